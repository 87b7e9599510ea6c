"""``require_torch()``: torch for parity tests; never a skip where REFJAX_REQUIRE_TORCH=1."""

import os

import pytest


def require_torch():
    """Import torch for a parity test.

    Where REFJAX_REQUIRE_TORCH=1 (Python 3.11 CI) a missing torch is an error, never a skip;
    elsewhere (Python 3.12, no CPU torch wheel) the test skips with the reason.
    """
    if os.environ.get("REFJAX_REQUIRE_TORCH") == "1":
        import torch

        return torch
    return pytest.importorskip(
        "torch", reason="torch is not installed (Python 3.12 CI has no CPU torch wheel)"
    )
