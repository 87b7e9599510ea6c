"""Tables of a RAS RefShapes run (``run.py``'s ``OUT/<arm>/result.json``).

    python experiments/ras_refshapes/report.py OUT [--split val] [--png OUT/results.png]
        [--oneref checkpoints/refshapes_oneref_tiny/metrics.json]

Prints Markdown tables: per arm the overall ORES metrics (gIoU, cIoU, N-acc, T-acc,
Pr@0.7/0.8/0.9, the pool's oracle cIoU, mean selected masks, CPU minutes); per arm the cIoU
(gIoU for no-target) of every expression kind and of the with/without-reference splits; and,
for arms fine-tuned on RES / GRES too (``run.py --tasks``), those results beside OneRef's on the
same expressions (GRES's ``targeted`` group: no reference mask, at least one target = OneRef's
REC/RES split). Draws the overall gIoU / cIoU / N-acc per arm as a bar chart (PIL only).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from PIL import Image, ImageDraw

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from experiments.driver import load_results  # noqa: E402

ORDER = ("nar", "ar", "clip", "all")
OVERALL = ("giou", "ciou", "n_acc", "t_acc", "pr@0.7", "pr@0.8", "pr@0.9", "oracle_ciou")
GROUPS = ("attribute", "spatial", "relational", "superlative", "group", "hybrid", "no-target",
          "with_ref", "without_ref")


def load(out: str) -> dict[str, dict]:
    """``{arm: result}`` for the arms that finished."""
    return load_results(out, ORDER)


def _pct(m: dict, k: str) -> str:
    return f"{100 * m[k]:.1f}" if k in m else "-"


def tables(results: dict[str, dict], split: str = "val") -> str:
    """The two Markdown tables (module docstring)."""
    lines = ["| arm | steps (s1/s2/s3) | CPU min | " + " | ".join(OVERALL) + " | selected |",
             "|" + "---|" * (len(OVERALL) + 4)]
    for arm, r in results.items():
        m = r["splits"][split]
        steps = "/".join(str(s) for s in r["stage_steps"])
        # the ORES path only (stages 1-3); RES/GRES fine-tunings (stage3_<task>) come on top
        cpu = sum(v for k, v in r["cpu_s"].items() if not k.startswith("stage3_"))
        lines.append(f"| {arm} ({r['config']}) | {steps} | {cpu / 60:.1f} | "
                     + " | ".join(_pct(m, k) for k in OVERALL)
                     + f" | {m.get('mean_selected', float('nan')):.2f} |")
    lines += ["", "| arm | " + " | ".join(GROUPS) + " |", "|" + "---|" * (len(GROUPS) + 1)]
    for arm, r in results.items():
        m = r["splits"][split]
        cells = [_pct(m, f"{g}/{'giou' if g == 'no-target' else 'ciou'}") for g in GROUPS]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def task_table(results: dict[str, dict], split: str = "val",
               oneref: dict | None = None) -> str:
    """RES (single-target) and GRES (no reference masks) fine-tuning of the arms that ran them,
    with OneRef's REC/RES metrics on its split (= GRES ``targeted``) when given."""
    lines = ["| model | fine-tuned on | expressions | mIoU | oIoU | gIoU | cIoU | N-acc |",
             "|---|---|---|---|---|---|---|---|"]
    for arm, r in results.items():
        for task, splits in (r.get("tasks") or {}).items():
            m = splits[split]
            if task == "res":
                lines.append(f"| RAS {arm} | RES | single-target ({m['count']:.0f}) | "
                             f"{_pct(m, 'miou')} | {_pct(m, 'oiou')} | - | - | - |")
            else:
                lines.append(f"| RAS {arm} | GRES | no reference ({m['count']:.0f}) | - | - | "
                             f"{_pct(m, 'giou')} | {_pct(m, 'ciou')} | {_pct(m, 'n_acc')} |")
                lines.append(f"| RAS {arm} | GRES | with a target, no reference "
                             f"({m.get('targeted/count', 0):.0f}) | {_pct(m, 'targeted/miou')} | "
                             f"{_pct(m, 'targeted/oiou')} | - | - | - |")
    if oneref is not None:
        m = oneref["splits"][split]
        lines.append(f"| OneRef (shipped demo checkpoint) | REC+RES | with a target, no "
                     f"reference ({m['count']:.0f}) | {_pct(m, 'miou')} | {_pct(m, 'oiou')} | "
                     "- | - | - |")
    return "\n".join(lines)


BAR_KEYS = (("giou", "gIoU"), ("ciou", "cIoU"), ("n_acc", "N-acc"))
BAR_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c")


def bars_png(results: dict[str, dict], path: str, split: str = "val") -> None:
    """Overall gIoU / cIoU / N-acc of every arm, as grouped bars with their values."""
    w, h, pad = 120 + 150 * len(results), 360, 50
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)

    def y_of(v: float) -> float:
        return h - pad - (h - 2 * pad) * v

    d.line([(pad, y_of(0)), (w - 10, y_of(0))], fill="black")
    for i in range(6):
        y = y_of(i / 5)
        d.line([(pad - 4, y), (pad, y)], fill="black")
        d.text((5, y - 6), f"{20 * i}%", fill="black")
    d.text((pad, 10), f"RAS tiny on RefShapes ORES ({split})", fill="black")
    for j, (_, name) in enumerate(BAR_KEYS):
        d.rectangle([w - 90, 10 + 14 * j, w - 80, 20 + 14 * j], fill=BAR_COLOURS[j])
        d.text((w - 75, 8 + 14 * j), name, fill="black")
    for i, (arm, r) in enumerate(results.items()):
        m = r["splits"][split]
        m = m.get("overall", m)
        x0 = pad + 20 + 150 * i
        for j, (key, _) in enumerate(BAR_KEYS):
            v = float(m.get(key, 0.0))
            x = x0 + 34 * j
            d.rectangle([x, y_of(v), x + 28, y_of(0)], fill=BAR_COLOURS[j])
            d.text((x, y_of(v) - 12), f"{100 * v:.0f}", fill="black")
        d.text((x0, h - pad + 8), arm, fill="black")
    img.save(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--split", default="val")
    p.add_argument("--png", default=None, help="default OUT/results.png")
    p.add_argument("--oneref", default=None, help="a OneRef metrics.json (eval on the split)")
    a = p.parse_args()
    results = load(a.out)
    if not results:
        raise SystemExit(f"no OUT/<arm>/result.json under {a.out}")
    print(tables(results, a.split))
    oneref = json.load(open(a.oneref)) if a.oneref else None
    if any(r.get("tasks") for r in results.values()) or oneref:
        print()
        print(task_table(results, a.split, oneref))
    bars_png(results, a.png or os.path.join(a.out, "results.png"), a.split)


if __name__ == "__main__":
    main()
