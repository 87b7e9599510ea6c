"""Tiny RAS train step: frozen towers run every step (pixels) vs cached tower features.

Same config (``configs/ras/stage2.py:tiny``, all four towers + 2D PE), one device. The
feature cache is written once for the train split (``refjax.ras_features.write_features``, what
``python -m refjax ras-features`` runs) into ``--cache``. The script then times the jitted
train step on 11 prefetched batches (3 rounds, compile excluded) and 10 steps fed by the
pipeline (data included), for both inputs:

    python benchmarks/ras_features_speed.py --data_dir DATA [--data_config tiny] [--cache DIR]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax

from refjax.data.pipeline import make_pipeline
from refjax.ras_features import write_features
from refjax.train import setup
from refjax.train.config import apply_overrides, load_config
from refjax.train.trainer import resolve_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def time_steps(config, batches: int = 12, rounds: int = 3) -> dict[str, float]:
    """``step_s`` (min over rounds of the mean step on prefetched batches), ``e2e_s`` (mean
    step fed by the pipeline), ``loss`` (the last)."""
    s = setup.build(config, total_steps=100, devices=jax.devices()[:1], seed=0)
    with make_pipeline(config.data, "train", task=s.task.data_task(config), train=True,
                       seed=0) as it:
        host = [next(it) for _ in range(batches)]
        with s.activate():
            state = s.state
            gbs = [s.global_batch(b) for b in host]
            state, m = s.train_step(state, gbs[0])
            jax.block_until_ready(m)
            ts = []
            for _ in range(rounds):
                t = time.perf_counter()
                for gb in gbs[1:]:
                    state, m = s.train_step(state, gb)
                jax.block_until_ready(m)
                ts.append((time.perf_counter() - t) / (len(gbs) - 1))
            t = time.perf_counter()
            for _ in range(10):
                state, m = s.train_step(state, s.global_batch(next(it)))
            jax.block_until_ready(m)
            e2e = (time.perf_counter() - t) / 10
    return {"step_s": min(ts), "e2e_s": e2e, "loss": float(m["loss"])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data_dir", required=True)
    p.add_argument("--data_config", default="tiny")
    p.add_argument("--cache", default=None, help="feature cache dir (default: a temp dir)")
    a = p.parse_args()
    c = load_config(os.path.join(ROOT, "configs/ras/stage2.py") + f":tiny,data={a.data_config}")
    apply_overrides(c, [f"data.data_dir={a.data_dir}", "optim.warmup_steps=0"])
    c = resolve_config(c)
    out = a.cache or tempfile.mkdtemp(prefix="ras_features_")
    t = time.time()
    write_features(c, out, splits=["train"], batch_size=32, progress=False, overwrite=True)
    print(f"write_features (train): {time.time() - t:.1f} s", flush=True)
    cf = c.copy_and_resolve_references()
    with cf.unlocked():
        cf.data.features_dir = out
    res = {}
    for name, cc in (("pixels", c), ("features", cf)):
        res[name] = time_steps(cc)
        r = res[name]
        print(f"{name:<9} step {r['step_s']:.3f} s, with pipeline {r['e2e_s']:.3f} s, "
              f"loss {r['loss']:.4f}", flush=True)
    print(f"speedup: step {res['pixels']['step_s'] / res['features']['step_s']:.2f}x, "
          f"with pipeline {res['pixels']['e2e_s'] / res['features']['e2e_s']:.2f}x; "
          f"losses differ by {abs(res['pixels']['loss'] - res['features']['loss']):.2e}")


if __name__ == "__main__":
    main()
