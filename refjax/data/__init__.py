"""refjax.data."""
