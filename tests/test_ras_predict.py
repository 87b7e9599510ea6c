"""RAS prediction for users (refjax.tasks.ras_predict) with a random-weight tiny model: the
selected group (masks are the caller's pool masks at the original resolution, scores, union),
pools from an array, a SAM-style COCO-RLE JSON file and ``auto``, the drawing, the CLI helper,
and every bad input as a BadRecordError naming the field."""

import json

import jax
import numpy as np
import pytest
from flax import linen as nn
from PIL import Image

from refjax.data.errors import BadRecordError
from refjax.tasks import get_task
from refjax.tasks.ras_predict import PALETTE, RASPredictor, run_cli
from refjax.train.state import _init_variables, model_variables
from tests import ras_task_util as U
from tests.data_fixtures import refshapes_tiny_dir  # noqa: F401


def _random(config, seed=3):
    task = get_task("ras")
    model = task.build_model(config)
    v = nn.unbox(jax.jit(lambda k, b: _init_variables(task, model, config, k, b))(
        jax.random.key(seed), task.dummy_batch(config, 1)))
    return task, model, v


@pytest.fixture(scope="module")
def predictor(refshapes_tiny_dir):  # noqa: F811
    c = U.small_config(refshapes_tiny_dir, arg="tiny,data=tiny,encoders=clip")
    task, model, v = _random(c)
    # a wider spread of logits than the prior-initialised head gives
    head = jax.tree.map(np.array, v["params"]["head"])
    head["out"]["kernel"] = head["out"]["kernel"] * 50.0
    head["out"]["bias"] = np.zeros_like(head["out"]["bias"])
    v = dict(v, params=dict(v["params"], head=head))
    return task.make_predictor(model, model_variables(v), c)


def _rle_json(masks, path):
    from pycocotools import mask as mask_utils

    anns = []
    for m in masks:
        rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        anns.append({"segmentation": {"size": list(rle["size"]),
                                      "counts": rle["counts"].decode("ascii")},
                     "predicted_iou": 0.9})
    path.write_text(json.dumps(anns))
    return str(path)


def test_predict_group_union_and_draw(predictor, tmp_path):
    sc = U.scene(h=30, w=44)
    img, pool = sc["image"], sc["pool_masks"]
    assert isinstance(predictor, RASPredictor)
    first = predictor.predict(img, "all blue shapes", pool=pool)
    scores = first["all_scores"]
    assert scores.shape == (len(pool),) and ((scores >= 0) & (scores <= 1)).all()
    # a threshold inside the score range: a proper subset is selected
    predictor.threshold = float(np.median(scores))
    pred = predictor.predict(img, "all blue shapes", pool=pool)
    np.testing.assert_allclose(pred["all_scores"], scores)
    idx = pred["indices"]
    assert 0 < len(idx) < len(pool)
    np.testing.assert_array_equal(idx, np.flatnonzero(scores > predictor.threshold))
    np.testing.assert_array_equal(pred["masks"], pool[idx].astype(bool))
    np.testing.assert_array_equal(pred["union"], pool[idx].astype(bool).any(0))
    np.testing.assert_allclose(pred["scores"], scores[idx])
    assert pred["masks"].shape == (len(idx), 30, 44) and pred["dropped"] == 0
    # the drawing: each selected mask tinted with its own colour, the text below
    im = predictor.draw(img, pred, "all blue shapes")
    assert im.size[0] == 44 and im.size[1] > 30
    arr = np.asarray(im)[:30].astype(int)
    only0 = pred["masks"][0] & ~pred["masks"][1:].any(0)
    if only0.any():
        y, x = np.argwhere(only0)[0]
        expect = np.round(0.55 * img[y, x] + 0.45 * np.array(PALETTE[0])).astype(int)
        assert np.abs(arr[y, x] - expect).max() <= 1
    outside = ~pred["union"]
    np.testing.assert_array_equal(arr[outside], img[outside])

    # the same pool from a SAM-style COCO-RLE JSON file, and a reference mask
    pool_json = _rle_json(pool, tmp_path / "pool.json")
    ref = sc["masks"][1]
    p2 = predictor.predict(img, "the shape left of <mask-ref>", ref_masks=[ref],
                           pool=pool_json)
    np.testing.assert_array_equal(p2["pool"], pool.astype(bool))
    assert len(p2["ref_masks"]) == 1
    # the CLI helper: reference mask PNG, pool JSON, drawing written
    Image.fromarray(ref * 255).save(tmp_path / "ref.png")
    out = tmp_path / "group.png"
    p3 = run_cli(predictor, img, "the shape left of <mask-ref>", [str(tmp_path / "ref.png")],
                 pool_json, str(out))
    np.testing.assert_array_equal(p3["indices"], p2["indices"])
    assert Image.open(out).size[0] == 44
    # auto pool: a class-agnostic pool of at most pool_max masks at the image size
    p4 = predictor.predict(img, "all blue shapes", pool="auto")
    assert 1 <= len(p4["pool"]) <= 24 and p4["pool"].shape[1:] == (30, 44)
    # more masks than pool_max: the first pool_max are used
    big = np.concatenate([pool] * 6)
    p5 = predictor.predict(img, "all blue shapes", pool=big)
    assert p5["dropped"] == len(big) - 24 and len(p5["pool"]) == 24


