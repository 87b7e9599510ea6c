"""Host-side per-example transforms (pure numpy/PIL), as picklable module-level classes for grain.

Stages (see ``refjax.data.pipeline``): ``expand`` one expression of a decoded scene into an
example; geometric transform to the ``size x size`` canvas (``eval_letterbox`` or the OneRef
train augmentation ``augment``, spec/oneref.md 4.2); ``tokenize``; MRefM masking; ``finalize``
into fixed shapes. Boxes follow through ``refjax.boxes.Letterbox``.

Deviations from the reference (documented on purpose):

- RandomSizeCrop accepts a crop when the box centre lies *inside* it (the reference compares cx
  with the crop top and cy with the crop left, spec/oneref.md 6.17) and, when the target has a
  mask, when some target pixel is inside the crop. After a crop the box is the tight box of the
  visible target pixels (the reference clips the box; identical for box-shaped masks up to
  rounding); without a mask the box is clipped as in the reference.
- Boxes are scaled by the actual per-axis resize factors (new_w / w, new_h / h), as
  ``Letterbox`` does, instead of the nominal ratio.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image, ImageEnhance

from refjax import boxes as bx
from refjax.data.errors import BadRecordError
from refjax.data.images import LazyMasks

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SPATIAL_WORDS = ("left", "right", "top", "bottom", "middle")
# Fixed kind vocabulary: the id is the index; unknown kinds map to 0.
KINDS = (
    "other",
    "attribute",
    "spatial",
    "relational",
    "superlative",
    "group",
    "no-target",
    "hybrid",
    "refcoco",
    "gres",
    "ores",
    "ores_ref",
)

Example = dict[str, Any]


def kind_id(kind: str) -> int:
    """Index of ``kind`` in ``KINDS`` (0 for an unknown kind)."""
    return KINDS.index(kind) if kind in KINDS else 0


def train_scales(size: int, num: int = 7) -> list[int]:
    """OneRef RandomResize long sides, scaled to the canvas: {384, 352, ..., 192} for 384."""
    return [round(size * (1 - k / 12)) for k in range(num)]


def has_spatial_word(text: str) -> bool:
    """OneRef's substring test on the lower-cased text."""
    t = text.lower()
    return any(w in t for w in SPATIAL_WORDS)


# ----------------------------------------------------------------------------- expand


def _check_image(scene: dict, rid: str) -> np.ndarray:
    img = scene.get("image")
    if img is None:
        raise BadRecordError(rid, "image", "missing image")
    img = np.asarray(img)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3 or img.size == 0:
        raise BadRecordError(rid, "image", f"expected uint8 (H, W, 3), got {img.dtype} {img.shape}")
    return img


def _check_masks(
    masks: Any, hw: tuple[int, int], rid: str, field: str
) -> np.ndarray | LazyMasks:
    if isinstance(masks, LazyMasks):  # decoded (and checked) one by one where used
        if tuple(masks.shape[1:]) != hw:
            raise BadRecordError(rid, field, f"mask of size {masks.shape[1:]} != image size {hw}")
        return masks
    m = np.asarray(masks if masks is not None else np.zeros((0, *hw), np.uint8))
    if m.ndim != 3 or tuple(m.shape[1:]) != hw:
        raise BadRecordError(rid, field, f"mask of size {m.shape[1:]} != image size {hw}")
    return m.astype(np.uint8)


def _check_box(box: np.ndarray, w: int, h: int, rid: str, field: str) -> np.ndarray:
    problem = bx.box_problem(box, w, h)
    if problem:
        raise BadRecordError(rid, field, problem)
    return np.clip(np.asarray(box, np.float64), 0, [w, h, w, h])


def _indices(v: Any, n: int, rid: str, field: str) -> np.ndarray:
    idx = np.asarray(v if v is not None else [], np.int64).reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise BadRecordError(rid, field, f"index out of range [0, {n}): {idx.tolist()}")
    return idx


