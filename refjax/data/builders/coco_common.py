"""Shared pieces of the real-data builders (RefCOCO/+/g, gRefCOCO, MaskGroups-HQ).

- input checks that raise :class:`BadRecordError` naming the record and the field (image files,
  COCO boxes, COCO polygon/RLE segmentations, texts) and :class:`BadRecordPolicy`, which raises
  them or, with ``skip_bad_records``, logs and counts them (and a split left with no record
  raises :class:`EmptySplitError` naming the split and what was skipped);
- COCO ``instances.json`` indexing (images, annotations per image, category names, and where
  an annotation id belongs, for "annotation N is not in the image" errors);
- :func:`scene_record`, which lays objects/expressions/pool out in the scheme of
  ``refjax.data.schema`` (CSR target/ref lists, row-major ``pool_ioa``);
- :class:`SceneBuilder`, the tfds base class: scene features, ``disable_shuffling``, the
  ``manual_dir``/``skip_bad_records``/``span_parser`` constructor arguments, and the metadata
  (per split ``expressions_per_record`` and ``skipped_bad_records``; ``span_parser``, the
  parser of the subject/object word spans, ``refjax.data.subject_object``).

Builder modules list their builders in a ``BUILDERS`` table (dataset name -> class);
``refjax.data.build.get_builder``/``build_dataset`` construct and prepare them.
"""

from __future__ import annotations

import abc
import collections
import inspect
import io
import json
import logging as pylogging
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath
from PIL import Image
from tensorflow_datasets.core import utils as tfds_utils

from refjax.boxes import box_problem, mask_ioa, xywh_to_xyxy, xyxy_to_xywh
from refjax.data import subject_object
from refjax.data.errors import BadRecordError
from refjax.data.images import encode_png
from refjax.data.schema import EXPRESSIONS_PER_RECORD, NO_SPAN, scene_features, word_count

_log = pylogging.getLogger(__name__)

# metadata.json key: per split, {"records"|"objects"|"expressions": number skipped}.
SKIPPED_BAD_RECORDS = "skipped_bad_records"
# metadata.json key: the parser of the expressions' subject/object spans ("none": not parsed).
SPAN_PARSER = "span_parser"
# metadata.json key: the STS word-score side file and, per split, how many expressions it scored.
STS_SCORES = "sts_scores"
# Skipped inputs listed by name in an EmptySplitError (the rest are counted).
MAX_LISTED_SKIPS = 20
# Split order of the refer/grefer annotation files; other split names follow, sorted.
CANONICAL_SPLITS = ("train", "val", "testA", "testB", "test")
# Decoded image modes/formats whose bytes are stored as given; anything else is re-encoded (PNG).
_KEEP_FORMATS = ("JPEG", "PNG")
_KEEP_MODES = ("RGB", "L")


@dataclass
class ImageData:
    """Encoded image bytes (stored as given when JPEG/PNG RGB/L) and their decoded size."""

    data: bytes
    height: int
    width: int


@dataclass
class SceneObject:
    id: int
    box: np.ndarray  # float32 COCO xywh, inside the image
    mask: np.ndarray  # uint8 (H, W) in {0, 1}
    category: str = ""


@dataclass
class Expression:
    id: str
    text: str  # what models read (refer: the normalised ``sent``)
    kind: str
    targets: list[int]  # indices into the scene's objects
    refs: list[int] = field(default_factory=list)  # indices into the scene's objects
    raw: str = ""  # the sentence as written (case, punctuation); "" = same as ``text``
    subject_span: tuple[int, int] = NO_SPAN  # [start, end) words of ``text``, head last
    object_span: tuple[int, int] = NO_SPAN


class EmptySplitError(BadRecordError):
    """Every record of a split was skipped as bad input: names the split and the skips."""

    def __init__(self, dataset: str, split: str, summary: dict[str, int], skipped: list[str]):
        listed = "; ".join(skipped[:MAX_LISTED_SKIPS])
        more = len(skipped) - MAX_LISTED_SKIPS
        if more > 0:
            listed += f"; and {more} more"
        super().__init__(
            f"{dataset}/{split}",
            "records",
            f"every record of split {split!r} was skipped as bad input (skipped {summary}): "
            f"{listed or 'nothing was skipped, the split has no input'}",
        )
        self.split = split
        self.summary = summary
        self.skipped = skipped


