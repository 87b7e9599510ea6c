"""MRefM on real (tiny RefShapes) data: the pipeline's MRefM rows (masks, STS labels), and the
pretraining -> transfer round trip through the CLI (``python -m refjax train``)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from refjax import masking
from refjax.convert import oneref as conv
from refjax.convert.common import load_state_dict
from refjax.data.pipeline import make_pipeline
from refjax.tasks import get_task
from refjax.tasks.oneref import backbone_config
from refjax.train.config import apply_overrides, load_config
from refjax.train.trainer import load_for_inference, resolve_config
from tests.data_fixtures import refshapes_tiny_dir  # noqa: F401
from tests.test_train_resume import ROOT, subprocess_env, tiny_train_args

MREFM_HEADS = ("mim_head", "mim_vts_head", "mlm_head", "mlm_sts_head")


def _config(data_dir: str, *sets: str):
    config = load_config("configs/oneref/mrefm.py:tiny")
    apply_overrides(config, [f"data.data_dir={data_dir}", "data.dataset_config=tiny",
                             "model.img_size=64", "data.max_text_len=16", "data.batch_size=8",
                             *sets])
    return resolve_config(config)


def test_pipeline_rows(refshapes_tiny_dir):  # noqa: F811
    for random_masking in (False, True):
        config = _config(refshapes_tiny_dir, f"data.random_masking={random_masking}")
        data_task = get_task("mrefm").data_task(config)
        with make_pipeline(config.data, "train", task=data_task, train=True, seed=0) as it:
            batch = next(it)
        g, n = 4, 16
        pad = batch["text_padding"].astype(bool)
        n_tok = (~pad).sum(1)
        sts = batch["sts_label"]
        assert sts.shape == (8, n) and sts.dtype == np.float32
        assert set(np.unique(sts)) <= {0.0, 1.0} and sts.sum() > 0
        assert not sts[pad].any() and not sts[:, 0].any()
        assert not sts[np.arange(8), n_tok - 1].any()  # EOS
        assert batch["image_raw"].dtype == np.uint8 and batch["image_raw"].shape == (8, 64, 64, 3)
        for i in range(8):
            m = batch["mim_mask"][i].reshape(g, g)
            y1, y2, x1, x2 = masking.box_region(batch["box"][i], g)
            lr = (y2 - y1) * (x2 - x1)
            if not random_masking:
                assert m[y1:y2, x1:x2].sum() == lr - int(lr * 0.25)
            k = masking.num_text_masked(int(n_tok[i]), 0.4)
            assert batch["mlm_mask"][i].sum() == k and batch["mlm_mask"][i][0] == 0
            changed = batch["mlm_ids"][i] != batch["text_ids"][i]
            assert not (changed & (batch["mlm_mask"][i] == 0)).any()


def _assert_same_params(back: dict, params: dict) -> None:
    """Every converted-back leaf equals the run's parameter of the same path."""
    host = jax.device_get(params)
    for (path, x), (_, y) in zip(jax.tree.leaves_with_path(back),
                                 jax.tree.leaves_with_path({k: host[k] for k in back})):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y),
                                      err_msg=jax.tree_util.keystr(path))


def test_mrefm_then_transfer_through_the_cli(refshapes_tiny_dir, tmp_path):  # noqa: F811
    pre, rec = str(tmp_path / "mrefm"), str(tmp_path / "rec")
    args = tiny_train_args(refshapes_tiny_dir, pre, "train.total_steps=3", "train.ckpt_every=3",
                           "train.eval_max_batches=1", "eval.splits=val",
                           "tokenizer.codebook_size=32", "loss.use_vts=True",
                           "loss.use_sts=True")
    args[args.index("configs/oneref/rec_res.py:tiny")] = "configs/oneref/mrefm.py:tiny,data=tiny"
    env = subprocess_env()
    r = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    with open(os.path.join(pre, "metrics.json")) as f:
        metrics = json.load(f)
    assert metrics["step"] == 3
    train = metrics["train"]
    assert train["loss_mim"] > 0 and train["mim_step"] == 1.0  # step 3 is update step 2: MIM
    val = metrics["splits"]["val"]
    for key in ("mim_acc", "mlm_acc", "loss_mim", "loss_mlm", "loss_mim_vts", "loss_mlm_sts"):
        assert np.isfinite(val[key]), key
    records = [json.loads(line) for line in open(os.path.join(pre, "metrics.jsonl"))]
    steps = {rec["step"]: rec for rec in records if "loss" in rec}
    assert steps[1]["mim_step"] == 1.0 and steps[2]["mim_step"] == 0.0
    assert steps[2]["loss_mlm"] > 0 and steps[2]["loss_mim"] == 0.0

    # Export back to the official layout and convert in again: the same parameters.
    # .pth needs torch (Python 3.11 CI); the same state_dict as .safetensors without it
    ext = ".pth" if importlib.util.find_spec("torch") else ".safetensors"
    pth = str(tmp_path / f"mrefm{ext}")
    r = subprocess.run([sys.executable, "-m", "refjax", "export", "--workdir", pre, "--out", pth,
                        "--official"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=400)
    assert r.returncode == 0 and "MRefM official layout" in r.stdout, r.stdout + r.stderr[-4000:]
    _, _, va, config = load_for_inference(pre)
    sd = load_state_dict(pth)
    assert {k.split(".")[0] for k in sd} == {"beit3", "vision_head", "language_head",
                                             "logit_scale", "visu_proj", "text_proj",
                                             "bbox_embed", *MREFM_HEADS}
    back, report = conv.from_torch_mrefm(sd, backbone_config(config.model))
    assert not report.missing and not report.unexpected
    _assert_same_params(back["params"], va["params"])

    # Transfer: REC from the MRefM workdir; lr 0 keeps the loaded backbone as it was.
    args = tiny_train_args(refshapes_tiny_dir, rec, "train.total_steps=1", "eval.splits=",
                           f"init={pre}", "optim.lr=0.0")
    r = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    task_b, _, vb, _ = load_for_inference(rec)
    assert task_b.name == "rec"
    assert set(MREFM_HEADS) <= set(va["params"]) and "tokenizer" in va["frozen"]
    assert not set(MREFM_HEADS) & set(vb["params"]) and not vb["frozen"]
    for name in ("beit3", "vision_head", "language_head", "bbox_embed"):
        la = jax.tree.leaves_with_path(va["params"][name])
        lb = jax.tree.leaves_with_path(vb["params"][name])
        assert [p for p, _ in la] == [p for p, _ in lb]
        for (path, x), (_, y) in zip(la, lb):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y),
                                          err_msg=f"{name}{jax.tree_util.keystr(path)}")

    # The REC run exports to BEiT3ForGrounding's keys (no MRefM heads) and converts back.
    rec_sd = str(tmp_path / f"rec{ext}")
    assert "OneRef REC official layout" in conv.export_official_cli(rec, rec_sd)
    sd = load_state_dict(rec_sd)
    assert not {k.split(".")[0] for k in sd} & set(MREFM_HEADS)
    back, report = conv.from_torch(sd, backbone_config(load_for_inference(rec)[3].model))
    assert not report.missing and not report.unexpected
    _assert_same_params(back["params"], vb["params"])
    with pytest.raises(FileExistsError):
        conv.export_official_cli(rec, rec_sd)
    with pytest.raises(conv.ConversionError, match="pth or .safetensors"):
        conv.export_official_cli(rec, str(tmp_path / "rec.npz"))
