"""The README's main job: a trained OneRef on RefShapes, and the training path that made it.

``python -m refjax demo --workdir runs/demo`` (``make demo``), about 15 minutes on 2 cores:

1. build RefShapes (``default``) under ``workdir/data`` unless present;
2. evaluate the shipped checkpoint (``checkpoints/refshapes_oneref_tiny``: MRefM pretraining then
   REC+RES transfer, parameters only; its README gives the command that reproduces it) on
   val / testA / testB and draw 16 of its val predictions (``workdir/predictions.png``);
3. within the remaining budget, run a short MRefM pretraining (the shipped k-means MIM tokenizer,
   ``checkpoints/refshapes_kmeans_tokenizer``) and a short REC+RES transfer from it, the same
   recipe at a fraction of the steps, so the training path is visible end to end;
4. print one table with both (overall Acc@0.5 / mIoU / oIoU per split) and write
   ``workdir/metrics.json`` (both, per kind).

One model predicts both the box (REC) and the mask (RES): ``configs/oneref/rec_res.py:tiny,
task=res`` with the box losses switched on (``BOTH_HEADS``) at the small size of ``MODEL``.
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
MRefM_CONFIG = "mrefm.py:tiny"
SHIPPED = os.path.join("checkpoints", "refshapes_oneref_tiny")
TOKENIZER = os.path.join("checkpoints", "refshapes_kmeans_tokenizer")
BOTH_HEADS = ("loss.use_box_loss=True", "loss.use_box_mask_constraint=True")
# The small model every demo-sized run uses (pretraining and transfer): a narrower, shallower
# encoder than ``tiny`` and 24 text tokens (RefShapes expressions need at most 17).
MODEL = ("model.dim=128", "model.depth=3", "model.heads=4", "model.mlp_dim=512",
         "data.max_text_len=24")
# Transfer settings for a 2-core budget: a 32-channel RES head (the full-width one costs 2.6x
# the encoder), an inverse temperature of 10 on the text-patch cosines (from scratch, OneRef's
# [-1, 1] pooling collapses to the mean box; BENCHMARKS.md), lr 1e-3 with a short warm-up.
TRANSFER = (*MODEL, "model.seg_dim=32", "model.sim_scale=10.0", *BOTH_HEADS, "optim.lr=1e-3",
            "optim.warmup_steps=50")
BUDGET = (*TRANSFER, "data.num_workers=1", "train.total_steps=800", "train.eval_every=0",
          "train.ckpt_every=800")
SPLITS = ("val", "testA", "testB")
# Seconds per step of the short runs on 2 cores (measured, BENCHMARKS.md) and what the rest of
# the short run costs (compiles, the three evaluations), for sizing it to the budget.
STEP_S = {"mrefm": 0.55, "transfer": 0.6}
FIXED_S = 210.0


def repo_path(rel: str) -> str:
    """``rel`` inside the repository holding this package."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), rel)


def config_path(spec: str = CONFIG) -> str:
    """``configs/oneref/<spec>`` in the repository holding this package."""
    return repo_path(os.path.join("configs", "oneref", spec))


def demo_config(data_dir: str, data_config: str = "default", sets: Sequence[str] = ()) -> Any:
    """The demo's transfer config: REC+RES on RefShapes ``data_config`` under ``data_dir``."""
    from refjax.train.config import apply_overrides, load_config

    config = load_config(config_path())
    apply_overrides(
        config,
        [*BUDGET, f"data.data_dir={data_dir}", f"data.dataset_config={data_config}", *sets],
    )
    return config


def short_run_configs(
    data_dir: str, data_config: str, mrefm_steps: int, transfer_steps: int, pretrain_dir: str,
    sets: Sequence[str] = (),
) -> tuple[Any, Any]:
    """``(mrefm_config, transfer_config)`` of the demo's short training path."""
    from refjax.train.config import apply_overrides, load_config

    data = [f"data.data_dir={data_dir}", f"data.dataset_config={data_config}",
            "data.num_workers=1"]
    pre = load_config(config_path(MRefM_CONFIG))
    apply_overrides(pre, [*MODEL, *data, f"model.tokenizer_init={repo_path(TOKENIZER)}",
                          f"train.total_steps={mrefm_steps}", "train.eval_every=0",
                          f"train.ckpt_every={mrefm_steps}", "optim.warmup_steps=20",
                          "eval.splits="])
    tr = load_config(config_path())
    apply_overrides(tr, [*TRANSFER, *data, f"init={pretrain_dir}",
                         f"train.total_steps={transfer_steps}", "train.eval_every=0",
                         f"train.ckpt_every={transfer_steps}", *sets])
    return pre, tr


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