class BadRecordPolicy:
    """Raise bad-input errors, or (``skip=True``) log them and count them per unit.

    Units: ``records`` (a whole scene/sample), ``objects`` (one annotation), ``expressions``,
    and for the refer-format builders ``refs`` (a ref dropped whole: no sentences, a missing or
    bad target annotation, or its image dropped). Counts are of items dropped: a dropped record
    also adds its refs and expressions, a dropped ref its expressions, and expressions whose
    target object was dropped are counted too. ``skipped`` lists each handled error as
    ``"<record id> (<field>): <reason>"``.
    """

    UNITS = ("records", "objects", "expressions")

    def __init__(self, skip: bool, units: Sequence[str] = UNITS):
        self.skip = skip
        self.units = tuple(units)
        self.counts: collections.Counter[str] = collections.Counter()
        self.skipped: list[str] = []

    def handle(self, err: BadRecordError, unit: str, n: int = 1) -> None:
        """Raise ``err`` or (skip mode) log it and count ``n`` dropped ``unit``."""
        self._check(unit)
        if not self.skip:
            raise err
        logging.warning("skip_bad_records: skipping %d %s: %s", n, unit, err)
        self.counts[unit] += n
        self.skipped.append(f"{err.record_id} ({err.field}): {err.reason}")

    def add(self, unit: str, n: int) -> None:
        """Count ``n`` more dropped ``unit`` (items dropped along with a handled error)."""
        self._check(unit)
        self.counts[unit] += n

    def _check(self, unit: str) -> None:
        if unit not in self.units:
            raise ValueError(f"unknown unit {unit!r}; expected one of {self.units}")

    def summary(self) -> dict[str, int]:
        return {u: int(self.counts[u]) for u in self.units}


# ----------------------------------------------------------------------------- input checks
def load_image(path: str | os.PathLike, record_id: str, field: str = "image") -> ImageData:
    """Read an image file; JPEG/PNG in RGB or L mode are kept byte-exact, others become PNG."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise BadRecordError(record_id, field, f"missing image file {path} ({e})") from e
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            width, height = im.size
            if im.format not in _KEEP_FORMATS or im.mode not in _KEEP_MODES:
                data = encode_png(np.asarray(im.convert("RGB")))
    except Exception as e:  # PIL raises several types for corrupt data
        raise BadRecordError(record_id, field, f"unreadable image {path} ({e})") from e
    return ImageData(data, height, width)


def check_image_size(image: ImageData, height: int, width: int, record_id: str) -> None:
    if (image.height, image.width) != (int(height), int(width)):
        raise BadRecordError(
            record_id,
            "image",
            f"image file is {image.height}x{image.width} (HxW) but the annotation says "
            f"{height}x{width}",
        )


def check_text(text: Any, record_id: str, field: str) -> str:
    if not isinstance(text, str) or not text.strip():
        raise BadRecordError(record_id, field, f"empty text {text!r}")
    return text.strip()


def check_box(xywh: Any, height: int, width: int, record_id: str, field: str) -> np.ndarray:
    """Validate a COCO xywh box against the image (``refjax.boxes.box_problem``); returns
    float32 xywh clipped to the image."""
    try:
        b = np.asarray(xywh, np.float64).reshape(4)
    except (TypeError, ValueError) as e:
        raise BadRecordError(record_id, field, f"not a 4-number box: {xywh!r}") from e
    xyxy = xywh_to_xyxy(b) if np.all(np.isfinite(b)) else b
    problem = box_problem(xyxy, width, height)
    if problem:
        raise BadRecordError(record_id, field, f"{problem} (COCO xywh={b.tolist()})")
    xyxy = np.clip(xyxy, 0, [width, height, width, height])
    return xyxy_to_xywh(xyxy).astype(np.float32)


def _pycoco_decode(rle: dict) -> np.ndarray:
    """pycocotools' decode, without its numpy-2 ``__array__(copy=)`` DeprecationWarning."""
    from pycocotools import mask as mask_utils

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "__array__ implementation", DeprecationWarning)
        return mask_utils.decode(rle)


