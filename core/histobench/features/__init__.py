"""Feature extraction and the per-slide HDF5 feature cache."""
