"""Checkpoint converters and Hub packaging for VL-Mamba.

Run as `vlmamba compose ...` (and the other `vlmamba` tools), or `python -m conversion.<module>` in a checkout.
"""
