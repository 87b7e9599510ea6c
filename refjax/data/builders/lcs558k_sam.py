"""LCS-558K captions with SAM candidate pools: the RAS stage-1 data (spec ras.md 7-8).

Format: LLaVA's pretraining file ``blip_laion_cc_sbu_558k.json``, a JSON list of samples
``{id, image, conversations: [{from: 'human', value: '<image>\\n...'}, {from: 'gpt', value:
caption}]}``, and the candidate pools a SAM run wrote for those images. The pools come either
inside a sample (``mask_pool``: [COCO RLE], as MaskGroups-HQ stores them) or from
``sam_pools.json`` in the manual dir: ``{image path as in the sample: [COCO RLE, ...]}``.
Images are looked up in ``images/`` and the manual dir itself (LLaVA unpacks
``images/00453/004539375.jpg``).

Manual dir: the chat JSON (``blip_laion_cc_sbu_558k.json``, else the only ``*.json`` that is
not ``sam_pools.json``), the pools, the images.

Mapping: one record per sample: the image, the caption (the first ``gpt`` value, stripped) as
the record's ``caption``, the SAM pool (source ``sam``), no objects, and one expression (id =
sample id, text = the caption, kind ``caption``, no targets) so that the expression-indexed
pipeline reaches the record (RAS stage 1 trains on a record's first expression that has a
caption). Splits: LCS-558K has only a training set; ``val`` holds every sample whose
position in the file is a multiple of ``VAL_EVERY`` (0.5%), ``train`` the rest.

Bad input ids are the sample ``id``; fields name the JSON path (``image``, ``conversations``,
``mask_pool[2]``, ``sam_pools.json[<image>]``). A sample without a pool is bad input: stage 1
has nothing to caption from.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from refjax.data.builders import coco_common as cc
from refjax.data.errors import BadRecordError

CHAT_FILE = "blip_laion_cc_sbu_558k.json"
POOLS_FILE = "sam_pools.json"
IMAGE_DIRS = ("images", ".")
VAL_EVERY = 200


def caption_of(sample: dict, record_id: str) -> str:
    """The first ``gpt`` turn of a sample: the caption."""
    conv = sample.get("conversations")
    if not isinstance(conv, list):
        raise BadRecordError(record_id, "conversations", "missing or not a list")
    for i, c in enumerate(conv):
        if isinstance(c, dict) and c.get("from") == "gpt":
            value = c.get("value")
            if not isinstance(value, str):
                raise BadRecordError(record_id, f"conversations[{i}].value",
                                     f"caption is {type(value).__name__}")
            return cc.check_text(" ".join(value.split()), record_id, f"conversations[{i}].value")
    raise BadRecordError(record_id, "conversations", "no 'gpt' turn (the caption)")


class Lcs558kSam(cc.SceneBuilder):
    """LCS-558K + SAM pools: one record per caption; splits ``train`` / ``val``."""

    name = "lcs558k_sam"
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        f"Put LLaVA's {CHAT_FILE}, the SAM pools ({POOLS_FILE}: image -> [COCO RLE], or a "
        "mask_pool field per sample) and the images (images/) into the manual dir."
    )

    def _load(self, root: Path) -> dict[str, list[Any]]:
        self._root = root
        chat = root / CHAT_FILE
        if not chat.exists():
            others = [p for p in sorted(root.glob("*.json")) if p.name != POOLS_FILE]
            if len(others) != 1:
                raise FileNotFoundError(f"no {CHAT_FILE} in {root} (and not exactly one other "
                                        f"*.json: {[p.name for p in others]})")
            chat = others[0]
        with open(chat) as f:
            samples = json.load(f)
        if not isinstance(samples, list):
            raise ValueError(f"{chat}: expected a JSON list of samples")
        self._pools: dict[str, Any] = {}
        if (root / POOLS_FILE).exists():
            with open(root / POOLS_FILE) as f:
                self._pools = json.load(f)
        val = [s for i, s in enumerate(samples) if i % VAL_EVERY == 0]
        train = [s for i, s in enumerate(samples) if i % VAL_EVERY != 0]
        return {"train": train, "val": val}

    def _pool(self, sample: dict, image: cc.ImageData, rid: str) -> list:
        if "mask_pool" in sample:
            rles, field = sample["mask_pool"], "mask_pool"
        else:
            key = str(sample.get("image"))
            rles, field = self._pools.get(key), f"{POOLS_FILE}[{key}]"
        if not isinstance(rles, list) or not rles:
            raise BadRecordError(rid, field, "no candidate masks (missing or empty pool)")
        return [cc.decode_rle(r, image.height, image.width, rid, f"{field}[{i}]")
                for i, r in enumerate(rles)]

    def _scenes(
        self, items: Sequence[dict], policy: cc.BadRecordPolicy
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        for n, sample in enumerate(items):
            rid = str(sample.get("id"))
            try:
                caption = caption_of(sample, rid)
                name = sample.get("image")
                if not isinstance(name, str) or not name:
                    raise BadRecordError(rid, "image", f"no image file name ({name!r})")
                image = cc.load_image(cc.find_file([self._root / d / name for d in IMAGE_DIRS]),
                                      rid)
                pool = self._pool(sample, image, rid)
            except BadRecordError as e:
                policy.handle(e, "records")
                policy.add("expressions", 1)
                continue
            expr = cc.Expression(rid, caption, "caption", [], [])
            yield f"{n}:{rid}", cc.scene_record(name, name, image, [], [expr], pool,
                                                caption=caption)


BUILDERS: dict[str, type[Lcs558kSam]] = {"lcs558k_sam": Lcs558kSam}
