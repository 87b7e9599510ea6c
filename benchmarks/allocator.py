"""Which malloc runs XLA:CPU's training step fastest: glibc vs tcmalloc vs mimalloc.

XLA:CPU allocates each execution's temporary buffer afresh; under glibc that is an ``mmap`` per
step and millions of minor page faults (BENCHMARKS.md). This script runs the same short training
in fresh processes with each allocator preloaded (``LD_PRELOAD``), alternating allocators over
``--rounds``, and reports the median steady-state examples/s (compile step excluded), user and
system CPU seconds and minor page faults of the whole process.

    python benchmarks/allocator.py --data_dir DATA [--data_config tiny] [--steps 80] [--rounds 2]
        [--case tiny|demo]

``tiny``: ``configs/oneref/rec_res.py:tiny`` (REC); ``demo``: the demo's RES model and budget
settings (``refjax.demo.BUDGET``) on the same data. Allocators not found on this machine are
skipped: tcmalloc from Debian's ``libtcmalloc-minimal4``, mimalloc from the ``cmeel-mimalloc``
wheel (``refjax.allocator.find_mimalloc``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def allocators() -> dict[str, str | None]:
    from refjax.allocator import find_mimalloc, find_tcmalloc

    found: dict[str, str | None] = {"glibc": None}
    if find_tcmalloc():
        found["tcmalloc"] = find_tcmalloc()
    if find_mimalloc():
        found["mimalloc"] = find_mimalloc()  # run with refjax.allocator.MIMALLOC_ENV
    return found


def _sets(case: str, data_dir: str, data_config: str, steps: int) -> tuple[str, list[str]]:
    sets = [f"data.data_dir={data_dir}", f"data.dataset_config={data_config}",
            f"train.total_steps={steps}", "train.log_every=10", "train.eval_every=0",
            f"train.ckpt_every={steps}", "train.progress=False", "eval.splits=",
            "data.num_workers=0", "train.async_checkpoint=False"]
    if case == "demo":
        from refjax.demo import BOTH_HEADS, BUDGET

        budget = [s for s in BUDGET if not s.startswith(("train.", "data.num_workers"))]
        return "configs/oneref/rec_res.py:tiny,task=res", [*BOTH_HEADS, *budget, *sets]
    return "configs/oneref/rec_res.py:tiny", sets


def run_once(case: str, lib: str | None, data_dir: str, data_config: str, steps: int) -> dict:
    config, sets = _sets(case, data_dir, data_config, steps)
    workdir = tempfile.mkdtemp(prefix="alloc_")
    args = [sys.executable, "-m", "refjax", "train", "--config", config, "--workdir", workdir]
    for s in sets:
        args += ["--set", s]
    env = {**os.environ, "PYTHONPATH": HERE, "REFJAX_ALLOCATOR": "system"}
    env.pop("XLA_FLAGS", None)
    if lib:
        env["LD_PRELOAD"] = lib
        if "mimalloc" in lib:
            from refjax.allocator import MIMALLOC_ENV

            env = {**MIMALLOC_ENV, **env}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(args, cwd=HERE, env=env, check=True, capture_output=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f if '"loss"' in line]
    steady = [r["examples_per_sec"] for r in recs[1:]]  # the first interval holds the compile
    return {
        "examples_per_sec": statistics.median(steady),
        "user_s": after.ru_utime - before.ru_utime,
        "sys_s": after.ru_stime - before.ru_stime,
        "minor_faults_m": (after.ru_minflt - before.ru_minflt) / 1e6,
        "losses": [r["loss"] for r in recs],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data_dir", required=True)
    p.add_argument("--data_config", default="tiny")
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--case", choices=("tiny", "demo"), default="tiny")
    a = p.parse_args()
    libs = allocators()
    runs: dict[str, list[dict]] = {name: [] for name in libs}
    for r in range(a.rounds):
        for name, lib in libs.items():
            res = run_once(a.case, lib, a.data_dir, a.data_config, a.steps)
            runs[name].append(res)
            print(json.dumps({"round": r, "allocator": name,
                              **{k: v for k, v in res.items() if k != "losses"}}), flush=True)
    base = statistics.median(x["examples_per_sec"] for x in runs["glibc"])
    print(f"\ncase {a.case}, {a.steps} steps, {a.rounds} rounds (medians)")
    print(f"{'allocator':<10}{'examples/s':>12}{'vs glibc':>10}{'user s':>9}{'sys s':>8}"
          f"{'minor faults (M)':>18}{'same losses':>13}")
    ref = runs["glibc"][0]["losses"]
    for name, rs in runs.items():
        eps = statistics.median(x["examples_per_sec"] for x in rs)
        same = all(x["losses"] == ref for x in rs)
        print(f"{name:<10}{eps:>12.1f}{eps / base:>9.2f}x"
              f"{statistics.median(x['user_s'] for x in rs):>9.1f}"
              f"{statistics.median(x['sys_s'] for x in rs):>8.1f}"
              f"{statistics.median(x['minor_faults_m'] for x in rs):>18.2f}{str(same):>13}")


if __name__ == "__main__":
    main()
