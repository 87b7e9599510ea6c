"""The LCS-558K + SAM pool builder (RAS stage 1's 13b data) on a fixture in LLaVA's layout:
captions, pools (side file and inline), splits, and bad input named by record and field."""

from __future__ import annotations

import json

import numpy as np
import pytest

from refjax.data import build
from refjax.data.builders.lcs558k_sam import VAL_EVERY
from refjax.data.errors import BadRecordError
from tests.fixtures import real_formats as rf


def _prepare(raw, data_dir, **kw):
    b = build.get_builder("lcs558k_sam", None, data_dir, raw, **kw)
    b.download_and_prepare()
    return b


def _records(b, split):
    src = b.as_data_source(split)
    return [src[i] for i in range(len(src))]


def _s(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def test_captions_pools_and_splits(tmp_path):
    fx = rf.write_lcs558k_sam(tmp_path / "raw", n=5)
    b = _prepare(fx.root, tmp_path / "data")
    val, train = _records(b, "val"), _records(b, "train")
    want_val = [sid for i, sid in enumerate(fx.order) if i % VAL_EVERY == 0]
    assert [_s(r["image/id"]).split("/")[1][:-4] for r in val] == want_val
    assert len(train) == len(fx.order) - len(want_val)
    for rec in val + train:
        (eid,) = [_s(x) for x in rec["expressions"]["id"]]
        caption = " ".join(fx.captions[eid].split())
        assert _s(rec["caption"]) == caption  # the gpt turn, whitespace normalised
        assert [_s(x) for x in rec["expressions"]["text"]] == [caption]
        assert [_s(x) for x in rec["expressions"]["kind"]] == ["caption"]
        assert list(rec["expressions"]["target_count"]) == [0]
        assert len(rec["objects"]["mask"]) == 0
        pool = [np.asarray(m)[..., 0] for m in rec["pool"]["mask"]]
        assert len(pool) == len(fx.pools[eid])  # inline mask_pool (sample 1) or sam_pools.json
        for m, drawn in zip(pool, fx.pools[eid]):
            np.testing.assert_array_equal(m, drawn)


def _drop_pool(root, index: int) -> str:
    with open(root / "blip_laion_cc_sbu_558k.json") as f:
        image = json.load(f)[index]["image"]
    with open(root / "sam_pools.json") as f:
        pools = json.load(f)
    del pools[image]
    rf.write_json(root / "sam_pools.json", pools)
    return image


def test_bad_input_names_record_and_field(tmp_path):
    fx = rf.write_lcs558k_sam(tmp_path / "raw", n=4)
    image = _drop_pool(fx.root, 2)
    with pytest.raises(BadRecordError, match=rf"{fx.order[2]}.*sam_pools.json\[{image}\]"):
        _prepare(fx.root, tmp_path / "data")
    b = _prepare(fx.root, tmp_path / "data2", skip_bad_records=True)
    assert len(_records(b, "train")) == len(fx.order) - 2  # one in val, one skipped
    skipped = json.loads((b.data_path / "metadata.json").read_text())["skipped_bad_records"]
    assert skipped["train"]["records"] == 1


def test_missing_caption_turn(tmp_path):
    fx = rf.write_lcs558k_sam(tmp_path / "raw", n=3)
    path = fx.root / "blip_laion_cc_sbu_558k.json"
    samples = json.loads(path.read_text())
    samples[1]["conversations"] = samples[1]["conversations"][:1]
    rf.write_json(path, samples)
    with pytest.raises(BadRecordError, match=rf"{fx.order[1]}.*conversations.*gpt"):
        _prepare(fx.root, tmp_path / "data")
