"""Names of the tissue-detection and border-tile modes, in a module without imports so the CLI
can offer them as choices without loading scikit-image (``slidefm --help`` stays fast)."""

BORDER_MODES = ("drop", "pad")  # partial tiles at the image edge: dropped, or padded with white
TISSUE_MODES = ("auto", "brightfield", "fluorescence")
