"""Two-stage VL-Mamba training with TRL (`vlmamba train ...`, or `python -m training.<module>` in a checkout)."""
