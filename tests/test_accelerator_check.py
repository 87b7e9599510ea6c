"""benchmarks/accelerator_check.py runs end to end in --smoke mode on CPU (so it cannot rot
between the sessions that have a GPU)."""

import json
import os
import runpy
import sys

import jax
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_accelerator_check_smoke(tmp_path, monkeypatch):
    out = tmp_path / "rows.json"
    monkeypatch.setattr(sys, "argv", ["accelerator_check.py", "--smoke", "--json", str(out)])
    jax.config.update("jax_disable_most_optimizations", True)  # compile time dominates here
    try:
        with pytest.raises(SystemExit) as e:
            runpy.run_path(os.path.join(ROOT, "benchmarks", "accelerator_check.py"),
                           run_name="__main__")
    finally:
        jax.config.update("jax_disable_most_optimizations", False)
    assert e.value.code == 0
    rows = json.loads(out.read_text())
    assert [r["case"].split()[0] for r in rows] == ["beit3", "beit3", "oneref"]
    assert all(r["step_s"] > 0 for r in rows)
    assert rows[-1]["examples_per_s"] > 0


def test_demo_flops_grow_with_the_model():
    ns = runpy.run_path(os.path.join(ROOT, "benchmarks", "accelerator_check.py"))
    flops = ns["encoder_flops"]
    base = flops(128, 512, 3, 128, 16, 24)
    # linear in depth (plus the patch embedding), quadratic in the token count's attention part
    assert flops(128, 512, 6, 128, 16, 24) - base == pytest.approx(base - flops(128, 512, 0, 128,
                                                                                16, 24))
    assert flops(128, 512, 3, 256, 16, 24) > 4 * base * 0.9
    assert ns["demo_flops"]() == pytest.approx(base)  # the demo model is dim 128, depth 3, 128 px
