"""Shared converter machinery: reading PyTorch checkpoints, declarative key rules, reports,
and Orbax parameter checkpoints.

A converter is a list of :class:`Rule` (torch key <-> Flax parameter path, with a transform
hook each way). ``torch_to_flax`` applies the rules, checks shapes against the model's
``eval_shape`` template, and reports unknown and missing keys by name.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

Path = tuple[str, ...]
Transform = Callable[[np.ndarray], np.ndarray]


def identity(x: np.ndarray) -> np.ndarray:
    return x


def linear_t(x: np.ndarray) -> np.ndarray:
    """torch Linear weight (out, in) <-> Flax Dense kernel (in, out)."""
    return np.ascontiguousarray(x.T)


def conv_to_flax(x: np.ndarray) -> np.ndarray:
    """torch Conv2d weight (out, in, kh, kw) -> Flax kernel (kh, kw, in, out)."""
    return np.ascontiguousarray(x.transpose(2, 3, 1, 0))


def conv_to_torch(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(3, 2, 0, 1))


@dataclasses.dataclass(frozen=True)
class Rule:
    """One tensor: ``torch_key`` <-> Flax ``path`` with transforms for each direction.

    ``layer`` is the layer index of a per-layer tensor (stacked along axis 0 of ``path`` when
    the model is scanned), or None.
    """

    torch_key: str
    path: Path
    to_flax: Transform = identity
    to_torch: Transform = identity
    layer: int | None = None


@dataclasses.dataclass
class ConversionReport:
    """What a conversion used, ignored and could not find."""

    converted: list[str] = dataclasses.field(default_factory=list)
    unexpected: list[str] = dataclasses.field(default_factory=list)
    missing: list[str] = dataclasses.field(default_factory=list)
    ignored: list[str] = dataclasses.field(default_factory=list)  # known keys left out on purpose

    def summary(self) -> str:
        parts = [f"{len(self.converted)} tensors converted"]
        if self.ignored:
            parts.append(f"{len(self.ignored)} known keys ignored: {self.ignored}")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unknown keys ignored: {self.unexpected}")
        if self.missing:
            parts.append(f"{len(self.missing)} missing keys: {self.missing}")
        return "; ".join(parts)


class ConversionError(ValueError):
    """A checkpoint that does not fit the model (the message names the key)."""


def prefix_rules(rules: list[Rule], torch_prefix: str, path_prefix: Path) -> list[Rule]:
    """``rules`` for a submodule: torch keys under ``torch_prefix``, Flax paths under
    ``path_prefix`` (e.g. the BEiT-3 rules inside a wrapper: ``'beit3.'``, ``('beit3',)``)."""
    return [
        dataclasses.replace(
            r, torch_key=torch_prefix + r.torch_key, path=tuple(path_prefix) + r.path
        )
        for r in rules
    ]


def _to_numpy(v: Any) -> np.ndarray:
    if isinstance(v, np.ndarray):
        return v
    if hasattr(v, "detach"):  # torch.Tensor
        t = v.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":
            t = t.float()
        return t.numpy()
    return np.asarray(v)


def load_state_dict(path: str, model_keys: tuple[str, ...] = ("model", "module")) -> dict:
    """Read a checkpoint into a flat ``{key: np.ndarray}``.

    ``.safetensors`` is read with safetensors (no torch needed); anything else with
    ``torch.load``. A wrapper dict (``{'model': state_dict, 'optimizer': ...}``) is unwrapped
    through the first of ``model_keys`` present, as the official loaders do.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="numpy") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            f"reading {path} needs torch; convert it to .safetensors or install torch"
        ) from e
    obj = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(obj, Mapping):
        for k in model_keys:
            if k in obj and isinstance(obj[k], Mapping):
                obj = obj[k]
                break
    if not isinstance(obj, Mapping):
        raise ConversionError(f"{path}: expected a state_dict, got {type(obj).__name__}")
    return {k: _to_numpy(v) for k, v in obj.items() if hasattr(v, "shape")}


def save_safetensors(path: str, state_dict: Mapping[str, np.ndarray]) -> None:
    from safetensors.numpy import save_file

    save_file({k: np.array(v, order="C") for k, v in state_dict.items()}, path)  # keeps 0-d


def _get(tree: Mapping, path: Path) -> Any:
    for p in path:
        tree = tree[p]
    return tree


