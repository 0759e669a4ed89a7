"""Data: CXR-LT manifests, the synthetic demo, the resized cache, datasets and transforms."""
