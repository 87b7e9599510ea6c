"""Config files and overrides: ``load_config("configs/x.py:arg")``, ``--set key=value``, JSON."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
from collections.abc import Sequence
from typing import Any

import ml_collections


def config_file(name: str) -> str:
    """The file of a config ``name``: a path, else a name inside the shipped ``configs``
    package (``"oneref/rec_res"`` or ``"oneref/rec_res.py"``), so configs load by name when
    refjax is installed as a package."""
    if os.path.isfile(name):
        return name
    import importlib.resources

    rel = name if name.endswith(".py") else name + ".py"
    rel = rel[len("configs/"):] if rel.startswith("configs/") else rel
    try:
        candidate = importlib.resources.files("configs").joinpath(rel)
    except ModuleNotFoundError:
        candidate = None
    if candidate is not None and candidate.is_file():
        return str(candidate)
    raise FileNotFoundError(f"config file not found: {name} (a path, or a name under configs/ "
                            "such as oneref/rec_res)")


def load_config(spec: str) -> ml_collections.ConfigDict:
    """Import the config file of ``"path/to/config.py[:arg]"`` (or ``"oneref/rec_res:arg"``,
    see ``config_file``) and call ``get_config(arg)``."""
    name, _, arg = spec.partition(":")
    path = config_file(name)
    name = "refjax_config_" + os.path.splitext(os.path.basename(path))[0]
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise ImportError(f"cannot import config file {path}")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise AttributeError(f"{path} has no get_config(arg)")
    return module.get_config(arg or None)


def _parse_value(text: str, current: Any) -> Any:
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    if value is None:
        return None  # unset a field, whatever it held (e.g. data.tokenizer_path=None)
    if isinstance(current, tuple | list) and not isinstance(value, tuple | list):
        value = tuple(v.strip() for v in str(text).split(",") if v.strip())
    elif isinstance(current, str) and not isinstance(value, str):
        value = text  # e.g. a numeric-looking string
    return value


def apply_overrides(config: ml_collections.ConfigDict, sets: Sequence[str]) -> None:
    """Apply ``"a.b=value"`` items in place. Values are Python literals (else strings); a
    comma list sets a tuple field. Unknown keys raise ``KeyError`` (the config is locked)."""
    for item in sets:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects key=value, got {item!r}")
        *parents, leaf = key.strip().split(".")
        node = config
        for p in parents:
            if p not in node or not isinstance(node[p], ml_collections.ConfigDict):
                raise KeyError(f"unknown config key {key!r} (no section {p!r})")
            node = node[p]
        if leaf not in node:
            raise KeyError(f"unknown config key {key!r}")
        node[leaf] = _parse_value(text.strip(), node[leaf])


def to_json(config: ml_collections.ConfigDict) -> str:
    return json.dumps(json.loads(config.to_json()), indent=2, sort_keys=True)


def from_json(text: str) -> ml_collections.ConfigDict:
    """A locked ConfigDict from ``to_json`` output (lists come back as tuples)."""

    def fix(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: fix(v) for k, v in x.items()}
        if isinstance(x, list):
            return tuple(fix(v) for v in x)
        return x

    config = ml_collections.ConfigDict(fix(json.loads(text)))
    config.lock()
    return config
