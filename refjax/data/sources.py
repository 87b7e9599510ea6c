"""Random-access reader of prepared scene datasets (any builder following ``schema.py``).

``open_scenes(name, split, data_dir, config)`` opens ``<data_dir>/<name>/<config>/<version>``
(the newest version) without importing the builder module. ``SceneSource[i]`` decodes a record
with :func:`decode_scene`, which is pure so grain workers can run it on ``SceneSource.raw``.
``raw`` keeps every image and mask PNG-encoded; the pipeline reads scenes with ``lazy=True``
and decodes only the image and masks of an expression its task uses.

Scene dict (what ``decode_scene`` returns)::

    image_id: str              image: uint8 (H, W, 3)
    boxes: float32 (K, 4) xyxy pixels           masks: uint8 (K, H, W) 0/1 (visible pixels)
    categories: list[str]      object_ids: int64 (K,)
    expressions: list of {id: str, text: str, raw: str, kind: str, targets: int32 (T,),
                          refs: int32 (R,), subject_span: (int, int),
                          object_span: (int, int),   # [start, end)
                          [sts_word_scores: float32 (words,)]}  # only where the record has them
    pool_masks: uint8 (P, H, W)   pool_sources: list[str]   pool_ioa: float32 (E, P)
    caption: str
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import numpy as np

from refjax import boxes as box_ops
from refjax.data import schema
from refjax.data.errors import BadRecordError
from refjax.data.images import LazyImage, LazyMasks, decode_image, decode_mask


class _NoOpenCVNotice(logging.Filter):
    """tfds logs an OpenCV recommendation each time a source opens; refjax decodes PNGs itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "OpenCV is not installed" not in record.getMessage()


logging.getLogger("absl").addFilter(_NoOpenCVNotice())


def _str(v: Any) -> str:
    return v.decode("utf-8") if isinstance(v, (bytes, np.bytes_)) else str(v)


def _strs(v: Any) -> list[str]:
    return [_str(x) for x in (v if v is not None else [])]


def _mask_stack(
    values: Any, h: int, w: int, rid: str, field: str, lazy: bool = False
) -> np.ndarray | LazyMasks:
    """Masks (decoded arrays or PNG bytes) -> uint8 (N, H, W) 0/1, checking every size;
    ``lazy`` and all PNG bytes: a ``LazyMasks`` that decodes and checks each when used."""
    values = list(values) if values is not None else []
    if lazy and values and all(isinstance(m, (bytes, np.bytes_)) for m in values):
        return LazyMasks(values, h, w, rid, field)
    out = []
    for j, m in enumerate(values):
        if isinstance(m, (bytes, np.bytes_)):
            m = decode_mask(bytes(m), rid, f"{field}[{j}]")
        m = np.asarray(m)
        if m.ndim == 3 and m.shape[-1] == 1:
            m = m[..., 0]
        if m.shape != (h, w):
            raise BadRecordError(rid, f"{field}[{j}]", f"mask shape {m.shape} != image {(h, w)}")
        out.append(m > 0)
    return np.stack(out).astype(np.uint8) if out else np.zeros((0, h, w), np.uint8)


def _boxes_xyxy(xywh: Any, h: int, w: int, rid: str) -> np.ndarray:
    b = np.asarray(xywh, np.float32).reshape(-1, 4)
    for j, box in enumerate(b):
        if not np.all(np.isfinite(box)) or box[2] <= 0 or box[3] <= 0:
            raise BadRecordError(rid, f"objects/box[{j}]", f"degenerate box {box.tolist()}")
        if box[0] < -1 or box[1] < -1 or box[0] + box[2] > w + 1 or box[1] + box[3] > h + 1:
            raise BadRecordError(rid, f"objects/box[{j}]", f"box {box.tolist()} outside image")
    return box_ops.xywh_to_xyxy(b).astype(np.float32)


def _indices(flat: np.ndarray, start: int, count: int, k: int, rid: str, field: str):
    if start < 0 or count < 0 or start + count > len(flat):
        raise BadRecordError(rid, field, f"slice [{start}, {start + count}) out of range")
    idx = flat[start : start + count].astype(np.int32)
    if idx.size and (idx.min() < 0 or idx.max() >= k):
        raise BadRecordError(rid, field, f"object index out of range 0..{k - 1}: {idx.tolist()}")
    return idx


