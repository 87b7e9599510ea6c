"""Tables of a RAS RefShapes run (``run.py``'s ``OUT/<arm>/result.json``).

    python experiments/ras_refshapes/report.py OUT [--split val]

Prints two Markdown tables: per arm the overall ORES metrics (gIoU, cIoU, N-acc, T-acc,
Pr@0.7/0.8/0.9, the pool's oracle cIoU, mean selected masks, CPU minutes), then per arm the
cIoU (gIoU for no-target) of every expression kind and of the with/without-reference splits.
"""

from __future__ import annotations

import argparse
import json
import os

ORDER = ("nar", "ar", "clip", "all")
OVERALL = ("giou", "ciou", "n_acc", "t_acc", "pr@0.7", "pr@0.8", "pr@0.9", "oracle_ciou")
GROUPS = ("attribute", "spatial", "relational", "superlative", "group", "hybrid", "no-target",
          "with_ref", "without_ref")


def load(out: str) -> dict[str, dict]:
    """``{arm: result}`` for the arms that finished."""
    res = {}
    for arm in ORDER:
        path = os.path.join(out, arm, "result.json")
        if os.path.exists(path):
            with open(path) as f:
                res[arm] = json.load(f)
    return res


def _pct(m: dict, k: str) -> str:
    return f"{100 * m[k]:.1f}" if k in m else "-"


def tables(results: dict[str, dict], split: str = "val") -> str:
    """The two Markdown tables (module docstring)."""
    lines = ["| arm | steps (s1/s2/s3) | CPU min | " + " | ".join(OVERALL) + " | selected |",
             "|" + "---|" * (len(OVERALL) + 4)]
    for arm, r in results.items():
        m = r["splits"][split]
        steps = "/".join(str(s) for s in r["stage_steps"])
        lines.append(f"| {arm} ({r['config']}) | {steps} | {r['cpu_total_s'] / 60:.1f} | "
                     + " | ".join(_pct(m, k) for k in OVERALL)
                     + f" | {m.get('mean_selected', float('nan')):.2f} |")
    lines += ["", "| arm | " + " | ".join(GROUPS) + " |", "|" + "---|" * (len(GROUPS) + 1)]
    for arm, r in results.items():
        m = r["splits"][split]
        cells = [_pct(m, f"{g}/{'giou' if g == 'no-target' else 'ciou'}") for g in GROUPS]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--split", default="val")
    a = p.parse_args()
    results = load(a.out)
    if not results:
        raise SystemExit(f"no OUT/<arm>/result.json under {a.out}")
    print(tables(results, a.split))


if __name__ == "__main__":
    main()
