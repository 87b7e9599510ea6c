"""gRefCOCO (generalised referring expressions: multi-target and no-target) as scene records.

Format (defined by henghuiding/gRefCOCO, https://github.com/henghuiding/gRefCOCO: ``grefer.py``
and the README's ``grefcoco/`` layout). The manual dir holds, directly or under ``grefcoco/``:

- ``grefs(unc).json``: a JSON list of refs ``{ref_id, image_id, ann_id: [ann ids] ([-1] for
  no target), split, sentences: [{sent, sent_id, ...}], no_target: bool, category_id: [...],
  file_name}``;
- ``instances.json``: COCO instances of the referred images;
- COCO train2014 images in ``train2014/`` (or ``images/mscoco/images/train2014/``).

Builder ``grefcoco``, config ``unc``; splits train/val/testA/testB (those in the file). One
record per image and split; one expression per sentence (kind ``gres``; text = ``sent``, raw =
``raw`` or ``sent``, as for RefCOCO), targets = the indices of the ref's ``ann_id`` list among
the objects (empty for no-target refs); subject/object spans parsed as for RefCOCO
(``span_parser``). Skip counts as for RefCOCO (with the unit ``refs``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import tensorflow_datasets as tfds

from refjax.data.builders import coco_common as cc
from refjax.data.builders.refcoco import CocoRefBuilder
from refjax.data.errors import BadRecordError

KIND = "gres"


def target_ann_ids(ref: dict) -> list[int]:
    """The ref's target annotation ids ([] for no-target), checked against ``no_target``."""
    rid = f"ref:{ref.get('ref_id')}"
    raw = ref.get("ann_id")
    ids = [int(a) for a in (raw if isinstance(raw, list) else [raw])]
    no_target = bool(ref.get("no_target", False))
    if -1 in ids:
        if len(ids) != 1:
            raise BadRecordError(rid, "ann_id", f"-1 (no target) mixed with targets {ids}")
        if not no_target:
            raise BadRecordError(rid, "ann_id", "ann_id is [-1] but no_target is false")
        return []
    if no_target or not ids:
        raise BadRecordError(rid, "ann_id", f"no_target={no_target} with ann_id {ids}")
    return ids


class GRefCoco(CocoRefBuilder):
    """gRefCOCO, config ``unc``."""

    name = "grefcoco"
    FOLDER = "grefcoco"
    KIND = KIND
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="unc", description="gRefCOCO (UNC splits)")]
    HOMEPAGE = "https://github.com/henghuiding/gRefCOCO"
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Put gRefCOCO's grefs(unc).json and instances.json "
        "(https://github.com/henghuiding/gRefCOCO) and COCO train2014/ images into the manual dir."
    )

    def _annotation_file(self) -> str:
        return f"grefs({self.builder_config.name}).json"

    def _read_refs(self, path: Path) -> list[dict]:
        with open(path) as f:
            return json.load(f)

    def _ref_expressions(
        self, ref: dict, obj_index: dict[int, int], bad_anns: set[int], policy: cc.BadRecordPolicy
    ) -> list[cc.Expression]:
        rid = f"ref:{ref['ref_id']}"
        sentences: Sequence[dict] = ref.get("sentences") or []
        try:
            ids = target_ann_ids(ref)
            if any(a in bad_anns for a in ids):  # skipped (and counted) with its annotation
                self._drop_ref(policy, None, len(sentences))
                return []
            missing = [a for a in ids if a not in obj_index]
            if missing:
                image_id = int(ref["image_id"])
                why = "; ".join(self._index.ann_not_in_image(a, image_id) for a in missing)
                raise BadRecordError(rid, "ann_id", why)
        except BadRecordError as e:
            self._drop_ref(policy, e, len(sentences))
            return []
        return self._sentences(rid, sentences, [obj_index[a] for a in ids], policy)


BUILDERS: dict[str, type[GRefCoco]] = {"grefcoco": GRefCoco}

