"""refjax.evaluate."""
