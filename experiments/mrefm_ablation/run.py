"""The MRefM ablation in miniature (OneRef Table: MRefM > MVLM > none), on RefShapes.

Each arm gets the same training budget in steps of the same model (BEiT-3 dim 128, depth 3,
128 px, patch 16, batch 32; the demo's size) on one CPU core, and is then evaluated on
val/testA/testB (REC Acc@0.5 and RES mIoU of one model with both heads, as the demo trains):

    a  none      transfer only, for the whole budget
    b  mvlm      MVLM pretraining (random image/text masking, no referring heads), then transfer
    c  released  MRefM, released recipe (VTS/STS off), then transfer
    d  paper     MRefM with VTS + STS, then transfer

Pretraining arms split the budget: ``--pretrain_steps`` of pretraining plus ``--transfer_steps``
of transfer; arm a trains ``pretrain + transfer`` transfer steps. The MIM targets come from the
embedded k-means tokenizer (``python -m refjax train-tokenizer``; its fit is a one-off, like a
released VQ-KD, and is not counted). Every run is the real CLI (``python -m refjax train``);
CPU seconds are measured per run (``getrusage`` of the child). The transfer evaluates val every
``--eval_every`` steps on ``--eval_batches`` batches (the learning curve) and all of
val/testA/testB at the end.

    python experiments/mrefm_ablation/run.py --data_dir DATA --tokenizer TOK --out OUT \
        --arms a,b --core 0 [--pretrain_steps 1800 --transfer_steps 1800 --seed 13]

Results: ``OUT/<arm>/result.json``; ``report.py OUT`` writes the table and the PNG.
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
from refjax.demo import MODEL, TRANSFER  # noqa: E402  (the demo's model and transfer recipe)

ARMS = {
    "a": ("none", None),
    "b": ("mvlm", "objective=mvlm"),
    "c": ("released", "recipe=released"),
    "d": ("paper", "recipe=paper"),
}


def run_arm(arm: str, a: argparse.Namespace) -> dict:
    name, arg = ARMS[arm]
    out = os.path.join(a.out, arm)
    os.makedirs(out, exist_ok=True)
    common = [f"data.data_dir={a.data_dir}", f"train.seed={a.seed}", "train.progress=False",
              "data.num_workers=0", *a.set]
    cpu, t0 = {}, time.time()
    init = []
    transfer_steps = a.transfer_steps
    if arg is None:
        transfer_steps += a.pretrain_steps
    else:
        pre = os.path.join(out, "pretrain")
        sets = [*MODEL, *common, f"model.tokenizer_init={a.tokenizer}",
                f"train.total_steps={a.pretrain_steps}", "train.eval_every=0",
                f"train.ckpt_every={a.pretrain_steps}", "eval.splits=val",
                "train.eval_max_batches=0"]
        cpu["pretrain"] = run_cli(["train", "--config", f"configs/oneref/mrefm.py:tiny,{arg}",
                                "--workdir", pre, "--overwrite", *set_args(sets)],
                               os.path.join(out, "pretrain.log"), a.core)
        init = [f"init={pre}"]
    tr = os.path.join(out, "transfer")
    sets = [*TRANSFER, *common, *init, f"train.total_steps={transfer_steps}",
            f"train.eval_every={a.eval_every}", f"train.eval_max_batches={a.eval_batches}",
            f"train.ckpt_every={a.eval_every}", "train.log_every=50"]
    cpu["transfer"] = run_cli(["train", "--config", "configs/oneref/rec_res.py:tiny,task=res",
                            "--workdir", tr, "--overwrite", *set_args(sets)],
                           os.path.join(out, "transfer.log"), a.core)
    with open(os.path.join(tr, "metrics.json")) as f:
        final = json.load(f)
    from refjax.train.trainer import read_curve

    curve = [{"step": r["step"], **{k: r[k] for k in r if k.startswith("val/")}}
             for r in read_curve(tr, "val")]
    result = {"arm": arm, "name": name, "seed": a.seed, "pretrain_steps": 0 if arg is None
              else a.pretrain_steps, "transfer_steps": transfer_steps, "cpu_s": cpu,
              "cpu_total_s": sum(cpu.values()), "wall_s": time.time() - t0,
              "splits": final["splits"], "curve": curve}
    with open(os.path.join(out, "result.json"), "w") as f:
        json.dump(result, f, indent=2, sort_keys=True)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data_dir", required=True)
    p.add_argument("--tokenizer", required=True, help="a k-means tokenizer checkpoint")
    p.add_argument("--out", required=True)
    p.add_argument("--arms", default="a,b,c,d")
    p.add_argument("--core", type=int, default=None, help="pin the runs to this CPU core")
    p.add_argument("--pretrain_steps", type=int, default=1800)
    p.add_argument("--transfer_steps", type=int, default=1800)
    p.add_argument("--eval_every", type=int, default=600)
    p.add_argument("--eval_batches", type=int, default=10)
    p.add_argument("--seed", type=int, default=13)
    add_set_argument(p)
    a = p.parse_args()
    for arm in a.arms.split(","):
        r = run_arm(arm, a)
        v = r["splits"]["val"]
        print(f"arm {arm} ({r['name']}): val Acc@0.5 {v.get('acc@0.5', 0):.4f} mIoU "
              f"{v.get('miou', 0):.4f}; CPU {r['cpu_total_s'] / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