def expand(scene: dict, expr_idx: int) -> Example:
    """One example for expression ``expr_idx`` of a decoded scene, in original pixels.

    Keys: image uint8 (H,W,3); box float32 xyxy (the target box; for groups the tight box of the
    union mask; zeros for no-target); mask uint8 (H,W) union target mask; text; raw (the text
    with case and punctuation, where the dataset stores it); caption (the scene's); expr_pos
    (the expression's index in the scene); kind (int);
    num_targets; ref_masks (R,H,W); pool_masks (P,H,W); pool_ioa (P,); subject_span,
    object_span int32 (2,); record_id, expr_id; sts_word_scores float32 (words,) only where the
    expression has them. Bad input raises ``BadRecordError``.
    """
    rid = str(scene.get("image_id", "?"))
    img = _check_image(scene, rid)
    h, w = img.shape[:2]
    exprs = scene.get("expressions") or []
    if not 0 <= expr_idx < len(exprs):
        raise BadRecordError(rid, "expressions", f"no expression {expr_idx} (has {len(exprs)})")
    ex = exprs[expr_idx]
    ef = f"expressions[{expr_idx}]"
    text = ex.get("text")
    if not isinstance(text, str) or not text.strip():
        raise BadRecordError(rid, f"{ef}.text", f"empty text (expression {ex.get('id')!r})")
    masks = _check_masks(scene.get("masks"), (h, w), rid, "masks")
    obj_boxes = np.asarray(scene.get("boxes", np.zeros((0, 4))), np.float32).reshape(-1, 4)
    n_obj = max(len(obj_boxes), len(masks))
    targets = _indices(ex.get("targets"), n_obj, rid, f"{ef}.targets")
    refs = _indices(ex.get("refs"), len(masks), rid, f"{ef}.refs")
    tboxes = [_check_box(obj_boxes[t], w, h, rid, f"boxes[{t}]") for t in targets]
    union = np.zeros((h, w), np.uint8)
    for t in targets:
        if t < len(masks):
            union |= masks[t]
    if len(targets) == 0:
        box = np.zeros(4, np.float64)
    elif len(targets) == 1 or not union.any():
        # One target: the stored box, int-truncated like OneRef (xywh cast to int). A group
        # without masks: the hull of the boxes.
        if len(targets) == 1:
            xywh = np.trunc(bx.xyxy_to_xywh(tboxes[0]))
            box = bx.xywh_to_xyxy(xywh)
        else:
            tb = np.stack(tboxes)
            box = np.concatenate([tb[:, :2].min(0), tb[:, 2:].max(0)])
    else:
        box = bx.mask_to_box(union).astype(np.float64)
    pool = _check_masks(scene.get("pool_masks"), (h, w), rid, "pool_masks")
    ioa = np.asarray(scene.get("pool_ioa", np.zeros((0, len(pool)))), np.float32)
    pool_ioa = ioa[expr_idx] if ioa.ndim == 2 and len(ioa) > expr_idx else np.zeros(len(pool))
    if len(pool_ioa) != len(pool):
        raise BadRecordError(rid, "pool_ioa", f"{len(pool_ioa)} IoA values for {len(pool)} masks")
    out = {
        "record_id": rid,
        "expr_id": str(ex.get("id", expr_idx)),
        "image": img,
        "box": box.astype(np.float32),
        "mask": union,
        "text": text,
        "raw": str(ex.get("raw") or text),  # case and punctuation kept (LLM tokenizers)
        "caption": str(scene.get("caption", "")),
        "expr_pos": int(expr_idx),
        "kind": kind_id(str(ex.get("kind", ""))),
        "num_targets": len(targets),
        "ref_masks": masks[refs] if len(refs) else np.zeros((0, h, w), np.uint8),
        "pool_masks": pool,
        "pool_ioa": np.asarray(pool_ioa, np.float32),
        "subject_span": np.asarray(ex.get("subject_span", (-1, -1)), np.int32),
        "object_span": np.asarray(ex.get("object_span", (-1, -1)), np.int32),
    }
    if ex.get("sts_word_scores") is not None:  # real data with STS scores (schema)
        out["sts_word_scores"] = np.asarray(ex["sts_word_scores"], np.float32)
    return out


# ----------------------------------------------------------------------------- geometry


def _nearest_index(n_out: int, n_in: int) -> np.ndarray:
    """Source indices of PIL's NEAREST resize (accumulated centre sampling, as PIL computes)."""
    a = n_in / n_out
    steps = np.full(n_out, a)
    steps[0] = a * 0.5
    return np.minimum(np.floor(np.cumsum(steps)).astype(np.int64), n_in - 1)


def resize_masks(masks: np.ndarray, new_h: int, new_w: int) -> np.ndarray:
    """Nearest resize of (..., H, W) masks, bit-identical to PIL NEAREST, vectorised."""
    h, w = masks.shape[-2:]
    if (h, w) == (new_h, new_w):
        return masks
    rows = np.take(masks, _nearest_index(new_h, h), axis=-2)
    return np.take(rows, _nearest_index(new_w, w), axis=-1)


