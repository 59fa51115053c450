"""Names of the tissue-detection and border-tile modes, in a module without imports so the CLI
can offer them as choices without loading scikit-image (``slidefm --help`` stays fast)."""

BORDER_MODES = ("drop", "pad")  # partial tiles at the image edge: dropped, or padded with white
TISSUE_MODES = ("auto", "brightfield", "fluorescence")

# Allowed words of the ``encode-slides`` options that take one (the CLI's choices; the config
# checks them too).
ENCODE_CHOICES = {
    "stain_norm": ("none", "macenko"),
    "feature_dtype": ("float32", "float16"),
    "precision": ("auto", "bf16", "fp16", "fp32"),
    "border_tiles": BORDER_MODES,
}
