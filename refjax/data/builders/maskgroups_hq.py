"""MaskGroups-HQ (RAS, ICCV 2025) as scene records with a SAM candidate pool.

Format: the RAS release's records, as described in spec/ras.md section 8.2 (fields seen in use
by the RAS code): a JSON list of samples ``{id, image, conversations: [{from: 'human'|'gpt',
value}], mask_pool: [COCO RLE], gt_mask_pool: [COCO RLE], gt_mask_group: [[indices into
gt_mask_pool], ...]}``. A human value holds ``<image>`` and ``<mask_pool>`` then the query,
which may contain ``<mask-ref>``.

Manual dir: every ``*.json`` at its top level is one split named after the file stem (e.g.
``train.json``, ``eval.json``); images are looked up in ``images/``, ``images_resized/`` and
the manual dir itself.

Mapping (assumptions marked [A], since the release's layout is not confirmed by the spec):

- objects = ``gt_mask_pool`` (id = index, box = tight box of the mask, category '');
- pool = ``mask_pool`` (source ``sam``); ``pool_ioa`` = IoA of each candidate against the
  union of the expression's targets (spec/ras.md 8.4);
- [A] the k-th human turn goes with ``gt_mask_group[k]`` (one group per turn; the counts
  must match); each pair is one expression, id ``<sample id>:<k>``, text = the human value
  without ``<image>``/``<mask_pool>`` (``<mask-ref>`` kept), kind ``ores_ref`` when it has
  ``<mask-ref>``, else ``ores``; raw = text (the query keeps its case and punctuation);
  targets = the group's indices into gt_mask_pool (= objects; NOT into mask_pool);
- [A] reference masks: an optional field ``ref_mask_indices``, one list per human turn of
  indices into gt_mask_pool, one per ``<mask-ref>`` occurrence in order. A ``<mask-ref>`` turn
  without it is a BadRecordError (field ``ref_mask_indices``);
- samples that share an image and have identical ``mask_pool`` and ``gt_mask_pool`` are merged
  into one scene record (the image is stored once); other samples get their own record.

Bad input ids are the sample ``id`` (expressions: ``<id>:<k>``), fields name the JSON path
(``image``, ``gt_mask_pool[3]``, ``mask_pool[0]``, ``conversations[2].value``, ...).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from refjax.boxes import mask_to_box, xyxy_to_xywh
from refjax.data.builders import coco_common as cc
from refjax.data.errors import BadRecordError

MASK_REF = "<mask-ref>"
_STRIP_TOKENS = re.compile(r"<image>|<mask_pool>")
IMAGE_DIRS = ("images", "images_resized", ".")


def query_text(value: Any, record_id: str, field: str) -> str:
    """The query of a human turn: the value without ``<image>``/``<mask_pool>``, stripped."""
    if not isinstance(value, str):
        raise BadRecordError(record_id, field, f"human value is {type(value).__name__}")
    return cc.check_text(" ".join(_STRIP_TOKENS.sub(" ", value).split()), record_id, field)


@dataclass
class Turn:
    index: int  # position among human turns
    field: str  # JSON path of the human value
    value: Any


def human_turns(sample: dict, record_id: str) -> list[Turn]:
    conv = sample.get("conversations")
    if not isinstance(conv, list):
        raise BadRecordError(record_id, "conversations", "missing or not a list")
    turns = []
    for i, c in enumerate(conv):
        if isinstance(c, dict) and c.get("from") == "human":
            turns.append(Turn(len(turns), f"conversations[{i}].value", c.get("value")))
    return turns


def _indices(values: Any, n: int, record_id: str, field: str) -> list[int]:
    if not isinstance(values, list):
        raise BadRecordError(record_id, field, "not a list of indices")
    out = [int(v) for v in values]
    bad = [v for v in out if not 0 <= v < n]
    if bad:
        raise BadRecordError(record_id, field, f"indices {bad} out of range for {n} gt masks")
    return out


def _n_groups(sample: dict) -> int:
    groups = sample.get("gt_mask_group")
    return len(groups) if isinstance(groups, list) else 0


def _scene_key(sample: dict) -> tuple[str, str, str]:
    dump = lambda v: json.dumps(v, sort_keys=True)
    return str(sample.get("image")), dump(sample.get("mask_pool")), dump(sample.get("gt_mask_pool"))


def group_samples(samples: Sequence[dict]) -> list[list[dict]]:
    """Samples grouped by (image, mask_pool, gt_mask_pool), in order of first appearance."""
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for s in samples:
        groups.setdefault(_scene_key(s), []).append(s)
    return list(groups.values())


class MaskGroupsHq(cc.SceneBuilder):
    """MaskGroups-HQ: one record per image (and pool); splits = the JSON files of the manual dir."""

    name = "maskgroups_hq"
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Put the MaskGroups-HQ JSON files (one per split, e.g. train.json, eval.json) and the "
        "images (images/ or images_resized/) into the manual dir."
    )

    def _load(self, root: Path) -> dict[str, list[Any]]:
        self._root = root
        files = {re.sub(r"\W", "_", p.stem): p for p in sorted(root.glob("*.json"))}
        if not files:
            raise FileNotFoundError(f"no MaskGroups-HQ *.json split files in {root}")
        out = {}
        for split in cc.ordered_splits(list(files)):
            with open(files[split]) as f:
                out[split] = group_samples(json.load(f))
        return out

    def _image_path(self, image: Any, record_id: str) -> Path:
        if not isinstance(image, str) or not image:
            raise BadRecordError(record_id, "image", f"no image file name ({image!r})")
        return cc.find_file([self._root / d / image for d in IMAGE_DIRS])

    def _masks(self, sample: dict, key: str, image: cc.ImageData, rid: str) -> list[np.ndarray]:
        rles = sample.get(key)
        if not isinstance(rles, list):
            raise BadRecordError(rid, key, "missing or not a list of RLE")
        return [
            cc.decode_rle(r, image.height, image.width, rid, f"{key}[{i}]")
            for i, r in enumerate(rles)
        ]

    def _objects(self, gt: list[np.ndarray], rid: str) -> list[cc.SceneObject]:
        objects = []
        for i, m in enumerate(gt):
            box = xyxy_to_xywh(mask_to_box(m))
            if box[2] <= 0 or box[3] <= 0:
                raise BadRecordError(rid, f"gt_mask_pool[{i}]", "empty mask (zero-area box)")
            objects.append(cc.SceneObject(i, box.astype(np.float32), m))
        return objects

    def _expressions(
        self, sample: dict, n_obj: int, policy: cc.BadRecordPolicy
    ) -> list[cc.Expression]:
        rid = str(sample.get("id"))
        turns = human_turns(sample, rid)
        groups = sample.get("gt_mask_group")
        if not isinstance(groups, list) or len(groups) != len(turns):
            n = len(groups) if isinstance(groups, list) else None
            raise BadRecordError(rid, "gt_mask_group", f"{n} groups for {len(turns)} human turns")
        ref_lists = sample.get("ref_mask_indices")
        out = []
        for turn, group in zip(turns, groups):
            try:
                text = query_text(turn.value, rid, turn.field)
                targets = _indices(group, n_obj, rid, f"gt_mask_group[{turn.index}]")
                refs = self._refs(text, ref_lists, turn.index, n_obj, rid)
            except BadRecordError as e:
                policy.handle(e, "expressions")
                continue
            kind = "ores_ref" if refs else "ores"
            out.append(cc.Expression(f"{rid}:{turn.index}", text, kind, targets, refs))
        return out

    @staticmethod
    def _refs(text: str, ref_lists: Any, k: int, n_obj: int, rid: str) -> list[int]:
        n_ref = text.count(MASK_REF)
        if ref_lists is None:
            if n_ref:
                raise BadRecordError(
                    rid, "ref_mask_indices", f"turn {k} has {MASK_REF} but no reference masks"
                )
            return []
        field = f"ref_mask_indices[{k}]"
        if not isinstance(ref_lists, list) or k >= len(ref_lists):
            raise BadRecordError(rid, field, "missing (one list per human turn expected)")
        refs = _indices(ref_lists[k], n_obj, rid, field)
        if len(refs) != n_ref:
            raise BadRecordError(rid, field, f"{len(refs)} reference masks for {n_ref} {MASK_REF}")
        return refs

    def _scenes(
        self, items: Sequence[list[dict]], policy: cc.BadRecordPolicy
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        for n, samples in enumerate(items):
            first = samples[0]
            rid = str(first.get("id"))
            n_turns = sum(_n_groups(s) for s in samples)
            try:
                path = self._image_path(first.get("image"), rid)
                image = cc.load_image(path, rid)
                gt = self._masks(first, "gt_mask_pool", image, rid)
                pool = self._masks(first, "mask_pool", image, rid)
                objects = self._objects(gt, rid)
            except BadRecordError as e:
                policy.handle(e, "records", len(samples))
                policy.add("expressions", n_turns)
                continue
            exprs = []
            for s in samples:
                try:
                    exprs.extend(self._expressions(s, len(objects), policy))
                except BadRecordError as e:
                    policy.handle(e, "records")
                    policy.add("expressions", _n_groups(s))
            if not exprs:  # everything skipped (and counted)
                continue
            record = cc.scene_record(
                str(first["image"]), str(first["image"]), image, objects, exprs, pool
            )
            yield f"{n}:{rid}", record



BUILDERS: dict[str, type[MaskGroupsHq]] = {"maskgroups_hq": MaskGroupsHq}
