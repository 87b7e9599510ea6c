"""Inference API on a tiny random OneRef: shapes, coordinates, letterbox inverse, draw, errors."""

import jax
import ml_collections
import numpy as np
import pytest

from refjax import boxes as bx
from refjax.data.errors import BadRecordError
from refjax.data.tokenizers import load_beit3_tokenizer, train_tokenizers
from refjax.models.beit3 import beit3_config
from refjax.models.oneref import OneRef
from refjax.predict import (
    OneRefPredictor,
    Predictor,
    canvas_box_to_original,
    letterbox_of,
)
from tests.test_oneref_heads import _random_variables

SIZE, MAX_LEN = 64, 12
TEXTS = ["the small red circle", "all blue squares left of the green star", "the biggest ring"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    paths = train_tokenizers(TEXTS * 3, str(tmp_path_factory.mktemp("tok")), vocab_size=60)
    return load_beit3_tokenizer(paths["beit3"])


def _predictor(tokenizer, seg: bool) -> OneRefPredictor:
    cfg = beit3_config("tiny", depth=1, img_size=SIZE, vocab_size=128, max_source_positions=32)
    model = OneRef(cfg, use_seg_head=seg)
    abstract = jax.eval_shape(
        model.init,
        jax.random.key(0),
        np.zeros((1, MAX_LEN), np.int32),
        np.zeros((1, MAX_LEN), np.int32),
        np.zeros((1, SIZE, SIZE, 3), np.float32),
    )
    config = ml_collections.ConfigDict({"data": {
        "image_size": SIZE, "max_text_len": MAX_LEN,
        "image_mean": (0.485, 0.456, 0.406), "image_std": (0.229, 0.224, 0.225),
    }})
    return OneRefPredictor(model, _random_variables(abstract, seed=1), config, tokenizer)


@pytest.fixture(scope="module")
def res(tokenizer):
    return _predictor(tokenizer, seg=True)


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_predict_shapes_and_box_inside_image(res):
    img = _image(50, 80)
    p = res.predict(img, "the small red circle")
    box = p["box_xyxy"]
    assert box.shape == (4,) and box.dtype == np.float32
    assert 0 <= box[0] <= box[2] <= 80 and 0 <= box[1] <= box[3] <= 50
    assert p["mask"].shape == (50, 80) and p["mask"].dtype == bool
    assert isinstance(p["score"], float) and -1 - 1e-6 <= p["score"] <= 1 + 1e-6
    # the box is the raw canvas box mapped back through the eval letterbox
    lb = bx.Letterbox.centered(80, 50, SIZE)
    np.testing.assert_allclose(box, canvas_box_to_original(p["box_cxcywh_canvas"], lb), atol=1e-4)


def test_rec_only_model_has_no_mask(tokenizer):
    p = _predictor(tokenizer, seg=False).predict(_image(40, 30), "the biggest ring")
    assert p["mask"] is None and p["box_xyxy"].shape == (4,)


def test_batch_equals_single(res):
    imgs, texts = [_image(50, 80, 1), _image(70, 33, 2)], TEXTS[:2]
    batch = res.predict_batch(imgs, texts)
    for img, t, b in zip(imgs, texts, batch):
        one = res.predict(img, t)
        np.testing.assert_allclose(b["box_xyxy"], one["box_xyxy"], atol=1e-5)
        np.testing.assert_array_equal(b["mask"], one["mask"])
        assert b["mask"].shape == img.shape[:2]


@pytest.mark.parametrize("hw", [(50, 80), (81, 37), (64, 64), (300, 200)])
def test_letterbox_inverse_is_exact(res, hw):
    h, w = hw
    ex = res.prepare(_image(h, w), "the small red circle")
    lb = letterbox_of(ex["letterbox"], SIZE)
    assert lb == bx.Letterbox.centered(w, h, SIZE)  # the eval transform's own letterbox
    orig = np.array([0.25 * w, 0.1 * h, 0.9 * w, 0.75 * h])
    canvas = lb.forward_boxes(orig)
    cxcywh = bx.xyxy_to_cxcywh(canvas) / SIZE
    np.testing.assert_allclose(canvas_box_to_original(cxcywh, lb), orig, rtol=0, atol=1e-9)
    content = np.zeros((SIZE, SIZE), bool)
    content[lb.top : lb.top + lb.new_h, lb.left : lb.left + lb.new_w] = True
    assert lb.inverse_mask(content).shape == (h, w) and lb.inverse_mask(content).all()


def test_draw_keeps_the_input_size(res):
    img = _image(50, 80)
    p = res.predict(img, "the small red circle")
    out = res.draw(img, p, "the small red circle")
    assert out.size == (80, 50) and out.mode == "RGB"
    assert not np.array_equal(np.asarray(out), img)


@pytest.mark.parametrize("text", ["", "   ", None])
def test_empty_text_names_the_field(res, text):
    with pytest.raises(BadRecordError) as e:
        res.predict(_image(20, 20), text)
    assert e.value.field == "text"


@pytest.mark.parametrize(
    "image",
    [
        np.zeros((20, 20), np.uint8),
        np.zeros((20, 20, 3), np.float32),
        np.zeros((0, 20, 3), np.uint8),
        [[1, 2, 3]],
    ],
    ids=["2d", "float", "empty", "list"],
)
def test_bad_image_names_the_field(res, image):
    with pytest.raises(BadRecordError) as e:
        res.predict(image, "the small red circle")
    assert e.value.field == "image"


def test_cli_predict(res, tmp_path, monkeypatch, capsys):
    from PIL import Image

    from refjax.__main__ import main

    seen = {}

    def fake_from_workdir(cls, workdir, step=None):  # the trainer's checkpoint is not needed
        seen.update(workdir=workdir, step=step)
        return res

    monkeypatch.setattr(Predictor, "from_workdir", classmethod(fake_from_workdir))
    Image.fromarray(_image(50, 80)).save(tmp_path / "in.png")
    out = tmp_path / "pred.png"
    workdir = str(tmp_path / "run")
    (tmp_path / "run").mkdir()
    argv = [
        "predict",
        "--workdir",
        workdir,
        "--step",
        "5",
        "--image",
        str(tmp_path / "in.png"),
        "--text",
        "the small red circle",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    assert seen == {"workdir": workdir, "step": 5}
    assert Image.open(out).size == (80, 50)
    assert "box_xyxy=" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["predict", "--workdir", "{tmp}", "--image", "{tmp}/none.png", "--text", "a"],
         "image '{tmp}/none.png' does not exist"),
        (["predict", "--workdir", "{tmp}/absent", "--image", "{tmp}/in.png", "--text", "a"],
         "workdir '{tmp}/absent' does not exist"),
        (["predict", "--workdir", "{tmp}", "--image", "{tmp}/in.png", "--text", "  "],
         "--text is empty"),
        (["predict", "--workdir", "{tmp}", "--image", "{tmp}/bad.png", "--text", "a"],
         "cannot read image '{tmp}/bad.png'"),
        (["train", "--config", "configs/oneref/rec_res.py:tiny", "--workdir", "{tmp}/w",
          "--set", "model.dimm=3"], "unknown config key 'model.dimm'"),
        (["eval", "--workdir", "{tmp}/absent"], "workdir '{tmp}/absent' does not exist"),
        (["train", "--config", "configs/oneref/nothere.py", "--workdir", "{tmp}/w"],
         "config file not found: configs/oneref/nothere.py"),
    ],
)
def test_cli_reports_user_mistakes_in_one_line(tmp_path, capsys, argv, message):
    from PIL import Image

    from refjax.__main__ import main

    Image.fromarray(_image(20, 30)).save(tmp_path / "in.png")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    assert message.replace("{tmp}", str(tmp_path)) in err, err
    with pytest.raises((OSError, ValueError, KeyError)):  # --debug: the real exception
        main(["--debug", *argv])
