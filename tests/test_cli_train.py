"""CLI smoke: ``python -m refjax train`` then ``eval`` (RES, so masks, BatchNorm and mIoU too)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.data_fixtures import refshapes_tiny_dir  # noqa: F401
from tests.test_train_resume import ROOT, subprocess_env, tiny_train_args


def _check_split(res: dict) -> None:
    """One flat result: overall metrics and ``<kind>/<metric>`` entries whose counts add up."""
    assert res["count"] > 0
    for key in ("acc@0.5", "miou", "oiou"):
        assert 0.0 <= res[key] <= 1.0
    kinds = {k.rsplit("/", 1)[0] for k in res if "/" in k}
    assert kinds and sum(res[f"{k}/count"] for k in kinds) == res["count"]
    for kind in kinds:
        assert res[f"{kind}/count"] > 0 and 0.0 <= res[f"{kind}/miou"] <= 1.0


def test_cli_train_then_eval(refshapes_tiny_dir, tmp_path):  # noqa: F811
    workdir = str(tmp_path / "run")
    args = tiny_train_args(refshapes_tiny_dir, workdir, "train.total_steps=4",
                           "train.eval_every=2", "train.eval_max_batches=2",
                           "eval.splits=val,testA")
    args[args.index("configs/oneref/rec_res.py:tiny")] = "configs/oneref/rec_res.py:tiny,task=res"
    env = subprocess_env(devices=2)
    r = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]

    with open(os.path.join(workdir, "metrics.json")) as f:
        metrics = json.load(f)
    assert metrics["step"] == 4 and sorted(metrics["splits"]) == ["testA", "val"]
    for res in metrics["splits"].values():
        _check_split(res)
    assert metrics["train"]["loss"] > 0 and "loss_seg_focal" in metrics["train"]
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["model"]["use_seg_head"] is True
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in records if "val/miou" in r] == [2, 4]
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(workdir))

    # eval of the final checkpoint (config from the workdir) reproduces the final metrics.
    ev = [sys.executable, "-m", "refjax", "eval", "--workdir", workdir,
          "--splits", "val,testB", "--step", "4"]
    r = subprocess.run(ev, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    with open(os.path.join(workdir, "eval_step4.json")) as f:
        result = json.load(f)
    assert result["step"] == 4 and sorted(result["splits"]) == ["testB", "val"]
    _check_split(result["splits"]["testB"])
    assert result["splits"]["val"] == metrics["splits"]["val"]
