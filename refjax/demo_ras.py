"""``make demo-ras``: the shipped tiny RAS selects mask groups for RefShapes val expressions.

``python -m refjax demo-ras --workdir runs/demo_ras`` (a few minutes on 2 cores):

1. build RefShapes (``default``) under ``workdir/data`` unless present;
2. load the shipped checkpoint ``checkpoints/refshapes_ras_tiny`` (its README gives the
   command that rebuilt it and its val metrics);
3. for ``n`` val expressions spread over the kinds (incl. ``hybrid``, whose text holds a
   ``<mask-ref>`` and a reference mask, and ``no-target``), select a group from the scene's
   candidate pool, print each expression with the selected count and the group's IoU with the
   ground truth, and draw them into ``workdir/ras_groups.png``.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from refjax import boxes
from refjax.data import transforms as tf
from refjax.demo import repo_path

SHIPPED = os.path.join("checkpoints", "refshapes_ras_tiny")


def sample_examples(data_dir: str, data_config: str, n: int) -> list[tf.Example]:
    """Up to ``n`` val examples, cycling through the expression kinds in the order met."""
    from refjax.data.sources import open_scenes

    src = open_scenes("refshapes", "val", data_dir, data_config)
    pairs = np.asarray(src.expression_index()).reshape(-1, 2)
    by_kind: dict[int, list[tf.Example]] = {}
    for rec, e in pairs[:: max(1, len(pairs) // (8 * n))]:
        ex = tf.expand(src[int(rec)], int(e))
        by_kind.setdefault(ex["kind"], []).append(ex)
    out: list[tf.Example] = []
    while len(out) < n and any(by_kind.values()):
        for kind in sorted(by_kind):
            if by_kind[kind] and len(out) < n:
                out.append(by_kind[kind].pop(0))
    return out


def run(workdir: str, data_config: str = "default", n: int = 8) -> list[dict[str, Any]]:
    """The demo (module docstring). Returns one row per example (text, kind, selected, IoU)."""
    from refjax.data.build import ensure_refshapes
    from refjax.evaluate.report import tile_grid
    from refjax.predict import Predictor

    shipped = repo_path(SHIPPED)
    if not os.path.isdir(shipped):
        raise FileNotFoundError(f"no shipped RAS checkpoint at {shipped}")
    workdir = os.path.abspath(workdir)
    data_dir = os.path.join(workdir, "data")
    print(f"[demo-ras] RefShapes ({data_config}) at {ensure_refshapes(data_dir, data_config)}",
          flush=True)
    predictor = Predictor.from_workdir(
        shipped, sets=[f"data.data_dir={data_dir}", f"data.dataset_config={data_config}"])
    rows, drawn = [], []
    for ex in sample_examples(data_dir, data_config, n):
        pred = predictor.predict(ex["image"], ex["raw"], ref_masks=list(ex["ref_masks"]),
                                 pool=list(ex["pool_masks"]), record_id=ex["record_id"])
        gt = ex["mask"].astype(bool)
        if gt.any() or pred["union"].any():
            iou = float(boxes.mask_iou(pred["union"], gt)[2])
        else:
            iou = 1.0  # no target, nothing selected: right (GRES convention)
        kind = tf.KINDS[ex["kind"]]
        rows.append({"text": ex["raw"], "kind": kind, "targets": ex["num_targets"],
                     "selected": len(pred["indices"]), "pool": len(ex["pool_masks"]),
                     "iou": iou})
        drawn.append(predictor.draw(ex["image"], pred, f"{ex['raw']} ({kind})"))
        print(f"[demo-ras] {kind:<12} {ex['num_targets']} target(s), selected "
              f"{len(pred['indices'])} of {len(ex['pool_masks'])}, IoU {iou:.2f}: {ex['raw']}",
              flush=True)
    os.makedirs(workdir, exist_ok=True)
    if drawn:
        tile_grid(drawn).save(os.path.join(workdir, "ras_groups.png"))
    mean = float(np.mean([r["iou"] for r in rows])) if rows else 0.0
    print(f"[demo-ras] mean IoU over {len(rows)} examples {mean:.2f}; wrote "
          f"{workdir}/ras_groups.png (selected masks coloured, reference masks outlined)")
    return rows
