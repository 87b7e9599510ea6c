"""Shared data fixtures. Import into a test module to use them::

    from tests.data_fixtures import refshapes_tiny_dir  # noqa: F401

``refshapes_tiny_dir`` (session scope) returns the tfds ``data_dir`` (a str) holding the RefShapes
``tiny`` config, prepared once per pytest session. Open it with
``refjax.data.sources.open_scenes("refshapes", split, refshapes_tiny_dir, config="tiny")``; the
version directory ``<data_dir>/refshapes/tiny/<VERSION>`` also holds ``beit3.spm`` and
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


def data_config(data_dir: str, **overrides):
    """A complete ``config.data`` section (every key ``make_pipeline`` reads) for the tiny
    RefShapes under ``data_dir``; ``overrides`` replace values."""
    import ml_collections

    base = dict(
        dataset="refshapes", dataset_config="tiny", data_dir=data_dir, image_size=64,
        max_text_len=24, batch_size=8, eval_batch_size=None, num_workers=0, read_threads=2,
        prefetch_buffer=16, skip_bad_records=False, truncate_text=True, tokenizer_path=None,
        num_scales=7, image_mean=(0.485, 0.456, 0.406), image_std=(0.229, 0.224, 0.225),
        next_timeout_s=0.0,
    )
    unknown = set(overrides) - set(base)
    if unknown:
        raise KeyError(f"unknown data keys {sorted(unknown)}")
    return ml_collections.ConfigDict(base | overrides)
