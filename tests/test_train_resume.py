"""Kill -9 mid-run and resume: the same per-step losses and bit-identical final parameters."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np

from refjax.train.logging import read_jsonl
from refjax.train.trainer import load_for_inference
from tests.data_fixtures import refshapes_tiny_dir  # noqa: F401

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STOP_LINE = "refjax: stopped after step 3"


def tiny_train_args(data_dir: str, workdir: str, *sets: str) -> list[str]:
    """``python -m refjax train`` on the tiny RefShapes fixture with a very small model."""
    base = [
        f"data.data_dir={data_dir}", "data.dataset_config=tiny", "model.dim=32", "model.depth=2",
        "model.heads=2", "model.mlp_dim=64", "model.img_size=64", "model.drop_path_rate=0.1",
        "data.max_text_len=16", "data.batch_size=4", "data.eval_batch_size=8",
        "train.log_every=1", "train.ckpt_every=3", "train.eval_every=0", "train.progress=False",
        "optim.warmup_steps=2", *sets,
    ]
    args = [sys.executable, "-m", "refjax", "train", "--config",
            "configs/oneref/rec_res.py:tiny", "--workdir", workdir]
    for s in base:
        args += ["--set", s]
    return args


def subprocess_env(devices: int = 1) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        JAX_DISABLE_MOST_OPTIMIZATIONS="1",
        PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""),
    )
    return env


def _losses(workdir: str) -> dict[int, float]:
    out = {}
    for rec in read_jsonl(os.path.join(workdir, "metrics.jsonl")):
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]  # a later record of a step wins
    return out


def _run(args: list[str], log: str) -> subprocess.Popen:
    with open(log, "w") as f:
        return subprocess.Popen(args, cwd=ROOT, env=subprocess_env(), stdout=f,
                                stderr=subprocess.STDOUT, text=True)


def _wait_for_line(proc: subprocess.Popen, log: str, line: str, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        with open(log) as f:
            if line in f.read():
                return
        if proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}):\n{open(log).read()[-3000:]}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {line!r}:\n{open(log).read()[-3000:]}")


def test_sigkill_and_resume_is_exact(refshapes_tiny_dir, tmp_path):  # noqa: F811
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    no_eval = "eval.splits="
    # Run the uninterrupted run and the to-be-killed run side by side.
    a = _run(tiny_train_args(refshapes_tiny_dir, straight, "train.total_steps=6", no_eval),
             str(tmp_path / "a.log"))
    b_log = str(tmp_path / "b.log")
    b = _run(tiny_train_args(refshapes_tiny_dir, resumed, "train.total_steps=6", no_eval,
                             "train.stop_after=3", "train.stop_hang=True"), b_log)
    try:
        _wait_for_line(b, b_log, STOP_LINE, timeout=300)
        os.kill(b.pid, signal.SIGKILL)  # no cleanup of any kind
        assert b.wait(timeout=60) == -signal.SIGKILL
    finally:
        if b.poll() is None:
            b.kill()
    assert sorted(_losses(resumed)) == [1, 2, 3]
    c_log = str(tmp_path / "c.log")
    c = _run(tiny_train_args(refshapes_tiny_dir, resumed, "train.total_steps=6", no_eval), c_log)
    assert c.wait(timeout=300) == 0, open(c_log).read()[-3000:]
    assert a.wait(timeout=300) == 0, open(str(tmp_path / "a.log")).read()[-3000:]
    assert "resumed from" in open(c_log).read()

    want, got = _losses(straight), _losses(resumed)
    assert sorted(want) == sorted(got) == [1, 2, 3, 4, 5, 6]
    assert [got[s] for s in range(1, 7)] == [want[s] for s in range(1, 7)]

    _, _, va, _ = load_for_inference(straight, step=6)
    _, _, vb, _ = load_for_inference(resumed, step=6)
    la, lb = jax.tree.leaves_with_path(va), jax.tree.leaves_with_path(vb)
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (path, x), (_, y) in zip(la, lb):
        assert np.array_equal(np.asarray(x), np.asarray(y)), jax.tree_util.keystr(path)
