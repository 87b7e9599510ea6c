"""RefCOCO, RefCOCO+ and RefCOCOg as scene records (one record per COCO image and split).

Format (defined by lichengunc/refer, https://github.com/lichengunc/refer: ``refer.py`` and its
README's ``data/<dataset>/`` layout). The manual dir holds, either directly or under
``<dataset>/`` (``refcoco``, ``refcoco+``, ``refcocog``):

- ``refs(<splitBy>).p``: a pickle of a list of refs ``{ref_id, ann_id, image_id, split,
  sentences: [{sent_id, sent, raw, tokens}], category_id, file_name, sent_ids}`` (``file_name``
  is refer's per-ref name and is not used; the image file comes from instances.json);
- ``instances.json``: COCO instances (images, annotations with polygon or RLE segmentation,
  categories);
- COCO train2014 images in ``train2014/`` (or refer's ``images/mscoco/images/train2014/``).

Builders (``BUILDERS`` names, built by ``refjax.data.build``): ``refcoco`` (configs ``unc``
[default], ``google``), ``refcoco_plus`` (name ``refcoco+`` accepted; config ``unc``),
``refcocog`` (configs ``umd`` [default], ``google``). Splits are those present in the refs file
(unc: train/val/testA/testB, umd: train/val/test, google: train/val[/test]).

Each record holds all of the image's annotations as ``objects`` and one expression per sentence
(text = refer's normalised ``sent``, raw = refer's ``raw`` sentence with its case and
punctuation, or ``sent`` when a sentence has no ``raw``; kind ``refcoco``, id = ``sent_id``,
target = the index of the ref's ``ann_id`` among the objects; ``subject_span``/``object_span``
parsed from the text by ``refjax.data.subject_object``: spaCy when installed with an English
model, else its rule-based fallback, chosen with the ``span_parser`` builder argument and
named in ``metadata.json`` under ``span_parser``). Image bytes are stored as found
(JPEG), once per image. Bad input ids: ``image:<image_id>``, ``ann:<ann_id>``, ``ref:<ref_id>``,
``ref:<ref_id>/sent:<sent_id>``. Skip counts (``skipped_bad_records``) have the unit ``refs``
besides records/objects/expressions: a ref with no sentences, with no usable sentence, or
whose target annotation is missing or bad counts as one skipped ref.
"""

from __future__ import annotations

import pickle
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import tensorflow_datasets as tfds

from refjax.data.builders import coco_common as cc
from refjax.data.errors import BadRecordError

KIND = "refcoco"


def load_refs(path: Path) -> list[dict]:
    """Load a refer ``refs(*).p`` (protocol-2 pickles written by Python 2 included)."""
    with open(path, "rb") as f:
        try:
            return pickle.load(f)
        except UnicodeDecodeError:
            f.seek(0)
            return _fix_latin1(pickle.load(f, encoding="latin1"))


def _fix_latin1(obj: Any) -> Any:
    """Undo latin1 decoding of Python-2 byte strings that held UTF-8."""
    if isinstance(obj, str):
        try:
            return obj.encode("latin1").decode("utf-8")
        except (UnicodeEncodeError, UnicodeDecodeError):
            return obj
    if isinstance(obj, list):
        return [_fix_latin1(v) for v in obj]
    if isinstance(obj, dict):
        return {_fix_latin1(k): _fix_latin1(v) for k, v in obj.items()}
    return obj


