"""The tiny RAS on RefShapes ORES: stages 1-3, NAR vs AR, and the encoder ablation in miniature.

Arms (``configs/ras/stage{1,2,3}.py:tiny``), each through the three stages with the same steps:

    nar       decoding=nar, encoders=all+pe (the full recipe)
    ar        decoding=ar,  encoders=all+pe (the [SEG] baseline; stage 1 shared with nar)
    clip      decoding=nar, encoders=clip   (one tower)
    all       decoding=nar, encoders=all    (the ensemble without the 2D position map)

Every run is the real CLI (``python -m refjax train``); CPU seconds per run are measured
(``getrusage`` of the child). Stage 3 (ORES) evaluates ``--splits`` at the end (gIoU, cIoU,
N-acc, T-acc, Pr@x, oracle; per kind and with/without reference masks). Per-query latency of
NAR vs AR at equal pool size is ``benchmarks/ras_forward.py`` (same tiny model).

    python experiments/ras_refshapes/run.py --data_dir DATA --out OUT --arms nar,ar \
        [--stage_steps 300,600,400 --core 0 --seed 0]

Results: ``OUT/<arm>/result.json``; ``report.py OUT`` prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)
from experiments.driver import add_set_argument, run_cli, set_args  # noqa: E402

ARMS = {"nar": "decoding=nar,encoders=all+pe", "ar": "decoding=ar,encoders=all+pe",
        "clip": "decoding=nar,encoders=clip", "all": "decoding=nar,encoders=all"}
# Stage 1 trains the mask projector on captions: it depends on the encoders, not the decoding.
STAGE1_KEY = {"nar": "all+pe", "ar": "all+pe", "clip": "clip", "all": "all"}


def _train(stage: int, arg: str, workdir: str, steps: int, init: str | None,
           a: argparse.Namespace) -> float:
    if os.path.exists(os.path.join(workdir, "metrics.json")):
        return json.load(open(os.path.join(workdir, "cpu.json")))["cpu_s"]
    sets = [f"data.data_dir={a.data_dir}", f"train.seed={a.seed}", "train.progress=False",
            f"train.total_steps={steps}", f"train.ckpt_every={steps}",
            f"train.eval_every={max(steps // 2, 1) if stage == 3 else 0}",
            f"train.eval_max_batches={a.eval_batches}", "optim.warmup_steps=50", *a.set]
    if stage == 3:
        sets.append(f"eval.splits={a.splits}")
    if init:
        sets.append(f"init={init}")
    cpu = run_cli(["train", "--config", f"configs/ras/stage{stage}.py:tiny,{arg}", "--workdir",
                workdir, "--overwrite", *set_args(sets)], workdir + ".log", a.core)
    with open(os.path.join(workdir, "cpu.json"), "w") as f:
        json.dump({"cpu_s": cpu}, f)
    return cpu


def run_arm(arm: str, a: argparse.Namespace) -> dict:
    arg = ARMS[arm]
    s1, s2, s3 = a.stage_steps
    out = os.path.join(a.out, arm)
    os.makedirs(out, exist_ok=True)
    st1 = os.path.join(a.out, f"stage1_{STAGE1_KEY[arm]}")
    t0 = time.time()
    cpu = {"stage1": _train(1, f"encoders={STAGE1_KEY[arm]}", st1, s1, None, a)}
    cpu["stage2"] = _train(2, arg, os.path.join(out, "stage2"), s2, st1, a)
    w3 = os.path.join(out, "stage3")
    cpu["stage3"] = _train(3, arg + ",task=ores", w3, s3, os.path.join(out, "stage2"), a)
    with open(os.path.join(w3, "metrics.json")) as f:
        final = json.load(f)
    tasks = {}
    for task in a.tasks.split(","):  # stage 3 for other tasks (RES, GRES) from the same stage 2
        if task == "ores":
            continue
        wt = os.path.join(out, f"stage3_{task}")
        cpu[f"stage3_{task}"] = _train(3, f"{arg},task={task}", wt, s3,
                                       os.path.join(out, "stage2"), a)
        with open(os.path.join(wt, "metrics.json")) as f:
            tasks[task] = json.load(f)["splits"]
    from refjax.train.trainer import read_curve

    result = {"arm": arm, "config": arg, "seed": a.seed, "stage_steps": a.stage_steps,
              "cpu_s": cpu, "cpu_total_s": sum(cpu.values()), "wall_s": time.time() - t0,
              "splits": final["splits"], "curve": read_curve(w3, "val"), "tasks": tasks}
    with open(os.path.join(out, "result.json"), "w") as f:
        json.dump(result, f, indent=2, sort_keys=True)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data_dir", required=True, help="TFDS data dir holding refshapes/default")
    p.add_argument("--out", required=True)
    p.add_argument("--arms", default="nar,ar,clip,all")
    p.add_argument("--core", type=int, default=None, help="pin the runs to this CPU core")
    p.add_argument("--stage_steps", default="300,600,400",
                   type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--eval_batches", type=int, default=0, help="stage-3 mid-run val batches")
    p.add_argument("--splits", default="val,testA,testB", help="stage-3 final evaluation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tasks", default="ores",
                   help="stage-3 tasks, each from the same stage 2 (ores first; res, gres)")
    add_set_argument(p)
    a = p.parse_args()
    for arm in a.arms.split(","):
        r = run_arm(arm, a)
        v = r["splits"]["val"]
        v = v.get("overall", v)
        print(f"arm {arm}: val gIoU {v.get('giou', 0):.4f} cIoU {v.get('ciou', 0):.4f} "
              f"N-acc {v.get('n_acc', 0):.4f}; CPU {r['cpu_total_s'] / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
