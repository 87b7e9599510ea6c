"""refjax.train."""
