"""CS3F: cross-subject zero-shot anomaly detection in 3D medical images, as a MONAI bundle."""