def _set(tree: dict, path: Path, value: Any) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def torch_to_flax(
    state_dict: Mapping[str, np.ndarray],
    rules: list[Rule],
    template: Mapping,
    *,
    scanned: bool,
    strict: bool = True,
    ignore: Callable[[str], bool] = lambda k: False,
) -> tuple[dict, ConversionReport]:
    """Apply ``rules`` to ``state_dict``; check every shape against ``template``.

    ``template`` is the unboxed ``eval_shape`` parameter tree. With ``strict``, missing keys are
    an error; unknown keys are always reported (and logged), never silently used.
    """
    report = ConversionReport()
    out: dict = {}
    stacks: dict[Path, dict[int, tuple[str, np.ndarray]]] = {}
    known = set()
    for r in rules:
        known.add(r.torch_key)
        if r.torch_key not in state_dict:
            report.missing.append(r.torch_key)
            continue
        value = r.to_flax(np.asarray(state_dict[r.torch_key]))
        report.converted.append(r.torch_key)
        if r.layer is not None and scanned:
            stacks.setdefault(r.path, {})[r.layer] = (r.torch_key, value)
        else:
            _set(out, r.path, value)
    for path, per_layer in stacks.items():
        n = max(per_layer) + 1
        if sorted(per_layer) != list(range(n)):
            continue  # missing layers already reported
        expected = tuple(_get(template, path).shape[1:])
        for key, v in per_layer.values():
            if tuple(v.shape) != expected:
                raise ConversionError(
                    f"{key}: shape {tuple(v.shape)} does not fit parameter "
                    f"{'/'.join(path)} (per layer {expected})"
                )
        _set(out, path, np.stack([per_layer[i][1] for i in range(n)]))
    report.unexpected = sorted(k for k in state_dict if k not in known and not ignore(k))
    if report.missing and strict:
        raise ConversionError(f"missing keys in checkpoint: {report.missing}")
    _check_shapes(out, template, rules)
    if report.unexpected:
        log.warning("ignored %d unknown keys: %s", len(report.unexpected), report.unexpected)
    return out, report


def _check_shapes(out: Mapping, template: Mapping, rules: list[Rule]) -> None:
    by_path: dict[Path, str] = {}
    for r in rules:
        by_path.setdefault(r.path, r.torch_key)

    def walk(o, t, prefix: Path):
        for k, v in o.items():
            path = prefix + (k,)
            if k not in t:
                raise ConversionError(f"{by_path.get(path, '/'.join(path))}: no such parameter")
            if isinstance(v, Mapping):
                walk(v, t[k], path)
            elif tuple(v.shape) != tuple(t[k].shape):
                key = by_path.get(path, "/".join(path))
                raise ConversionError(
                    f"{key}: shape {tuple(v.shape)} does not fit parameter "
                    f"{'/'.join(path)} of shape {tuple(t[k].shape)}"
                )

    walk(out, template, ())


def flax_to_torch(params: Mapping, rules: list[Rule], *, scanned: bool) -> dict[str, np.ndarray]:
    """Inverse of :func:`torch_to_flax`: a flat torch-keyed dict of numpy arrays."""
    sd = {}
    for r in rules:
        v = np.asarray(_get(params, r.path))
        if r.layer is not None and scanned:
            v = v[r.layer]
        sd[r.torch_key] = r.to_torch(v)
    return sd


def save_params(
    path: str,
    params: Mapping,
    metadata: Mapping[str, Any],
    *,
    batch_stats: Mapping | None = None,
) -> None:
    """Write ``{'params': params}`` (plus ``'batch_stats'`` when given) as an Orbax checkpoint
    and ``refjax_meta.json`` beside it.

    Written to a temporary directory and renamed, so a crash never leaves a half checkpoint.
    """
    import orbax.checkpoint as ocp

    path = os.path.abspath(path)
    if os.path.exists(path):
        raise FileExistsError(f"{path} exists; remove it or choose another output")
    tree = {"params": params}
    if batch_stats:
        tree["batch_stats"] = batch_stats
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(os.path.join(path, "params"), tree)
    ckptr.wait_until_finished()
    with open(os.path.join(path, "refjax_meta.json.tmp"), "w") as f:
        json.dump(dict(metadata), f, indent=2, sort_keys=True)
    os.replace(os.path.join(path, "refjax_meta.json.tmp"), os.path.join(path, "refjax_meta.json"))


def load_params(path: str) -> tuple[dict, dict]:
    """Restore a checkpoint written by :func:`save_params`: ``(params, metadata)``."""
    variables, meta = load_variables(path)
    return variables["params"], meta


def load_variables(path: str) -> tuple[dict, dict]:
    """Restore a :func:`save_params` checkpoint: ``({'params', ['batch_stats']}, metadata)``."""
    import orbax.checkpoint as ocp

    path = os.path.abspath(path)
    meta_file = os.path.join(path, "refjax_meta.json")
    if not os.path.exists(meta_file):
        raise FileNotFoundError(f"{path} is not a refjax parameter checkpoint (no {meta_file})")
    with open(meta_file) as f:
        meta = json.load(f)
    restored = ocp.StandardCheckpointer().restore(os.path.join(path, "params"))
    return dict(restored), meta
