"""Inference restore cost: parameters only vs the whole train state, for a base-size OneRef.

``python benchmarks/restore.py --workdir /tmp/restore_bench`` writes (once) a train checkpoint of
``configs/oneref/rec_res.py:base,task=res`` (BEiT-3 base + REC/RES heads, 384 px; random
weights, AdamW state), then restores it in fresh processes, alternating, ``--rounds`` times:

- ``train_state``: what inference did before the task seam (build the optimizer, restore the
  whole ``TrainState``: parameters, batch statistics and both AdamW moments);
- ``variables``: ``trainer.restore_variables`` (params + frozen + batch statistics only; no
  optimizer is built or read), what ``Predictor.from_workdir`` and ``refjax eval`` use now.

Each prints wall seconds and the process's peak RSS (``VmHWM``); the table reports medians.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "configs/oneref/rec_res.py:base,task=res"


def _config():
    from refjax.train.config import load_config

    config = load_config(os.path.join(HERE, CONFIG))
    with config.unlocked():
        config.model.vocab_size = 64010
        config.model.dtype = "float32"
        config.mesh = {"data": 1}
        config.layout = "dp"
        config.train.total_steps = 1
    return config


def write(workdir: str) -> None:
    import jax

    from refjax.train import setup
    from refjax.train.trainer import CONFIG_FILE, _checkpointer

    config = _config()
    t0 = time.perf_counter()
    s = setup.build(config, total_steps=1, steps_per_epoch=1, devices=jax.devices()[:1],
                    load_init=False)
    # Trained AdamW moments are dense noise; fresh ones are zeros, which the checkpoint stores
    # compressed to almost nothing, so fill them with random values like a real run's.
    leaves, treedef = jax.tree.flatten(s.state.opt_state)
    keys = jax.random.split(jax.random.key(0), len(leaves))
    leaves = [jax.random.uniform(k, x.shape, x.dtype) if x.ndim else x
              for k, x in zip(keys, leaves)]
    state = s.state.replace(opt_state=jax.tree.unflatten(treedef, leaves))
    with _checkpointer(config, workdir) as ckpt:
        ckpt.save(1, state)
        ckpt.wait_until_finished()
    with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
        f.write(config.to_json())
    n = sum(x.size for x in jax.tree.leaves(s.state.params))
    print(f"wrote a {n / 1e6:.1f} M-parameter train state in {time.perf_counter() - t0:.0f} s")


def _vm_hwm_mib() -> float:
    """This process's peak resident memory (``VmHWM``; ``ru_maxrss`` would include the parent's
    peak at fork time)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024


def restore(workdir: str, what: str) -> None:
    import jax

    from refjax import parallel
    from refjax.train import trainer

    config = trainer.load_config_json(workdir)
    mesh = parallel.create_mesh({"data": 1}, jax.devices()[:1])
    rules = parallel.rules_for("dp")
    t0 = time.perf_counter()
    if what == "variables":
        _, _, tree, _, _ = trainer.restore_variables(config, workdir, 1, mesh, rules)
    else:
        tree, _, _ = trainer.restore_train_state(config, workdir, 1, mesh, rules)
    jax.block_until_ready(tree)
    wall = time.perf_counter() - t0
    peak = _vm_hwm_mib()
    print(json.dumps({"what": what, "wall_s": wall, "peak_rss_mib": peak}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--child", choices=("variables", "train_state"), default=None)
    a = p.parse_args()
    if a.child:
        restore(a.workdir, a.child)
        return
    if not os.path.isdir(os.path.join(a.workdir, "checkpoints", "1")):
        write(a.workdir)
    runs: dict[str, list[dict]] = {"train_state": [], "variables": []}
    env = {**os.environ, "XLA_FLAGS": "", "PYTHONPATH": HERE}
    for _ in range(a.rounds):
        for what in runs:
            cmd = [sys.executable, __file__, "--workdir", a.workdir, "--child", what]
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
            runs[what].append(json.loads(out.strip().splitlines()[-1]))
            print(json.dumps(runs[what][-1]), flush=True)
    print(f"{'restore':<12}{'wall s (median)':>17}{'peak RSS MiB (median)':>24}")
    for what, rs in runs.items():
        wall = statistics.median(r["wall_s"] for r in rs)
        rss = statistics.median(r["peak_rss_mib"] for r in rs)
        print(f"{what:<12}{wall:>17.2f}{rss:>24.0f}")


if __name__ == "__main__":
    main()
