"""The shipped presets, as package data: `--config NAME` finds NAME.yaml here (stages/config.py)."""
