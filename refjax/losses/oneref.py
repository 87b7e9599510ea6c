"""OneRef REC/RES losses (spec/oneref.md 2.4): pure ``(outputs, batch, config) -> (loss, metrics)``.

Batch keys: ``box`` (B,4) normalised cxcywh on the canvas, ``mask`` (B,H,W) canvas mask (the
rasterised GT box in REC, the object mask in RES), optional ``valid`` (B,) example weights
(0 for padded rows). Every term is ``sum_b valid_b * l_b / max(sum_b valid_b, 1)``, i.e. the
reference's ``sum / nb`` over the real examples.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from refjax.boxes import cxcywh_to_xyxy, generalized_box_iou, upsample_seg_logits

Array = jax.Array

KEYS = (
    "use_box_loss", "use_box_mask_constraint", "use_seg_loss", "l1", "giou", "box_mask_focal",
    "box_mask_dice", "seg_focal", "seg_dice", "focal_alpha", "focal_gamma",
)
_DUMMY_BOX = (0.5, 0.5, 1.0, 1.0)


def _get(config: Mapping[str, Any], key: str) -> Any:
    """``config[key]``; a key the config lacks is an error naming it (no silent default)."""
    try:
        return config[key]
    except (KeyError, AttributeError):
        raise KeyError(f"loss config lacks {key!r} (configs/oneref/*.py define: {KEYS})") from None


def _weighted_mean(per_sample: Array, valid: Array) -> Array:
    return jnp.sum(per_sample * valid) / jnp.maximum(jnp.sum(valid), 1.0)


def sigmoid_focal(logits: Array, targets: Array, alpha: float = 0.25, gamma: float = 2.0) -> Array:
    """Per-sample sigmoid focal loss (DETR form), mean over all non-batch elements -> (B,)."""
    x = logits.astype(jnp.float32).reshape(logits.shape[0], -1)
    t = targets.astype(jnp.float32).reshape(x.shape)
    p = jax.nn.sigmoid(x)
    ce = jnp.maximum(x, 0) - x * t + jnp.log1p(jnp.exp(-jnp.abs(x)))
    p_t = p * t + (1 - p) * (1 - t)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * t + (1 - alpha) * (1 - t)) * loss
    return jnp.mean(loss, axis=1)


def dice(logits: Array, targets: Array) -> Array:
    """Per-sample dice loss ``1 - (2 sum(sig*t) + 1) / (sum(sig) + sum(t) + 1)`` -> (B,)."""
    p = jax.nn.sigmoid(logits.astype(jnp.float32)).reshape(logits.shape[0], -1)
    t = targets.astype(jnp.float32).reshape(p.shape)
    return 1 - (2 * jnp.sum(p * t, axis=1) + 1) / (jnp.sum(p, axis=1) + jnp.sum(t, axis=1) + 1)


def patch_targets(mask: Array, num_patches: int) -> Array:
    """Top-left nearest downsample of canvas masks (B,H,W) to the patch grid, > 0.5 -> (B,P).

    PyTorch ``F.interpolate(mode='nearest')`` from H to g picks pixel ``p * r`` (p = H / g).
    """
    g = math.isqrt(num_patches)
    h, w = mask.shape[-2:]
    if g * g != num_patches or h % g or w % g:
        raise ValueError(f"mask {mask.shape} does not tile into a {g}x{g} patch grid")
    sub = mask[:, :: h // g, :: w // g].astype(jnp.float32)
    return (sub > 0.5).astype(jnp.float32).reshape(mask.shape[0], num_patches)


def oneref_loss(
    outputs: Mapping[str, Array], batch: Mapping[str, Array], config: Mapping[str, Any]
) -> tuple[Array, dict[str, Array]]:
    """Weighted sum of the enabled OneRef terms; metrics hold each unweighted term and ``loss``.

    ``config`` is ``config.loss`` (every key of ``KEYS``).
    """
    box = outputs["box"].astype(jnp.float32)
    bsz = box.shape[0]
    valid = batch.get("valid")
    valid = jnp.ones((bsz,), jnp.float32) if valid is None else valid.astype(jnp.float32)
    vmask = valid > 0
    metrics: dict[str, Array] = {}
    total = jnp.zeros((), jnp.float32)

    def add(name: str, weight_key: str, per_sample: Array) -> None:
        nonlocal total
        term = _weighted_mean(jnp.where(vmask, per_sample, 0.0), valid)
        metrics[f"loss_{name}"] = term
        total = total + _get(config, weight_key) * term

    alpha, gamma = _get(config, "focal_alpha"), _get(config, "focal_gamma")
    if _get(config, "use_box_loss"):
        # Padded rows get a harmless dummy target so neither value nor gradient can be NaN.
        gt = jnp.where(vmask[:, None], batch["box"].astype(jnp.float32), jnp.asarray(_DUMMY_BOX))
        add("l1", "l1", jnp.sum(jnp.abs(box - gt), axis=-1))
        giou = generalized_box_iou(cxcywh_to_xyxy(box), cxcywh_to_xyxy(gt))
        add("giou", "giou", 1 - giou)
    if _get(config, "use_box_mask_constraint"):
        sim = outputs["sim"]
        target = patch_targets(batch["mask"], sim.shape[1])
        add("box_mask_focal", "box_mask_focal", sigmoid_focal(sim, target, alpha, gamma))
        add("box_mask_dice", "box_mask_dice", dice(sim, target))
    if _get(config, "use_seg_loss"):
        mask = batch["mask"].astype(jnp.float32)
        logits = upsample_seg_logits(outputs["seg_logits"], mask.shape[-2:])
        add("seg_focal", "seg_focal", sigmoid_focal(logits, mask, alpha, gamma))
        add("seg_dice", "seg_dice", dice(logits, mask))
    metrics["loss"] = total
    return total, metrics
