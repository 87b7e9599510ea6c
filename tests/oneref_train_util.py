"""Shared pieces of the OneRef train-step sharding tests (also imported by ``dist_worker.py``).

A tiny fp32 RES config with every loss term on (so the box, box-mask and seg heads, and the
BatchNorm layers, all get gradients), a deterministic numpy batch, and a runner that builds the
sharded state and steps with the trainer's own setup chain (``refjax.train.setup.build``) on a
given mesh and layout.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from refjax import parallel
from refjax.train import setup
from refjax.train.config import load_config
from refjax.train.state import TrainState
from refjax.train.steps import local_rows

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLOBAL_BATCH = 8
TEXT_LEN = 8
IMAGE = 64
SEED = 7

# (mesh sizes, layout) of the 8-device layouts compared against one device.
LAYOUTS: dict[str, tuple[dict[str, int], str]] = {
    "dp": ({"data": 8}, "dp"),
    "fsdp": ({"data": 2, "fsdp": 4}, "fsdp"),
    "fsdp_tp": ({"data": 2, "fsdp": 2, "tensor": 2}, "fsdp_tp"),
}


def tiny_config() -> ml_collections.ConfigDict:
    """``rec_res.py:tiny,task=res`` shrunk to dim 64 / depth 2 / 64 px, fp32, no drop path.

    The optimizer is AdamW at a constant lr 1e-2 with ``eps=1e-3``. With the default
    ``eps=1e-8`` Adam's first update is ~``lr * sign(g)``, so for gradient entries of ~1e-8
    (the patch-embedding kernel has some) the fp32 reduction-order noise of the gradient (~4e-8
    between layouts) flips or halves the update; a larger eps keeps the update proportional to
    the gradient there, so parameters move by up to ~1e-2 and a 1e-5 agreement tests the
    gradients to ~1e-6 rather than the rounding of near-zero ones.
    """
    config = load_config(os.path.join(REPO, "configs/oneref/rec_res.py") + ":tiny,task=res")
    config.model.update(dim=64, depth=2, heads=4, mlp_dim=128, vocab_size=512, img_size=IMAGE,
                        dtype="float32", drop_path_rate=0.0, use_seg_head=True)
    config.data.max_text_len = TEXT_LEN
    config.data.batch_size = GLOBAL_BATCH
    config.optim.update(lr=1e-2, schedule="constant", warmup_steps=0, eps=1e-3,
                        weight_decay=1e-4, grad_clip_norm=0.0, accum_steps=1, frozen="")
    config.train.seed = SEED
    config.loss.update(use_box_loss=True, use_box_mask_constraint=True, use_seg_loss=True)
    return config


def make_batch(step: int, batch_size: int = GLOBAL_BATCH) -> dict[str, np.ndarray]:
    """A deterministic global batch (numpy) for ``step``: padded text, one invalid row."""
    rng = np.random.default_rng([SEED, step])
    b = batch_size
    text_ids = rng.integers(3, 512, (b, TEXT_LEN)).astype(np.int32)
    lengths = rng.integers(2, TEXT_LEN + 1, (b,))
    text_padding = (np.arange(TEXT_LEN)[None] >= lengths[:, None]).astype(np.int32)
    cxcy = rng.uniform(0.3, 0.7, (b, 2))
    wh = rng.uniform(0.15, 0.5, (b, 2))
    box = np.concatenate([cxcy, wh], axis=1).astype(np.float32)
    yy, xx = (np.mgrid[0:IMAGE, 0:IMAGE] + 0.5) / IMAGE
    lo, hi = box[:, :2] - box[:, 2:] / 2, box[:, :2] + box[:, 2:] / 2
    mask = ((xx[None] >= lo[:, 0, None, None]) & (xx[None] < hi[:, 0, None, None])
            & (yy[None] >= lo[:, 1, None, None]) & (yy[None] < hi[:, 1, None, None]))
    valid = np.ones((b,), np.float32)
    valid[-1] = 0.0
    return {
        "text_ids": text_ids,
        "text_padding": text_padding,
        "image": rng.standard_normal((b, IMAGE, IMAGE, 3)).astype(np.float32),
        "box": box,
        "mask": mask.astype(np.float32),
        "valid": valid,
        "kind": (np.arange(b) % 3).astype(np.int32),
    }


def local_slice(batch: Mapping[str, np.ndarray], index: int, count: int) -> dict[str, np.ndarray]:
    """Rows ``[index * n, (index + 1) * n)`` of every array, ``n = len / count``."""
    n = len(next(iter(batch.values()))) // count
    return {k: v[index * n : (index + 1) * n] for k, v in batch.items()}


def to_host(tree: Any) -> Any:
    """Global jax arrays (possibly spanning processes) as full numpy arrays."""
    if jax.process_count() > 1:
        tree = multihost_utils.process_allgather(tree, tiled=True)
    return jax.tree.map(np.asarray, tree)


def flat_variables(state: TrainState) -> dict[str, np.ndarray]:
    """``{'params/...': array, 'batch_stats/...': array}`` of a train state, on the host."""
    tree = to_host({"params": state.params, "batch_stats": state.batch_stats})
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {parallel.path_str(path): np.asarray(x) for path, x in flat}


def run_train_steps(
    mesh_cfg: Mapping[str, int],
    layout: str,
    devices: Sequence[jax.Device],
    local_batches: Sequence[Mapping[str, np.ndarray]],
    eval_batch: Mapping[str, np.ndarray] | None = None,
    keep_initial: bool = False,
) -> dict[str, Any]:
    """Train one step per batch on a mesh of ``devices`` with the trainer's jitted step.

    ``local_batches`` are this process's rows (the whole global batch in one process).
    Returns ``state`` (final, sharded), ``losses`` (list of floats), ``metrics`` (last, host),
    with ``eval_batch`` also ``eval`` (this process's rows of the per-sample eval metrics) and
    with ``keep_initial`` also ``initial`` (``flat_variables`` before the first step).
    """
    config = tiny_config()
    mesh = parallel.create_mesh(mesh_cfg, devices)
    global_shapes = {k: (v.shape[0] * jax.process_count(), *v.shape[1:])
                     for k, v in local_batches[0].items()}
    sample = {k: np.zeros(s, local_batches[0][k].dtype) for k, s in global_shapes.items()}
    s = setup.build(config, total_steps=len(local_batches), mesh=mesh,
                    rules=parallel.rules_for(layout), sample_batch=sample)
    state = s.state
    losses, metrics = [], {}
    out: dict[str, Any] = {}
    if keep_initial:
        out["initial"] = flat_variables(state)
    with s.activate():
        for local in local_batches:
            state, metrics = s.train_step(state, s.global_batch(local))
            losses.append(float(metrics["loss"]))
        if eval_batch is not None:
            per_sample = s.eval_step(state.variables(), s.global_batch(eval_batch))
            out["eval"] = {k: local_rows(v) for k, v in per_sample.items()}
    out.update(state=state, losses=losses, metrics=jax.tree.map(np.asarray, metrics))
    return out
