"""File formats: the HDF5 feature schema, cohort manifests, atomic writes."""