def _overall_table(rows: Mapping[str, Mapping[str, Mapping[str, float]]]) -> str:
    """One line per (model, split): count, Acc@0.5, mIoU, oIoU."""
    head = f"{'model':<34}{'split':<7}{'count':>7}{'Acc@0.5':>9}{'mIoU':>9}{'oIoU':>9}"
    lines = [head, "-" * len(head)]
    for name, splits in rows.items():
        for split, m in splits.items():
            cells = "".join(f"{100 * m[k]:>8.2f}%" if k in m else f"{'-':>9}"
                            for k in ("acc@0.5", "miou", "oiou"))
            lines.append(f"{name:<34}{split:<7}{int(m.get('count', 0)):>7}{cells}")
    return "\n".join(lines)


def run(
    workdir: str, data_config: str = "default", sets: Sequence[str] = (),
    budget_min: float = 15.0,
) -> dict:
    """The demo (module docstring). Returns ``{model: {split: flat metrics}}``."""
    from refjax.data.build import ensure_refshapes
    from refjax.predict import Predictor
    from refjax.train import trainer

    t0 = time.time()
    workdir = os.path.abspath(workdir)
    data_dir = os.path.join(workdir, "data")
    print(f"[demo] RefShapes ({data_config}) at {ensure_refshapes(data_dir, data_config)}",
          flush=True)
    rows: dict[str, dict[str, dict[str, float]]] = {}
    over = [f"data.data_dir={data_dir}", f"data.dataset_config={data_config}"]
    shipped = repo_path(SHIPPED)
    examples = sample_examples(data_dir, data_config, "val", 16)
    predictor = None
    if os.path.isdir(shipped):
        print(f"[demo] evaluating the shipped checkpoint {SHIPPED} on {', '.join(SPLITS)}",
              flush=True)
        config = trainer.load_config_json(shipped)
        from refjax.train.config import apply_overrides

        apply_overrides(config, over)
        res = trainer.evaluate(config, shipped, SPLITS, out_dir=os.path.join(workdir, "shipped"))
        rows["shipped (MRefM + transfer)"] = res["splits"]
        predictor = Predictor.from_workdir(shipped, sets=over)
    else:
        print(f"[demo] no shipped checkpoint at {shipped}; training path only", flush=True)

    left = budget_min * 60 - (time.time() - t0) - FIXED_S
    total = max(100, int(left / (STEP_S["mrefm"] / 3 + STEP_S["transfer"] * 2 / 3)))
    mrefm_steps, transfer_steps = max(50, total // 3), max(50, total - total // 3)
    print(f"[demo] short training path in the remaining budget: {mrefm_steps} MRefM steps, "
          f"then {transfer_steps} REC+RES transfer steps", flush=True)
    pre_dir, tr_dir = os.path.join(workdir, "mrefm"), os.path.join(workdir, "transfer")
    pre, tr = short_run_configs(data_dir, data_config, mrefm_steps, transfer_steps, pre_dir,
                                sets)
    trainer.train(pre, pre_dir)
    short = trainer.train(tr, tr_dir)["splits"]
    rows[f"short run ({mrefm_steps}+{transfer_steps} steps)"] = short
    if predictor is None:
        predictor = Predictor.from_workdir(tr_dir)
    wall = time.time() - t0
    write_report(workdir, {f"{n} | {s}": m for n, sp in rows.items() for s, m in sp.items()},
                 predictor, examples, {"wall_time_s": wall, "sets": list(sets),
                                       "shipped": SHIPPED if os.path.isdir(shipped) else None})
    print(_overall_table(rows))
    print(f"[demo] wrote {workdir}/metrics.json and {workdir}/predictions.png "
          f"(predictions of the {'shipped' if os.path.isdir(shipped) else 'short-run'} model); "
          f"total wall time {wall / 60:.1f} min")
    return rows
