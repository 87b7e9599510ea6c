"""Build (prepare) refjax datasets: ``build_dataset(name, config, data_dir, manual_dir)``.

Dispatches by dataset name to a builder module in ``refjax.data.builders``, imported lazily.
A real-data module (RefCOCO/+/g, gRefCOCO, MaskGroups-HQ) lists its builder classes in a
``BUILDERS`` table (dataset name -> ``SceneBuilder`` subclass); :func:`get_builder` constructs
one (raw files from ``manual_dir``, ArrayRecord output, ``skip_bad_records``). Any other module
(RefShapes) registers a tfds builder named ``name`` on import, which is prepared here.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

from refjax.data.tokenizers import BEIT3_FILE, LLAMA_FILE

BUILDER_MODULES = {
    "refshapes": "refjax.data.builders.refshapes",
    "refcoco": "refjax.data.builders.refcoco",
    "refcoco+": "refjax.data.builders.refcoco",
    "refcoco_plus": "refjax.data.builders.refcoco",
    "refcocog": "refjax.data.builders.refcoco",
    "grefcoco": "refjax.data.builders.grefcoco",
    "maskgroups_hq": "refjax.data.builders.maskgroups_hq",
    "lcs558k_sam": "refjax.data.builders.lcs558k_sam",
}


def _import_builder(name: str):
    if name not in BUILDER_MODULES:
        raise ValueError(f"unknown dataset {name!r}; choose from {sorted(BUILDER_MODULES)}")
    module = BUILDER_MODULES[name]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != module:  # a missing dependency inside the module: not ours to hide
            raise
        raise NotImplementedError(
            f"dataset {name!r} needs builder module {module}, which does not exist yet"
        ) from e


def get_builder(
    name: str,
    config: str | None = None,
    data_dir: str | os.PathLike | None = None,
    manual_dir: str | os.PathLike | None = None,
    *,
    skip_bad_records: bool = False,
    span_parser: str = "auto",
    sts_scores: str | os.PathLike | None = None,
) -> Any:
    """The tfds builder of real dataset ``name`` (a ``BUILDERS`` entry of its module).

    ``span_parser`` picks the subject/object word parser of builders that store word spans
    (``refjax.data.subject_object``: auto | spacy | rules | none); ``sts_scores``: the
    optional JSON side file of per-word STS scores (``coco_common.load_word_scores``).

    ``config``: the builder config (None: the builder's first, e.g. refcoco ``unc``); datasets
    without configs (maskgroups_hq) refuse one. ``manual_dir`` holds the raw files. The builder
    writes ArrayRecord files under ``data_dir``; ``skip_bad_records`` skips, logs and counts
    bad inputs instead of raising (``refjax.data.builders.coco_common.BadRecordPolicy``).
    """
    module = _import_builder(name)
    builders = getattr(module, "BUILDERS", None)
    if builders is None or name not in builders:
        raise ValueError(f"dataset {name!r} is not a real-data builder (no BUILDERS entry)")
    cls = builders[name]
    if config is not None and not cls.BUILDER_CONFIGS:
        raise ValueError(f"{name} has no configs (got {config!r})")
    return cls(
        config=config,
        data_dir=None if data_dir is None else os.fspath(data_dir),
        manual_dir=manual_dir,
        skip_bad_records=skip_bad_records,
        span_parser=span_parser,
        sts_scores=sts_scores,
        file_format="array_record",
    )


def build_dataset(
    name: str,
    config: str | None,
    data_dir: str | os.PathLike,
    manual_dir: str | os.PathLike | None = None,
    skip_bad_records: bool = False,
    span_parser: str = "auto",
    sts_scores: str | os.PathLike | None = None,
) -> str:
    """Prepare dataset ``name`` (config ``config``) under ``data_dir``; return its version dir.

    Real data reads its raw files from ``manual_dir``; ``skip_bad_records`` (real data only:
    RefShapes records are generated and verified, there is nothing to skip) skips, logs and
    counts bad inputs per split in ``metadata.json`` instead of raising ``BadRecordError``; a
    split left without any record then raises ``EmptySplitError`` naming it and the skips.

    RefShapes: ``<data_dir>/refshapes/<config>/<VERSION>`` with the ArrayRecord files,
    ``dataset_info.json``, ``metadata.json`` and the tokenizers ``beit3.spm`` and
    ``tokenizer.model``. Already prepared datasets are left as they are.
    """
    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()  # refjax's builders show their own progress per split
    module = _import_builder(name)
    if hasattr(module, "BUILDERS"):
        builder = get_builder(name, config, data_dir, manual_dir,
                              skip_bad_records=skip_bad_records, span_parser=span_parser,
                              sts_scores=sts_scores)
        builder.download_and_prepare()
        return str(builder.data_path)
    if sts_scores is not None:
        raise ValueError(f"{name} takes no sts_scores file: its STS labels come from its word "
                         "spans (refjax.tasks.mrefm)")
    full = f"{name}/{config}" if config else name
    builder = tfds.builder(full, data_dir=os.fspath(data_dir), file_format="array_record")
    dl_config = tfds.download.DownloadConfig(manual_dir=manual_dir)
    builder.download_and_prepare(download_config=dl_config)
    return str(builder.data_path)


def ensure_refshapes(data_dir: str, config: str = "default") -> str:
    """The RefShapes version dir for ``config``, building it only if absent or incomplete."""
    from refjax.data.builders.refshapes import VERSION

    path = os.path.join(data_dir, "refshapes", config, VERSION)
    done = all(
        os.path.isfile(os.path.join(path, f))
        for f in ("dataset_info.json", "metadata.json", BEIT3_FILE, LLAMA_FILE)
    )
    return path if done else build_dataset("refshapes", config, data_dir)
