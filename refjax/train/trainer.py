"""The OneRef REC/RES trainer: ``train``, ``evaluate`` and ``load_for_inference``.

Workdir layout::

    config.json            the resolved config (written at train start; rebuilds the model)
    checkpoints/<step>/    Orbax: train state + grain iterator (latest ``train.keep`` + best)
    metrics.jsonl, events.*    train/eval scalars (JSONL + TensorBoard; process 0 only)
    metrics.json           final evaluation of every ``eval.splits`` split (overall + per kind)
    eval_step<N>.json      ``evaluate`` results

Training resumes from the latest complete checkpoint in the workdir: state and data iterator
continue exactly, so the losses after a restart equal those of an uninterrupted run. After a
crash, the steps between the last checkpoint and the crash appear twice in metrics.jsonl (the
later record is the valid one).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from refjax import parallel
from refjax.data.pipeline import cfg_get, make_pipeline
from refjax.data.transforms import KINDS
from refjax.evaluate.metrics import MetricAccumulator
from refjax.models.beit3 import VARIANTS
from refjax.models.oneref import OneRef
from refjax.train import config as config_lib
from refjax.train.checkpoint import Checkpointer, NonFiniteStateError, check_finite
from refjax.train.logging import MetricWriter, ProgressBar
from refjax.train.optim import make_optimizer
from refjax.train.state import (
    TrainState,
    abstract_train_state,
    build_model,
    create_train_state,
)
from refjax.train.steps import jit_steps, local_rows, make_eval_step, make_train_step

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
CKPT_DIR = "checkpoints"
METRICS_FILE = "metrics.json"


# ----------------------------------------------------------------------------- setup
def _is_main() -> bool:
    return jax.process_index() == 0


def _write_json(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def prepare_data(config: Any) -> None:
    """Build RefShapes if the config trains on it and it is absent (process 0 builds)."""
    if cfg_get(config, "dataset") != "refshapes":
        return
    from refjax.data.build import ensure_refshapes

    data_dir = os.path.expanduser(cfg_get(config, "data_dir"))
    name = cfg_get(config, "dataset_config") or "default"
    if _is_main():
        ensure_refshapes(data_dir, name)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("refjax_prepare_data")


def _open_source(config: Any, split: str) -> Any:
    from refjax.data.sources import open_scenes

    return open_scenes(cfg_get(config, "dataset"), split, cfg_get(config, "data_dir"),
                       cfg_get(config, "dataset_config"))


def resolve_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A locked copy with ``data.data_dir`` expanded and ``model.vocab_size`` filled in
    (tiny: the dataset tokenizer's size; other variants: the BEiT-3 vocabulary)."""
    c = config_lib.from_json(config.to_json())
    with c.unlocked():
        if c.data.data_dir:
            c.data.data_dir = os.path.abspath(os.path.expanduser(c.data.data_dir))
        if c.model.vocab_size is None:
            if c.model.variant == "tiny":
                from refjax.data.tokenizers import BEIT3_FILE, load_beit3_tokenizer

                path = c.data.tokenizer_path or _open_source(c, "train").file(BEIT3_FILE)
                c.model.vocab_size = len(load_beit3_tokenizer(str(path)))
            else:
                c.model.vocab_size = VARIANTS[c.model.variant].get("vocab_size", 64010)
    return c


def sample_batch(config: Any, batch_size: int) -> dict[str, np.ndarray]:
    """Zero model inputs of the configured shapes (for init and abstract states)."""
    size, n = int(config.data.image_size), int(config.data.max_text_len)
    return {
        "text_ids": np.zeros((batch_size, n), np.int32),
        "text_padding": np.zeros((batch_size, n), np.int32),
        "image": np.zeros((batch_size, size, size, 3), np.float32),
    }