def rle_string_counts(counts: str | bytes) -> list[int]:
    """Parse COCO's compressed RLE string (the inverse of maskApi.c ``rleToString``).

    Done in Python so that malformed strings raise instead of making pycocotools write
    past its buffer.
    """
    s = counts.encode("ascii") if isinstance(counts, str) else bytes(counts)
    out: list[int] = []
    p = 0
    while p < len(s):
        x, k, more = 0, 0, True
        while more:
            if p >= len(s):
                raise ValueError("truncated RLE string")
            c = s[p] - 48
            if not 0 <= c < 64:
                raise ValueError(f"invalid RLE character {chr(s[p])!r}")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(out) > 2:
            x += out[-2]
        out.append(x)
    return out


def decode_rle(rle: Any, height: int, width: int, record_id: str, field: str) -> np.ndarray:
    """Decode a COCO RLE (compressed string or uncompressed counts list) to uint8 (H, W)."""
    from pycocotools import mask as mask_utils

    if not isinstance(rle, dict) or "counts" not in rle or "size" not in rle:
        raise BadRecordError(record_id, field, "RLE must be a dict with 'size' and 'counts'")
    size = [int(v) for v in rle["size"]]
    if size != [int(height), int(width)]:
        raise BadRecordError(
            record_id, field, f"mask of wrong size: RLE size {size}, image {[height, width]}"
        )
    counts = rle["counts"]
    try:
        if isinstance(counts, (str, bytes)):
            cnts = rle_string_counts(counts)
            data = counts.encode("ascii") if isinstance(counts, str) else counts
        else:
            cnts = [int(c) for c in counts]
            data = None
        if any(c < 0 for c in cnts) or sum(cnts) != height * width:
            raise ValueError(f"RLE counts sum to {sum(cnts)}, not H*W = {height * width}")
        if data is None:
            data = mask_utils.frPyObjects({"size": size, "counts": cnts}, height, width)["counts"]
        m = _pycoco_decode({"size": size, "counts": data})
    except (ValueError, TypeError) as e:
        raise BadRecordError(record_id, field, f"RLE does not decode ({e})") from e
    return np.ascontiguousarray(m, dtype=np.uint8)


def decode_polygons(polys: Any, height: int, width: int, record_id: str, field: str) -> np.ndarray:
    """Rasterise COCO polygons with pycocotools (parts of fewer than 3 points are ignored)."""
    from pycocotools import mask as mask_utils

    parts = []
    for poly in polys:
        try:
            p = [float(v) for v in poly]
        except (TypeError, ValueError) as e:
            raise BadRecordError(record_id, field, f"polygon is not a list of numbers ({e})") from e
        if len(p) % 2 or not all(math.isfinite(v) for v in p):
            raise BadRecordError(record_id, field, "polygon needs an even number of finite values")
        if len(p) >= 6:
            parts.append(p)
    if not parts:
        raise BadRecordError(record_id, field, "no polygon with at least 3 points")
    rles = mask_utils.frPyObjects(parts, height, width)
    return np.ascontiguousarray(_pycoco_decode(mask_utils.merge(rles)), dtype=np.uint8)


def decode_segmentation(
    seg: Any, height: int, width: int, record_id: str, field: str
) -> np.ndarray:
    """A COCO ``segmentation`` (polygon list or RLE dict) -> uint8 (H, W) mask."""
    if isinstance(seg, dict):
        return decode_rle(seg, height, width, record_id, field)
    if isinstance(seg, list):
        return decode_polygons(seg, height, width, record_id, field)
    raise BadRecordError(record_id, field, f"segmentation of type {type(seg).__name__}")


