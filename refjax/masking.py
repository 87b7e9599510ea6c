"""MRefM masking (spec/oneref.md 3.2 and 3.5): referring-aware image masking and text masking.

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
