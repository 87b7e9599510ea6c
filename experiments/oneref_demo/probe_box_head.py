"""Why does the from-scratch box head collapse? Probe a trained REC workdir on train batches.

    python experiments/oneref_demo/probe_box_head.py WORKDIR [--batches 48]

Prints, over ``batches`` train batches (no augmentation randomness beyond the pipeline's):

* the softmax pooling mass on ground-truth patches (1.0 = the pooling looks only at the target);
* R^2 of a least-squares linear read-out of the box (cx, cy, w, h) from the model's pooled
  feature and from an *oracle* pooling (mean ``visu_proj`` feature over the target's patches),
  fitted on 3/4 of the rows and scored on the rest: how much position the features carry;
* R^2 of the box head's own predictions and their spread (a collapsed head predicts the mean
  box: spread ~0).

Results are recorded in BENCHMARKS.md (RefShapes demo section).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np


def _r2(y: np.ndarray, pred: np.ndarray) -> np.ndarray:
    return 1 - ((y - pred) ** 2).sum(0) / ((y - y.mean(0)) ** 2).sum(0)


def linear_readout_r2(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """R^2 per target column of a linear fit on the first 3/4 rows, scored on the last 1/4."""
    x1 = np.c_[x, np.ones(len(x))]
    cut = len(x) * 3 // 4
    w = np.linalg.lstsq(x1[:cut], y[:cut], rcond=None)[0]
    return _r2(y[cut:], x1[cut:] @ w)


def main() -> None:
    from absl import flags

    from refjax.data.pipeline import make_pipeline
    from refjax.train import trainer

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("workdir")
    p.add_argument("--batches", type=int, default=48)
    args = p.parse_args()
    flags.FLAGS(["probe"])  # grain reads absl flags

    from refjax.train.state import model_variables

    task, model, variables, config = trainer.load_for_inference(args.workdir)
    variables = model_variables(variables)
    it = make_pipeline(config.data, "train", task=task.data_task(config), train=True, seed=1)

    @jax.jit
    def forward(batch):
        (out, _), inter = model.apply(
            variables, batch["text_ids"], batch["text_padding"], batch["image"],
            deterministic=True, capture_intermediates=lambda m, _: m.name == "visu_proj",
            mutable=["intermediates"])
        return out, inter["intermediates"]["visu_proj"]["__call__"][0][:, 1:]

    pooled, oracle, boxes, preds, mass = [], [], [], [], []
    patch = int(config.model.patch_size)
    for _ in range(args.batches):
        b = next(it)
        out, src = forward({k: jnp.asarray(b[k]) for k in ("text_ids", "text_padding", "image")})
        src = np.asarray(src)
        w = np.asarray(jax.nn.softmax(out["sim"], axis=-1))
        gt = b["mask"][:, ::patch, ::patch].reshape(len(w), -1).astype(np.float32)
        pooled.append(np.einsum("bp,bpd->bd", w, src))
        oracle.append(np.einsum("bp,bpd->bd", gt / np.maximum(gt.sum(1, keepdims=True), 1), src))
        mass.append((w * (gt > 0)).sum(1))
        boxes.append(b["box"])
        preds.append(np.asarray(out["box"]))
    y, pr = np.concatenate(boxes), np.concatenate(preds)
    print(f"rows {len(y)}; softmax mass on ground-truth patches {np.concatenate(mass).mean():.3f}")
    print("R^2 (cx, cy, w, h), linear read-out of the model pooling :",
          np.round(linear_readout_r2(np.concatenate(pooled), y), 3))
    print("R^2 (cx, cy, w, h), linear read-out of the oracle pooling:",
          np.round(linear_readout_r2(np.concatenate(oracle), y), 3))
    print("R^2 (cx, cy, w, h) of the box head:", np.round(_r2(y, pr), 3),
          "prediction std", np.round(pr.std(0), 3), "target std", np.round(y.std(0), 3))


if __name__ == "__main__":
    main()
