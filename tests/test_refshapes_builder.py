"""The RefShapes TFDS builder and the scene reader: what is read back equals what was generated."""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest

from refjax import boxes as box_ops
from refjax.data import build, sources
from refjax.data import refshapes as rs
from refjax.data.builders.refshapes import VERSION
from refjax.data.errors import BadRecordError
from refjax.data.tokenizers import BEIT3_FILE, LLAMA_FILE, load_beit3_tokenizer
from tests.data_fixtures import refshapes_tiny_dir  # noqa: F401

CFG = rs.CONFIGS["tiny"]


@pytest.mark.parametrize("split", rs.SPLITS)
def test_read_back_equals_generator(refshapes_tiny_dir, split):  # noqa: F811
    src = sources.open_scenes("refshapes", split, refshapes_tiny_dir, config="tiny")
    assert len(src) == CFG.split_sizes[split]
    index = []
    for i in range(len(src)):
        got, want = src[i], rs.generate_scene(CFG, split, i)
        assert got["image_id"] == want.image_id
        np.testing.assert_array_equal(got["image"], want.image)
        assert got["masks"].dtype == np.uint8 and got["masks"].shape == want.masks.shape
        np.testing.assert_array_equal(got["masks"], want.masks)
        assert got["boxes"].dtype == np.float32
        np.testing.assert_array_equal(got["boxes"], box_ops.xywh_to_xyxy(want.boxes_xywh))
        for m, b in zip(got["masks"], got["boxes"]):
            np.testing.assert_array_equal(box_ops.mask_to_box(m), b)
        assert got["categories"] == want.categories
        assert len(got["expressions"]) == len(want.expressions)
        for j, (g, w) in enumerate(zip(got["expressions"], want.expressions)):
            assert (g["id"], g["text"], g["kind"]) == (w.id, w.text, w.kind)
            assert g["targets"].dtype == np.int32 and tuple(g["targets"]) == w.targets
            assert tuple(g["refs"]) == w.refs
            assert g["subject_span"] == w.subject_span and g["object_span"] == w.object_span
            index.append((i, j))
        raw = src.raw[i]["expressions"]["raw"]  # stored beside text (equal for RefShapes)
        assert [r.decode() for r in raw] == [w.text for w in want.expressions]
        np.testing.assert_array_equal(got["pool_masks"], want.pool_masks)
        assert got["pool_sources"] == want.pool_sources
        np.testing.assert_array_equal(got["pool_ioa"], want.pool_ioa)
        assert got["pool_ioa"].shape == (len(want.expressions), len(want.pool_masks))
        assert got["caption"] == want.caption
    np.testing.assert_array_equal(src.expression_index(), np.asarray(index, np.int32))
    assert src.expression_index().dtype == np.int32


def test_files_and_ensure(refshapes_tiny_dir):  # noqa: F811
    path = sources.dataset_dir("refshapes", refshapes_tiny_dir, "tiny")
    assert VERSION == "1.1.0"  # bumped with the relation/centroid/agreement fixes
    assert path == os.path.join(refshapes_tiny_dir, "refshapes", "tiny", VERSION)
    for f in (BEIT3_FILE, LLAMA_FILE, "metadata.json", "dataset_info.json"):
        assert os.path.isfile(os.path.join(path, f)), f
    stamp = os.path.getmtime(os.path.join(path, "dataset_info.json"))
    assert build.ensure_refshapes(refshapes_tiny_dir, "tiny") == path
    assert os.path.getmtime(os.path.join(path, "dataset_info.json")) == stamp
    tok = load_beit3_tokenizer(os.path.join(path, BEIT3_FILE))
    assert tok.unk_token_id not in tok.encode(rs.generate_scene(CFG, "train", 0).caption)


def test_decode_scene_validates(refshapes_tiny_dir):  # noqa: F811
    src = sources.open_scenes("refshapes", "val", refshapes_tiny_dir, config="tiny")
    raw = src.raw[0]
    rid = raw["image/id"].decode()

    def broken(fn):
        rec = copy.deepcopy(raw)
        fn(rec)
        with pytest.raises(BadRecordError) as err:
            sources.decode_scene(rec)
        return err.value

    def bad_mask(r):
        r["objects"]["mask"] = [np.zeros((64, 64, 1), np.uint8)] + list(r["objects"]["mask"][1:])

    def bad_box(r):
        r["objects"]["box"] = np.array(r["objects"]["box"])
        r["objects"]["box"][0, 2] = 0.0

    def empty_text(r):
        r["expressions"]["text"] = [b""] + list(r["expressions"]["text"][1:])

    def bad_target(r):
        r["expr_targets"] = [99] * len(r["expr_targets"])

    def bad_image(r):
        r["image"] = b"not a png"

    e = broken(bad_mask)
    assert (e.record_id, e.field) == (rid, "objects/mask[0]")
    e = broken(bad_box)
    assert (e.record_id, e.field) == (rid, "objects/box[0]")
    assert broken(empty_text).field == "text"
    assert broken(bad_target).field == "expr_targets"
    assert broken(bad_image).field == "image"


def test_open_and_build_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="build-data"):
        sources.open_scenes("refshapes", "train", str(tmp_path))
    with pytest.raises(ValueError, match="unknown dataset"):
        build.build_dataset("imagenet", None, str(tmp_path))
    monkeypatch.setitem(build.BUILDER_MODULES, "refcoco", "refjax.data.builders.no_such_module")
    with pytest.raises(NotImplementedError, match="does not exist yet"):
        build.build_dataset("refcoco", "unc", str(tmp_path))


def test_scene_without_pool_skips_only_the_pool(refshapes_tiny_dir):  # noqa: F811
    """Pool masks stay PNG bytes in ``raw`` and are decoded only when asked for; a scene read
    ``with_pool=False`` equals the full scene except for the (empty) pool fields."""
    src = sources.open_scenes("refshapes", "val", refshapes_tiny_dir, config="tiny")
    assert all(isinstance(m, bytes) for m in src.raw[0]["pool"]["mask"])
    full, lean = src.scene(0), src.scene(0, with_pool=False)
    assert len(full["pool_masks"]) > 0 and full["pool_ioa"].shape[1] == len(full["pool_masks"])
    assert lean["pool_masks"].shape == (0, *full["image"].shape[:2])
    assert lean["pool_ioa"].shape == (len(full["expressions"]), 0) and lean["pool_sources"] == []
    for key in ("image", "masks", "boxes"):
        np.testing.assert_array_equal(lean[key], full[key])
    assert lean["expressions"][0]["text"] == full["expressions"][0]["text"]
