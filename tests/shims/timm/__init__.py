"""Test-only stand-in for timm: torchscale imports only timm.models.layers.drop_path.

The real timm needs torchvision, which has no CPU build here (see spec/environment.md).
"""
