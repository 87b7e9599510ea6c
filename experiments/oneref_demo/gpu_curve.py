"""The shipped OneRef checkpoint's learning curve and what the 0.60 targets would need.

Reads the training logs shipped with ``checkpoints/refshapes_oneref_tiny`` (the first transfer's
``logs/2_transfer.jsonl`` and the continued transfer's ``metrics.jsonl``). It prints in-run val
Acc@0.5 / mIoU (10 batches) against transfer examples seen, then fits a log-linear slope
(points per doubling of the examples) from 128k examples on. From the full-val evaluation in
``metrics.json`` it extrapolates the examples that 0.60 would need. The curve bends down, so
this is a lower bound.

    python experiments/oneref_demo/gpu_curve.py [--ckpt checkpoints/refshapes_oneref_tiny]
"""

from __future__ import annotations

import argparse
import json
import math
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TARGET = 0.60


def val_points(path: str, batch: int, offset: int) -> list[tuple[int, float, float]]:
    """(transfer examples, val Acc@0.5, val mIoU) of each in-run evaluation in a jsonl log."""
    out = []
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            if "val/miou" in r:
                out.append((offset + int(r["step"]) * batch, r["val/acc@0.5"], r["val/miou"]))
    return out


def slope(points: list[tuple[int, float]]) -> float:
    """Least-squares slope of value against log2(examples)."""
    xs = [math.log2(n) for n, _ in points]
    ys = [v for _, v in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", default=os.path.join(ROOT, "checkpoints", "refshapes_oneref_tiny"))
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--first_steps", type=int, default=2500, help="steps of the first transfer")
    a = p.parse_args()
    pts = val_points(os.path.join(a.ckpt, "logs", "2_transfer.jsonl"), a.batch, 0)
    pts += val_points(os.path.join(a.ckpt, "metrics.jsonl"), a.batch, a.first_steps * a.batch)
    with open(os.path.join(a.ckpt, "metrics.json")) as f:
        final = json.load(f)
    n_final = pts[-1][0]
    full = {"acc@0.5": final["splits"]["val"]["acc@0.5"], "miou": final["splits"]["val"]["miou"]}
    print("| transfer examples | val Acc@0.5 (10 batches) | val mIoU (10 batches) |")
    print("|---|---|---|")
    for n, acc, miou in pts:
        print(f"| {n:,} | {100 * acc:.1f} | {100 * miou:.1f} |")
    print(f"\nfull val at {n_final:,}: Acc@0.5 {100 * full['acc@0.5']:.2f}, "
          f"mIoU {100 * full['miou']:.2f}")
    sel = [q for q in pts if q[0] >= 128_000]
    for i, key in ((1, "acc@0.5"), (2, "miou")):
        s = slope([(q[0], q[i]) for q in sel])
        need = (TARGET - full[key]) / s if s > 0 else math.inf
        times = 2 ** need
        print(f"{key:>7}: {100 * s:+.2f} points per doubling (fit from 128k) -> {TARGET} needs "
              f"{need:.1f} more doublings, {times:,.0f}x = {n_final * times / 1e6:,.0f}M "
              "transfer examples")


if __name__ == "__main__":
    main()
