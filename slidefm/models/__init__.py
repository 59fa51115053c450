"""slidefm.models"""

# Names the CLI lists in ``--help``: kept here, free of torch, so parsing stays fast.
MIL_MODELS = ("mean", "max", "abmil", "transmil", "slide_encoder")