def decode_scene(record: dict, with_pool: bool = True, lazy: bool = False) -> dict:
    """A schema record (as tfds decodes it, or with PNG bytes) -> the scene dict above.

    ``with_pool=False`` skips the candidate pool (its masks are most of a scene's PNGs and only
    RAS reads them): ``pool_masks`` is then ``(0, H, W)``, ``pool_sources`` empty and
    ``pool_ioa`` ``(E, 0)``.

    ``lazy``: an encoded image of declared size becomes a ``LazyImage`` and encoded object masks
    a ``LazyMasks``, decoded (and their sizes checked) only when an example uses them; the
    pipeline reads each expression this way and decodes only its image and its own masks.

    Raises ``BadRecordError`` naming the record id and field for unreadable images, masks of the
    wrong size, degenerate boxes, empty texts, and inconsistent index lists.
    """
    rid = _str(record.get("image/id", "?"))
    image = record.get("image")
    declared = "image/height" in record and "image/width" in record
    if lazy and declared and isinstance(image, (bytes, np.bytes_)):
        image = LazyImage(image, int(record["image/height"]), int(record["image/width"]), rid)
    else:
        if isinstance(image, (bytes, np.bytes_)):
            image = decode_image(bytes(image), rid, "image")
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
            raise BadRecordError(rid, "image", f"expected uint8 (H, W, 3), got {image.shape}")
        if declared and (int(record["image/height"]), int(record["image/width"])) != (
            image.shape[:2]
        ):
            raise BadRecordError(rid, "image/height",
                                 f"declared size != decoded size {image.shape[:2]}")
    h, w = image.shape[:2]
    obj = record.get("objects", {})
    masks = _mask_stack(obj.get("mask"), h, w, rid, "objects/mask", lazy)
    boxes = _boxes_xyxy(obj.get("box", np.zeros((0, 4))), h, w, rid)
    k = len(masks)
    if len(boxes) != k:
        raise BadRecordError(rid, "objects/box", f"{len(boxes)} boxes for {k} masks")
    ex = record.get("expressions", {})
    targets = np.asarray(record.get("expr_targets", []), np.int32).reshape(-1)
    refs = np.asarray(record.get("expr_refs", []), np.int32).reshape(-1)
    expressions = []
    ids = _strs(ex.get("id"))
    texts, kinds = _strs(ex.get("text")), _strs(ex.get("kind"))
    raws = _strs(ex.get("raw")) or texts  # datasets built before 'raw': the text
    for e, eid in enumerate(ids):
        if not texts[e].strip():
            raise BadRecordError(eid, "text", "empty expression text")
        sub = np.asarray(ex["subject_span"][e]).reshape(2)
        obj_span = np.asarray(ex["object_span"][e]).reshape(2)
        expressions.append(
            {
                "id": eid,
                "text": texts[e],
                "raw": raws[e],
                "kind": kinds[e],
                "targets": _indices(
                    targets,
                    int(ex["target_start"][e]),
                    int(ex["target_count"][e]),
                    k,
                    eid,
                    "expr_targets",
                ),
                "refs": _indices(
                    refs, int(ex["ref_start"][e]), int(ex["ref_count"][e]), k, eid, "expr_refs"
                ),
                "subject_span": (int(sub[0]), int(sub[1])),
                "object_span": (int(obj_span[0]), int(obj_span[1])),
            }
        )
    _attach_word_scores(record.get("expr_word_scores", ()), expressions, rid)
    pool = record.get("pool", {}) if with_pool else {}
    pool_masks = _mask_stack(pool.get("mask"), h, w, rid, "pool/mask")
    ioa = np.asarray(record.get("pool_ioa", []) if with_pool else [], np.float32).reshape(-1)
    if ioa.size != len(expressions) * len(pool_masks):
        raise BadRecordError(
            rid,
            "pool_ioa",
            f"{ioa.size} values for {len(expressions)} expressions x {len(pool_masks)} candidates",
        )
    return {
        "image_id": rid,
        "image": image,
        "boxes": boxes,
        "masks": masks,
        "categories": _strs(obj.get("category")),
        "object_ids": np.asarray(obj.get("id", np.arange(k)), np.int64).reshape(-1),
        "expressions": expressions,
        "pool_masks": pool_masks,
        "pool_sources": _strs(pool.get("source")) if with_pool else [],
        "pool_ioa": ioa.reshape(len(expressions), len(pool_masks)),
        "caption": _str(record.get("caption", "")),
    }


