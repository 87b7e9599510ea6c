"""Shared data fixtures. Import into a test module to use them::

    from tests.data_fixtures import refshapes_tiny_dir  # noqa: F401

``refshapes_tiny_dir`` (session scope) returns the tfds ``data_dir`` (a str) holding the RefShapes
``tiny`` config, prepared once per pytest session. Open it with
``refjax.data.sources.open_scenes("refshapes", split, refshapes_tiny_dir, config="tiny")``; the
version directory ``<data_dir>/refshapes/tiny/1.0.0`` also holds ``beit3.spm`` and
``tokenizer.model``. Treat it as read-only: other tests share it.
"""

from __future__ import annotations

import pytest

_BUILT: dict[str, str] = {}


@pytest.fixture(scope="session")
def refshapes_tiny_dir(tmp_path_factory) -> str:
    # A module-level cache: the fixture is imported into several modules (one FixtureDef each).
    if "tiny" not in _BUILT:
        from refjax.data.build import ensure_refshapes

        data_dir = str(tmp_path_factory.getbasetemp() / "refshapes_data")
        ensure_refshapes(data_dir, "tiny")
        _BUILT["tiny"] = data_dir
    return _BUILT["tiny"]
