"""Checkpoint converters and Hub packaging for VL-Mamba (run from a checkout: `python -m conversion.<module>`)."""