# ------------------------------------------------------------------------------ COCO indexing
@dataclass
class CocoIndex:
    """A COCO ``instances.json``: images by id, annotations per image (by id), category names."""

    images: dict[int, dict]
    anns_by_image: dict[int, list[dict]]
    categories: dict[int, str]
    image_of_ann: dict[int, int] = field(default_factory=dict)  # annotation id -> image id

    @classmethod
    def load(cls, path: str | os.PathLike) -> CocoIndex:
        with open(path) as f:
            data = json.load(f)
        images = {int(im["id"]): im for im in data["images"]}
        anns: dict[int, list[dict]] = collections.defaultdict(list)
        for ann in data["annotations"]:
            anns[int(ann["image_id"])].append(ann)
        for lst in anns.values():
            lst.sort(key=lambda a: int(a["id"]))
        cats = {int(c["id"]): str(c["name"]) for c in data.get("categories", [])}
        image_of = {int(a["id"]): int(a["image_id"]) for a in data["annotations"]}
        return cls(images, dict(anns), cats, image_of)

    def ann_not_in_image(self, ann_id: int, image_id: int) -> str:
        """Why annotation ``ann_id`` is not an object of image ``image_id`` (for errors)."""
        owner = self.image_of_ann.get(int(ann_id))
        if owner is None:
            return f"annotation {ann_id} is not in instances.json"
        if owner != int(image_id):
            return f"annotation {ann_id} belongs to image {owner}, not to image {image_id}"
        return f"annotation {ann_id} of image {image_id} was not loaded"

    def image_file(self, image_id: int) -> str:
        """The image's file name (``COCO_train2014_%012d.jpg`` when instances.json lacks it)."""
        return self.images[image_id].get("file_name") or f"COCO_train2014_{image_id:012d}.jpg"

    def objects(
        self, image_id: int, height: int, width: int, policy: BadRecordPolicy
    ) -> tuple[list[SceneObject], set[int]]:
        """The image's annotations as objects; returns (objects, ids of skipped annotations)."""
        objects, bad = [], set()
        for ann in self.anns_by_image.get(image_id, []):
            rid = f"ann:{ann['id']}"
            try:
                box = check_box(ann.get("bbox"), height, width, rid, "bbox")
                seg = ann.get("segmentation")
                mask = decode_segmentation(seg, height, width, rid, "segmentation")
                cat = self.categories.get(int(ann.get("category_id", -1)))
                if cat is None:
                    raise BadRecordError(rid, "category_id", f"unknown {ann.get('category_id')}")
            except BadRecordError as e:
                policy.handle(e, "objects")
                bad.add(int(ann["id"]))
                continue
            objects.append(SceneObject(int(ann["id"]), box, mask, cat))
        return objects, bad


def find_file(candidates: Sequence[Path]) -> Path:
    """The first existing path among candidates (the first one when none exists)."""
    for c in candidates:
        if c.exists():
            return c
    return candidates[0]


def coco_image_dirs(root: Path) -> list[Path]:
    """Where COCO train2014 images are looked for under a manual dir (refer's layout included)."""
    return [
        root / "train2014",
        root / "images" / "train2014",
        root / "images" / "mscoco" / "images" / "train2014",
        root / "mscoco" / "images" / "train2014",
    ]


def ordered_splits(names: Sequence[str]) -> list[str]:
    known = [s for s in CANONICAL_SPLITS if s in names]
    return known + sorted(set(names) - set(known))


# ------------------------------------------------------------------------------ scene records
def scene_record(
    image_id: str,
    filename: str,
    image: ImageData,
    objects: Sequence[SceneObject],
    expressions: Sequence[Expression],
    pool: Sequence[np.ndarray] = (),
    pool_source: str = "sam",
    caption: str = "",
) -> dict[str, Any]:
    """One scene record in the ``refjax.data.schema`` layout."""
    targets: list[int] = []
    refs: list[int] = []
    exprs = []
    n_obj = len(objects)
    for e in expressions:
        for i in (*e.targets, *e.refs):
            if not 0 <= i < n_obj:
                raise ValueError(f"expression {e.id}: object index {i} out of range {n_obj}")
        exprs.append(
            {
                "id": e.id,
                "text": e.text,
                "raw": e.raw or e.text,
                "kind": e.kind,
                "target_start": len(targets),
                "target_count": len(e.targets),
                "ref_start": len(refs),
                "ref_count": len(e.refs),
                "subject_span": np.asarray(e.subject_span, np.int32).reshape(2),
                "object_span": np.asarray(e.object_span, np.int32).reshape(2),
            }
        )
        targets.extend(e.targets)
        refs.extend(e.refs)
    pool_ioa = np.zeros((len(expressions), len(pool)), np.float32)
    if len(pool):
        cands = np.stack(pool)
        for k, e in enumerate(expressions):
            if e.targets:
                union = np.any(np.stack([objects[i].mask for i in e.targets]), axis=0)
                pool_ioa[k] = mask_ioa(cands, union)
    return {
        "image/id": image_id,
        "image/filename": filename,
        "image": image.data,
        "image/height": image.height,
        "image/width": image.width,
        "objects": [
            {"id": o.id, "box": o.box, "mask": encode_png(o.mask), "category": o.category}
            for o in objects
        ],
        "expressions": exprs,
        "expr_targets": np.asarray(targets, np.int32),
        "expr_refs": np.asarray(refs, np.int32),
        "pool": [{"mask": encode_png(m), "source": pool_source} for m in pool],
        "pool_ioa": pool_ioa.reshape(-1),
        "caption": caption,
        "expr_word_scores": np.zeros(0, np.float32),  # filled by SceneBuilder from sts_scores
    }


