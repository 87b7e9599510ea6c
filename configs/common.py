"""Shared pieces of the config files: the ``get_config(arg)`` argument parser and common sections.

A config argument is ``"<variant>[,key=value...]"``, e.g. ``"tiny,task=res,data=tiny"``: the
first item (when it has no ``=``) picks the model size, the rest set the keys a config file
declares. Unknown keys and values outside a key's allowed set are errors naming them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

VARIANTS = ("tiny", "base", "large")


def parse_arg(
    arg: str | None,
    keys: Mapping[str, Sequence[str] | None],
    defaults: Mapping[str, str],
    variants: Sequence[str] = VARIANTS,
) -> dict[str, str]:
    """``"base,task=res"`` -> ``{"variant": "base", "task": "res", ...}`` with ``defaults``.

    ``keys`` maps each accepted key to its allowed values (``None``: any value).
    """
    out = {"variant": variants[0], **defaults}
    items = [s.strip() for s in (arg or "").split(",") if s.strip()]
    if items and "=" not in items[0]:
        out["variant"] = items.pop(0)
    if out["variant"] not in variants:
        raise ValueError(f"unknown variant {out['variant']!r}; one of {tuple(variants)}")
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in keys:
            raise ValueError(f"bad config arg item {item!r}; expected key=value with key in "
                             f"{sorted(keys)}")
        allowed = keys[key]
        if allowed is not None and value not in allowed:
            raise ValueError(f"{key}={value!r}: expected one of {tuple(allowed)}")
        out[key] = value
    return out


def default_data_dir() -> str:
    """``$REFJAX_DATA_DIR``, else ``~/tensorflow_datasets``."""
    return os.environ.get("REFJAX_DATA_DIR", os.path.expanduser("~/tensorflow_datasets"))


def mesh_section() -> dict[str, Any]:
    """The mesh axes (``data=-1`` takes every device not given to the others)."""
    return dict(data=-1, fsdp=1, tensor=1)


def optim_section(**values: Any) -> dict[str, Any]:
    """Every key ``refjax.train.optim.make_optimizer`` reads; ``values`` override."""
    base = dict(
        lr=1e-4, schedule="warmup_cosine", warmup_steps=0, min_lr_ratio=0.0, weight_decay=1e-4,
        b1=0.9, b2=0.999, eps=1e-8, wd_mask=None, frozen="", grad_clip_norm=0.0, accum_steps=1,
        lr_scale=(),
    )
    unknown = set(values) - set(base)
    if unknown:
        raise KeyError(f"unknown optimizer keys {sorted(unknown)}")
    return {**base, **values}


def train_section(**values: Any) -> dict[str, Any]:
    """Every key the trainer reads; ``values`` override."""
    base = dict(
        total_steps=None,  # None: epochs x steps per epoch
        epochs=0.0,
        log_every=50,
        eval_every=2000,
        ckpt_every=2000,
        keep=2,
        best_metric="loss",
        best_mode="max",
        seed=13,
        eval_max_batches=0,  # 0: whole split during training evals
        async_checkpoint=True,
        stop_after=0,  # >0: stop once step N's checkpoint is committed (see stop_hang)
        stop_hang=False,  # with stop_after: block instead of returning (to be killed in tests)
        progress=True,
    )
    unknown = set(values) - set(base)
    if unknown:
        raise KeyError(f"unknown train keys {sorted(unknown)}")
    return {**base, **values}