def _attach_word_scores(flat: Any, expressions: list[dict], rid: str) -> None:
    """Split a record's ``expr_word_scores`` (schema) into each scored expression's
    ``sts_word_scores``; an expression whose words are all NaN has none."""
    flat = np.asarray(flat, np.float32).reshape(-1)
    if not flat.size:
        return
    counts = [schema.word_count(e["text"]) for e in expressions]
    if flat.size != sum(counts):
        raise BadRecordError(rid, "expr_word_scores",
                             f"{flat.size} scores for the {sum(counts)} words of "
                             f"{len(expressions)} expressions")
    start = 0
    for e, n in zip(expressions, counts):
        scores, start = flat[start : start + n], start + n
        nan = np.isnan(scores)
        if nan.all():
            continue
        if nan.any():
            raise BadRecordError(e["id"], "expr_word_scores", "scores for only some words")
        e["sts_word_scores"] = scores


def _version_key(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split("."))


def dataset_dir(name: str, data_dir: str, config: str | None = None) -> str:
    """``<data_dir>/<name>/<config>/<newest version>`` (``config`` may be omitted if unique)."""
    root = os.path.join(data_dir, name)
    if not os.path.isdir(root):
        raise FileNotFoundError(
            f"dataset {name!r} not found under {data_dir}; build it with "
            f"`python -m refjax build-data {name}`"
        )
    if config is None:
        configs = [c for c in os.listdir(root) if os.path.isdir(os.path.join(root, c))]
        versioned = [c for c in configs if c[:1].isdigit()]
        if versioned:  # a builder without configs
            config = ""
        elif len(configs) == 1 or "default" in configs:
            config = configs[0] if len(configs) == 1 else "default"
        else:
            raise ValueError(f"dataset {name!r} has configs {sorted(configs)}; pass config=")
    cdir = os.path.join(root, config)
    versions = [
        v
        for v in (os.listdir(cdir) if os.path.isdir(cdir) else [])
        if v[:1].isdigit() and os.path.isfile(os.path.join(cdir, v, "dataset_info.json"))
    ]
    if not versions:
        raise FileNotFoundError(f"no prepared version of {name}/{config} under {cdir}")
    return os.path.join(cdir, max(versions, key=_version_key))


class _PngBytes:
    """A tfds decoder that leaves an Image feature as its encoded PNG bytes."""

    def setup(self, feature: Any) -> None:  # tfds Decoder protocol
        self.feature = feature

    def decode_example(self, x: Any) -> Any:
        return x

    def decode_example_np(self, x: Any) -> Any:
        return x

    def decode_batch_example_np(self, x: Any) -> Any:
        return x


def _encoded_images(features: Any) -> dict | None:
    """tfds decoders that keep every Image feature of a scene schema (``image``,
    ``objects/mask``, ``pool/mask``) as its encoded bytes; None when there is none."""
    from tensorflow_datasets.core.features import Image

    out: dict[str, Any] = {}
    for key, sub in (("image", None), ("objects", "mask"), ("pool", "mask")):
        try:
            feature = features[key] if sub is None else features[key][sub]
        except (KeyError, TypeError):
            continue
        if isinstance(feature, Image):
            out[key] = _PngBytes() if sub is None else {sub: _PngBytes()}
    return out or None


