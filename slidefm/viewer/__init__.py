"""``slidefm view``: a local web viewer (FastAPI + OpenSeadragon) for slides and model outputs."""
