"""Two-stage VL-Mamba training with TRL (run from a checkout: `python -m training.<module>`)."""