class SceneSource:
    """Random-access decoded scenes of one split (``len``, ``[i]``) plus expression indexing."""

    def __init__(self, path: str, split: str):
        import tensorflow_datasets as tfds

        self.path = path
        self.split = split
        builder = tfds.builder_from_directory(path)
        # Every image and mask stays encoded until decode_scene needs it: tfds would otherwise
        # decode all of a scene's PNGs eagerly, candidate-pool masks (only RAS reads them) and
        # object masks an expression does not use included.
        self.raw = builder.as_data_source(split=split,
                                          decoders=_encoded_images(builder.info.features))
        self._counts: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.raw)

    def __getitem__(self, i: int) -> dict:
        return self.scene(i)

    def scene(self, i: int, with_pool: bool = True, lazy: bool = False) -> dict:
        """Record ``i`` decoded (``with_pool=False``: without the candidate pool; ``lazy``:
        image and object masks decoded when used, ``decode_scene``)."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"record {i} out of range for {len(self)} records")
        return decode_scene(self.raw[i % len(self)], with_pool, lazy)

    def expressions_per_record(self) -> np.ndarray:
        """int32 (N,): expressions in each record, from ``metadata.json`` (no decoding)."""
        if self._counts is None:
            meta_path = os.path.join(self.path, "metadata.json")
            with open(meta_path) as f:
                meta = json.load(f)
            counts = meta.get(schema.EXPRESSIONS_PER_RECORD, {}).get(self.split)
            if counts is None or len(counts) != len(self):
                raise BadRecordError(
                    meta_path,
                    schema.EXPRESSIONS_PER_RECORD,
                    f"missing or wrong length for split {self.split!r}",
                )
            self._counts = np.asarray(counts, np.int32)
        return self._counts

    def expression_index(self) -> np.ndarray:
        """int32 (M, 2): (record index, expression index) of every expression, in order."""
        counts = self.expressions_per_record()
        rec = np.repeat(np.arange(len(counts), dtype=np.int32), counts)
        starts = np.repeat(np.cumsum(counts) - counts, counts)
        expr = np.arange(int(counts.sum()), dtype=np.int32) - starts
        return np.stack([rec, expr.astype(np.int32)], axis=1).reshape(-1, 2)

    def file(self, name: str) -> str:
        """Path of a file stored with the dataset (e.g. ``beit3.spm``, ``tokenizer.model``)."""
        return os.path.join(self.path, name)


def open_scenes(name: str, split: str, data_dir: str, config: str | None = None) -> SceneSource:
    """Open a prepared split of ``name`` (e.g. 'refshapes', config 'tiny') for random access."""
    return SceneSource(dataset_dir(name, data_dir, config), split)


def open_split(data_cfg: Any, split: str) -> SceneSource:
    """The split of the dataset ``config.data`` names (``dataset``, ``data_dir``,
    ``dataset_config``)."""
    return open_scenes(data_cfg.dataset, split, data_cfg.data_dir, data_cfg.dataset_config)


def tokenizer_file(data_cfg: Any, filename: str) -> str:
    """The tokenizer a pipeline or predictor reads: ``config.data.tokenizer_path`` when set,
    else ``filename`` (``beit3.spm``, ``tokenizer.model``) stored with the dataset."""
    if data_cfg.tokenizer_path:
        return str(os.path.expanduser(data_cfg.tokenizer_path))
    ds = dataset_dir(data_cfg.dataset, data_cfg.data_dir, data_cfg.dataset_config)
    return os.path.join(ds, filename)


def check_dataset_tokenizer(config: Any, filename: str, size_of: Any, vocab: int) -> None:
    """A model whose vocabulary was read from the dataset's tokenizer (``vocab``) against the
    tokenizer this dataset holds now: they differ when the dataset was rebuilt elsewhere
    (RefShapes' tokenizers are trained at build time, and another sentencepiece version trains
    another vocabulary), and then every text id is wrong. Skipped with ``data.tokenizer_path``
    (an explicit tokenizer) or when the dataset is not there."""
    if config.data.tokenizer_path:
        return
    try:
        path = tokenizer_file(config.data, filename)
    except FileNotFoundError:  # no dataset here (e.g. restoring for another data dir later)
        return
    if not os.path.exists(path):
        return
    n = int(size_of(path))
    if n != int(vocab):
        raise ValueError(
            f"model.vocab_size is {vocab} but the dataset's tokenizer {path} has {n} pieces: "
            "the checkpoint was trained with another tokenizer (RefShapes builds its tokenizers "
            "at build time, and they depend on the sentencepiece version). Point "
            "data.tokenizer_path at the training tokenizer, or rebuild the data where the "
            "model was trained")
