"""Optax setup from a ConfigDict: AdamW, LR schedules, frozen parameters, clipping, accumulation.

Config fields (all required: the config files are the one source of values;
``configs/common.py:optim_section`` fills them)::

    lr: 5e-5                    # peak learning rate
    b1: 0.9, b2: 0.999, eps: 1e-8
    weight_decay: 1e-4          # decoupled (torch.optim.AdamW semantics), on every parameter
    wd_mask: None               # regex(es); if set, only matching parameter paths are decayed
    schedule: "warmup_cosine"   # or "epoch_cosine" (OneRef's per-epoch LambdaLR) or "constant"
    warmup_steps: 0
    min_lr_ratio: 0.0           # cosine end value as a fraction of lr (warmup_cosine only)
    frozen: ()                  # regex(es) of frozen parameter paths, e.g. ("beit3/",)
    lr_scale: ()                # "regex=factor" items: matching paths learn at lr * factor
                                # (e.g. ("mask_projector/=0.1",)); first match wins. Optional
                                # (configs saved before it existed have none)
    grad_clip_norm: None        # global-norm clipping of the trainable gradients (None/0: off)
    accum_steps: 1              # gradient accumulation (micro-batches per update)

Paths are '/'-joined (``param_path``) and regexes are matched with ``re.match`` (anchored at the
start, so ``"beit3/"`` selects the whole backbone). Step counts for schedules are optimizer updates,
i.e. after accumulation.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from refjax.parallel import path_str

KEYS = (
    "lr", "b1", "b2", "eps", "weight_decay", "wd_mask", "schedule", "warmup_steps",
    "min_lr_ratio", "frozen", "grad_clip_norm", "accum_steps", "lr_scale",
)
OPTIONAL_KEYS = ("lr_scale",)


def param_path(tree: Any) -> Any:
    """A tree like ``tree`` whose leaves are their '/'-joined paths, e.g. 'beit3/encoder/...'."""
    return jax.tree_util.tree_map_with_path(lambda p, _: path_str(p), tree)


def _patterns(value: str | Sequence[str] | None) -> tuple[str, ...]:
    if not value:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


def path_mask(tree: Any, patterns: str | Sequence[str] | None) -> Any:
    """Bool tree: True where the leaf's path matches any of the regexes (``re.match``)."""
    compiled = [re.compile(p) for p in _patterns(patterns)]
    return jax.tree.map(lambda p: any(c.match(p) for c in compiled), param_path(tree))


def _get(cfg: Mapping[str, Any], key: str) -> Any:
    return cfg[key]


def _check_keys(cfg: Mapping[str, Any]) -> None:
    """Every key of ``KEYS`` and nothing else (the config files are the one source of values)."""
    unknown = set(cfg.keys()) - set(KEYS)
    if unknown:
        raise KeyError(f"unknown optimizer config keys {sorted(unknown)}; known: {sorted(KEYS)}")
    missing = [k for k in KEYS if k not in cfg and k not in OPTIONAL_KEYS]
    if missing:
        raise KeyError(f"optimizer config lacks {missing} (configs/common.py optim_section "
                       "lists every key)")


def epoch_cosine(lr: float, num_epochs: int, steps_per_epoch: int) -> optax.Schedule:
    """OneRef's per-epoch LambdaLR: lr * 0.5 * (1 + cos(pi * e / E)), constant within epoch e."""
    if num_epochs <= 0 or steps_per_epoch <= 0:
        raise ValueError(
            f"epoch_cosine needs positive epochs/steps, got {num_epochs}, {steps_per_epoch}"
        )

    def schedule(step: jax.Array | int) -> jax.Array:
        epoch = jnp.asarray(step) // steps_per_epoch
        return lr * 0.5 * (1.0 + jnp.cos(jnp.pi * epoch / num_epochs))

    return schedule


