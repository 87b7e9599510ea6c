"""Candidate mask pools for RAS prediction (spec/ras.md 2): read a SAM run's COCO-RLE JSON, check
a pool, or build a class-agnostic pool with a classical method when no segmenter is at hand.

- ``load_pool_json``: the JSON a SAM ``SamAutomaticMaskGenerator(output_mode="coco_rle")`` run
  writes (a list of ``{"segmentation": {"size": [H, W], "counts": str}, ...}``), a bare list of
  RLE dicts, or ``{"annotations": [...]}`` (COCO); bad input raises ``BadRecordError`` naming
  the file and the field (``[3].segmentation``: wrong size, counts that do not decode; ``masks``
  / ``annotations``: an empty pool).
- ``check_pool``: the pool checks of a record (a mask of the wrong size, an empty pool).
- ``auto_pool``: a class-agnostic pool from scikit-image (see its docstring). It is a stand-in
  for a fresh machine: real use wants SAM masks.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from refjax.boxes import mask_iou
from refjax.data.errors import BadRecordError
from refjax.data.transforms import resize_masks


# ----------------------------------------------------------------------------- checks
def check_pool(
    masks: np.ndarray | Sequence[np.ndarray],
    height: int,
    width: int,
    record_id: str,
    field: str = "pool_masks",
) -> np.ndarray:
    """A record's candidate pool as uint8 ``(N, height, width)`` in {0, 1}.

    Raises ``BadRecordError(record_id, "<field>[i]")`` for a mask that is not 2-D or not of the
    image size, and ``BadRecordError(record_id, field)`` for an empty pool. Masks without pixels
    are kept (selecting one counts as an empty prediction in the metrics).
    """
    hw = (int(height), int(width))
    if isinstance(masks, np.ndarray) and masks.ndim == 3:
        items: Sequence[Any] = list(masks)
    elif isinstance(masks, np.ndarray) and masks.ndim != 3:
        raise BadRecordError(record_id, field, f"expected (N, H, W) masks, got shape {masks.shape}")
    else:
        items = list(masks)
    if not items:
        raise BadRecordError(record_id, field, "empty candidate pool (no masks)")
    out = np.zeros((len(items), *hw), np.uint8)
    for i, m in enumerate(items):
        m = np.asarray(m)
        if m.shape != hw:
            raise BadRecordError(
                record_id, f"{field}[{i}]", f"mask of size {m.shape} != image size {hw} (HxW)"
            )
        out[i] = m > 0
    return out


def load_pool_json(path: str | os.PathLike, height: int, width: int) -> np.ndarray:
    """Read a COCO-RLE pool file (module docstring) -> uint8 ``(N, height, width)``.

    Each entry is an RLE dict (``{"size": [H, W], "counts": str | list}``), a COCO polygon list,
    or a dict holding one under ``"segmentation"`` (SAM / COCO annotations); order is kept.
    Errors are ``BadRecordError`` with the file path as record id.
    """
    from refjax.data.builders.coco_common import decode_segmentation

    rid = str(path)
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise BadRecordError(rid, "file", f"cannot read the pool file ({e})") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise BadRecordError(rid, "file", f"not JSON ({e})") from e
    if isinstance(data, dict):
        if not isinstance(data.get("annotations"), list):
            raise BadRecordError(
                rid, "annotations", "expected a list of masks or {'annotations': [...]}"
            )
        items, field = data["annotations"], "annotations"
    elif isinstance(data, list):
        items, field = data, "masks"
    else:
        raise BadRecordError(rid, "file", f"expected a JSON list or object, got {type(data)}")
    if not items:
        raise BadRecordError(rid, field, "empty candidate pool (no masks)")
    masks = []
    for i, item in enumerate(items):
        prefix = "annotations" if field == "annotations" else ""
        where = f"{prefix}[{i}]"
        seg = item
        if isinstance(item, dict) and "segmentation" in item:
            seg, where = item["segmentation"], f"{where}.segmentation"
        masks.append(decode_segmentation(seg, height, width, rid, where))
    return check_pool(np.stack(masks), height, width, rid, field)


# ----------------------------------------------------------------------------- auto pool
def _adjacent_pairs(labels: np.ndarray) -> np.ndarray:
    """``(E, 2)`` int64 pairs ``a < b`` of 4-adjacent labels, sorted and unique."""
    n = int(labels.max()) + 1
    codes = []
    for a, b in ((labels[:, :-1], labels[:, 1:]), (labels[:-1, :], labels[1:, :])):
        diff = a != b
        lo = np.minimum(a[diff], b[diff]).astype(np.int64)
        hi = np.maximum(a[diff], b[diff]).astype(np.int64)
        codes.append(lo * n + hi)
    u = np.unique(np.concatenate(codes))
    return np.stack([u // n, u % n], axis=1)


def _levels(
    image: np.ndarray,
    scale: float,
    sigma: float,
    min_size: int,
    thresholds: Sequence[float],
) -> list[np.ndarray]:
    """Label maps: the Felzenszwalb over-segmentation, then its regions merged by mean colour at
    each threshold (coarser with larger thresholds).

    Merging is ``skimage.graph.cut_threshold`` on ``rag_mean_color``'s graph (regions joined
    when an adjacency edge of mean-colour distance below the threshold connects them), done
    here with numpy and ``scipy.sparse.csgraph`` on 4-adjacency: the skimage RAG is built pixel
    by pixel in Python and takes seconds on a 512-pixel image.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    from skimage import segmentation

    base = segmentation.felzenszwalb(image, scale=scale, sigma=sigma, min_size=min_size)
    levels = [base]
    n = int(base.max()) + 1
    if n == 1:
        return levels
    flat = base.ravel()
    count = np.bincount(flat, minlength=n).astype(np.float64)
    pix = image.reshape(-1, image.shape[-1]).astype(np.float64)
    mean = (
        np.stack(
            [np.bincount(flat, weights=pix[:, c], minlength=n) for c in range(pix.shape[1])], 1
        )
        / np.maximum(count, 1)[:, None]
    )
    pairs = _adjacent_pairs(base)
    dist = np.linalg.norm(mean[pairs[:, 0]] - mean[pairs[:, 1]], axis=1)
    for t in sorted(thresholds):
        e = pairs[dist < float(t)]
        graph = coo_matrix((np.ones(len(e)), (e[:, 0], e[:, 1])), shape=(n, n))
        _, comp = connected_components(graph, directed=False)
        levels.append(comp[base])
    return levels


