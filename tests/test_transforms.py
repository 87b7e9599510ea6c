"""refjax.data.transforms: expand, letterbox, OneRef train augmentation, bad-input checks."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from PIL import Image

from refjax import boxes as bx
from refjax.data import stages
from refjax.data import transforms as tf
from refjax.data.errors import BadRecordError


def _disk(h: int, w: int, cx: float, cy: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return ((xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2 <= r * r).astype(np.uint8)


def make_scene(h: int = 96, w: int = 140, seed: int = 0, text: str = "the red ball") -> dict:
    """A synthetic decoded scene: 3 disks, one group expression, a pool and a reference."""
    rng = np.random.default_rng(seed)
    masks = np.stack(
        [
            _disk(h, w, w * 0.25, h * 0.3, 0.12 * h),
            _disk(h, w, w * 0.7, h * 0.6, 0.2 * h),
            _disk(h, w, w * 0.45, h * 0.8, 0.1 * h),
        ]
    )
    boxes = np.stack([bx.mask_to_box(m) for m in masks])
    pool = np.concatenate([masks, masks[:1] | masks[2:3]])
    return {
        "image_id": f"scene-{seed}",
        "image": rng.integers(0, 255, (h, w, 3), dtype=np.uint8),
        "boxes": boxes,
        "masks": masks,
        "categories": ["circle"] * 3,
        "expressions": [
            {
                "id": "e0",
                "text": text,
                "kind": "attribute",
                "targets": np.array([1], np.int32),
                "refs": np.zeros(0, np.int32),
                "subject_span": np.array([0, 3], np.int32),
                "object_span": np.array([-1, -1], np.int32),
            },
            {
                "id": "e1",
                "text": "all balls on the left",
                "kind": "group",
                "targets": np.array([0, 2], np.int32),
                "refs": np.zeros(0, np.int32),
                "subject_span": np.array([0, 2], np.int32),
                "object_span": np.array([-1, -1]),
            },
            {
                "id": "e2",
                "text": "the purple star",
                "kind": "no-target",
                "targets": np.zeros(0, np.int32),
                "refs": np.array([0], np.int32),
                "subject_span": np.array([0, 3], np.int32),
                "object_span": np.array([-1, -1]),
            },
        ],
        "pool_masks": pool,
        "pool_ioa": rng.random((3, len(pool))).astype(np.float32),
        "caption": "",
    }


def _tight_box_canvas(mask: np.ndarray) -> np.ndarray:
    return bx.mask_to_box(mask)


def _box_px(ex: dict, size: int) -> np.ndarray:
    return np.asarray(ex["box"], np.float64)


def test_expand_single_group_and_no_target():
    sc = make_scene()
    e0 = tf.expand(sc, 0)
    np.testing.assert_array_equal(e0["box"], sc["boxes"][1])
    np.testing.assert_array_equal(e0["mask"], sc["masks"][1])
    assert e0["kind"] == tf.KINDS.index("attribute") and e0["num_targets"] == 1
    e1 = tf.expand(sc, 1)  # group: union mask, its tight box
    union = sc["masks"][0] | sc["masks"][2]
    np.testing.assert_array_equal(e1["mask"], union)
    np.testing.assert_array_equal(e1["box"], bx.mask_to_box(union))
    e2 = tf.expand(sc, 2)
    assert e2["num_targets"] == 0 and not e2["mask"].any() and e2["ref_masks"].shape == (1, 96, 140)
    assert e2["pool_ioa"].shape == (4,)


def test_pil_nearest_equivalence():
    rng = np.random.default_rng(1)
    for _ in range(20):
        h, w, nh, nw = (int(v) for v in rng.integers(3, 300, 4))
        m = rng.integers(0, 255, (h, w)).astype(np.uint8)
        ref = np.asarray(Image.fromarray(m).resize((nw, nh), Image.NEAREST))
        np.testing.assert_array_equal(tf.resize_masks(m[None], nh, nw)[0], ref)


@pytest.mark.parametrize("hw", [(96, 140), (140, 96), (77, 77)])
@pytest.mark.parametrize("size", [128, 384])
def test_letterbox_roundtrip_and_layout(hw, size):
    sc = make_scene(*hw)
    ex = tf.expand(sc, 0)
    out = tf.eval_letterbox(ex, size)
    assert out["image"].shape == (size, size, 3) and out["image"].dtype == np.float32
    assert out["mask"].shape == (size, size)
    lb = bx.Letterbox.centered(hw[1], hw[0], size)
    assert (lb.left, lb.top) == (int(out["letterbox"][4]), int(out["letterbox"][5]))
    # Back through the letterbox: unchanged up to float rounding.
    np.testing.assert_allclose(
        lb.inverse_boxes(out["box"].astype(np.float64)), ex["box"], atol=1e-3
    )
    # Pad is 0 in normalised space, content is not all zero.
    assert np.all(out["image"][: lb.top] == 0) and np.all(out["image"][lb.top + lb.new_h :] == 0)
    assert np.all(out["image"][:, : lb.left] == 0)
    assert np.abs(out["image"][lb.top : lb.top + lb.new_h, lb.left : lb.left + lb.new_w]).sum() > 0
    # Centre pad offsets as OneRef: round(d/2 - 0.1).
    assert lb.top == round((size - lb.new_h) / 2 - 0.1)
    assert lb.left == round((size - lb.new_w) / 2 - 0.1)
    # Normalisation: ImageNet mean/std of the PIL-bilinear resized image.
    resized = np.asarray(Image.fromarray(sc["image"]).resize((lb.new_w, lb.new_h), Image.BILINEAR))
    expect = (resized / 255.0 - np.array(tf.IMAGENET_MEAN)) / np.array(tf.IMAGENET_STD)
    got = out["image"][lb.top : lb.top + lb.new_h, lb.left : lb.left + lb.new_w]
    np.testing.assert_allclose(got, expect, atol=1e-5)
    # The mask's tight box equals the box within 1 px.
    np.testing.assert_allclose(_tight_box_canvas(out["mask"]), out["box"], atol=1.0)


@pytest.mark.parametrize("size", [128, 384])
@pytest.mark.parametrize("expr", [0, 1])
def test_augment_mask_box_consistent_over_seeds(size, expr):
    sc = make_scene(120, 170)
    ex = tf.expand(sc, expr)
    for seed in range(40):
        out = tf.augment(ex, size, np.random.default_rng(seed))
        assert out["image"].shape == (size, size, 3) and out["mask"].shape == (size, size)
        assert out["mask"].any()
        np.testing.assert_allclose(
            _tight_box_canvas(out["mask"]), out["box"], atol=1.0, err_msg=f"seed {seed}"
        )
        b = out["box"]
        assert 0 <= b[0] < b[2] <= size and 0 <= b[1] < b[3] <= size


def test_augment_spatial_word_is_resize_only(monkeypatch):
    sc = make_scene(text="the ball on the LEFT")
    ex = tf.expand(sc, 0)
    crops = []
    monkeypatch.setattr(tf, "_random_size_crop", lambda *a, **k: crops.append(1))
    sizes = set()
    for seed in range(60):
        out = tf.augment(ex, 384, np.random.default_rng(seed), jitter_prob=0.0)
        sizes.add(int(max(out["letterbox"][2], out["letterbox"][3])))
    assert not crops
    assert sizes == set(tf.train_scales(384)) == set(range(192, 385, 32))
    assert tf.train_scales(128) == [128, 117, 107, 96, 85, 75, 64]
    # Without a spatial word the crop chain is used about half of the time.
    ex2 = tf.expand(make_scene(text="the red ball"), 0)
    for seed in range(60):
        tf.augment(ex2, 384, np.random.default_rng(seed), jitter_prob=0.0)
    assert 15 < len(crops) < 45


def test_augment_deterministic_and_seed_dependent():
    ex = tf.expand(make_scene(), 1)
    a = tf.augment(ex, 128, np.random.default_rng(3))
    b = tf.augment(ex, 128, np.random.default_rng(3))
    for k in ("image", "mask", "box"):
        np.testing.assert_array_equal(a[k], b[k])
    c = [tf.augment(ex, 128, np.random.default_rng(s))["image"] for s in range(4, 8)]
    assert any(not np.array_equal(a["image"], x) for x in c)


def test_crop_acceptance_centre_inside():
    sc = make_scene(400, 600)
    ex = tf.expand(sc, 0)
    for seed in range(30):
        v = tf._view_of(ex)
        tf._random_size_crop(v, 128, 200, np.random.default_rng(seed))
        w, h = v.size
        if (w, h) != (600, 400):  # a crop was accepted: the target centre stays visible
            assert v.masks[0].any()
            assert 0 <= v.box[0] < v.box[2] <= w and 0 <= v.box[1] < v.box[3] <= h


def test_color_jitter_keeps_geometry():
    ex = tf.expand(make_scene(), 0)
    a = tf.augment(ex, 128, np.random.default_rng(0), jitter_prob=0.0)
    b = tf.augment(ex, 128, np.random.default_rng(0), jitter_prob=1.0)
    assert a["mask"].sum() == b["mask"].sum()  # same geometry (the pad offset draw differs)
    np.testing.assert_allclose(a["box"][2:] - a["box"][:2], b["box"][2:] - b["box"][:2])


def test_stages_are_picklable():
    from refjax.tasks.mrefm import MRefMData
    from refjax.tasks.oneref import OneRefData
    from refjax.tasks.ras import RASData

    for obj in (
        stages.EvalLetterbox(128, True),
        stages.Augment(128, False),
        stages.Tokenize("/nonexistent", True, False, OneRefData(64, 16, 7, box_mask=True)),
        stages.Expand([], False, MRefMData(64, 16, 6, patch=16)),
        stages.MRefMMask(128, 16, 5),
        stages.Finalize(RASData(64, 16), keep_bad=True),
    ):
        assert type(pickle.loads(pickle.dumps(obj))) is type(obj)


# ----------------------------------------------------------------------------- bad input


def _bad(fn, field: str, text: str):
    with pytest.raises(BadRecordError) as e:
        fn()
    assert e.value.field == field and e.value.record_id == "scene-0"
    assert text in str(e.value) and "scene-0" in str(e.value)


def test_bad_missing_image():
    sc = make_scene()
    sc["image"] = None
    _bad(lambda: tf.expand(sc, 0), "image", "missing image")


def test_bad_unreadable_image():
    from refjax.data.images import decode_image

    with pytest.raises(BadRecordError) as e:
        decode_image(b"not a png", "scene-0")
    assert e.value.field == "image" and "unreadable image" in str(e.value)


def test_bad_box_outside_and_zero_area():
    sc = make_scene()
    sc["boxes"][1] = [100, 10, 150, 40]  # x2 > W = 140
    _bad(lambda: tf.expand(sc, 0), "boxes[1]", "outside the 140x96 (WxH) image")
    sc["boxes"][1] = [30, 10, 30, 40]
    _bad(lambda: tf.expand(sc, 0), "boxes[1]", "zero-area box")


def test_bad_empty_text():
    sc = make_scene(text="   ")
    _bad(lambda: tf.expand(sc, 0), "expressions[0].text", "empty text")


def test_bad_mask_size():
    sc = make_scene()
    sc["masks"] = sc["masks"][:, :50]
    _bad(lambda: tf.expand(sc, 0), "masks", "mask of size (50, 140) != image size (96, 140)")
    sc = make_scene()
    sc["pool_masks"] = sc["pool_masks"][:, :, :3]
    _bad(lambda: tf.expand(sc, 0), "pool_masks", "mask of size")


# ----------------------------------------------------------------------------- tokenize


@pytest.fixture(scope="module")
def beit3_tok(tmp_path_factory):
    from refjax.data.tokenizers import load_beit3_tokenizer, train_tokenizers

    texts = [e["text"] for e in make_scene()["expressions"]] + ["the small red circle left of it"]
    paths = train_tokenizers(texts, str(tmp_path_factory.mktemp("tok")))
    return load_beit3_tokenizer(paths["beit3"])


def test_tokenize_and_subject_priority(beit3_tok):
    ex = tf.expand(make_scene(text="the small red circle"), 0)  # subject span words [0, 3)
    out = tf.tokenize(ex, beit3_tok, 16)
    ids, pad = out["text_ids"], out["text_padding"]
    assert ids.shape == pad.shape == (16,) and ids.dtype == pad.dtype == np.int32
    assert ids[0] == 0 and ids[out["n_tok"] - 1] == 2 and np.all(ids[out["n_tok"] :] == 1)
    np.testing.assert_array_equal(pad, (np.arange(16) >= out["n_tok"]).astype(np.int32))
    pieces = beit3_tok.convert_ids_to_tokens([int(i) for i in ids[1 : out["n_tok"] - 1]])
    words = tf.word_positions(pieces)
    # Priority: the pieces of the head (last) word of the subject span, "red" (word 2).
    assert out["mlm_priority"] and all(words[p - 1] == 2 for p in out["mlm_priority"])


def test_bad_overlong_text(beit3_tok):
    ex = tf.expand(make_scene(text="the small red circle left of it " * 4), 0)
    out = tf.tokenize(ex, beit3_tok, 8)  # default: truncate like OneRef
    assert out["n_tok"] == 8 and out["text_ids"][7] == 2
    _bad(lambda: tf.tokenize(ex, beit3_tok, 8, truncate=False), "text", "tokens > max_len-2 = 6")
