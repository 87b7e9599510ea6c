"""The README's main job: train OneRef (box + mask) on RefShapes, evaluate, and report.

``python -m refjax demo --workdir runs/demo``:

1. build RefShapes (``default``) under ``workdir/data`` unless present;
2. train ``configs/oneref/rec_res.py:tiny,task=res`` with the box losses switched on as well
   (``loss.use_box_loss``, ``loss.use_box_mask_constraint``), so one model predicts both the box
   (REC) and the mask (RES);
3. evaluate val / testA / testB and write ``workdir/metrics.json`` (overall and per-kind Acc@0.5,
   mIoU, oIoU per split), ``workdir/predictions.png`` (16 val predictions vs. ground truth), and
   print the per-kind table and the wall time.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from refjax.data import transforms as tf

CONFIG = "rec_res.py:tiny,task=res"
BOTH_HEADS = ("loss.use_box_loss=True", "loss.use_box_mask_constraint=True")
# Sized for the 2-core CPU budget of the README's main job (about 12 minutes of training and
# evaluation): a narrower, shallower encoder than ``tiny``, a 32-channel RES head (the full-width
# one costs 2.6x the encoder), 24 text tokens (RefShapes expressions need at most 17), the loader
# in one worker process so that it overlaps the step, and a short schedule. Measured results,
# the learning curve and the reasons are in BENCHMARKS.md; ``--set`` overrides any of these.
BUDGET = (
    "model.dim=128", "model.depth=3", "model.heads=4", "model.mlp_dim=512",
    "model.seg_dim=32", "data.max_text_len=24", "data.num_workers=1",
    "optim.lr=1e-3", "optim.warmup_steps=50", "train.total_steps=800",
    "train.eval_every=0", "train.ckpt_every=800",  # eval once, at the end
    # From scratch, OneRef's [-1, 1] cosine pooling collapses to the mean box (BENCHMARKS.md);
    # an inverse temperature of 10 lets the text-patch alignment learn.
    "model.sim_scale=10.0",
)
SPLITS = ("val", "testA", "testB")


def config_path(spec: str = CONFIG) -> str:
    """``configs/oneref/<spec>`` in the repository holding this package."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.path.join(root, "configs", "oneref", spec)


def demo_config(data_dir: str, data_config: str = "default", sets: Sequence[str] = ()) -> Any:
    """The demo's training config: REC+RES on RefShapes ``data_config`` under ``data_dir``."""
    from refjax.train.config import apply_overrides, load_config

    config = load_config(config_path())
    apply_overrides(
        config,
        [*BOTH_HEADS, *BUDGET, f"data.data_dir={data_dir}", f"data.dataset_config={data_config}",
         *sets],
    )
    return config


def sample_examples(
    data_dir: str, data_config: str, split: str = "val", n: int = 16
) -> list[tf.Example]:
    """``n`` usable expressions (one or more targets, no reference masks), evenly spread over
    ``split``, expanded to original-pixel examples (``transforms.expand``)."""
    from refjax.data.sources import open_scenes

    src = open_scenes("refshapes", split, data_dir, data_config)
    out: list[tf.Example] = []
    pairs = np.asarray(src.expression_index()).reshape(-1, 2)
    stride = max(1, len(pairs) // (2 * n))
    for rec, e in pairs[::stride]:
        ex = tf.expand(src[int(rec)], int(e))
        if ex["num_targets"] > 0 and len(ex["ref_masks"]) == 0:
            out.append(ex)
        if len(out) == n:
            break
    return out


def write_report(
    workdir: str,
    metrics: Mapping[str, Mapping[str, float]],
    predictor: Any,
    examples: Sequence[tf.Example],
    extra: Mapping[str, Any] | None = None,
) -> str:
    """Write ``metrics.json`` (``metrics``: split -> ``{'overall', 'per_kind'}`` as the trainer
    returns, or flat result dicts) and ``predictions.png`` into ``workdir``; return the table."""
    from refjax.evaluate.report import per_kind_table, prediction_grid

    os.makedirs(workdir, exist_ok=True)
    payload = {"splits": {s: dict(m) for s, m in metrics.items()}, **(extra or {})}
    tmp = os.path.join(workdir, "metrics.json.tmp")
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True)
    os.replace(tmp, os.path.join(workdir, "metrics.json"))
    if examples:
        images = [ex["image"] for ex in examples]
        texts = [ex["text"] for ex in examples]
        preds = predictor.predict_batch(images, texts)
        gts = [{"box_xyxy": ex["box"], "mask": ex["mask"].astype(bool)} for ex in examples]
        prediction_grid(images, preds, gts, texts).save(os.path.join(workdir, "predictions.png"))
    return per_kind_table(metrics)


def run(workdir: str, data_config: str = "default", sets: Sequence[str] = ()) -> dict:
    """Build data, train, evaluate, report (module docstring). Returns the metrics per split."""
    from refjax.data.build import ensure_refshapes
    from refjax.predict import Predictor
    from refjax.train import trainer

    t0 = time.time()
    data_dir = os.path.join(workdir, "data")
    print(f"RefShapes ({data_config}) at {ensure_refshapes(data_dir, data_config)}")
    config = demo_config(data_dir, data_config, sets)
    train_dir = os.path.join(workdir, "train")
    # train() ends with an evaluation of every config.eval.splits split (val/testA/testB):
    # report that rather than evaluating a second time.
    metrics = trainer.train(config, train_dir)["splits"]
    predictor = Predictor.from_workdir(train_dir)
    examples = sample_examples(data_dir, data_config, "val", 16)
    wall = time.time() - t0
    table = write_report(
        workdir,
        metrics,
        predictor,
        examples,
        {"config": CONFIG, "sets": [*BOTH_HEADS, *BUDGET, *sets], "wall_time_s": wall},
    )
    print(table)
    print(
        f"wrote {workdir}/metrics.json and {workdir}/predictions.png; total wall time "
        f"{wall / 60:.1f} min"
    )
    return metrics