class _View:
    """Image (PIL), stacked masks (N, H, W) (index 0: the union target mask) and xyxy box."""

    def __init__(self, image: Image.Image, masks: np.ndarray, box: np.ndarray):
        self.image, self.masks, self.box = image, masks, box.astype(np.float64)
        self.box0 = self.box  # the box in the coordinates the final Letterbox maps from

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size

    def resize(self, new_w: int, new_h: int) -> None:
        w, h = self.image.size
        if (new_w, new_h) == (w, h):
            return
        self.image = self.image.resize((new_w, new_h), Image.BILINEAR)
        self.masks = resize_masks(self.masks, new_h, new_w)
        self.box = self.box * np.array([new_w / w, new_h / h, new_w / w, new_h / h])

    def resize_long(self, size: int) -> None:
        w, h = self.image.size
        r = size / max(w, h)
        self.resize(round(w * r), round(h * r))

    def resize_short(self, size: int) -> None:
        w, h = self.image.size
        r = size / min(w, h)
        self.resize(round(w * r), round(h * r))


def _random_size_crop(
    v: _View, min_size: int, max_size: int, rng: np.random.Generator, tries: int = 20
) -> None:
    """RandomSizeCrop with the corrected acceptance test (module docstring)."""
    w, h = v.size
    if min(w, h) < min_size:
        return
    has_mask = bool(v.masks[0].any())
    cx, cy = (v.box[0] + v.box[2]) / 2, (v.box[1] + v.box[3]) / 2
    for _ in range(tries):
        cw = int(rng.integers(min_size, min(w, max_size), endpoint=True))
        ch = int(rng.integers(min_size, min(h, max_size), endpoint=True))
        top = int(rng.integers(0, h - ch, endpoint=True))
        left = int(rng.integers(0, w - cw, endpoint=True))
        if not (left < cx < left + cw and top < cy < top + ch):
            continue
        target = v.masks[0, top : top + ch, left : left + cw]
        if has_mask and not target.any():
            continue
        v.image = v.image.crop((left, top, left + cw, top + ch))
        v.masks = v.masks[:, top : top + ch, left : left + cw]
        if has_mask:
            v.box = bx.mask_to_box(target).astype(np.float64)
        else:
            v.box = bx.clip_boxes(v.box - [left, top, left, top], cw, ch)
        return


def color_jitter(
    image: Image.Image, rng: np.random.Generator, strength: float = 0.4, p: float = 0.8
) -> Image.Image:
    """With probability p: brightness/contrast/saturation in random order, factors U[1-s, 1+s]."""
    if rng.random() >= p:
        return image
    enhancers = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)
    for k in rng.permutation(3):
        image = enhancers[k](image).enhance(float(rng.uniform(1 - strength, 1 + strength)))
    return image


def _canvas(v: _View, lb: bx.Letterbox, mean: np.ndarray, std: np.ndarray) -> Example:
    """Normalise and pad the (already resized) view into ``lb``'s canvas; pad 0 in normalised
    space. ``lb`` maps the view's original image: its box goes through ``lb.forward_boxes``."""
    s, t, le, nh, nw = lb.size, lb.top, lb.left, lb.new_h, lb.new_w
    img = (np.asarray(v.image, np.float32) / 255.0 - mean) / std
    image = np.zeros((s, s, 3), np.float32)
    image[t : t + nh, le : le + nw] = img
    raw = np.zeros((s, s, 3), np.uint8)
    raw[t : t + nh, le : le + nw] = np.asarray(v.image)
    masks = np.zeros((len(v.masks), s, s), np.uint8)
    masks[:, t : t + nh, le : le + nw] = v.masks
    return {
        "image": image,
        "image_raw": raw,
        "masks": masks,
        "box_px": np.asarray(lb.forward_boxes(v.box0), np.float32),
        "letterbox": np.array([lb.orig_w, lb.orig_h, nw, nh, le, t], np.float32),
    }


def _view_of(ex: Example) -> _View:
    masks = np.concatenate([ex["mask"][None], ex["ref_masks"], ex["pool_masks"]], axis=0)
    return _View(Image.fromarray(ex["image"]), masks, ex["box"])


