"""Checkpoint conversion: resharding, Hugging Face export and import."""
