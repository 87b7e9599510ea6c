"""The RefCOCO/+/g, gRefCOCO and MaskGroups-HQ builders on exact-format fixture files."""

from __future__ import annotations

import json
import pickle
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from pycocotools.coco import COCO

from refjax.boxes import mask_iou, mask_to_box, xywh_to_xyxy, xyxy_to_xywh
from refjax.data import build
from refjax.data import subject_object as so
from refjax.data.builders import coco_common as cc
from refjax.data.builders import refcoco
from refjax.data.errors import BadRecordError
from refjax.data.images import read_image_file
from refjax.data.schema import EXPRESSIONS_PER_RECORD, NO_SPAN
from tests.fixtures import real_formats as rf

# pycocotools' own decode under numpy 2 (COCO.annToMask in the checks below)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


# ------------------------------------------------------------------------------- helpers
def prepare(name: str, raw: Path, data_dir: Path, config=None, **kw):
    b = build.get_builder(name, config, data_dir, raw, **kw)
    b.download_and_prepare()
    return b


def records(builder, split: str, **kw) -> list[dict]:
    src = builder.as_data_source(split, **kw)
    return [src[i] for i in range(len(src))]


def s(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def expressions(rec: dict) -> list[dict]:
    """Per-expression dicts with targets/refs resolved to object ids."""
    ex, ids = rec["expressions"], list(rec["objects"]["id"])
    out = []
    for k in range(len(ex["id"])):
        t0, tn = int(ex["target_start"][k]), int(ex["target_count"][k])
        r0, rn = int(ex["ref_start"][k]), int(ex["ref_count"][k])
        targets = [int(i) for i in rec["expr_targets"][t0 : t0 + tn]]
        refs = [int(i) for i in rec["expr_refs"][r0 : r0 + rn]]
        out.append({"id": s(ex["id"][k]), "text": s(ex["text"][k]), "raw": s(ex["raw"][k]),
                    "kind": s(ex["kind"][k]),
                    "targets": targets, "target_ids": [int(ids[i]) for i in targets],
                    "refs": refs,
                    "subject_span": tuple(int(v) for v in ex["subject_span"][k]),
                    "object_span": tuple(int(v) for v in ex["object_span"][k])})
    return out


def masks(rec: dict, key: str = "objects") -> list[np.ndarray]:
    return [np.asarray(m)[..., 0] for m in rec[key]["mask"]]


def edit_json(path: Path, fn) -> None:
    with open(path) as f:
        data = json.load(f)
    fn(data)
    rf.write_json(path, data)


def edit_instances(fx: rf.CocoFixture, ann_id: int, fn) -> None:
    edit_json(fx.ann_dir / "instances.json",
              lambda d: fn(next(a for a in d["annotations"] if a["id"] == ann_id)))


def edit_refs(fx: rf.CocoFixture, fn) -> None:
    path = fx.ann_dir / "refs(unc).p"
    with open(path, "rb") as f:
        refs = pickle.load(f)
    fn(refs)
    rf.write_refs_pickle(path, refs)


def sentence(refs: list[dict], ref_id: int, sent_id: int) -> dict:
    ref = next(r for r in refs if r["ref_id"] == ref_id)
    return next(x for x in ref["sentences"] if x["sent_id"] == sent_id)


def expected_by_split(refs: list[dict]) -> dict[str, dict[int, list[tuple[str, object]]]]:
    """{split: {image_id: [(sent_id, ann_id(s))]}} in the builder's order."""
    out: dict[str, dict[int, list]] = defaultdict(lambda: defaultdict(list))
    for ref in sorted(refs, key=lambda r: r["ref_id"]):
        for sent in ref["sentences"]:
            out[ref["split"]][ref["image_id"]].append((str(sent["sent_id"]), ref["ann_id"]))
    return out


def check_coco_scene(rec: dict, fx: rf.CocoFixture, coco: COCO) -> None:
    image_id = int(s(rec["image/id"]))
    img = fx.images[image_id]
    assert (int(rec["image/height"]), int(rec["image/width"])) == (img["height"], img["width"])
    assert s(rec["image/filename"]) == img["file"]
    np.testing.assert_array_equal(rec["image"], read_image_file(str(fx.image_path(image_id))))
    assert np.abs(rec["image"].astype(int) - img["pixels"]).mean() < 15  # lossy JPEG of it
    want = sorted(a for a, v in fx.anns.items() if v["image_id"] == image_id)
    assert [int(i) for i in rec["objects"]["id"]] == want
    for ann_id, box, cat, mask in zip(want, rec["objects"]["box"], rec["objects"]["category"],
                                      masks(rec)):
        ann = fx.anns[ann_id]
        np.testing.assert_allclose(xywh_to_xyxy(np.asarray(box)),
                                   xywh_to_xyxy(np.asarray(ann["bbox"])), atol=1e-5)
        assert s(cat) == rf.CAT_NAMES[ann["category_id"]]
        np.testing.assert_array_equal(mask, coco.annToMask(coco.anns[ann_id]))
        iou = float(mask_iou(mask, ann["drawn"])[2])
        assert iou > (0.999 if isinstance(ann["segmentation"], dict) else 0.8), (ann_id, iou)


# ------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def refcoco_built(tmp_path_factory):
    root = tmp_path_factory.mktemp("refcoco")
    fx = rf.write_refcoco(root / "raw")
    return fx, prepare("refcoco", fx.root, root / "data")


@pytest.fixture(scope="module")
def grefcoco_built(tmp_path_factory):
    root = tmp_path_factory.mktemp("grefcoco")
    fx = rf.write_grefcoco(root / "raw")
    return fx, prepare("grefcoco", fx.root, root / "data")


@pytest.fixture(scope="module")
def maskgroups_built(tmp_path_factory):
    root = tmp_path_factory.mktemp("maskgroups")
    fx = rf.write_maskgroups_hq(root / "raw")
    return fx, prepare("maskgroups_hq", fx.root, root / "data")


# ------------------------------------------------------------------------------- RefCOCO
def test_refcoco_records(refcoco_built):
    fx, b = refcoco_built
    coco = COCO(str(fx.ann_dir / "instances.json"))
    want = expected_by_split(fx.refs)
    parser = so.get_parser("auto")  # rules-v1 unless spaCy and an English model are installed
    assert b.info.metadata[cc.SPAN_PARSER] == parser.name
    assert list(b.info.splits.keys()) == ["train", "val", "testA"]
    for split, per_image in want.items():
        recs = records(b, split)
        ids = [int(s(r["image/id"])) for r in recs]
        # one record per distinct image: no image stored twice
        assert ids == sorted(per_image) and len(set(ids)) == len(ids)
        per_record = [len(v) for v in per_image.values()]
        assert b.info.metadata[EXPRESSIONS_PER_RECORD][split] == per_record
        for rec in recs:
            check_coco_scene(rec, fx, coco)
            got = expressions(rec)
            exp = per_image[int(s(rec["image/id"]))]
            assert [(e["id"], e["target_ids"][0]) for e in got] == exp
            assert all(e["kind"] == "refcoco" and len(e["targets"]) == 1 for e in got)
            for e in got:
                ref = next(r for r in fx.refs if int(e["id"]) in r["sent_ids"])
                sent = sentence(fx.refs, ref["ref_id"], int(e["id"]))
                # text: refer's normalised sent; raw: the sentence as written
                assert (e["text"], e["raw"]) == (sent["sent"], sent["raw"])
                assert e["raw"] != e["text"] and e["raw"].endswith(".")
                # spans of the text by the parser the build reports
                assert (e["subject_span"], e["object_span"]) == parser(e["text"])
            assert len(rec["pool"]["mask"]) == 0 and len(rec["pool_ioa"]) == 0
    assert b.info.metadata[cc.SKIPPED_BAD_RECORDS]["train"] == {
        "records": 0, "objects": 0, "expressions": 0, "refs": 0}
    # the metadata survives a reload from the directory
    again = tfds.builder_from_directory(b.data_dir)
    assert again.info.metadata[EXPRESSIONS_PER_RECORD]["train"] == [3, 1]
    assert again.info.metadata[cc.SPAN_PARSER] == parser.name


def test_refcoco_jpeg_stored_as_given(refcoco_built):
    fx, b = refcoco_built
    recs = records(b, "train", decoders={"image": tfds.decode.SkipDecoding()})
    for rec in recs:
        assert rec["image"] == fx.image_path(int(s(rec["image/id"]))).read_bytes()


def test_refcoco_plus_layout_and_get_builder(tmp_path):
    fx = rf.write_refcoco(tmp_path / "raw", dataset="refcoco+")
    path = build.build_dataset("refcoco+", None, tmp_path / "data", fx.root)
    version = str(cc.SceneBuilder.VERSION)
    assert version == "1.3.0"
    assert path == str(tmp_path / "data" / "refcoco_plus" / "unc" / version)
    assert refcoco.BUILDERS["refcoco+"].name == "refcoco_plus"
    b = tfds.builder_from_directory(path)
    assert (b.name, b.builder_config.name) == ("refcoco_plus", "unc")
    assert len(records(b, "train")) == 2
    g = build.get_builder("refcocog", None, tmp_path / "d", fx.root)
    assert (g.name, g.builder_config.name) == ("refcocog", "umd")
    assert build.get_builder("refcoco", "google", tmp_path, None).builder_config.name == "google"
    with pytest.raises(ValueError, match="unknown dataset"):
        build.get_builder("refclef", None, tmp_path, None)
    with pytest.raises(ValueError, match="not a real-data builder"):
        build.get_builder("refshapes", "tiny", tmp_path, None)


def _remove(path: Path) -> None:
    path.unlink()


REFCOCO_BAD = {
    "missing_image": (lambda fx: _remove(fx.image_path(102)),
                      "image:102", "image", "missing image file"),
    "unreadable_image": (lambda fx: fx.image_path(103).write_bytes(b"not a jpeg"),
                         "image:103", "image", "unreadable image"),
    "box_outside": (lambda fx: edit_instances(fx, 1004, lambda a: a.update(bbox=[30, 8, 30, 42])),
                    "ann:1004", "bbox", "outside"),
    "zero_area_box": (lambda fx: edit_instances(fx, 1006, lambda a: a["bbox"].__setitem__(2, 0)),
                      "ann:1006", "bbox", "zero-area"),
    "empty_text": (lambda fx: edit_refs(fx, lambda r: sentence(r, 3, 13).update(sent="  ")),
                   "ref:3/sent:13", "sentences.sent", "empty text"),
    "no_sentences": (lambda fx: edit_refs(fx, lambda r: r[2].update(sentences=[])),
                     "ref:3", "sentences", "no sentences"),
    "mask_wrong_size": (
        lambda fx: edit_instances(fx, 1002, lambda a: a["segmentation"].update(size=[24, 32])),
        "ann:1002", "segmentation", "wrong size"),
    "rle_string_bad": (
        lambda fx: edit_instances(fx, 1007, lambda a: a["segmentation"].update(counts="PPPP")),
        "ann:1007", "segmentation", "does not decode"),
    "rle_counts_bad": (
        lambda fx: edit_instances(fx, 1003, lambda a: a["segmentation"]["counts"].append(5)),
        "ann:1003", "segmentation", "does not decode"),
}


@pytest.mark.parametrize("case", sorted(REFCOCO_BAD))
def test_refcoco_bad_input_names_record_and_field(tmp_path, case):
    mutate, record_id, field, words = REFCOCO_BAD[case]
    fx = rf.write_refcoco(tmp_path / "raw")
    mutate(fx)
    with pytest.raises(BadRecordError) as err:
        prepare("refcoco", fx.root, tmp_path / "data")
    assert (err.value.record_id, err.value.field) == (record_id, field)
    assert record_id in str(err.value) and field in str(err.value) and words in str(err.value)


def test_refcoco_skip_bad_records_counts(tmp_path):
    fx = rf.write_refcoco(tmp_path / "raw")
    _remove(fx.image_path(102))  # train record (1 expression)
    edit_instances(fx, 1002, lambda a: a["bbox"].__setitem__(3, 0))  # object + ref 2 (1 expr)
    edit_refs(fx, lambda r: sentence(r, 4, 15).update(sent=""))  # one val expression
    b = prepare("refcoco", fx.root, tmp_path / "data", skip_bad_records=True)
    skipped = b.info.metadata[cc.SKIPPED_BAD_RECORDS]
    # train: image 102 (ref 3, 1 sentence) and annotation 1002 (ref 2, 1 sentence) dropped
    assert skipped["train"] == {"records": 1, "objects": 1, "expressions": 2, "refs": 2}
    assert skipped["val"] == {"records": 0, "objects": 0, "expressions": 1, "refs": 0}
    assert skipped["testA"] == {"records": 0, "objects": 0, "expressions": 0, "refs": 0}
    (train,) = records(b, "train")
    assert [int(i) for i in train["objects"]["id"]] == [1001, 1003]
    assert [(e["id"], e["target_ids"]) for e in expressions(train)] == [
        ("10", [1001]), ("11", [1001])]
    (val,) = records(b, "val")
    assert [e["id"] for e in expressions(val)] == ["14"]
    assert b.info.metadata[EXPRESSIONS_PER_RECORD] == {"train": [2], "val": [1], "testA": [2]}


def test_refcoco_ref_without_sentences_is_a_counted_skip(tmp_path):
    fx = rf.write_refcoco(tmp_path / "raw")
    edit_refs(fx, lambda r: r[2].update(sentences=[], sent_ids=[]))  # ref 3, image 102's only
    b = prepare("refcoco", fx.root, tmp_path / "data", skip_bad_records=True)
    assert b.info.metadata[cc.SKIPPED_BAD_RECORDS]["train"] == {
        "records": 0, "objects": 0, "expressions": 0, "refs": 1}
    assert [int(s(r["image/id"])) for r in records(b, "train")] == [101]


def test_refcoco_raw_falls_back_to_sent(tmp_path):
    fx = rf.write_refcoco(tmp_path / "raw")
    edit_refs(fx, lambda r: (sentence(r, 4, 14).pop("raw"), sentence(r, 4, 15).update(raw=" ")))
    b = prepare("refcoco", fx.root, tmp_path / "data")
    (val,) = records(b, "val")
    assert [(e["text"], e["raw"]) for e in expressions(val)] == [
        ("person right", "person right"), ("right one", "right one")]


# Hand-checked rules-v1 spans of the fixture sentences: sent_id -> (subject, object) words.
RULE_SPANS = {
    "10": (["man"], ["left"]),  # man on the left
    "11": (["left", "guy"], []),  # left guy
    "12": (["brown", "dog"], []),  # brown dog
    "13": (["cat"], []),  # the cat
    "14": (["person"], []),  # person right: a trailing position word is not the head
    "15": (["right", "one"], []),  # right one
    "16": (["dog"], ["bottom"]),  # dog at the bottom
    "17": (["person"], ["top"]),  # person on top
}


def _span_words(text: str, span: tuple[int, int]) -> list[str]:
    return [] if span == NO_SPAN else text.split()[span[0] : span[1]]


def _built_with_parser(tmp_path, span_parser: str):
    fx = rf.write_refcoco(tmp_path / "raw")
    b = refcoco.RefCoco(config="unc", data_dir=str(tmp_path / "data"), manual_dir=fx.root,
                        span_parser=span_parser, file_format="array_record")
    b.download_and_prepare()
    return {e["id"]: e for split in b.info.splits for r in records(b, split)
            for e in expressions(r)}, b


def test_refcoco_spans_rules_parser(tmp_path, caplog):
    with caplog.at_level("INFO"):
        exprs, b = _built_with_parser(tmp_path, "rules")
    assert b.info.metadata[cc.SPAN_PARSER] == so.RULES_NAME
    assert f"subject/object spans by {so.RULES_NAME}" in caplog.text  # reported at build time
    assert sorted(exprs) == sorted(RULE_SPANS)
    for sid, (subject, obj) in RULE_SPANS.items():
        e = exprs[sid]
        assert _span_words(e["text"], e["subject_span"]) == subject, e["text"]
        assert _span_words(e["text"], e["object_span"]) == obj, e["text"]


def test_refcoco_spans_spacy_parser_is_used_and_named(tmp_path, monkeypatch):
    """The spaCy path through the builder, with a stand-in pipeline (no model on PyPI)."""
    seen = []

    class Tok:  # the attributes of a spaCy Token the official rule reads
        def __init__(self, i, idx, text, dep):
            self.i, self.idx, self.text, self.dep_ = i, idx, text, dep
            self.lefts = []
            self.left_edge = self.right_edge = self

    def fake_nlp(text):  # the first word a pobj, the last the ROOT
        seen.append(text)
        ws, doc, pos = text.split(), [], 0
        for i, w in enumerate(ws):
            pos = text.index(w, pos)
            doc.append(Tok(i, pos, w, "ROOT" if i == len(ws) - 1 else "pobj" if i == 0 else "dep"))
            pos += len(w)
        return doc

    monkeypatch.setattr(so, "_load_spacy", lambda *a, **k: (fake_nlp, "spacy-x:fake_md-0"))
    exprs, b = _built_with_parser(tmp_path, "auto")
    assert b.info.metadata[cc.SPAN_PARSER] == "spacy-x:fake_md-0"
    assert sorted(seen) == sorted(e["text"] for e in exprs.values())
    for e in exprs.values():
        n = len(e["text"].split())
        assert e["subject_span"] == (n - 1, n)  # the ROOT
        assert e["object_span"] == ((0, 1) if n > 1 else NO_SPAN)  # the first pobj


def test_refcoco_spans_none_and_bad_parser(tmp_path):
    exprs, b = _built_with_parser(tmp_path, "none")
    assert b.info.metadata[cc.SPAN_PARSER] == "none"
    assert all(e["subject_span"] == NO_SPAN == e["object_span"] for e in exprs.values())
    with pytest.raises(ValueError, match="unknown span_parser"):
        refcoco.RefCoco(config="unc", data_dir=str(tmp_path / "d2"), span_parser="stanza")


def _ref_target(ref_id: int, ann_id: int):
    def mutate(fx):
        edit_refs(fx, lambda r: next(x for x in r if x["ref_id"] == ref_id).update(ann_id=ann_id))
    return mutate


@pytest.mark.parametrize("ann_id, words", [
    (1004, "annotation 1004 belongs to image 102, not to image 101"),
    (9999, "annotation 9999 is not in instances.json"),
])
def test_refcoco_target_not_in_image_says_where_it_is(tmp_path, ann_id, words):
    fx = rf.write_refcoco(tmp_path / "raw")
    _ref_target(2, ann_id)(fx)  # ref 2 is on image 101
    with pytest.raises(BadRecordError) as err:
        prepare("refcoco", fx.root, tmp_path / "data")
    assert (err.value.record_id, err.value.field) == ("ref:2", "ann_id")
    assert words in str(err.value)


EMPTY_SPLIT = {
    # val holds one image (103, ref 4): its file is missing
    "image_missing": (lambda fx: _remove(fx.image_path(103)), "val",
                      ["image:103 (image): missing image file"], {"records": 1, "refs": 1}),
    # testA holds refs 5 and 6 (image 104): both without sentences
    "no_sentences": (
        lambda fx: edit_refs(fx, lambda r: [x.update(sentences=[]) for x in r if x["ref_id"] > 4]),
        "testA", ["ref:5 (sentences): ref has no sentences", "ref:6 (sentences)"], {"refs": 2}),
}


@pytest.mark.parametrize("case", sorted(EMPTY_SPLIT))
def test_skip_mode_fails_on_a_split_with_every_record_skipped(tmp_path, case):
    mutate, split, named, counts = EMPTY_SPLIT[case]
    fx = rf.write_refcoco(tmp_path / "raw")
    mutate(fx)
    with pytest.raises(cc.EmptySplitError) as err:
        prepare("refcoco", fx.root, tmp_path / "data", skip_bad_records=True)
    msg = str(err.value)
    assert err.value.split == split and f"split {split!r}" in msg and "refcoco" in msg
    for words in named:
        assert words in msg, msg
    assert {k: v for k, v in err.value.summary.items() if v and k != "expressions"} == counts
    assert isinstance(err.value, BadRecordError)  # a user error, like the others


@pytest.mark.parametrize("name", ["refcoco", "grefcoco", "maskgroups_hq"])
def test_build_dataset_passes_skip_bad_records(tmp_path, name):
    if name == "maskgroups_hq":
        fx = rf.write_maskgroups_hq(tmp_path / "raw")
        (fx.root / "images" / "m1.jpg").unlink()  # train keeps m2.jpg
    else:
        fx = (rf.write_refcoco if name == "refcoco" else rf.write_grefcoco)(tmp_path / "raw")
        _remove(fx.image_path(102))  # train keeps image 101
    with pytest.raises(BadRecordError, match="missing image file"):
        build.build_dataset(name, None, tmp_path / "strict", fx.root)
    path = build.build_dataset(name, None, tmp_path / "data", fx.root, skip_bad_records=True)
    b = tfds.builder_from_directory(path)
    assert b.info.metadata[cc.SKIPPED_BAD_RECORDS]["train"]["records"] >= 1
    assert len(records(b, "train")) >= 1


# ------------------------------------------------------------------------------ gRefCOCO
def test_grefcoco_records(grefcoco_built):
    fx, b = grefcoco_built
    coco = COCO(str(fx.ann_dir / "instances.json"))
    want = expected_by_split(fx.refs)
    parser = so.get_parser("auto")
    assert b.info.metadata[cc.SPAN_PARSER] == parser.name
    for split, per_image in want.items():
        recs = records(b, split)
        assert [int(s(r["image/id"])) for r in recs] == sorted(per_image)
        per_record = [len(v) for v in per_image.values()]
        assert b.info.metadata[EXPRESSIONS_PER_RECORD][split] == per_record
        for rec in recs:
            check_coco_scene(rec, fx, coco)
            got = expressions(rec)
            exp = per_image[int(s(rec["image/id"]))]
            assert [e["id"] for e in got] == [sid for sid, _ in exp]
            for e, (_, ann_ids) in zip(got, exp):
                assert e["kind"] == "gres"
                assert e["target_ids"] == ([] if ann_ids == [-1] else ann_ids)
                assert (e["subject_span"], e["object_span"]) == parser(e["text"])
    kinds = {len(e["targets"]) for r in records(b, "train") for e in expressions(r)}
    assert kinds == {0, 1, 2}  # no-target, single and multi-target


def test_grefcoco_bad_input_and_skip(tmp_path):
    fx = rf.write_grefcoco(tmp_path / "raw")
    grefs = fx.root / "grefs(unc).json"
    edit_json(grefs, lambda refs: refs[2].update(no_target=True))  # ref 3: ann_id [1005]
    with pytest.raises(BadRecordError) as err:
        prepare("grefcoco", fx.root, tmp_path / "data")
    assert (err.value.record_id, err.value.field) == ("ref:3", "ann_id")
    assert "no_target" in str(err.value)

    edit_json(grefs, lambda refs: refs[2].update(no_target=False))
    edit_json(grefs, lambda refs: refs[3]["sentences"][1].update(sent=""))  # ref 4, sent 24
    with pytest.raises(BadRecordError) as err:
        prepare("grefcoco", fx.root, tmp_path / "data2")
    assert (err.value.record_id, err.value.field) == ("ref:4/sent:24", "sentences.sent")

    edit_json(grefs, lambda refs: refs[3]["sentences"][1].update(sent="both of them"))
    edit_json(grefs, lambda refs: refs[0].update(ann_id=[1001, 1006, 4242]))  # on image 101
    with pytest.raises(BadRecordError) as err:
        prepare("grefcoco", fx.root, tmp_path / "data2b")
    assert (err.value.record_id, err.value.field) == ("ref:1", "ann_id")
    assert ("annotation 1006 belongs to image 103, not to image 101; "
            "annotation 4242 is not in instances.json") in str(err.value)
    edit_json(grefs, lambda refs: refs[0].update(ann_id=[1001, 1002]))
    edit_json(grefs, lambda refs: refs[3]["sentences"][1].update(sent=""))

    edit_json(grefs, lambda refs: refs[2].update(no_target=True))
    b = prepare("grefcoco", fx.root, tmp_path / "data3", skip_bad_records=True)
    assert b.info.metadata[cc.SKIPPED_BAD_RECORDS] == {
        "train": {"records": 0, "objects": 0, "expressions": 1, "refs": 1},
        "val": {"records": 0, "objects": 0, "expressions": 1, "refs": 0},
    }
    assert [int(s(r["image/id"])) for r in records(b, "train")] == [101]  # 102 lost its ref
    assert [e["id"] for e in expressions(records(b, "val")[0])] == ["23", "25"]


# ------------------------------------------------------------------------- MaskGroups-HQ
def test_maskgroups_records(maskgroups_built):
    fx, b = maskgroups_built
    train = records(b, "train")
    # mg-1 and mg-2 share image and pools: one record, the image stored once
    assert [s(r["image/filename"]) for r in train] == ["m1.jpg", "m2.jpg"]
    assert b.info.metadata[EXPRESSIONS_PER_RECORD] == {"train": [2, 2], "eval": [1]}
    assert b.info.metadata[cc.SPAN_PARSER] == "none"  # MaskGroups-HQ does not parse spans
    samples = {x["id"]: x for split in fx.splits.values() for x in split}
    by_expr = {}
    for rec in train + records(b, "eval"):
        image = fx.images[s(rec["image/filename"])]
        assert np.abs(rec["image"].astype(int) - image).mean() < 15
        for e in expressions(rec):
            by_expr[e["id"]] = (rec, e)
    assert sorted(by_expr) == ["mg-1:0", "mg-2:0", "mg-3:0", "mg-3:1", "mg-4:0"]
    for eid, (rec, e) in by_expr.items():
        sid, turn = eid.split(":")
        sample, gt, pool = samples[sid], fx.gt[sid], fx.pool[sid]
        obj_masks, pool_masks = masks(rec), masks(rec, "pool")
        assert len(obj_masks) == len(gt) and len(pool_masks) == len(pool)
        for m, drawn, box in zip(obj_masks, gt, rec["objects"]["box"]):
            np.testing.assert_array_equal(m, drawn)
            np.testing.assert_array_equal(box, xyxy_to_xywh(mask_to_box(drawn)))
        for m, drawn in zip(pool_masks, pool):
            np.testing.assert_array_equal(m, drawn)
        assert [s(x) for x in rec["pool"]["source"]] == ["sam"] * len(pool)
        group = sample["gt_mask_group"][int(turn)]
        assert e["targets"] == group  # indices into gt_mask_pool (= objects), not mask_pool
        assert e["refs"] == (sample.get("ref_mask_indices") or [[]] * 9)[int(turn)]
        assert e["kind"] == ("ores_ref" if e["refs"] else "ores")
        assert "<image>" not in e["text"] and "<mask_pool>" not in e["text"]
        union = np.zeros_like(gt[0], bool)
        for i in group:
            union |= gt[i].astype(bool)
        want = [(p.astype(bool) & union).sum() / p.sum() for p in pool]
        k = [s(x) for x in rec["expressions"]["id"]].index(eid)
        ioa = np.asarray(rec["pool_ioa"], np.float32).reshape(-1, len(pool))[k]
        np.testing.assert_allclose(ioa, want, atol=1e-6)
    _, e = by_expr["mg-1:0"]
    ioa_rec = by_expr["mg-1:0"][0]
    assert e["text"] == "Select all red squares."
    labels = np.asarray(ioa_rec["pool_ioa"]).reshape(2, -1)[0] >= 0.5
    assert labels.tolist() == [False, True, True, False, True]
    assert by_expr["mg-2:0"][1]["text"] == "All squares left of <mask-ref>."
    assert all(e["raw"] == e["text"] for _, e in by_expr.values())  # the query is raw text


MG_BAD = {
    "gt_wrong_size": (
        lambda d: d["train"][2]["gt_mask_pool"].__setitem__(1, rf.rle_compressed(np.ones((9, 9)))),
        "mg-3", "gt_mask_pool[1]", "wrong size"),
    "pool_undecodable": (lambda d: d["train"][2]["mask_pool"][0].update(counts="PPPP"),
                         "mg-3", "mask_pool[0]", "does not decode"),
    "mask_ref_without_refs": (lambda d: d["train"][1].pop("ref_mask_indices"),
                              "mg-2", "ref_mask_indices", "<mask-ref>"),
    "empty_query": (lambda d: d["train"][0]["conversations"][0].update(
        value="<image>\n<mask_pool>\n "), "mg-1", "conversations[0].value", "empty text"),
}


def _edit_mg(fx: rf.MaskGroupsFixture, fn) -> None:
    data = {split: json.loads((fx.root / f"{split}.json").read_text()) for split in fx.splits}
    fn(data)
    for split, samples in data.items():
        rf.write_json(fx.root / f"{split}.json", samples)


@pytest.mark.parametrize("case", sorted(MG_BAD))
def test_maskgroups_bad_input_names_record_and_field(tmp_path, case):
    mutate, record_id, field, words = MG_BAD[case]
    fx = rf.write_maskgroups_hq(tmp_path / "raw")
    _edit_mg(fx, mutate)
    with pytest.raises(BadRecordError) as err:
        prepare("maskgroups_hq", fx.root, tmp_path / "data")
    assert (err.value.record_id, err.value.field) == (record_id, field)
    assert record_id in str(err.value) and words in str(err.value)


def test_maskgroups_missing_image_and_skip(tmp_path):
    fx = rf.write_maskgroups_hq(tmp_path / "raw")
    (fx.root / "images" / "m1.jpg").unlink()
    with pytest.raises(BadRecordError, match="missing image file") as err:
        prepare("maskgroups_hq", fx.root, tmp_path / "data")
    assert (err.value.record_id, err.value.field) == ("mg-1", "image")

    fx = rf.write_maskgroups_hq(tmp_path / "raw2")
    _edit_mg(fx, lambda d: (MG_BAD["mask_ref_without_refs"][0](d), MG_BAD["gt_wrong_size"][0](d)))
    b = prepare("maskgroups_hq", fx.root, tmp_path / "data2", skip_bad_records=True)
    assert b.info.metadata[cc.SKIPPED_BAD_RECORDS] == {
        "train": {"records": 1, "objects": 0, "expressions": 3},
        "eval": {"records": 0, "objects": 0, "expressions": 0},
    }
    (rec,) = records(b, "train")
    assert [e["id"] for e in expressions(rec)] == ["mg-1:0"]
    assert b.info.metadata[EXPRESSIONS_PER_RECORD] == {"train": [1], "eval": [1]}


def test_maskgroups_rejects_config(tmp_path):
    with pytest.raises(ValueError, match="no configs"):
        build.get_builder("maskgroups_hq", "x", tmp_path, None)


# ------------------------------------------------------------------------------ helpers
def test_rle_string_parser_matches_pycocotools():
    from pycocotools import mask as mask_utils

    rng = np.random.default_rng(0)
    for _ in range(20):
        h, w = rng.integers(1, 30, 2)
        m = (rng.random((h, w)) < rng.random()).astype(np.uint8)
        counts = mask_utils.encode(np.asfortranarray(m))["counts"]
        assert cc.rle_string_counts(counts) == rf.rle_uncompressed(m)["counts"]
        np.testing.assert_array_equal(
            cc.decode_rle({"size": [int(h), int(w)], "counts": counts.decode()}, h, w, "r", "f"), m)
