"""Hugging Face checkpoint directories: ``config.json`` + ``*.safetensors`` (as ``save_pretrained``
writes them), read and written without torch.

A directory holds either one ``model.safetensors`` or shards listed by
``model.safetensors.index.json``; legacy ``pytorch_model.bin`` files are read through torch.
Arrays come back as numpy in their stored dtype (bfloat16 through ml_dtypes); converters cast.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from refjax.convert.common import ConversionError, load_state_dict

CONFIG = "config.json"
SAFETENSORS = "model.safetensors"
INDEX = "model.safetensors.index.json"
TORCH_BIN = "pytorch_model.bin"


def read_config(directory: str) -> dict[str, Any]:
    """``config.json`` of a checkpoint directory as a dict."""
    path = os.path.join(directory, CONFIG)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory} is not a Hugging Face checkpoint (no {CONFIG})")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_state_dict(directory: str) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint directory (single file, sharded, or ``pytorch_model.bin``)."""
    from safetensors import safe_open

    single, index = os.path.join(directory, SAFETENSORS), os.path.join(directory, INDEX)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.isfile(single):
        files = [SAFETENSORS]
    elif os.path.isfile(os.path.join(directory, TORCH_BIN)):
        return load_state_dict(os.path.join(directory, TORCH_BIN))
    else:
        raise FileNotFoundError(
            f"{directory}: no {SAFETENSORS}, {INDEX} or {TORCH_BIN} to read weights from"
        )
    out: dict[str, np.ndarray] = {}
    for name in files:
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{directory}: shard {name} listed in {INDEX} is missing")
        with safe_open(path, framework="numpy") as f:
            for key in f.keys():
                if key in out:
                    raise ConversionError(f"{directory}: tensor {key!r} appears in two shards")
                out[key] = f.get_tensor(key)
    return out


def read_checkpoint(directory: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``(config, state_dict)`` of a Hugging Face checkpoint directory."""
    return read_config(directory), read_state_dict(directory)


def strip_prefixes(
    state_dict: Mapping[str, np.ndarray], prefixes: Iterable[str]
) -> dict[str, np.ndarray]:
    """Keys with the first matching prefix removed (e.g. ``vision_model.`` of a two-tower
    CLIP checkpoint); keys matching no prefix are kept as they are."""
    prefixes = tuple(prefixes)
    out = {}
    for k, v in state_dict.items():
        for p in prefixes:
            if k.startswith(p):
                k = k[len(p):]
                break
        out[k] = v
    return out


def write_checkpoint(
    directory: str,
    config: Mapping[str, Any],
    state_dict: Mapping[str, np.ndarray],
    *,
    max_shard_bytes: int = 4 << 30,
) -> None:
    """Write ``config.json`` and the tensors (one file, or shards + index past
    ``max_shard_bytes``) in the layout ``from_pretrained`` reads. The directory must not exist."""
    from safetensors.numpy import save_file

    if os.path.exists(directory):
        raise FileExistsError(f"{directory} exists; remove it or choose another output")
    tmp = directory.rstrip("/") + ".tmp"
    os.makedirs(tmp)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for k in sorted(state_dict):
        v = np.array(state_dict[k], order="C")  # keeps 0-d shapes
        if shards[-1] and size + v.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += v.nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], os.path.join(tmp, SAFETENSORS), metadata=meta)
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(tmp, name), metadata=meta)
            weight_map.update({k: name for k in shard})
        total = sum(int(np.asarray(v).nbytes) for v in state_dict.values())
        with open(os.path.join(tmp, INDEX), "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(tmp, CONFIG), "w", encoding="utf-8") as f:
        json.dump(dict(config), f, indent=2, sort_keys=True)
    os.replace(tmp, directory)