def _merge(ex: Example, out: Example) -> Example:
    """Replace the original-pixel arrays of ``ex`` by the canvas ones in ``out``."""
    masks = out.pop("masks")
    n_ref = len(ex["ref_masks"])
    res = {k: v for k, v in ex.items() if k not in ("image", "mask", "ref_masks", "pool_masks")}
    res.update(out)
    res["mask"], res["ref_masks"], res["pool_masks"] = (
        masks[0],
        masks[1 : 1 + n_ref],
        masks[1 + n_ref :],
    )
    res["box"] = res.pop("box_px")
    if ex["num_targets"] == 0:
        res["box"] = np.zeros(4, np.float32)
    return res


def eval_letterbox(ex: Example, size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> Example:
    """OneRef eval transform: long side to ``size`` (PIL bilinear / nearest), centred pad."""
    v = _view_of(ex)
    w, h = v.size
    lb = bx.Letterbox.centered(w, h, size)
    v.box0 = v.box.copy()  # Letterbox maps original pixels
    v.resize(lb.new_w, lb.new_h)
    return _merge(ex, _canvas(v, lb, np.asarray(mean, np.float32), np.asarray(std, np.float32)))


def augment(
    ex: Example,
    size: int,
    rng: np.random.Generator,
    *,
    num_scales: int = 7,
    crop_prob: float = 0.5,
    jitter_prob: float = 0.8,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
) -> Example:
    """OneRef train augmentation (spec/oneref.md 4.2) to the ``size x size`` canvas; no flip."""
    v = _view_of(ex)
    scales = train_scales(size, num_scales)
    if not has_spatial_word(ex["text"]) and rng.random() < crop_prob:
        v.resize_short(int(rng.choice([round(s * size / 384) for s in (400, 500, 600)])))
        _random_size_crop(v, size, round(600 * size / 384), rng)
    v.resize_long(int(rng.choice(scales)))
    v.image = color_jitter(v.image, rng, p=jitter_prob)
    w, h = v.size
    left = int(rng.integers(0, size - w, endpoint=True))
    top = int(rng.integers(0, size - h, endpoint=True))
    v.box0 = v.box  # the last resize already happened: an identity-scale letterbox
    lb = bx.Letterbox(w, h, size, 1.0, w, h, left, top)
    out = _canvas(v, lb, np.asarray(mean, np.float32), np.asarray(std, np.float32))
    return _merge(ex, out)


def box_to_target(box_px: np.ndarray, size: int) -> np.ndarray:
    """Canvas-pixel xyxy -> cxcywh normalised to the canvas (the model's box target)."""
    return (np.asarray(bx.xyxy_to_cxcywh(np.asarray(box_px, np.float32))) / size).astype(np.float32)


# ----------------------------------------------------------------------------- text


def word_positions(pieces: list[str]) -> np.ndarray:
    """Word index of each SentencePiece piece ('▁' or ``<mask-ref>`` starts a word)."""
    starts = np.array([p.startswith("\u2581") or p == "<mask-ref>" for p in pieces], np.int64)
    return np.cumsum(starts) - 1


def tokenize(ex: Example, tokenizer: Any, max_len: int, *, truncate: bool = True) -> Example:
    """BEiT-3 ids of the lower-cased text: [BOS] + ids[:max_len-2] + [EOS], padded to max_len.

    Adds ``text_ids``, ``text_padding`` (1 on pads), ``n_tok`` (BOS and EOS included) and
    ``mlm_priority``: token positions of the head (last) word of the subject span, then of the
    object span (RefShapes word spans replace OneRef's spaCy parse). With ``truncate=False`` a
    text longer than max_len-2 tokens is a ``BadRecordError``.
    """
    from refjax.data.tokenizers import beit3_encode

    text = ex["text"].lower()
    rid = ex["record_id"]
    pieces = tokenizer.tokenize(text)
    if not truncate and len(pieces) > max_len - 2:
        raise BadRecordError(
            rid,
            "text",
            f"{len(pieces)} tokens > max_len-2 = {max_len - 2} (expression {ex['expr_id']!r})",
        )
    ids, pad = beit3_encode(tokenizer, text, max_len, record_id=rid)
    n_tok = int(np.sum(np.asarray(pad) == 0))
    words = word_positions(pieces[: n_tok - 2])
    priority: list[int] = []
    for span in (ex["subject_span"], ex["object_span"]):
        s, e = int(span[0]), int(span[1])
        if 0 <= s < e:
            priority += [int(p) + 1 for p in np.nonzero(words == e - 1)[0]]
    out = dict(ex)
    out.update(
        text_ids=np.asarray(ids, np.int32),
        text_padding=np.asarray(pad, np.int32),
        n_tok=n_tok,
        mlm_priority=priority,
    )
    return out
