"""refjax.convert."""