def _bad(fn, field, text, record="input"):
    with pytest.raises(BadRecordError) as e:
        fn()
    assert e.value.field == field and e.value.record_id == record, e.value
    assert text in str(e.value)


def test_predict_bad_inputs(predictor, tmp_path):
    sc = U.scene(h=30, w=44)
    img, pool = sc["image"], sc["pool_masks"]
    p = predictor.predict
    _bad(lambda: p(img, "x", pool=np.zeros((2, 30, 40), np.uint8)), "pool[0]",
         "!= image size")
    _bad(lambda: p(img, "x", pool=np.zeros((0, 30, 44), np.uint8)), "pool",
         "empty candidate pool")
    _bad(lambda: p(img, "left of <mask-ref>", pool=pool), "ref_masks",
         "1 <mask-ref> placeholder(s) but 0 reference mask(s)")
    _bad(lambda: p(img, "all shapes", ref_masks=[sc["masks"][0]], pool=pool), "ref_masks",
         "0 <mask-ref> placeholder(s) but 1 reference mask(s)")
    _bad(lambda: p(img, "left of <mask-ref>", ref_masks=[np.ones((3, 3))], pool=pool),
         "ref_masks[0]", "!= image size")
    _bad(lambda: p(img, "the red square " * 40, pool=pool), "text", "exceeds max_len")
    _bad(lambda: p(img, "  ", pool=pool), "text", "empty text")
    _bad(lambda: p(img.astype(np.float32), "x", pool=pool), "image", "uint8")
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    _bad(lambda: p(img, "x", pool=str(empty)), "masks", "empty candidate pool",
         record=str(empty))
    wrong = _rle_json(np.zeros((1, 20, 20), np.uint8), tmp_path / "wrong.json")
    _bad(lambda: p(img, "x", pool=wrong), "[0].segmentation", "wrong size", record=wrong)


def test_ar_predictor(refshapes_tiny_dir):  # noqa: F811
    from refjax.models.ras import RAS
    from refjax.tasks.ras import model_inputs

    c = U.small_config(refshapes_tiny_dir, arg="tiny,data=tiny,encoders=clip,decoding=ar",
                       seg_max=3)
    task, model, v = _random(c)
    cfg = model.config
    sc = U.scene(h=30, w=44)
    pred = task.make_predictor(model, model_variables(v), c)
    # make the first decision [SEG]: its lm_head column = EOS's + 5 h / |h|^2 at the prompt's
    # last state (later steps decide freely)
    row, _, _ = pred.prepare(sc["image"], "all blue shapes", (), sc["pool_masks"])
    kw = model_inputs({k: x[None] for k, x in row.items()}, c, cfg, features=False,
                      train=False)
    length = row["input_ids"].shape[0] + 3
    _, h, _, _ = jax.jit(lambda v, a: model.apply(
        v, a["input_ids"], a["slot_index"], a["attention_mask"], pool_masks=a["pool_masks"],
        ref_masks=a["ref_masks"], pixels=a["pixels"], cache_length=length,
        method=RAS.ar_prefill))(pred.variables, {k: x for k, x in kw.items() if k != "mode"})
    h = np.asarray(h[0], np.float64)
    k = np.array(v["params"]["llm"]["lm_head"]["kernel"])
    k[:, cfg.seg_token_id] = k[:, cfg.eos_token_id] + 5.0 * h / (h @ h)
    v = dict(v, params=dict(v["params"], llm=dict(v["params"]["llm"],
                                                   lm_head={"kernel": k})))
    pred = task.make_predictor(model, model_variables(v), c)
    out = pred.predict(sc["image"], "all blue shapes", pool=sc["pool_masks"])
    idx = out["indices"]
    assert 1 <= len(idx) <= 3 and (out["scores"] > 0).all() and (out["scores"] <= 1).all()
    assert (out["all_scores"][np.setdiff1d(np.arange(5), idx)] == 0).all()
    np.testing.assert_array_equal(out["union"], sc["pool_masks"][idx].astype(bool).any(0))
