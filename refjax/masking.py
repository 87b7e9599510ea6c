"""MRefM masking (spec/oneref.md 3.2 and 3.5): referring-aware image masking and text masking,
plus the MVLM baseline's patch-random image masking with the same count (``random_image_mask``)
and the expected referring count (``expected_referring_count``) the statistics tests check.

Pure numpy, ground floor: used by the host-side data pipeline (one call per example, with the
example's ``np.random.Generator``) and usable anywhere else.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _random_mask(n: int, num_masked: int, rng: np.random.Generator) -> np.ndarray:
    """MAE-style random masking: exactly ``num_masked`` of ``n`` positions (argsort of noise)."""
    mask = np.zeros(n, bool)
    if num_masked > 0:
        mask[np.argsort(rng.random(n), kind="stable")[:num_masked]] = True
    return mask


def box_region(box_cxcywh: np.ndarray, grid: int, margin: int = 1) -> tuple[int, int, int, int]:
    """Patch region (y1, y2, x1, x2) of a normalised cxcywh box: scaled to patch units,
    converted to xyxy, truncated to int, expanded by ``margin`` patches and clipped to the grid."""
    cx, cy, w, h = (float(v) * grid for v in box_cxcywh)
    x1, y1, x2, y2 = int(cx - w / 2), int(cy - h / 2), int(cx + w / 2), int(cy + h / 2)
    x1, y1 = max(x1 - margin, 0), max(y1 - margin, 0)
    x2, y2 = min(x2 + margin, grid), min(y2 + margin, grid)
    return y1, y2, x1, x2


def referring_image_mask(
    box_cxcywh: np.ndarray,
    grid: int,
    rng: np.random.Generator,
    *,
    mask_ratio: float = 0.35,
    dynamic_ratio: float = 0.75,
    margin: int = 1,
) -> np.ndarray:
    """OneRef's Dynamic_MIM_MaskGenerator: bool (grid*grid,), row-major, True = masked.

    Whole grid: ``G^2 - int(G^2 (1 - mask_ratio))`` random patches; then the box region (the box in
    patch units, int-truncated, expanded by ``margin``) is overwritten with its own random masking
    of ``L_r - int(L_r (1 - dynamic_ratio))`` patches. Patch-random, not block-wise.
    """
    n = grid * grid
    mask = _random_mask(n, n - int(n * (1 - mask_ratio)), rng).reshape(grid, grid)
    y1, y2, x1, x2 = box_region(np.asarray(box_cxcywh), grid, margin)
    if y2 > y1 and x2 > x1:
        lr = (y2 - y1) * (x2 - x1)
        region = _random_mask(lr, lr - int(lr * (1 - dynamic_ratio)), rng)
        mask[y1:y2, x1:x2] = region.reshape(y2 - y1, x2 - x1)
    return mask.reshape(n)


def region_size(box_cxcywh: np.ndarray, grid: int, margin: int = 1) -> int:
    """Number of patches L_r of the (expanded, clipped) box region of ``box_region``."""
    y1, y2, x1, x2 = box_region(np.asarray(box_cxcywh), grid, margin)
    return max(y2 - y1, 0) * max(x2 - x1, 0)


def expected_referring_count(
    box_cxcywh: np.ndarray,
    grid: int,
    *,
    mask_ratio: float = 0.35,
    dynamic_ratio: float = 0.75,
    margin: int = 1,
) -> float:
    """Expected number of patches ``referring_image_mask`` masks for this box: the whole-grid
    count ``n_g = G^2 - int(G^2 (1 - mask_ratio))`` lands outside the region with probability
    ``1 - L_r / G^2``, and the region holds exactly ``L_r - int(L_r (1 - dynamic_ratio))``."""
    n = grid * grid
    lr = region_size(box_cxcywh, grid, margin)
    n_g = n - int(n * (1 - mask_ratio))
    inside = lr - int(lr * (1 - dynamic_ratio)) if lr > 0 else 0
    return n_g * (1 - lr / n) + inside


def random_image_mask(
    box_cxcywh: np.ndarray,
    grid: int,
    rng: np.random.Generator,
    *,
    mask_ratio: float = 0.35,
    dynamic_ratio: float = 0.75,
    margin: int = 1,
) -> np.ndarray:
    """MVLM baseline image mask: patch-random over the whole grid (no box region), with as many
    patches as a ``referring_image_mask`` draw for the same box (so the count has the same
    distribution, and the same expected overall ratio, as the referring masking; only *where*
    differs). bool (grid*grid,), True = masked."""
    count = int(referring_image_mask(box_cxcywh, grid, rng, mask_ratio=mask_ratio,
                                     dynamic_ratio=dynamic_ratio, margin=margin).sum())
    return _random_mask(grid * grid, count, rng)


def num_text_masked(n_tok: int, mask_prob: float) -> int:
    """How many of ``n_tok`` tokens (BOS and EOS included) OneRef masks."""
    return max(1, min(int((n_tok - 1) * mask_prob + 0.5), n_tok - 1))


def text_mask(
    ids: np.ndarray,
    n_tok: int,
    rng: np.random.Generator,
    *,
    mask_id: int,
    priority: Sequence[int] = (),
    mask_prob: float = 0.4,
    random_low: int = 3,
) -> tuple[np.ndarray, np.ndarray]:
    """OneRef referring MLM masking of one tokenized text (spec/oneref.md 3.5).

    ``ids``: (L,) with BOS at 0 and EOS at ``n_tok - 1``; ``priority``: token positions masked
    first (subject/object words), the rest are drawn uniformly from [1, n_tok - 1] (EOS maskable,
    BOS never). Each masked position: 80% ``mask_id``, 10% unchanged, 10% a random id in
    [random_low, mask_id]. Returns (masked ids int32 (L,), mask int32 (L,), 1 = masked).
    """
    ids = np.asarray(ids, np.int32)
    out, mask = ids.copy(), np.zeros(ids.shape, np.int32)
    if n_tok < 2:
        return out, mask
    num = num_text_masked(n_tok, mask_prob)
    chosen: list[int] = []
    for p in priority:
        if 1 <= p < n_tok and p not in chosen and len(chosen) < num:
            chosen.append(int(p))
    rest = np.array([p for p in range(1, n_tok) if p not in chosen], np.int64)
    need = num - len(chosen)
    if need > 0:
        chosen.extend(int(p) for p in rng.permutation(rest)[:need])
    for p in chosen:
        mask[p] = 1
        u = rng.random()
        if u < 0.8:
            out[p] = mask_id
        elif u >= 0.9:
            out[p] = rng.integers(random_low, mask_id, endpoint=True)
    return out, mask
