"""ml_collections configs for the experiments (``--config configs/<name>.py``)."""
