"""The demo's pieces that do not need the trainer: config, example sampling, report files."""

import json
import os

import numpy as np
from PIL import Image

from refjax import demo
from refjax.data.builders.refshapes import VERSION
from refjax.data.tokenizers import BEIT3_FILE, load_beit3_tokenizer
from tests.data_fixtures import refshapes_tiny_dir  # noqa: F401
from tests.test_predict import _predictor


def test_demo_config_trains_box_and_mask(tmp_path):
    config = demo.demo_config(str(tmp_path / "data"), "tiny", ["train.total_steps=7"])
    assert config.model.use_seg_head and config.task == "res"
    assert config.loss.use_box_loss and config.loss.use_seg_loss
    assert config.data.data_dir == str(tmp_path / "data") and config.data.dataset_config == "tiny"
    assert config.train.total_steps == 7
    assert tuple(config.eval.splits) == demo.SPLITS


def test_sample_and_write_report(refshapes_tiny_dir, tmp_path):  # noqa: F811
    examples = demo.sample_examples(refshapes_tiny_dir, "tiny", "val", n=5)
    assert len(examples) == 5
    assert all(
        ex["num_targets"] > 0 and ex["mask"].shape == ex["image"].shape[:2] for ex in examples
    )
    path = os.path.join(refshapes_tiny_dir, "refshapes", "tiny", VERSION, BEIT3_FILE)
    predictor = _predictor(load_beit3_tokenizer(path), seg=True)
    metrics = {"val": {"count": 5.0, "acc@0.5": 0.4, "spatial/count": 2.0, "spatial/acc@0.5": 0.5}}
    table = demo.write_report(str(tmp_path), metrics, predictor, examples, {"wall_time_s": 1.0})
    assert "spatial" in table and "40.00%" in table
    with open(tmp_path / "metrics.json") as f:
        saved = json.load(f)
    assert saved["splits"] == metrics and saved["wall_time_s"] == 1.0
    grid = Image.open(tmp_path / "predictions.png")
    assert grid.width > 4 * 200 and np.asarray(grid).std() > 0


def test_short_run_configs_chain_pretraining_into_transfer(tmp_path):
    pre, tr = demo.short_run_configs(str(tmp_path), "tiny", 30, 60, str(tmp_path / "mrefm"))
    assert pre.task == "mrefm" and tr.task == "res"
    assert pre.model.tokenizer_init.endswith(demo.TOKENIZER)
    assert tr.init == str(tmp_path / "mrefm")
    assert (pre.train.total_steps, tr.train.total_steps) == (30, 60)
    for c in (pre, tr):  # the same small backbone on both sides of the transfer
        assert (c.model.dim, c.model.depth, c.data.max_text_len) == (128, 3, 24)
    assert tr.loss.use_box_loss and tr.loss.use_seg_loss and tr.model.seg_dim == 32
    table = demo._overall_table({"a": {"val": {"count": 4.0, "acc@0.5": 0.5, "miou": 0.25}}})
    assert table.splitlines()[2].split() == ["a", "val", "4", "50.00%", "25.00%", "-"]
