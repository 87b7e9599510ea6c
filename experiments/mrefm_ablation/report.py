"""Table and learning-curve PNG of an MRefM ablation run (``run.py``'s ``OUT/<arm>/result.json``).

    python experiments/mrefm_ablation/report.py OUT [--png OUT/curve.png]

Prints a Markdown table (per arm: pretraining/transfer steps, CPU minutes, val/testA/testB
Acc@0.5 and mIoU), the in-run val curve as a table (Acc@0.5 / mIoU at each evaluated transfer
step, with the number of expressions those evaluations covered) and each arm's CPU minutes per
phase, and draws val mIoU against transfer step for every arm (PIL only).
"""

from __future__ import annotations

import argparse
import os
import sys

from PIL import Image, ImageDraw

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from experiments.driver import load_results  # noqa: E402

ORDER = ("a", "b", "c", "d")
COLOURS = {"a": (90, 90, 90), "b": (31, 119, 180), "c": (255, 127, 14), "d": (44, 160, 44)}
SPLITS = ("val", "testA", "testB")


def load(out: str) -> dict[str, dict]:
    """``{arm: result}`` for the arms that finished."""
    return load_results(out, ORDER)


def table(results: dict[str, dict]) -> str:
    """The Markdown results table."""
    head = ("| arm | pretrain steps | transfer steps | CPU min | "
            + " | ".join(f"{s} Acc@0.5 | {s} mIoU" for s in SPLITS) + " |")
    lines = [head, "|" + "---|" * (4 + 2 * len(SPLITS))]
    for arm, r in results.items():
        cells = []
        for s in SPLITS:
            m = r["splits"][s]
            cells += [f"{100 * m['acc@0.5']:.2f}", f"{100 * m['miou']:.2f}"]
        lines.append(f"| {arm} {r['name']} | {r['pretrain_steps']} | {r['transfer_steps']} | "
                     f"{r['cpu_total_s'] / 60:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def curve_table(results: dict[str, dict]) -> str:
    """In-run val Acc@0.5 / mIoU (%) per evaluated transfer step (rows) and arm (columns)."""
    steps = sorted({c["step"] for r in results.values() for c in r["curve"] if "val/miou" in c})
    counts = sorted({int(c["val/count"]) for r in results.values() for c in r["curve"]
                     if "val/count" in c})
    lines = ["| transfer step | " + " | ".join(f"{a} {r['name']}" for a, r in results.items())
             + " |", "|" + "---|" * (1 + len(results))]
    for step in steps:
        cells = []
        for r in results.values():
            c = next((c for c in r["curve"] if c["step"] == step and "val/miou" in c), None)
            cells.append("" if c is None else
                         f"{100 * c['val/acc@0.5']:.1f} / {100 * c['val/miou']:.1f}")
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    lines.append(f"\n(in-run evaluations over {', '.join(map(str, counts))} val expressions)")
    return "\n".join(lines)


def cpu_lines(results: dict[str, dict]) -> str:
    """CPU minutes of each arm's phases."""
    return "\n".join(
        f"{a} {r['name']}: " + ", ".join(f"{k} {v / 60:.1f}" for k, v in r["cpu_s"].items())
        + f" CPU-min (total {r['cpu_total_s'] / 60:.1f})" for a, r in results.items())


def curve_png(results: dict[str, dict], path: str, key: str = "val/miou") -> None:
    """Val ``key`` (10-batch evaluations during transfer, plus the final full val) per arm."""
    w, h, pad = 640, 400, 50
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    series = {}
    for arm, r in results.items():
        pts = [(c["step"], c[key]) for c in r["curve"] if key in c]
        series[arm] = sorted(pts)
    xmax = max((p[0] for s in series.values() for p in s), default=1)
    ymax = max(0.05, max((p[1] for s in series.values() for p in s), default=0.05)) * 1.15

    def xy(x: float, y: float) -> tuple[float, float]:
        return pad + (w - 2 * pad) * x / xmax, h - pad - (h - 2 * pad) * y / ymax

    d.line([xy(0, 0), xy(xmax, 0)], fill="black")
    d.line([xy(0, 0), xy(0, ymax)], fill="black")
    for i in range(5):
        y = ymax * i / 4
        d.text((5, xy(0, y)[1] - 6), f"{100 * y:.0f}%", fill="black")
        x = xmax * i / 4
        d.text((xy(x, 0)[0] - 10, h - pad + 8), f"{x:.0f}", fill="black")
    d.text((w // 2 - 60, h - 18), "transfer step", fill="black")
    d.text((pad, 10), f"{key} (10-batch evals) by arm", fill="black")
    for j, (arm, pts) in enumerate(series.items()):
        c = COLOURS[arm]
        if len(pts) > 1:
            d.line([xy(*p) for p in pts], fill=c, width=2)
        for p in pts:
            x, y = xy(*p)
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=c)
        d.text((w - pad - 120, pad + 14 * j), f"{arm} {results[arm]['name']}", fill=c)
    img.save(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--png", default=None)
    a = p.parse_args()
    results = load(a.out)
    if not results:
        raise SystemExit(f"no OUT/<arm>/result.json under {a.out}")
    print(table(results))
    print()
    print(curve_table(results))
    print()
    print(cpu_lines(results))
    curve_png(results, a.png or os.path.join(a.out, "curve.png"))


if __name__ == "__main__":
    main()