def group_by_split_image(refs: Sequence[dict]) -> dict[str, list[tuple[int, list[dict]]]]:
    """{split: [(image_id, refs of that image sorted by ref_id)], images sorted by id}."""
    groups: dict[str, dict[int, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for ref in refs:
        groups[str(ref["split"])][int(ref["image_id"])].append(ref)
    return {
        split: [
            (iid, sorted(groups[split][iid], key=lambda r: int(r["ref_id"])))
            for iid in sorted(groups[split])
        ]
        for split in cc.ordered_splits(list(groups))
    }


class CocoRefBuilder(cc.SceneBuilder, skip_registration=True):
    """Shared machinery for refer-style (refs + instances.json + COCO images) datasets."""

    FOLDER = ""  # refer's data/<FOLDER>/
    KIND = KIND
    SKIP_UNITS = (*cc.BadRecordPolicy.UNITS, "refs")
    PARSES_SPANS = True
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Put refer's refs(<splitBy>).p and instances.json (https://github.com/lichengunc/refer) "
        "and COCO train2014/ images into the manual dir."
    )

    def _annotation_dir(self, root: Path, filename: str) -> Path:
        return cc.find_file([root / self.FOLDER / filename, root / filename]).parent

    def _annotation_file(self) -> str:
        return f"refs({self.builder_config.name}).p"

    def _read_refs(self, path: Path) -> list[dict]:
        return load_refs(path)

    def _load(self, root: Path) -> dict[str, list[Any]]:
        name = self._annotation_file()
        ann_dir = self._annotation_dir(root, name)
        self._index = cc.CocoIndex.load(ann_dir / "instances.json")
        self._image_dir = cc.find_file(cc.coco_image_dirs(root) + cc.coco_image_dirs(ann_dir))
        return group_by_split_image(self._read_refs(ann_dir / name))

    def _ref_expressions(
        self, ref: dict, obj_index: dict[int, int], bad_anns: set[int], policy: cc.BadRecordPolicy
    ) -> list[cc.Expression]:
        """The expressions of one ref (one per sentence)."""
        rid = f"ref:{ref['ref_id']}"
        sentences = ref.get("sentences") or []
        ann_id = int(ref["ann_id"])
        if ann_id not in obj_index:
            if ann_id in bad_anns:  # the annotation was skipped already (and counted)
                self._drop_ref(policy, None, len(sentences))
                return []
            why = self._index.ann_not_in_image(ann_id, int(ref["image_id"]))
            self._drop_ref(policy, BadRecordError(rid, "ann_id", why), len(sentences))
            return []
        return self._sentences(rid, sentences, [obj_index[ann_id]], policy)

    @staticmethod
    def _drop_ref(policy: cc.BadRecordPolicy, err: BadRecordError | None, n_sent: int) -> None:
        """Raise ``err`` or count one skipped ref and its ``n_sent`` sentences."""
        if err is not None:
            policy.handle(err, "refs")
        else:
            policy.add("refs", 1)
        policy.add("expressions", n_sent)

    def _sentences(
        self, rid: str, sentences: Sequence[dict], targets: list[int], policy: cc.BadRecordPolicy
    ) -> list[cc.Expression]:
        if not sentences:
            self._drop_ref(policy, BadRecordError(rid, "sentences", "ref has no sentences"), 0)
            return []
        out = []
        for sent in sentences:
            sid = f"{rid}/sent:{sent.get('sent_id')}"
            try:
                text = cc.check_text(sent.get("sent"), sid, "sentences.sent")
            except BadRecordError as e:
                policy.handle(e, "expressions")
                continue
            raw = sent.get("raw")
            raw = raw.strip() if isinstance(raw, str) and raw.strip() else text
            subject, obj = self.spans(text)
            out.append(
                cc.Expression(str(sent["sent_id"]), text, self.KIND, list(targets), raw=raw,
                              subject_span=subject, object_span=obj)
            )
        if not out:  # every sentence was bad (each counted): the ref is gone too
            policy.add("refs", 1)
        return out

    def _scenes(
        self, items: Sequence[tuple[int, list[dict]]], policy: cc.BadRecordPolicy
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        index = self._index
        for image_id, refs in items:
            rid = f"image:{image_id}"
            n_sent = sum(len(r.get("sentences") or []) for r in refs)
            try:
                if image_id not in index.images:
                    raise BadRecordError(rid, "image_id", "image not in instances.json")
                meta = index.images[image_id]
                filename = index.image_file(image_id)
                image = cc.load_image(self._image_dir / filename, rid)
                cc.check_image_size(image, meta["height"], meta["width"], rid)
            except BadRecordError as e:
                policy.handle(e, "records")
                policy.add("refs", len(refs))
                policy.add("expressions", n_sent)
                continue
            objects, bad = index.objects(image_id, image.height, image.width, policy)
            obj_index = {o.id: i for i, o in enumerate(objects)}
            exprs = []
            for ref in refs:
                exprs.extend(self._ref_expressions(ref, obj_index, bad, policy))
            if not exprs:  # everything skipped (and counted)
                continue
            yield str(image_id), cc.scene_record(str(image_id), filename, image, objects, exprs)


def _configs(*names: str) -> list[tfds.core.BuilderConfig]:
    return [tfds.core.BuilderConfig(name=n, description=f"refer splitBy={n}") for n in names]


class RefCoco(CocoRefBuilder):
    """RefCOCO (refer ``data/refcoco``), configs ``unc`` and ``google``."""

    name = "refcoco"
    FOLDER = "refcoco"
    BUILDER_CONFIGS = _configs("unc", "google")
    HOMEPAGE = "https://github.com/lichengunc/refer"


class RefCocoPlus(CocoRefBuilder):
    """RefCOCO+ (refer ``data/refcoco+``), config ``unc``."""

    name = "refcoco_plus"
    FOLDER = "refcoco+"
    BUILDER_CONFIGS = _configs("unc")
    HOMEPAGE = "https://github.com/lichengunc/refer"


class RefCocog(CocoRefBuilder):
    """RefCOCOg (refer ``data/refcocog``), configs ``umd`` and ``google``."""

    name = "refcocog"
    FOLDER = "refcocog"
    BUILDER_CONFIGS = _configs("umd", "google")
    HOMEPAGE = "https://github.com/lichengunc/refer"


BUILDERS: dict[str, type[CocoRefBuilder]] = {
    "refcoco": RefCoco,
    "refcoco+": RefCocoPlus,
    "refcoco_plus": RefCocoPlus,
    "refcocog": RefCocog,
}

