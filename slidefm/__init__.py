"""slidefm: slide-level foundation model toolkit for computational pathology."""

__version__ = "0.1.0"