def load_word_scores(path: Path) -> dict[str, list[float]]:
    """The STS word-score side file: a JSON object ``{expression id: [one finite float per
    whitespace-separated word of the expression's text]}`` (the paper's CLIP word-to-target
    similarities, computed elsewhere). A malformed file is an error naming the file and key."""
    if not path.is_file():
        raise FileNotFoundError(f"sts_scores file {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise BadRecordError(str(path), "sts_scores", f"not JSON: {e}") from e
    if not isinstance(data, dict):
        raise BadRecordError(str(path), "sts_scores",
                             f"expected an object {{expression id: [scores]}}, got "
                             f"{type(data).__name__}")
    out = {}
    for key, scores in data.items():
        ok = isinstance(scores, list) and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
            for x in scores)
        if not ok:
            raise BadRecordError(f"{path}:{key}", "sts_scores",
                                 "expected a list of finite numbers, one per word")
        out[str(key)] = [float(x) for x in scores]
    return out


# ----------------------------------------------------------------------------- base builder
class SceneBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of the real-data builders: one scene record per image (see refjax.data.schema).

    Constructor keyword arguments on top of tfds': ``manual_dir`` (where the raw files are;
    otherwise ``download_config.manual_dir``) and ``skip_bad_records`` (default False: a bad
    input raises ``BadRecordError``; True: it is skipped, logged, and counted per split in
    ``metadata.json`` under ``skipped_bad_records``), and ``span_parser`` (builders with
    ``PARSES_SPANS``: ``auto`` [default: spaCy when it and an English model are installed,
    else the rule-based fallback], ``spacy``, ``rules`` or ``none``; see
    ``refjax.data.subject_object``; the parser used is logged and stored in ``metadata.json``
    under ``span_parser``), and ``sts_scores`` (a JSON side file ``{expression id: [score per
    word]}`` filling the records' ``expr_word_scores``, MRefM's STS label; ``load_word_scores``).
    They are constructor arguments rather than BuilderConfig fields
    because tfds refuses a custom config named like a registered one.
    """

    VERSION = tfds.core.Version("1.3.0")
    RELEASE_NOTES = {
        "1.0.0": "Scene records (refjax.data.schema).",
        "1.1.0": "Expressions keep the raw sentence (field 'raw') beside the normalised text.",
        "1.2.0": "Subject/object word spans parsed from the text (refjax.data.subject_object; "
        "metadata 'span_parser' names the parser).",
        "1.3.0": "Per-word STS scores ('expr_word_scores') from an optional side file "
        "(sts_scores); metadata 'sts_scores' names it and counts the scored expressions.",
    }
    HOMEPAGE = ""
    DESCRIPTION = ""
    # Units of the skipped_bad_records counts (see BadRecordPolicy).
    SKIP_UNITS: tuple[str, ...] = BadRecordPolicy.UNITS
    # Whether the builder parses subject/object spans of its expressions (``spans``).
    PARSES_SPANS = False

    def __init__(
        self,
        *,
        manual_dir: str | os.PathLike | None = None,
        skip_bad_records: bool = False,
        span_parser: str = "auto",
        sts_scores: str | os.PathLike | None = None,
        **kwargs: Any,
    ):
        self.skip_bad_records = bool(skip_bad_records)
        self.sts_scores_path = None if sts_scores is None else Path(sts_scores)
        self._word_scores: dict[str, list[float]] | None = None
        self._raw_dir = Path(manual_dir) if manual_dir is not None else None
        if span_parser not in subject_object.PARSERS:
            raise ValueError(f"unknown span_parser {span_parser!r}; one of "
                             f"{subject_object.PARSERS}")
        self.span_parser_kind = span_parser if self.PARSES_SPANS else "none"
        self._span_parser: subject_object.SpanParser | None = None
        self._span_parser_ready = False
        super().__init__(**kwargs)

    @property
    def span_parser_name(self) -> str:
        """The name of the span parser this build uses (``none`` when spans are not parsed);
        chosen, and logged, on first use."""
        if not self._span_parser_ready:
            self._span_parser = subject_object.get_parser(self.span_parser_kind)
            self._span_parser_ready = True
            name = self._span_parser.name if self._span_parser is not None else "none"
            # the stdlib logger: the CLI shows refjax's INFO lines (absl's are silenced there)
            _log.info("%s: subject/object spans by %s", self.name, name)
        return self._span_parser.name if self._span_parser is not None else "none"

    def spans(self, text: str) -> tuple[tuple[int, int], tuple[int, int]]:
        """``(subject_span, object_span)`` of an expression's text (``NO_SPAN`` when the
        builder does not parse spans)."""
        self.span_parser_name  # noqa: B018  (resolves the parser once)
        if self._span_parser is None:
            return NO_SPAN, NO_SPAN
        return self._span_parser(text)

    @tfds_utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        """The module file: tfds' own lookup (via importlib.resources) needs the
        ``importlib_resources`` backport, absent here; this is its documented fallback."""
        return epath.Path(inspect.getfile(cls))

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.DESCRIPTION,
            features=scene_features(word_scores=True),
            homepage=self.HOMEPAGE,
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        root = self._raw_dir if self._raw_dir is not None else Path(dl_manager.manual_dir)
        self.info.metadata[SPAN_PARSER] = self.span_parser_name
        if self.sts_scores_path is not None:
            self._word_scores = load_word_scores(self.sts_scores_path)
        self.info.metadata[STS_SCORES] = {
            "file": self.sts_scores_path.name if self.sts_scores_path is not None else "none"}
        work = self._load(root)
        return {split: self._generate_examples(split, items) for split, items in work.items()}

    def _generate_examples(self, split: str, items: Sequence[Any]):
        policy = BadRecordPolicy(self.skip_bad_records, self.SKIP_UNITS)
        counts, scored = [], 0
        for key, record in self._scenes(items, policy):
            counts.append(len(record["expressions"]))
            scored += self._attach_word_scores(record)
            yield key, record
        if not counts:  # tfds would fail on the empty split without saying why
            raise EmptySplitError(self.name, split, policy.summary(), policy.skipped)
        self.info.metadata.setdefault(EXPRESSIONS_PER_RECORD, {})[split] = counts
        self.info.metadata[STS_SCORES][split] = scored
        if self._word_scores is not None:
            _log.info("%s split %s: %d of %d expressions have STS word scores", self.name, split,
                      scored, sum(counts))
        self.info.metadata.setdefault(SKIPPED_BAD_RECORDS, {})[split] = policy.summary()
        if sum(policy.counts.values()):
            logging.warning("%s split %s: skipped bad input %s", self.name, split, policy.summary())

    def _attach_word_scores(self, record: dict[str, Any]) -> int:
        """Fill ``expr_word_scores`` of a scene record from the side file (schema); returns how
        many of its expressions have scores."""
        if not self._word_scores:
            return 0
        flat, scored = [], 0
        for e in record["expressions"]:
            n = word_count(e["text"])
            scores = self._word_scores.get(e["id"])
            if scores is None:
                flat.append(np.full(n, np.nan, np.float32))
                continue
            if len(scores) != n:
                raise BadRecordError(
                    f"expression {e['id']}", "sts_word_scores",
                    f"{len(scores)} scores in {self.sts_scores_path} for the {n} words of "
                    f"{e['text']!r}")
            flat.append(np.asarray(scores, np.float32))
            scored += 1
        if scored:
            record["expr_word_scores"] = np.concatenate(flat) if flat else np.zeros(0, np.float32)
        return scored

    @abc.abstractmethod
    def _load(self, root: Path) -> dict[str, list[Any]]:
        """Read the annotation files: {split: the work items of its scenes, in record order}."""

    @abc.abstractmethod
    def _scenes(
        self, items: Sequence[Any], policy: BadRecordPolicy
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        """Yield (unique key, scene record) for the work items of one split."""
