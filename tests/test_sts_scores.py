"""STS word scores on real data: the side file -> the records -> the scene -> MRefM's label."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from refjax.__main__ import main
from refjax.data import build, sources
from refjax.data import transforms as tf
from refjax.data.builders import coco_common as cc
from refjax.data.builders.refshapes import VERSION
from refjax.data.errors import BadRecordError
from refjax.tasks.mrefm import MRefMData, sts_label
from tests.data_fixtures import refshapes_tiny_dir  # noqa: F401
from tests.fixtures import real_formats as rf

# refcoco fixture sentences: 10 "man on the left" (train), 14 "person right" (val)
SCORES = {"10": [0.9, 0.05, 0.0, 0.6], "14": [0.75, 0.25]}


def _write(path, data) -> str:
    path.write_text(json.dumps(data))
    return str(path)


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sts")
    fx = rf.write_refcoco(tmp / "raw")
    scores = _write(tmp / "clip_scores.json", SCORES)
    assert main(["build-data", "refcoco", "--manual-dir", str(fx.root), "--data-dir",
                 str(tmp / "data"), "--span-parser", "rules", "--sts-scores", scores]) == 0
    return str(tmp / "data"), sources.dataset_dir("refcoco", str(tmp / "data"), "unc")


def _scenes(data_dir: str, split: str) -> list[dict]:
    src = sources.open_scenes("refcoco", split, data_dir, "unc")
    return [src[i] for i in range(len(src))]


def test_builder_stores_scores_and_counts_them(scored):
    data_dir, path = scored
    meta = tfds.builder_from_directory(path).info.metadata[cc.STS_SCORES]
    assert meta == {"file": "clip_scores.json", "train": 1, "val": 1, "testA": 0}
    exprs = {e["id"]: e for split in ("train", "val", "testA")
             for scene in _scenes(data_dir, split) for e in scene["expressions"]}
    for sid, want in SCORES.items():
        np.testing.assert_array_equal(exprs[sid]["sts_word_scores"], np.float32(want))
    with_scores = [k for k, e in exprs.items() if "sts_word_scores" in e]
    assert sorted(with_scores) == sorted(SCORES) and len(exprs) > len(SCORES)


def test_scores_reach_the_sts_label(scored, refshapes_tiny_dir):  # noqa: F811
    data_dir, _ = scored
    scene = next(s for s in _scenes(data_dir, "train") if any(e["id"] == "10"
                                                             for e in s["expressions"]))
    k = [e["id"] for e in scene["expressions"]].index("10")
    ex = tf.expand(scene, k)
    np.testing.assert_array_equal(ex["sts_word_scores"], np.float32(SCORES["10"]))
    data = MRefMData(64, 16, 6, patch=16)
    tok = data.load_tokenizer(os.path.join(refshapes_tiny_dir, "refshapes", "tiny", VERSION,
                                           "beit3.spm"))
    out = data.tokenize(ex, tok, truncate=True)
    pieces = tok.tokenize(ex["text"].lower())
    words = tf.word_positions(pieces)
    assert len(pieces) + 2 <= 16 and sorted(set(words)) == [0, 1, 2, 3]
    want = np.zeros(16, np.float32)
    for p, w in enumerate(words):
        want[p + 1] = SCORES["10"][w]
    np.testing.assert_array_equal(out["sts_label"], want)
    # without scores the span rule applies: 0/1 only
    ex.pop("sts_word_scores")
    rule = data.tokenize(ex, tok, truncate=True)["sts_label"]
    assert set(np.unique(rule)) <= {0.0, 1.0} and rule.sum() > 0
    assert np.array_equal(rule, sts_label(pieces, out["n_tok"], 16, ex["subject_span"],
                                          ex["object_span"]))


def test_wrong_word_count_names_the_expression(tmp_path):
    fx = rf.write_refcoco(tmp_path / "raw")
    scores = _write(tmp_path / "s.json", {"12": [1.0, 0.0, 0.0]})  # "brown dog": 2 words
    with pytest.raises(BadRecordError, match=r"expression 12.*sts_word_scores.*3 scores.*2 words"):
        build.build_dataset("refcoco", None, tmp_path / "data", fx.root, span_parser="none",
                            sts_scores=scores)


@pytest.mark.parametrize("content, match", [
    ("[1, 2]", "expected an object"),
    ('{"10": [1.0, "x"]}', r"10.*finite numbers"),
    ('{"10": [1.0, NaN]}', r"10.*finite numbers"),
    ('{"10": 0.5}', r"10.*finite numbers"),
    ("{oops", "not JSON"),
])
def test_malformed_side_file(tmp_path, content, match):
    path = tmp_path / "s.json"
    path.write_text(content)
    with pytest.raises(BadRecordError, match=match):
        cc.load_word_scores(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        cc.load_word_scores(tmp_path / "missing.json")


def test_refshapes_takes_no_side_file(tmp_path):
    with pytest.raises(ValueError, match="refshapes takes no sts_scores"):
        build.build_dataset("refshapes", "tiny", tmp_path, sts_scores=str(tmp_path / "s.json"))


def _record(flat) -> dict:
    """A minimal scene record with two expressions (3 and 2 words)."""
    img = np.zeros((4, 4, 3), np.uint8)
    return {"image/id": "r1", "image": img,
            "objects": {"mask": np.zeros((0, 4, 4, 1), np.uint8), "box": np.zeros((0, 4))},
            "expressions": {"id": ["a", "b"], "text": ["the red one", "blue cube"],
                            "kind": ["x", "x"], "target_start": [0, 0], "target_count": [0, 0],
                            "ref_start": [0, 0], "ref_count": [0, 0],
                            "subject_span": [[-1, -1]] * 2, "object_span": [[-1, -1]] * 2},
            "expr_word_scores": np.float32(flat)}


def test_decode_scene_splits_and_checks_scores():
    exprs = sources.decode_scene(_record([np.nan] * 3 + [0.5, 1.0]))["expressions"]
    assert "sts_word_scores" not in exprs[0]
    np.testing.assert_array_equal(exprs[1]["sts_word_scores"], np.float32([0.5, 1.0]))
    assert all("sts_word_scores" not in e
               for e in sources.decode_scene(_record([]))["expressions"])
    with pytest.raises(BadRecordError, match=r"'r1'.*expr_word_scores.*4 scores for the 5 words"):
        sources.decode_scene(_record([0.1] * 4))
    with pytest.raises(BadRecordError, match=r"'a'.*expr_word_scores.*only some words"):
        sources.decode_scene(_record([0.1, np.nan, 0.2, 0.5, 1.0]))
