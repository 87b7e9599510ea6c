"""OneRef evaluation metrics (spec/oneref.md 4.4): REC Acc@0.5 and RES mIoU / oIoU.

Per-sample quantities are computed by jittable functions (``rec_per_sample``,
``res_per_sample``, ``oneref_batch_metrics``); they are reduced on the host by
``MetricAccumulator`` as plain sums, so results can be summed across processes
(``MetricAccumulator.allreduce`` / ``allreduce_sums``). Unlike the reference, oIoU is reduced
over all processes, and padded rows are dropped through ``valid`` instead of being duplicated.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from refjax.boxes import Letterbox, box_iou, cxcywh_to_xyxy, mask_iou, upsample_seg_logits

Array = Any
_FIELDS = ("count", "correct", "mask_count", "iou_sum", "inter", "union")


# ----------------------------------------------------------------------------- per sample
def rec_per_sample(pred_box: Array, gt_box: Array) -> dict[str, Array]:
    """Box IoU and Acc@0.5 hit per sample; both boxes normalised cxcywh on the canvas.

    The prediction is converted to xyxy and clamped to [0, 1]; IoU = I / (U + 1e-16);
    correct iff IoU >= 0.5. Computed in float32 like the reference (there the 1e-16 vanishes
    against any non-empty union, so an IoU of exactly 0.5 counts as correct).
    """
    xp = jnp if isinstance(pred_box, jax.Array) else np
    pred = xp.clip(cxcywh_to_xyxy(xp.asarray(pred_box, xp.float32)), 0.0, 1.0)
    gt = cxcywh_to_xyxy(xp.asarray(gt_box, xp.float32))
    iou = box_iou(pred, gt, eps=1e-16)
    return {"box_iou": iou, "correct": iou >= 0.5}


def res_pred_mask(seg_logits: Array, size: tuple[int, int]) -> Array:
    """Binary mask at ``size`` exactly as the reference eval: the logits go through
    ``relu(sigmoid(x) - 0.5)`` *before* bilinear (half-pixel) upsampling, then ``!= 0``.

    This is not the same as thresholding upsampled logits: a canvas pixel is on whenever any
    low-res pixel it interpolates from (with non-zero weight) has sigmoid > 0.5.
    """
    x = jax.nn.relu(jax.nn.sigmoid(jnp.asarray(seg_logits, jnp.float32)) - 0.5)
    return upsample_seg_logits(x, size) > 0


def res_per_sample(seg_logits: Array, gt_mask: Array) -> dict[str, Array]:
    """Intersection, union and IoU per sample at the canvas resolution of ``gt_mask``."""
    pred = res_pred_mask(seg_logits, gt_mask.shape[-2:])
    inter, union, iou = mask_iou(pred, jnp.asarray(gt_mask) > 0)
    return {"mask_inter": inter, "mask_union": union, "mask_iou": iou}


def oneref_batch_metrics(outputs: Mapping[str, Array], batch: Mapping[str, Array]) -> dict:
    """Per-sample metric arrays for a batch (jittable); ``seg_logits`` adds the RES terms.

    ``batch['valid']`` (if present) is passed through so ``MetricAccumulator.update`` can drop
    padded rows.
    """
    out = rec_per_sample(outputs["box"], batch["box"])
    if "seg_logits" in outputs:
        out.update(res_per_sample(outputs["seg_logits"], batch["mask"]))
    if batch.get("valid") is not None:
        out["valid"] = batch["valid"]
    return out


def res_original_resolution(
    pred_canvas: np.ndarray, letterbox: Letterbox, gt_orig: np.ndarray
) -> tuple[float, float, float]:
    """(I, U, IoU) of one canvas prediction mapped back to the original image resolution
    (``Letterbox.inverse_mask``) against the original-resolution GT mask."""
    pred = letterbox.inverse_mask(np.asarray(pred_canvas).astype(bool))
    inter, union, iou = mask_iou(pred, np.asarray(gt_orig).astype(bool))
    return float(inter), float(union), float(iou)


# ----------------------------------------------------------------------------- reduction
def allreduce_sums(tree: Any) -> Any:
    """Sum a pytree of numpy scalars/arrays over all jax processes (float64 result).

    Values travel as float32 hi/lo pairs (jax has x64 off), so float64 sums such as pixel
    counts survive with ~1e-14 relative error.
    """
    from jax.experimental import multihost_utils

    leaves, treedef = jax.tree.flatten(tree)
    flat = [np.asarray(x, np.float64).ravel() for x in leaves]
    sizes = [f.size for f in flat]
    x = np.concatenate(flat) if flat else np.zeros((0,), np.float64)
    hi = x.astype(np.float32)
    lo = (x - hi.astype(np.float64)).astype(np.float32)
    gathered = np.asarray(multihost_utils.process_allgather(np.stack([hi, lo])), np.float64)
    total = gathered.reshape(-1, 2, x.size).sum(axis=0).sum(axis=0)
    out, start = [], 0
    for leaf, n in zip(leaves, sizes):
        out.append(total[start : start + n].reshape(np.shape(leaf)))
        start += n
    return jax.tree.unflatten(treedef, out)


def _zeros() -> dict[str, float]:
    return dict.fromkeys(_FIELDS, 0.0)


class MetricAccumulator:
    """Running sums for Acc@0.5, mIoU and oIoU, overall and per expression kind.

    Declare the kinds up front (``kinds=``) when reducing across processes: every process
    must hold the same set of kind keys (``allreduce`` checks this).
    """

    def __init__(self, kinds: Sequence[str] = ()):
        self.total = _zeros()
        self.by_kind: dict[str, dict[str, float]] = {k: _zeros() for k in kinds}

    @staticmethod
    def _sums(m: Mapping[str, np.ndarray], sel: np.ndarray) -> dict[str, float]:
        s = _zeros()
        s["count"] = float(sel.sum())
        s["correct"] = float(np.sum(m["correct"][sel]))
        if "mask_iou" in m:
            s["mask_count"] = s["count"]
            s["iou_sum"] = float(np.sum(m["mask_iou"][sel]))
            s["inter"] = float(np.sum(m["mask_inter"][sel]))
            s["union"] = float(np.sum(m["mask_union"][sel]))
        return s

    @staticmethod
    def _add(dst: dict[str, float], src: Mapping[str, float]) -> None:
        for f in _FIELDS:
            dst[f] += float(src[f])

    def update(
        self,
        batch_metrics: Mapping[str, Array],
        kinds: Sequence[str] | None = None,
        valid: Array | None = None,
    ) -> MetricAccumulator:
        """Add one batch of per-sample metrics (from ``oneref_batch_metrics``).

        ``valid`` (or ``batch_metrics['valid']``) drops padded rows; ``kinds`` gives each
        row's expression kind for the per-kind breakdown.
        """
        m = {k: np.asarray(v, np.float64) for k, v in batch_metrics.items()}
        n = m["correct"].shape[0]
        if valid is None:
            valid = batch_metrics.get("valid")
        sel = np.ones(n, bool) if valid is None else np.asarray(valid) > 0
        self._add(self.total, self._sums(m, sel))
        if kinds is not None:
            kinds_arr = np.asarray(kinds, dtype=object)
            if kinds_arr.shape != (n,):
                raise ValueError(f"kinds has shape {kinds_arr.shape}, expected ({n},)")
            for kind in sorted(set(kinds_arr[sel].tolist())):
                acc = self.by_kind.setdefault(kind, _zeros())
                self._add(acc, self._sums(m, sel & (kinds_arr == kind)))
        return self

    def merge(self, other: MetricAccumulator) -> MetricAccumulator:
        """Add another accumulator's sums into this one (in place; returns self)."""
        self._add(self.total, other.total)
        for kind, sums in other.by_kind.items():
            self._add(self.by_kind.setdefault(kind, _zeros()), sums)
        return self

    def state(self) -> dict[str, dict[str, float]]:
        return {
            "total": dict(self.total),
            **{f"kind/{k}": dict(v) for k, v in self.by_kind.items()},
        }

    def allreduce(self) -> MetricAccumulator:
        """A new accumulator holding the sums over all jax processes."""
        key_hash = zlib.crc32("\x00".join(sorted(self.by_kind)).encode()) % (1 << 24)
        hashes = allreduce_sums({"h": np.float64(key_hash), "n": np.float64(1)})
        if hashes["h"] != key_hash * hashes["n"]:
            raise ValueError("processes hold different expression kinds; declare kinds= up front")
        reduced = allreduce_sums(self.state())
        out = MetricAccumulator()
        out.total = {f: float(v) for f, v in reduced["total"].items()}
        out.by_kind = {
            k: {f: float(v) for f, v in reduced[f"kind/{k}"].items()} for k in self.by_kind
        }
        return out

    @staticmethod
    def _result(s: Mapping[str, float]) -> dict[str, float]:
        res = {"count": s["count"]}
        if s["count"] > 0:
            res["acc@0.5"] = s["correct"] / s["count"]
        if s["mask_count"] > 0:
            res["miou"] = s["iou_sum"] / s["mask_count"]
            res["oiou"] = s["inter"] / s["union"] if s["union"] > 0 else 0.0
        return res

    def result(self) -> dict[str, float]:
        """``acc@0.5``, ``miou``, ``oiou`` and ``count``, plus ``<kind>/<metric>`` entries."""
        out = self._result(self.total)
        for kind in sorted(self.by_kind):
            for name, value in self._result(self.by_kind[kind]).items():
                out[f"{kind}/{name}"] = value
        return out
