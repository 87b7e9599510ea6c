"""Build (prepare) refjax datasets: ``build_dataset(name, config, data_dir)``.

Dispatches by dataset name to a builder module in ``refjax.data.builders``, imported lazily.
A builder module may define ``build(name, config, data_dir, manual_dir) -> str``; otherwise its
import registers a tfds builder named ``name`` that is prepared here in ArrayRecord format.
"""

from __future__ import annotations

import importlib
import os

from refjax.data.tokenizers import BEIT3_FILE, LLAMA_FILE

BUILDER_MODULES = {
    "refshapes": "refjax.data.builders.refshapes",
    "refcoco": "refjax.data.builders.refcoco",
    "refcoco+": "refjax.data.builders.refcoco",
    "refcocog": "refjax.data.builders.refcoco",
    "grefcoco": "refjax.data.builders.grefcoco",
    "maskgroups_hq": "refjax.data.builders.maskgroups_hq",
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


def build_dataset(
    name: str, config: str | None, data_dir: str, manual_dir: str | None = None
) -> str:
    """Prepare dataset ``name`` (config ``config``) under ``data_dir``; return its version dir.

    RefShapes: ``<data_dir>/refshapes/<config>/1.0.0`` with the ArrayRecord files,
    ``dataset_info.json``, ``metadata.json`` and the tokenizers ``beit3.spm`` and
    ``tokenizer.model``. Already prepared datasets are left as they are.
    """
    module = _import_builder(name)
    if hasattr(module, "build"):
        return module.build(name, config, data_dir, manual_dir)
    import tensorflow_datasets as tfds

    full = f"{name}/{config}" if config else name
    builder = tfds.builder(full, data_dir=data_dir, file_format="array_record")
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