def make_schedule(
    cfg: Mapping[str, Any], total_steps: int, steps_per_epoch: int | None = None
) -> optax.Schedule:
    """The learning-rate schedule (per optimizer update) described by ``cfg``.

    ``warmup_steps`` (linear from 0) applies to every schedule kind.
    """
    _check_keys(cfg)
    lr = float(cfg["lr"])
    kind = _get(cfg, "schedule")
    warmup = int(_get(cfg, "warmup_steps"))
    if kind == "constant":
        main: optax.Schedule = optax.constant_schedule(lr)
    elif kind == "warmup_cosine":
        decay_steps = max(int(total_steps) - warmup, 1)
        main = optax.cosine_decay_schedule(lr, decay_steps, alpha=float(_get(cfg, "min_lr_ratio")))
    elif kind == "epoch_cosine":
        if not steps_per_epoch:
            raise ValueError("schedule 'epoch_cosine' needs steps_per_epoch")
        epochs = math.ceil(int(total_steps) / steps_per_epoch)
        main = epoch_cosine(lr, epochs, steps_per_epoch)
        if warmup:
            # The epoch count keeps running through the warm-up, as with a per-epoch LambdaLR.
            ramp = optax.linear_schedule(0.0, 1.0, warmup)
            return lambda step: main(step) * ramp(step)
        return main
    else:
        raise ValueError(f"unknown schedule {kind!r}: use warmup_cosine, epoch_cosine or constant")
    if not warmup:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def parse_lr_scale(value: str | Sequence[str] | None) -> tuple[tuple[str, float], ...]:
    """``("regex=factor", ...)`` -> ``((regex, factor), ...)``, with a clear error on a bad item."""
    out = []
    for item in _patterns(value):
        pattern, sep, factor = str(item).rpartition("=")
        try:
            f = float(factor)
        except ValueError:
            f = None
        if not sep or not pattern or f is None or f < 0:
            raise ValueError(f"optim.lr_scale item {item!r} is not 'regex=factor' with a "
                             "factor >= 0")
        re.compile(pattern)
        out.append((pattern, f))
    return tuple(out)


def scale_by_path(scales: Sequence[tuple[str, float]]) -> optax.GradientTransformation:
    """Multiply each update by the factor of the first ``(regex, factor)`` its path matches
    (``re.match``; 1 where none does): per-group learning rates, weight decay included (it is
    part of AdamW's update, as in torch parameter groups)."""
    compiled = [(re.compile(p), f) for p, f in scales]

    def factor(path: str) -> float:
        return next((f for c, f in compiled if c.match(path)), 1.0)

    def scaled(path: Any, u: Any) -> Any:
        f = factor(path_str(path))
        return u if f == 1.0 else u * f

    def update(updates, state, params=None):
        del params
        return jax.tree_util.tree_map_with_path(scaled, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(
    cfg: Mapping[str, Any],
    total_steps: int,
    steps_per_epoch: int | None = None,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """``(tx, schedule)`` for ``cfg`` (see the module docstring).

    Frozen parameters get exactly zero updates, no optimizer state and no weight decay; clipping
    and accumulation see only the trainable parameters.
    """
    _check_keys(cfg)
    schedule = make_schedule(cfg, total_steps, steps_per_epoch)
    wd_patterns = _patterns(_get(cfg, "wd_mask"))
    wd_mask: Callable[[Any], Any] | None = (
        (lambda params: path_mask(params, wd_patterns)) if wd_patterns else None
    )
    inner = [
        optax.adamw(
            schedule,
            b1=float(_get(cfg, "b1")),
            b2=float(_get(cfg, "b2")),
            eps=float(_get(cfg, "eps")),
            weight_decay=float(_get(cfg, "weight_decay")),
            mask=wd_mask,
        )
    ]
    scales = parse_lr_scale(cfg.get("lr_scale") if hasattr(cfg, "get") else None)
    if scales:
        inner.append(scale_by_path(scales))
    clip = _get(cfg, "grad_clip_norm")
    if clip:
        inner.insert(0, optax.clip_by_global_norm(float(clip)))
    tx: optax.GradientTransformation = optax.chain(*inner)
    accum = int(_get(cfg, "accum_steps"))
    if accum < 1:
        raise ValueError(f"accum_steps must be >= 1, got {accum}")
    if accum > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=accum).gradient_transformation()
    frozen = _patterns(_get(cfg, "frozen"))
    if frozen:
        labels = lambda params: jax.tree.map(
            lambda f: "frozen" if f else "train", path_mask(params, frozen)
        )
        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
    return tx, schedule
