"""refjax: referring expression grounding and segmentation in JAX/Flax (OneRef, RAS)."""

__version__ = "0.1.0"
