"""Per-GPU tuning profiles shipped as YAML package data."""
