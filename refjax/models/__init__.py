"""refjax.models."""
