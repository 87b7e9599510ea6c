"""refjax.losses."""
