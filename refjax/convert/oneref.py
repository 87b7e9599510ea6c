"""Official OneRef checkpoints (``BEiT3ForGrounding`` state_dict) <-> refjax ``OneRef`` variables.

A OneRef ``.pth`` is ``{'model': state_dict, 'optimizer', ...}`` (spec/oneref.md 1.5) with the
backbone under ``beit3.`` and the heads at the top level (spec 2.6). The backbone goes through
``refjax.convert.beit3``'s rules under a ``beit3`` prefix (the vision position table is
interpolated to the target grid as there); the heads through the key map documented in
``refjax.models.oneref``. BatchNorm running statistics form a second tree (``batch_stats``);
``bn{k}.num_batches_tracked`` is dropped on import and written as a 0-d int64 0 on export.
MRefM pre-training heads (``mim_head``, ``mim_vts_head``, ``mlm_head``, ``mlm_sts_head``) and
the optional mid-layer ``layer_norm`` are reported as ignored.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from refjax.convert.beit3 import PREFIX, beit3_rules, interpolate_vision_positions
from refjax.convert.beit3 import to_torch as beit3_to_torch
from refjax.convert.common import (
    ConversionError,
    ConversionReport,
    Rule,
    flax_to_torch,
    linear_t,
    prefix_rules,
    torch_to_flax,
)
from refjax.models.beit3 import BEiT3Config
from refjax.models.oneref import OneRef

SEG_KEY = "seg_conv1.weight"
MREFM_PREFIXES = ("mim_head.", "mim_vts_head.", "mlm_head.", "mlm_sts_head.", "layer_norm.")
BN_STATS = (("running_mean", "mean"), ("running_var", "var"))


def head_rules(use_seg_head: bool) -> list[Rule]:
    """Rules for the head parameters (``params`` tree, top level)."""
    rules = [
        Rule("vision_head.weight", ("vision_head", "kernel"), linear_t, linear_t),
        Rule("language_head.weight", ("language_head", "kernel"), linear_t, linear_t),
        Rule("logit_scale", ("logit_scale",)),
    ]
    for name in ("visu_proj", "text_proj"):
        rules.append(Rule(f"{name}.weight", (name, "kernel"), linear_t, linear_t))
        rules.append(Rule(f"{name}.bias", (name, "bias")))
    for i in range(3):
        path = ("bbox_embed", f"layers_{i}")
        rules.append(Rule(f"bbox_embed.layers.{i}.weight", path + ("kernel",), linear_t, linear_t))
        rules.append(Rule(f"bbox_embed.layers.{i}.bias", path + ("bias",)))
    if use_seg_head:
        for k in (1, 2, 3):
            rules.append(Rule(f"seg_conv{k}.weight", (f"seg_conv{k}", "kernel")))  # (in,out,2,2)
            rules.append(Rule(f"bn{k}.weight", (f"bn{k}", "scale")))
            rules.append(Rule(f"bn{k}.bias", (f"bn{k}", "bias")))
    return rules


def batch_stats_rules(use_seg_head: bool) -> list[Rule]:
    """Rules for the BatchNorm running statistics (``batch_stats`` tree)."""
    if not use_seg_head:
        return []
    return [Rule(f"bn{k}.{t}", (f"bn{k}", f)) for k in (1, 2, 3) for t, f in BN_STATS]


def oneref_rules(cfg: BEiT3Config, use_seg_head: bool) -> list[Rule]:
    """All ``params`` rules: the prefixed BEiT-3 backbone plus the heads."""
    return prefix_rules(beit3_rules(cfg), PREFIX, ("beit3",)) + head_rules(use_seg_head)


def is_ignored(key: str) -> bool:
    """Known keys that have no refjax counterpart: MRefM heads and BN batch counters."""
    return key.startswith(MREFM_PREFIXES) or key.endswith(".num_batches_tracked")


def has_seg_head(state_dict: Mapping[str, Any]) -> bool:
    """A RES checkpoint (seg_conv/bn heads) rather than a REC-only one."""
    return SEG_KEY in state_dict


def variable_template(cfg: BEiT3Config, use_seg_head: bool) -> dict:
    """Unboxed variable shapes of ``OneRef(cfg, use_seg_head)`` (no computation)."""
    model = OneRef(cfg, use_seg_head=use_seg_head)
    shapes = jax.eval_shape(
        model.init,
        jax.random.key(0),
        jnp.zeros((1, 2), jnp.int32),
        jnp.zeros((1, 2), jnp.int32),
        jnp.zeros((1, cfg.img_size, cfg.img_size, cfg.in_chans), jnp.float32),
    )
    return nn.unbox(shapes)


def from_torch(
    state_dict: Mapping[str, np.ndarray],
    cfg: BEiT3Config,
    use_seg_head: bool | None = None,
    *,
    strict: bool = True,
) -> tuple[dict, ConversionReport]:
    """OneRef state_dict -> ``{'params': ..., ['batch_stats': ...]}`` for ``OneRef(cfg, seg)``.

    ``use_seg_head=None`` detects it from the presence of ``seg_conv1.weight``. Missing keys are
    an error with ``strict`` (named); unknown keys are reported in ``report.unexpected``; a
    shape that does not fit raises ``ConversionError`` naming the torch key.
    """
    if not any(k.startswith(PREFIX) for k in state_dict):
        raise ConversionError(f"not a OneRef state_dict: no '{PREFIX}*' backbone keys")
    seg = has_seg_head(state_dict) if use_seg_head is None else use_seg_head
    sd = dict(state_dict)
    pos = PREFIX + "encoder.embed_positions.A.weight"
    if pos in sd:
        sd[pos] = interpolate_vision_positions(np.asarray(sd[pos]), cfg.grid)
    template = variable_template(cfg, seg)
    stat_rules = batch_stats_rules(seg)
    stat_keys = {r.torch_key for r in stat_rules}
    params, report = torch_to_flax(
        sd,
        oneref_rules(cfg, seg),
        template["params"],
        scanned=cfg.scan,
        strict=strict,
        ignore=lambda k: k in stat_keys or is_ignored(k),
    )
    variables = {"params": params}
    if stat_rules:
        stats, stat_report = torch_to_flax(
            sd,
            stat_rules,
            template["batch_stats"],
            scanned=False,
            strict=strict,
            ignore=lambda k: True,
        )
        variables["batch_stats"] = stats
        report.converted += stat_report.converted
        report.missing += stat_report.missing
    report.ignored = sorted(k for k in sd if is_ignored(k))
    return variables, report


def to_torch(variables: Mapping, cfg: BEiT3Config, use_seg_head: bool) -> dict[str, np.ndarray]:
    """refjax ``OneRef`` variables -> a ``BEiT3ForGrounding`` state_dict (numpy, ``beit3.``
    prefix on the backbone), loadable with ``strict=True``."""
    v = nn.unbox(variables)
    params = v["params"]
    seg = sorted(k for k in params if k.startswith("seg_"))
    want = [f"seg_conv{k}" for k in (1, 2, 3)] if use_seg_head else []
    widths = {params[k]["kernel"].shape[1] for k in seg if k.startswith("seg_conv")}
    if seg != want or widths - {cfg.dim}:
        raise ConversionError(
            f"the RES head was built with refjax-only options (seg_dim / seg_convs): layers "
            f"{seg}, widths {sorted(widths)}; OneRef has {want} at width {cfg.dim}"
        )
    sd = beit3_to_torch(params["beit3"], cfg, prefix=PREFIX)
    sd.update(flax_to_torch(params, head_rules(use_seg_head), scanned=False))
    if use_seg_head:
        if "batch_stats" not in v:
            raise ConversionError("use_seg_head=True but the variables have no 'batch_stats'")
        sd.update(flax_to_torch(v["batch_stats"], batch_stats_rules(True), scanned=False))
        for k in (1, 2, 3):
            sd[f"bn{k}.num_batches_tracked"] = np.array(0, np.int64)
    return sd
