"""A 2-process ``jax.distributed`` OneRef training run on 127.0.0.1 (2 processes x 2 CPU devices)
equals the 1-process run on 4 devices: two fsdp train steps, each process feeding its half of
every global batch; then the eval metric all-reduce gives the same totals on both processes.

All three runs are subprocesses of ``tests/dist_worker.py`` with an explicit environment (the
parent's 8-device ``XLA_FLAGS`` must not leak in). They compile with
``--xla_backend_optimization_level=0``, which cuts the CPU compile time about 3x; the reference
and the distributed run use the same flags.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, "tests", "dist_worker.py")
TOL = 1e-5
TIMEOUT_S = 240
FAST_COMPILE = "--xla_backend_optimization_level=0"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(xla_flags: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_"))}
    env.update(PYTHONPATH=REPO, XLA_FLAGS=xla_flags, JAX_PLATFORMS="cpu",
               PYTHONUNBUFFERED="1")
    return env


def _run_all(jobs: list[tuple[list[str], dict[str, str], Path]]) -> None:
    """Start every job, wait for all within ``TIMEOUT_S``; kill the rest on any failure."""
    procs = []
    try:
        for args, env, log in jobs:
            with open(log, "w") as f:
                procs.append(subprocess.Popen([sys.executable, WORKER, *args], env=env,
                                              stdout=f, stderr=subprocess.STDOUT, cwd=REPO))
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            codes = [p.poll() for p in procs]
            if all(c is not None for c in codes) or any(c not in (None, 0) for c in codes):
                break
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    bad = [(job, p.returncode) for job, p in zip(jobs, procs) if p.returncode != 0]
    if bad:
        report = "\n".join(f"--- worker {job[0]} exit {rc}:\n{job[2].read_text()[-3000:]}"
                           for job, rc in bad)
        pytest.fail(f"workers failed or timed out after {TIMEOUT_S} s:\n{report}")


def _section(result: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    return {k[len(prefix):]: v for k, v in result.items() if k.startswith(prefix)}


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path: Path) -> None:
    port = _free_port()
    out = [tmp_path / f"p{i}.npz" for i in range(2)]
    ref_out = tmp_path / "ref.npz"
    dist_env = _env(FAST_COMPILE)
    jobs = [([str(i), str(port), str(out[i])], dist_env, tmp_path / f"p{i}.log")
            for i in range(2)]
    ref_env = _env(f"--xla_force_host_platform_device_count=4 {FAST_COMPILE}")
    jobs.append((["0", "0", str(ref_out), "1"], ref_env, tmp_path / "ref.log"))
    _run_all(jobs)

    res = [dict(np.load(p)) for p in out]
    ref = dict(np.load(ref_out))
    assert [int(r["process_count"]) for r in res] == [2, 2]
    assert [int(r["process_index"]) for r in res] == [0, 1]
    assert int(ref["process_count"]) == 1

    # Training: both processes see the same global state; it equals the 1-process run.
    ref_vars = _section(ref, "var/")
    assert ref_vars and any(k.startswith("batch_stats/") for k in ref_vars)
    for r in res:
        np.testing.assert_allclose(r["losses"], ref["losses"], rtol=0, atol=TOL)
        got = _section(r, "var/")
        assert got.keys() == ref_vars.keys()
        diffs = {k: float(np.max(np.abs(got[k] - ref_vars[k]))) for k in ref_vars}
        worst = max(diffs, key=diffs.get)
        print(f"process {int(r['process_index'])}: losses {r['losses']} vs {ref['losses']}, "
              f"max |var diff| {diffs[worst]:.2e} at {worst}")
        assert diffs[worst] <= TOL, {k: v for k, v in diffs.items() if v > TOL}
    assert not np.allclose(res[0]["losses"][0], res[0]["losses"][1])  # the step did something

    # Eval rows: each process holds its half of the global batch, in order.
    rows = {k: np.concatenate([_section(r, "eval/")[k] for r in res]) for k in ("box_iou",
                                                                                "valid", "kind")}
    ref_rows = _section(ref, "eval/")
    np.testing.assert_allclose(rows["box_iou"], ref_rows["box_iou"], rtol=0, atol=TOL)
    np.testing.assert_array_equal(rows["valid"], ref_rows["valid"])
    np.testing.assert_array_equal(rows["kind"], ref_rows["kind"])

    # Metric all-reduce: identical totals on both processes, equal to the sum of the local
    # sums (oIoU = sum I / sum U over all processes), and every row is counted once.
    reduced = [_section(r, "reduced/") for r in res]
    local = [_section(r, "local/") for r in res]
    assert reduced[0].keys() == reduced[1].keys()
    assert "result/oiou" in reduced[0] and "kind/2/inter" in reduced[0]
    for k in reduced[0]:
        assert reduced[0][k] == reduced[1][k], k
    for k in local[0]:
        if not k.startswith("result/"):
            np.testing.assert_allclose(reduced[0][k], local[0][k] + local[1][k], rtol=1e-12,
                                       err_msg=k)
    total = reduced[0]
    assert total["total/count"] == ref_rows["valid"].sum() == 7
    assert total["result/oiou"] == pytest.approx(total["total/inter"] / total["total/union"])
    assert all(float(r["rows_total"]) == 8 for r in res)
    assert (local[0]["total/count"], local[1]["total/count"]) == (4, 3)  # row 7 is padding