def schedule_lengths(config: Any) -> tuple[int, int]:
    """``(total_steps, steps_per_epoch)``: an epoch is one pass over the train expressions."""
    n = len(_open_source(config, "train").expression_index())
    steps_per_epoch = max(1, n // int(config.data.batch_size))
    total = config.train.total_steps
    if not total:
        if not config.train.epochs:
            raise ValueError("set train.total_steps or train.epochs")
        total = math.ceil(float(config.train.epochs) * steps_per_epoch)
    return int(total), steps_per_epoch


def _checkpointer(config: Any, workdir: str) -> Checkpointer:
    metric = config.train.best_metric
    return Checkpointer(
        os.path.join(workdir, CKPT_DIR),
        max_to_keep=int(config.train.keep),
        best_fn=lambda m: float(m[metric]),
        best_mode="max",
        async_save=bool(config.train.async_checkpoint),
    )


# ----------------------------------------------------------------------------- evaluation
def _split_result(acc: MetricAccumulator) -> dict[str, Any]:
    flat = acc.result()
    overall = {k: v for k, v in flat.items() if "/" not in k}
    per_kind: dict[str, dict[str, float]] = {}
    for key, value in flat.items():
        if "/" in key:
            kind, name = key.rsplit("/", 1)
            per_kind.setdefault(kind, {})[name] = value
    return {"overall": overall,
            "per_kind": {k: v for k, v in per_kind.items() if v.get("count", 0) > 0}}


def run_eval(
    jitted_eval: Any, state: TrainState, config: Any, split: str, mesh: Any,
    max_batches: int = 0,
) -> dict[str, Any]:
    """Metrics of ``state`` on ``split`` (all processes reduced): overall and per kind.

    Call under the mesh and rules context.
    """
    with make_pipeline(config, split, train=False, seed=0) as it:
        n = it.num_batches if not max_batches else min(max_batches, it.num_batches or 0)
        return evaluate_batches(jitted_eval, state, (b for _, b in zip(range(n), it)), mesh)


def evaluate_batches(
    jitted_eval: Any, state: TrainState, batches: Iterable[Mapping[str, Any]], mesh: Any
) -> dict[str, Any]:
    """Metrics of ``state`` over this process's host ``batches`` (all processes reduced):
    ``{"overall": {...}, "per_kind": {kind: {...}}}``. Call under the mesh and rules context."""
    acc = MetricAccumulator(kinds=KINDS)
    for batch in batches:
        out = jitted_eval(state, parallel.host_batch_to_global(batch, mesh))
        m = {k: local_rows(v) for k, v in out.items()}
        kinds = [KINDS[int(k)] if 0 <= k < len(KINDS) else KINDS[0] for k in m.pop("kind")]
        acc.update(m, kinds=kinds)
    return _split_result(acc.allreduce())


def _eval_splits(
    jitted_eval: Any, state: TrainState, config: Any, splits: Iterable[str], mesh: Any
) -> dict[str, Any]:
    return {s: run_eval(jitted_eval, state, config, s, mesh) for s in splits}


# ----------------------------------------------------------------------------- train
def _flatten_eval(prefix: str, res: Mapping[str, Any]) -> dict[str, float]:
    out = {f"{prefix}/{k}": v for k, v in res["overall"].items()}
    for kind, vals in res["per_kind"].items():
        out.update({f"{prefix}/{kind}/{k}": v for k, v in vals.items()})
    return out


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Train (resuming from ``workdir`` if it has checkpoints); returns the final metrics.

    The return value (also ``workdir/metrics.json``) is ``{"step", "train": last train
    metrics, "splits": {split: {"overall": {...}, "per_kind": {kind: {...}}}}}``.
    """
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    prepare_data(config)
    config = resolve_config(config)
    if _is_main():
        _write_json(os.path.join(workdir, CONFIG_FILE), json.loads(config.to_json()))

    mesh = parallel.create_mesh(config.mesh)
    rules = parallel.rules_for(config.layout)
    model = build_model(config)
    total_steps, steps_per_epoch = schedule_lengths(config)
    tx, schedule = make_optimizer(config.optim, total_steps, steps_per_epoch)
    gbs = int(config.data.batch_size)
    state, shardings = create_train_state(
        config, model, tx, mesh, rules, int(config.train.seed), sample_batch(config, gbs)
    )
    train_it = make_pipeline(config, "train", train=True, seed=int(config.train.seed))
    ckpt = _checkpointer(config, workdir)
    start = ckpt.latest_step()
    if start is not None:
        from refjax.train.checkpoint import abstract_tree

        state = ckpt.restore(start, target=abstract_tree(state, shardings), data_iter=train_it)
        log.info("resumed from %s step %d", ckpt.directory, start)
    step = int(jax.device_get(state.step))

    jtrain, jeval = jit_steps(
        make_train_step(model, tx, config), make_eval_step(model, config), shardings, mesh
    )
    tc = config.train
    writer = MetricWriter(workdir)
    bar = ProgressBar(total_steps, initial=step, disable=not tc.progress, file=sys.stderr)
    last: dict[str, Any] = {}
    t0, s0 = time.perf_counter(), step
    try:
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            while step < total_steps:
                batch = parallel.host_batch_to_global(next(train_it), mesh)
                state, metrics = jtrain(state, batch)
                step += 1
                logging_now = step % int(tc.log_every) == 0 or step == total_steps
                eval_now = bool(tc.eval_every) and step % int(tc.eval_every) == 0
                save_now = (
                    step % int(tc.ckpt_every) == 0 or eval_now or step == total_steps
                    or step == int(tc.stop_after)
                )
                if logging_now or save_now:
                    last = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    if not math.isfinite(last["loss"]):
                        raise NonFiniteStateError(f"loss is {last['loss']} at step {step}")
                if logging_now:
                    dt = time.perf_counter() - t0
                    rate = {"steps_per_sec": (step - s0) / dt,
                            "examples_per_sec": (step - s0) * gbs / dt}
                    writer.write(step, {**last, "lr": float(schedule(step - 1)), **rate})
                    bar.update(step, loss=last["loss"], examples=(step - s0) * gbs)
                    t0, s0 = time.perf_counter(), step
                else:
                    bar.update(step)
                ckpt_metrics = None
                if eval_now:
                    split = "val" if "val" in config.eval.splits else config.eval.splits[0]
                    res = run_eval(jeval, state, config, split, mesh, int(tc.eval_max_batches))
                    writer.write(step, _flatten_eval(split, res))
                    ckpt_metrics = dict(res["overall"])
                if save_now:
                    if not check_finite(last):
                        raise NonFiniteStateError(f"non-finite metrics at step {step}: {last}")
                    if ckpt_metrics is not None and tc.best_metric not in ckpt_metrics:
                        raise KeyError(f"best_metric {tc.best_metric!r} not in eval metrics "
                                       f"{sorted(ckpt_metrics)}")
                    ckpt.save(step, state, data_iter=train_it, metrics=ckpt_metrics)
                if tc.stop_after and step == int(tc.stop_after):
                    ckpt.wait_until_finished()
                    print(f"refjax: stopped after step {step}", flush=True)
                    while tc.stop_hang:  # wait to be killed (tests)
                        time.sleep(1.0)
                    return {"step": step, "train": last, "stopped": True}
            ckpt.wait_until_finished()
            result = {"step": step, "train": last,
                      "splits": _eval_splits(jeval, state, config, config.eval.splits, mesh)}
    finally:
        bar.close()
        writer.close()
        ckpt.close()
        train_it.close()  # stops worker processes and frees their shared memory
    if _is_main():
        _write_json(os.path.join(workdir, METRICS_FILE), result)
    return result


# ----------------------------------------------------------------------------- restore
def load_config_json(workdir: str) -> ml_collections.ConfigDict:
    with open(os.path.join(workdir, CONFIG_FILE), encoding="utf-8") as f:
        return config_lib.from_json(f.read())


def _restore_state(
    config: Any, workdir: str, step: int | None, mesh: Any, rules: Any
) -> tuple[OneRef, TrainState, TrainState, int]:
    model = build_model(config)
    tx, _ = make_optimizer(config.optim, max(int(config.train.total_steps or 1), 1), 1)
    abstract, shardings = abstract_train_state(
        model, tx, mesh, rules, sample_batch(config, mesh.devices.size)
    )
    with _checkpointer(config, workdir) as ckpt:
        if step is None:
            step = ckpt.best_step() or ckpt.latest_step()
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {workdir}/{CKPT_DIR}")
        state = ckpt.restore(step, target=abstract)
    return model, state, shardings, int(step)


def evaluate(
    config: ml_collections.ConfigDict | None,
    workdir: str,
    splits: Sequence[str] | None = None,
    step: int | None = None,
) -> dict[str, Any]:
    """Evaluate a checkpoint of ``workdir`` (default: the best, else the latest) on ``splits``
    (default ``config.eval.splits``); ``config=None`` reads ``workdir/config.json``.
    Writes ``workdir/eval_step<N>.json`` and returns ``{"step", "splits": {...}}``.
    """
    workdir = os.path.abspath(workdir)
    config = load_config_json(workdir) if config is None else resolve_config(config)
    prepare_data(config)
    splits = tuple(splits or config.eval.splits)
    mesh = parallel.create_mesh(config.mesh)
    rules = parallel.rules_for(config.layout)
    model, state, shardings, step = _restore_state(config, workdir, step, mesh, rules)
    _, jeval = jit_steps(lambda s, b: (s, {}), make_eval_step(model, config), shardings, mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        result = {"step": step, "splits": _eval_splits(jeval, state, config, splits, mesh)}
    if _is_main():
        _write_json(os.path.join(workdir, f"eval_step{step}.json"), result)
    return result


def load_for_inference(
    workdir: str, step: int | None = None
) -> tuple[OneRef, dict[str, Any], ml_collections.ConfigDict]:
    """``(model, {'params', 'batch_stats'}, config)`` from a train workdir's checkpoint
    (default: the best, else the latest), parameters replicated over all local devices."""
    config = load_config_json(os.path.abspath(workdir))
    mesh = parallel.create_mesh({"data": -1}, jax.local_devices())
    rules = parallel.rules_for("dp")
    model, state, _, _ = _restore_state(config, os.path.abspath(workdir), step, mesh, rules)
    return model, {"params": state.params, "batch_stats": state.batch_stats}, config
