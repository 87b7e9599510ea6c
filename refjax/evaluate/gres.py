"""RAS mask-group metrics (spec/ras.md 9; the pool oracle of 8.4; GRES conventions of 14).

Per sample k: the prediction P_k is the union of the selected candidates (empty if none is
selected, *or if every selected candidate has no pixels*), the GT M_k the union of the target
masks (empty for a no-target expression); I_k = |P_k & M_k|, U_k = |P_k | M_k|, in pixels at the
original image resolution. Over a set of samples:

- ``ciou`` = sum_k I_k / sum_k U_k. With the ReLA/GRES conventions this needs no special case:
  a no-target sample adds I = U = 0 when predicted empty and I = 0, U = |P_k| otherwise; a
  targeted sample predicted empty adds I = 0, U = |M_k|.
- ``giou`` = mean_k IoU_k, IoU_k = I_k / U_k for a targeted sample (0 if U_k = 0) and, for a
  no-target sample, 1 if P_k is empty else 0.
- ``n_acc`` = no-target samples predicted empty / no-target samples; ``t_acc`` = targeted samples
  predicted non-empty / targeted samples; ``pr@0.7/0.8/0.9`` = targeted samples with
  IoU_k >= x / targeted samples (``>=`` as ReLA's evaluator).
- ``oracle_ciou``: cIoU of the greedy pool oracle (spec 8.4, ``oracle_per_sample``).
- ``miou`` / ``oiou``: the RES names (``refjax.evaluate.metrics``: mean IoU, cumulative IoU) of
  the same sums, reported for every group without no-target samples, where they equal
  ``giou`` / ``ciou`` by definition (single-target RES data, RefShapes kinds), so a RAS result
  prints in ``refjax.evaluate.report.per_kind_table`` beside OneRef's.

Undefined metrics are left out of ``GresAccumulator.result()`` rather than reported as 0 (ReLA
prints 0): ``n_acc`` without no-target samples, ``t_acc`` and ``pr@x`` without targeted samples,
``ciou`` when sum U = 0 (only no-target samples, all predicted empty), ``oracle_ciou`` without
oracle inputs; ``miou``/``oiou`` when the group has no-target samples.

Per-sample quantities come from ``gres_per_sample`` (numpy or jax, jittable) or, at original
resolution, from ``original_resolution_stats`` (numpy). ``GresAccumulator`` sums them per group
(overall, per expression kind, with / without reference masks) on the host and reduces the sums
over all jax processes exactly (``refjax.evaluate.metrics.allreduce_sums``).

Geometry: the RAS canvas is LLaVA's ``expand2square`` (centred pad to a square of side
max(w, h), then a resize of the square). ``refjax.boxes.Letterbox`` resizes first and pads by
whole canvas pixels, so it cannot express the fractional pad offset of ``expand2square``;
``refjax.boxes.Expand2Square`` (re-exported here) is its geometry (mask forward / inverse maps).

Exact scoring without the original masks: ``pool_atoms`` reduces a pool and a GT mask at the
original resolution to fixed-size atoms from which ``atom_terms`` gives the terms of any
selection (the RAS task's rows carry them; its eval step scores on the device).
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from refjax.boxes import (  # noqa: F401  (Expand2Square re-exported)
    Expand2Square,
    Letterbox,
    _xp,
    mask_iou,
)
from refjax.data.refshapes_render import greedy_oracle
from refjax.data.transforms import KINDS
from refjax.evaluate.metrics import allreduce_sums

Array = Any

PR_THRESHOLDS = (0.7, 0.8, 0.9)
WITH_REF, WITHOUT_REF = "with_ref", "without_ref"
# Samples with at least one target: OneRef's REC/RES split of the same data (its examples have
# a target), so ``targeted/miou`` / ``targeted/oiou`` compare the two systems on one split.
TARGETED = "targeted"
OVERALL = ""
# The 8 standard RES splits whose mean cIoU is the "RES" headline (spec 9).
RES_SPLITS = (
    "refcoco/val",
    "refcoco/testA",
    "refcoco/testB",
    "refcoco+/val",
    "refcoco+/testA",
    "refcoco+/testB",
    "refcocog/val",
    "refcocog/test",
)
FIELDS = (
    "count",
    "inter",
    "union",
    "iou_sum",
    "no_target",
    "no_target_empty",
    "targeted",
    "targeted_nonempty",
    *(f"pr{t}" for t in PR_THRESHOLDS),
    "oracle_count",
    "oracle_inter",
    "oracle_union",
)
_F = {f: i for i, f in enumerate(FIELDS)}


# ----------------------------------------------------------------------------- geometry
def letterbox_from_row(row: Array, size: int) -> Letterbox:
    """The ``Letterbox`` of a row's ``letterbox`` vector ``[orig_w, orig_h, new_w, new_h, left,
    top]`` (as ``refjax.data.transforms.eval_letterbox`` writes it)."""
    ow, oh, nw, nh, left, top = (int(v) for v in np.asarray(row)[:6])
    return Letterbox(ow, oh, size, size / max(ow, oh), nw, nh, left, top)


def geometry_from_row(row: Array, size: int, geometry: str) -> Letterbox | Expand2Square:
    """``geometry`` ``"letterbox"`` (OneRef) or ``"expand2square"`` (RAS) from a row's
    ``letterbox`` vector (for ``expand2square`` only its first two entries, orig_w and orig_h,
    are read)."""
    if geometry == "letterbox":
        return letterbox_from_row(row, size)
    if geometry == "expand2square":
        ow, oh = (int(v) for v in np.asarray(row)[:2])
        return Expand2Square(ow, oh, size)
    raise ValueError(f"unknown geometry {geometry!r}; expected 'letterbox' or 'expand2square'")


# ----------------------------------------------------------------------------- per sample
def selected_union(pool_masks: Array, selected: Array, pool_valid: Array | None = None) -> Array:
    """Union of the selected candidates: ``(..., N, H, W)`` masks, ``(..., N)`` selection (and
    validity) -> ``(..., H, W)`` bool. Jittable; numpy in -> numpy out."""
    xp = _xp(pool_masks)
    sel = xp.asarray(selected).astype(bool)
    if pool_valid is not None:
        sel = sel & (xp.asarray(pool_valid) > 0)
    return xp.any(xp.asarray(pool_masks).astype(bool) & sel[..., None, None], axis=-3)


def gres_per_sample(pred: Array, gt: Array, has_target: Array | None = None) -> dict[str, Array]:
    """Per-sample GRES terms of ``(..., H, W)`` predicted and GT union masks (jittable).

    Returns ``inter``, ``union`` (``refjax.boxes.mask_iou``), ``pred_area``, ``has_target``
    (``has_target`` if given, e.g. ``num_targets > 0``, else ``gt`` non-empty) and ``iou``, the
    sample's gIoU term: I/U (0 if U = 0) when targeted, ``pred_area == 0`` for no-target.
    """
    xp = _xp(pred)
    p = xp.asarray(pred).astype(bool)
    g = xp.asarray(gt).astype(bool)
    inter, union, iou = mask_iou(p, g)
    pred_area = xp.sum(p, axis=(-2, -1)).astype(inter.dtype)
    if has_target is None:
        targeted = xp.any(g, axis=(-2, -1))
    else:
        targeted = xp.asarray(has_target) > 0
    term = xp.where(targeted, iou, (pred_area == 0).astype(iou.dtype))
    return {
        "inter": inter,
        "union": union,
        "pred_area": pred_area,
        "has_target": targeted,
        "iou": term,
    }


def oracle_per_sample(
    pool_masks: np.ndarray, target: np.ndarray, pool_valid: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """The greedy pool oracle of spec 8.4 for one sample (numpy): ``(N, H, W)`` pool, ``(H, W)``
    target union -> ``oracle_inter``, ``oracle_union`` (pixels) and ``oracle_selected`` (N,).

    Candidates are taken in decreasing IoA with the target union and kept while they raise the
    union IoU (``refjax.data.refshapes_render.greedy_oracle``: a candidate that does not raise
    it is skipped). A no-target sample selects nothing (I = U = 0).
    """
    pool = np.asarray(pool_masks).astype(bool)
    if pool_valid is not None:
        pool = pool[np.asarray(pool_valid) > 0]
        index = np.flatnonzero(np.asarray(pool_valid) > 0)
    else:
        index = np.arange(len(pool))
    chosen, inter, union = greedy_oracle(pool, np.asarray(target).astype(bool))
    selected = np.zeros(len(np.asarray(pool_masks)), bool)
    selected[index[chosen]] = True
    return {
        "oracle_inter": np.float64(inter),
        "oracle_union": np.float64(union),
        "oracle_selected": selected,
    }


def original_resolution_stats(
    pred_canvas: np.ndarray,
    geometry: Letterbox | Expand2Square,
    gt_orig: np.ndarray,
    has_target: bool | None = None,
    pool_canvas: np.ndarray | None = None,
    pool_valid: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """One sample's ``gres_per_sample`` terms at the original resolution (numpy scalars): the
    canvas prediction mapped back by ``geometry.inverse_mask`` against the original GT mask;
    with ``pool_canvas`` (N, S, S) also the oracle, the pool mapped back the same way."""
    pred = geometry.inverse_mask(np.asarray(pred_canvas).astype(bool))
    gt = np.asarray(gt_orig).astype(bool)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction maps to {pred.shape}, GT mask is {gt.shape}")
    out = gres_per_sample(pred, gt, has_target)
    if pool_canvas is not None:
        pool = geometry.inverse_mask(np.asarray(pool_canvas).astype(bool))
        oracle = oracle_per_sample(pool, gt if out["has_target"] else np.zeros_like(gt), pool_valid)
        out.update(oracle_inter=oracle["oracle_inter"], oracle_union=oracle["oracle_union"])
    return out


def pool_atoms(
    pool: np.ndarray, gt: np.ndarray, max_atoms: int
) -> dict[str, np.ndarray]:
    """Exact original-resolution GRES terms of *any* selection from a pool, in fixed shapes.

    An atom is the set of pixels covered by exactly the same candidates (one non-empty
    membership pattern of the ``(N, H, W)`` pool). The union of a selection ``s`` covers atom
    ``a`` iff ``members[a] & s`` is non-empty, so ``pred_area = sum_a covered_a area_a``,
    ``I = sum_a covered_a gt_a`` and ``U = |GT| + pred_area - I`` are integer sums over atoms
    (``atom_terms``): the model's selection is scored at the original resolution on the device,
    without the original masks. Returns ``atom_members`` uint8 (max_atoms, N), ``atom_area``
    and ``atom_gt`` int32 (max_atoms,) (pixels, and pixels inside ``gt``), ``gt_area`` int32,
    ``atom_count`` (the true number of atoms) and ``atom_exact`` (1 when it fits). With more
    atoms than ``max_atoms`` the largest ``max_atoms`` are kept and the others' pixels count as
    never predicted (``atom_exact`` = 0; the metrics report such rows).
    """
    p = np.asarray(pool).astype(bool)
    g = np.asarray(gt).astype(bool)
    n = len(p)
    if p.ndim != 3 or p.shape[1:] != g.shape:
        raise ValueError(f"pool {p.shape} and GT {g.shape} do not match")
    members = np.zeros((max_atoms, n), np.uint8)
    area = np.zeros(max_atoms, np.int32)
    gt_px = np.zeros(max_atoms, np.int32)
    out = {"atom_members": members, "atom_area": area, "atom_gt": gt_px,
           "gt_area": np.int32(g.sum()), "atom_count": np.int32(0), "atom_exact": np.int32(1)}
    flat = p.reshape(n, -1)
    cov = flat.any(axis=0) if n else np.zeros(g.size, bool)
    if not cov.any():
        return out
    codes = np.ascontiguousarray(np.packbits(flat[:, cov].T, axis=1))
    nbytes = codes.shape[1]
    keys = codes.view(np.dtype((np.void, nbytes))).ravel()
    uniq, inv, counts = np.unique(keys, return_inverse=True, return_counts=True)
    inside = np.bincount(inv.ravel(), weights=g.ravel()[cov], minlength=len(uniq))
    bits = np.unpackbits(uniq.view(np.uint8).reshape(len(uniq), nbytes), axis=1)[:, :n]
    order = np.argsort(-counts, kind="stable")[:max_atoms]
    k = len(order)
    members[:k] = bits[order]
    area[:k] = counts[order]
    gt_px[:k] = np.round(inside[order]).astype(np.int64)
    out["atom_count"] = np.int32(len(uniq))
    out["atom_exact"] = np.int32(len(uniq) <= max_atoms)
    return out


def atom_terms(selected: Array, members: Array, area: Array, gt_px: Array,
               gt_area: Array) -> dict[str, Array]:
    """``inter``, ``union``, ``pred_area`` (int32) of selections ``(..., N)`` from the atoms of
    ``pool_atoms`` (``(..., A, N)``, ``(..., A)``, ``(..., A)``, ``(...)``). Jittable; numpy in
    -> numpy out."""
    xp = _xp(members)
    sel = xp.asarray(selected).astype(xp.int32)
    hit = xp.sum(xp.asarray(members).astype(xp.int32) * sel[..., None, :], axis=-1) > 0
    pred = xp.sum(xp.where(hit, xp.asarray(area), 0), axis=-1).astype(xp.int32)
    inter = xp.sum(xp.where(hit, xp.asarray(gt_px), 0), axis=-1).astype(xp.int32)
    union = (xp.asarray(gt_area).astype(xp.int32) + pred - inter).astype(xp.int32)
    return {"inter": inter, "union": union, "pred_area": pred}


def res_headline(ciou_by_split: Mapping[str, float]) -> float:
    """The RES headline of spec 9: the mean cIoU over the 8 standard splits (``RES_SPLITS``);
    raises ``KeyError`` naming the missing splits."""
    missing = [s for s in RES_SPLITS if s not in ciou_by_split]
    if missing:
        raise KeyError(f"RES headline needs all 8 splits; missing {missing}")
    return float(np.mean([float(ciou_by_split[s]) for s in RES_SPLITS]))


# ----------------------------------------------------------------------------- accumulator
class GresAccumulator:
    """Host sums of the GRES terms, overall, per expression kind and with / without reference
    masks; the ``refjax.tasks.base.Accumulator`` protocol.

    ``update(rows)`` takes numpy per-sample arrays (leading batch axis) with ``valid`` and either

    - the terms: ``inter``, ``union``, ``pred_area`` and ``has_target`` (or ``num_targets``),
      optionally ``oracle_inter`` / ``oracle_union`` (from ``gres_per_sample``,
      ``original_resolution_stats``, ``oracle_per_sample``); or
    - masks: ``pred_mask`` (B, S, S) or ``selected`` (B, N) with ``pool_masks`` (B, N, S, S)
      (and ``pool_valid``), and ``gt_mask`` (B, S, S); with ``pool_masks`` the oracle is added.
      With ``geometry`` set, every mask is mapped back to the original resolution through the
      row's ``letterbox`` vector (``geometry_from_row``); the GT is then the canvas GT mapped
      back, i.e. at the canvas' level of detail. Exact original-resolution scoring takes the
      terms from ``original_resolution_stats`` with the original GT mask.

    Groups: ``kind`` (ids into ``kinds``; unknown ids count as ``kinds[0]``) and, for ORES,
    ``has_ref`` (or ``ref_valid`` (B, R) / ``ref_count``): ``with_ref`` / ``without_ref``.
    Every process must use the same ``kinds`` (``allreduce`` checks).
    """

    def __init__(
        self,
        kinds: Sequence[str] = KINDS,
        geometry: str | None = None,
        size: int | None = None,
    ):
        if geometry is not None and size is None:
            raise ValueError("geometry needs the canvas size")
        self.kinds = tuple(kinds)
        self.geometry, self.size = geometry, size
        self.groups = (OVERALL, *self.kinds, WITH_REF, WITHOUT_REF, TARGETED)
        self.sums = np.zeros((len(self.groups), len(FIELDS)), np.float64)

    # -- per-sample terms from rows ------------------------------------------------------
    def _terms(self, rows: Mapping[str, Any]) -> dict[str, np.ndarray]:
        if "inter" in rows:
            t = {k: np.asarray(rows[k], np.float64) for k in ("inter", "union", "pred_area")}
            t["has_target"] = self._has_target(rows, None)
            for k in ("oracle_inter", "oracle_union"):
                if k in rows:
                    t[k] = np.asarray(rows[k], np.float64)
            if ("oracle_inter" in t) != ("oracle_union" in t):
                raise ValueError("rows need both oracle_inter and oracle_union")
            return t
        if "gt_mask" not in rows or not ("pred_mask" in rows or "selected" in rows):
            raise ValueError(
                "rows need the terms (inter, union, pred_area) or masks (pred_mask or selected "
                f"with pool_masks, and gt_mask); got {sorted(rows)}"
            )
        return self._terms_from_masks(rows)

    def _has_target(self, rows: Mapping[str, Any], gt: np.ndarray | None) -> np.ndarray:
        if "has_target" in rows:
            return np.asarray(rows["has_target"]) > 0
        if "num_targets" in rows:
            return np.asarray(rows["num_targets"]) > 0
        if gt is not None:
            return np.array([m.any() for m in gt], bool)
        raise ValueError("rows need has_target or num_targets")

    def _terms_from_masks(self, rows: Mapping[str, Any]) -> dict[str, np.ndarray]:
        gt_c = np.asarray(rows["gt_mask"]).astype(bool)
        pool_c = rows.get("pool_masks")
        pool_valid = rows.get("pool_valid")
        if "pred_mask" in rows:
            pred_c = np.asarray(rows["pred_mask"]).astype(bool)
        else:
            if pool_c is None:
                raise ValueError("rows with 'selected' need 'pool_masks'")
            pred_c = selected_union(np.asarray(pool_c), np.asarray(rows["selected"]), pool_valid)
        targeted = self._has_target(rows, gt_c)
        out: dict[str, list[float]] = {
            k: [] for k in ("inter", "union", "pred_area", "oracle_inter", "oracle_union")
        }
        for b in range(len(gt_c)):
            pred, gt = pred_c[b], gt_c[b]
            pool = None if pool_c is None else np.asarray(pool_c[b]).astype(bool)
            if self.geometry is not None:
                geo = geometry_from_row(rows["letterbox"][b], self.size, self.geometry)
                pred, gt = geo.inverse_mask(pred), geo.inverse_mask(gt)
                pool = None if pool is None else geo.inverse_mask(pool)
            s = gres_per_sample(pred, gt, targeted[b])
            for k in ("inter", "union", "pred_area"):
                out[k].append(float(s[k]))
            if pool is not None:
                valid = None if pool_valid is None else np.asarray(pool_valid[b])
                o = oracle_per_sample(pool, gt if targeted[b] else np.zeros_like(gt), valid)
                out["oracle_inter"].append(float(o["oracle_inter"]))
                out["oracle_union"].append(float(o["oracle_union"]))
        keys = ("inter", "union", "pred_area")
        if pool_c is not None:
            keys += ("oracle_inter", "oracle_union")
        t = {k: np.asarray(out[k], np.float64) for k in keys}
        t["has_target"] = targeted
        return t

    # -- accumulation ------------------------------------------------------------------------
    @staticmethod
    def _fields(t: Mapping[str, np.ndarray]) -> np.ndarray:
        """(n, len(FIELDS)) per-sample contributions."""
        inter, union, pred_area = t["inter"], t["union"], t["pred_area"]
        n = inter.shape[0]
        targeted = np.asarray(t["has_target"], bool).reshape(n)
        empty = pred_area == 0
        iou = np.where(union > 0, inter / np.maximum(union, 1.0), 0.0)  # float64 on purpose
        term = np.where(targeted, iou, empty.astype(np.float64))
        f = np.zeros((n, len(FIELDS)), np.float64)
        f[:, _F["count"]] = 1.0
        f[:, _F["inter"]] = inter
        f[:, _F["union"]] = union
        f[:, _F["iou_sum"]] = term
        f[:, _F["no_target"]] = ~targeted
        f[:, _F["no_target_empty"]] = ~targeted & empty
        f[:, _F["targeted"]] = targeted
        f[:, _F["targeted_nonempty"]] = targeted & ~empty
        for thr in PR_THRESHOLDS:
            f[:, _F[f"pr{thr}"]] = targeted & (iou >= thr)
        if "oracle_inter" in t:
            f[:, _F["oracle_count"]] = 1.0
            f[:, _F["oracle_inter"]] = t["oracle_inter"]
            f[:, _F["oracle_union"]] = t["oracle_union"]
        return f

    def _group_masks(self, rows: Mapping[str, Any], n: int) -> dict[int, np.ndarray]:
        groups = {0: np.ones(n, bool)}
        if "kind" in rows:
            ids = np.asarray(rows["kind"]).astype(np.int64).reshape(n)
            ids = np.where((ids >= 0) & (ids < len(self.kinds)), ids, 0)
            for k in np.unique(ids):
                groups[1 + int(k)] = ids == k
        has_ref = None
        if "has_ref" in rows:
            has_ref = np.asarray(rows["has_ref"]).reshape(n) > 0
        elif "ref_valid" in rows:
            has_ref = np.asarray(rows["ref_valid"]).reshape(n, -1).sum(axis=1) > 0
        elif "ref_count" in rows:
            has_ref = np.asarray(rows["ref_count"]).reshape(n) > 0
        if has_ref is not None:
            groups[self.groups.index(WITH_REF)] = has_ref
            groups[self.groups.index(WITHOUT_REF)] = ~has_ref
        return groups

    def update(self, rows: Mapping[str, Any]) -> None:
        """Add one batch of this process's rows (see the class docstring); ``valid`` = 0 rows
        (padding) are dropped."""
        t = self._terms(rows)
        f = self._fields(t)
        n = f.shape[0]
        valid = np.asarray(rows["valid"]).reshape(n) > 0 if "valid" in rows else np.ones(n, bool)
        groups = self._group_masks(rows, n)
        groups[self.groups.index(TARGETED)] = f[:, _F["targeted"]] > 0
        for g, sel in groups.items():
            self.sums[g] += f[sel & valid].sum(axis=0)

    def merge(self, other: GresAccumulator) -> GresAccumulator:
        """Add another accumulator's sums (same groups) into this one; returns self."""
        if other.groups != self.groups:
            raise ValueError("accumulators with different groups")
        self.sums += other.sums
        return self

    def allreduce(self) -> GresAccumulator:
        """A new accumulator holding the sums over all jax processes."""
        # Groups first (a fixed-size check), so that processes with different groups fail
        # here instead of gathering arrays of different shapes.
        key = zlib.crc32("\x00".join(self.groups).encode()) % (1 << 24)
        check = allreduce_sums({"h": np.float64(key), "n": np.float64(1)})
        if check["h"] != key * check["n"]:
            raise ValueError("processes hold different metric groups; use the same kinds")
        out = GresAccumulator(self.kinds, self.geometry, self.size)
        out.sums = np.asarray(allreduce_sums(self.sums), np.float64).reshape(self.sums.shape)
        return out

    # -- results -------------------------------------------------------------------------------
    @staticmethod
    def _result(s: np.ndarray) -> dict[str, float]:
        v = {f: float(s[i]) for i, f in enumerate(FIELDS)}
        res = {"count": v["count"]}
        if v["count"] == 0:
            return res
        res["giou"] = v["iou_sum"] / v["count"]
        if v["union"] > 0:
            res["ciou"] = v["inter"] / v["union"]
        if v["no_target"] > 0:
            res["n_acc"] = v["no_target_empty"] / v["no_target"]
        if v["targeted"] > 0:
            res["t_acc"] = v["targeted_nonempty"] / v["targeted"]
            for thr in PR_THRESHOLDS:
                res[f"pr@{thr}"] = v[f"pr{thr}"] / v["targeted"]
        if v["oracle_count"] > 0 and v["oracle_union"] > 0:
            res["oracle_ciou"] = v["oracle_inter"] / v["oracle_union"]
        res["no_target_count"] = v["no_target"]
        if v["no_target"] == 0:
            res["miou"] = res["giou"]
            if "ciou" in res:
                res["oiou"] = res["ciou"]
        return res

    def result(self) -> dict[str, float]:
        """Overall metrics (module docstring) and ``<group>/<metric>`` for every non-empty
        group (expression kinds, ``with_ref``, ``without_ref``, ``targeted``: the samples with
        a target); undefined metrics are absent."""
        out = self._result(self.sums[0])
        for g, name in enumerate(self.groups[1:], start=1):
            if self.sums[g, _F["count"]] > 0:
                out.update({f"{name}/{k}": x for k, x in self._result(self.sums[g]).items()})
        return out