def auto_pool(
    image: np.ndarray,
    max_masks: int = 24,
    *,
    scale: float = 100.0,
    sigmas: Sequence[float] = (0.0, 0.8),
    merge_thresholds: Sequence[float] = (12.0, 25.0, 45.0),
    min_area: float = 0.002,
    max_area: float = 0.9,
    dedupe_iou: float = 0.9,
    pair_unions: bool = True,
    work_size: int = 512,
) -> np.ndarray:
    """A class-agnostic candidate pool for ``image`` (uint8 (H, W, 3)) -> uint8 (N, H, W).

    Method (a small Selective-Search-style region hierarchy, Uijlings et al. 2013, on
    scikit-image):

    1. Felzenszwalb-Huttenlocher graph segmentation (``skimage.segmentation.felzenszwalb``,
       ``scale``, ``min_size`` = ``min_area`` of the image) once per smoothing ``sigma`` (0 keeps
       crisp edges, 0.8 is the paper's value for photos);
    2. each over-segmentation's regions merged by mean colour on the region adjacency graph
       (what ``skimage.graph.rag_mean_color`` + ``cut_threshold`` do, see ``_levels``) at each
       of ``merge_thresholds`` (Euclidean RGB distance, 0-255): coarser and coarser regions;
    3. with ``pair_unions``, the union of every pair of adjacent regions of the middle merge
       level (objects made of two differently coloured parts);
    4. candidates of area outside [``min_area``, ``max_area``] of the image are dropped;
       near-duplicates (mask IoU > ``dedupe_iou``, ``refjax.boxes.mask_iou``) are merged into
       the first one seen, which counts how many levels produced it (its *support*);
    5. the ``max_masks`` candidates of highest support (ties: larger area first) are kept and
       returned sorted by area, largest first.

    Images whose long side exceeds ``work_size`` are segmented at that size and the masks
    resized back (PIL-exact nearest). Never empty: a uniform image gives the whole-image mask.
    Needs scikit-image. A stand-in for a segmentation model: real use wants SAM masks.
    """
    img = np.asarray(image)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3 or img.size == 0:
        raise ValueError(f"expected a uint8 (H, W, 3) image, got {img.dtype} {img.shape}")
    if max_masks < 1:
        raise ValueError(f"max_masks must be >= 1, got {max_masks}")
    h, w = img.shape[:2]
    work = img
    if max(h, w) > work_size:
        from PIL import Image

        r = work_size / max(h, w)
        work = np.asarray(
            Image.fromarray(img).resize(
                (max(1, round(w * r)), max(1, round(h * r))), Image.BILINEAR
            )
        )
    wh, ww = work.shape[:2]
    area = float(wh * ww)
    min_px = max(1, int(round(min_area * area)))

    # Candidates in generation order; exact duplicates found by their packed bits, near
    # duplicates by mask IoU against kept masks of compatible area (IoU > t needs an area ratio
    # of at least t).
    kept: list[np.ndarray] = []  # packed bits
    kept_area: list[int] = []
    support: list[int] = []
    seen: dict[bytes, int] = {}
    lo, hi = min_area * area, max_area * area

    def add(c: np.ndarray, a: int) -> None:
        bits = np.packbits(c.ravel())
        key = bits.tobytes()
        if key in seen:
            support[seen[key]] += 1
            return
        near = [j for j, b in enumerate(kept_area) if min(a, b) >= dedupe_iou * max(a, b)]
        if near:
            others = np.stack([np.unpackbits(kept[j], count=c.size) for j in near])
            _, _, iou = mask_iou(others.reshape(len(near), *c.shape), c[None])
            best = int(np.argmax(iou))
            if iou[best] > dedupe_iou:
                support[near[best]] += 1
                seen[key] = near[best]
                return
        seen[key] = len(kept)
        kept.append(bits)
        kept_area.append(a)
        support.append(1)

    for sigma in sigmas:
        levels = _levels(work, scale, sigma, min_px, merge_thresholds)
        for labels in levels:
            counts = np.bincount(labels.ravel())
            for k in np.flatnonzero((counts >= lo) & (counts <= hi)):
                add(labels == k, int(counts[k]))
        if pair_unions and len(levels) > 1:
            mid = levels[len(levels) // 2]
            counts = np.bincount(mid.ravel())
            for a, b in _adjacent_pairs(mid).tolist():
                n = int(counts[a] + counts[b])
                if lo <= n <= hi:
                    add((mid == a) | (mid == b), n)

    if not kept:
        return np.ones((1, h, w), np.uint8)
    order = sorted(range(len(kept)), key=lambda i: (-support[i], -kept_area[i]))[:max_masks]
    order.sort(key=lambda i: -kept_area[i])
    pool = np.stack([np.unpackbits(kept[i], count=wh * ww) for i in order])
    pool = pool.reshape(len(order), wh, ww).astype(np.uint8)
    if (wh, ww) != (h, w):
        pool = resize_masks(pool, h, w)
    return pool
