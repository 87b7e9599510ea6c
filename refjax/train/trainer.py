"""The task-agnostic trainer: ``train``, ``evaluate`` and ``load_for_inference``.

``config.task`` names the task (``refjax.tasks``); nothing here knows which one it is.

Workdir layout::

    config.json            the resolved config (written when a run starts; rebuilds the model)
    checkpoints/<step>/    Orbax: variables + train state + grain iterator (latest ``keep`` + best)
    metrics.jsonl, events.*    train/eval scalars (JSONL + TensorBoard; process 0 only)
    metrics.json           final evaluation of every ``eval.splits`` split
    eval_step<N>.json      ``evaluate`` results

Training resumes from the latest complete checkpoint in the workdir: state and data iterator
continue exactly, so the losses after a restart equal those of an uninterrupted run. After a
crash, the steps between the last checkpoint and the crash appear twice in metrics.jsonl (the
later record is the valid one). A workdir holding a run with a *different* config is an error
naming the differing keys, unless ``resume=True`` (continue with the new config; ``config.json``
keeps the original) or ``overwrite=True`` (start afresh).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections

from refjax import parallel
from refjax.data.pipeline import make_pipeline
from refjax.tasks import Task, get_task
from refjax.train import config as config_lib
from refjax.train import setup as setup_lib
from refjax.train.checkpoint import Checkpointer, NonFiniteStateError
from refjax.train.evaluator import evaluate_split
from refjax.train.logging import MetricWriter, ProgressBar, read_jsonl
from refjax.train.state import abstract_train_state, abstract_variables
from refjax.train.steps import jit_eval_step, make_eval_step

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
CKPT_DIR = "checkpoints"
METRICS_FILE = "metrics.json"
METRICS_JSONL = "metrics.jsonl"


# Keys that change how a run is operated, not what it computes: a restart may change them
# without being a different run.
OPERATIONAL_KEYS = (
    "train.progress", "train.stop_after", "train.stop_hang", "train.log_every",
    "train.async_checkpoint", "train.eval_max_batches", "data.num_workers", "data.read_threads",
    "data.prefetch_buffer", "data.next_timeout_s",
)


class ConfigMismatchError(ValueError):
    """The workdir holds a run whose saved config differs from the one passed to ``train``."""


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
    if config.data.dataset != "refshapes":
        return
    from refjax.data.build import ensure_refshapes

    data_dir = os.path.expanduser(config.data.data_dir)
    if _is_main():
        ensure_refshapes(data_dir, config.data.dataset_config or "default")
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("refjax_prepare_data")


def resolve_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A locked copy with ``data.data_dir`` expanded and the task's derived values filled in
    (``Task.resolve_config``, e.g. a vocabulary size read from the dataset's tokenizer)."""
    c = config_lib.from_json(config.to_json())
    with c.unlocked():
        if c.data.data_dir:
            c.data.data_dir = os.path.abspath(os.path.expanduser(c.data.data_dir))
        get_task(c.task).resolve_config(c)
    return c


def schedule_lengths(config: Any) -> tuple[int, int]:
    """``(total_steps, steps_per_epoch)``: an epoch is one pass over the train expressions."""
    from refjax.data.sources import open_split

    n = len(open_split(config.data, "train").expression_index())
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
        best_mode=str(config.train.best_mode),
        async_save=bool(config.train.async_checkpoint),
    )


def config_diff(saved: Any, new: Any) -> list[str]:
    """Dotted keys whose values differ between two configs (JSON view), sorted."""

    def flat(x: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(x, Mapping):
            out: dict[str, Any] = {}
            for k, v in x.items():
                out.update(flat(v, f"{prefix}{k}."))
            return out
        return {prefix[:-1]: x}

    a = flat(json.loads(saved.to_json()) if hasattr(saved, "to_json") else saved)
    b = flat(json.loads(new.to_json()) if hasattr(new, "to_json") else new)
    return sorted(k for k in set(a) | set(b) if a.get(k, "<absent>") != b.get(k, "<absent>"))


def _claim_workdir(config: Any, workdir: str, resume: bool, overwrite: bool) -> None:
    """Check a workdir against a saved run (module docstring); write ``config.json`` for a new
    run."""
    path = os.path.join(workdir, CONFIG_FILE)
    if os.path.isfile(path):
        diff = [k for k in config_diff(load_config_json(workdir), config)
                if k not in OPERATIONAL_KEYS]
        if diff and overwrite:
            log.warning("overwriting the run in %s (config differs in %s)", workdir, diff)
            if _is_main():
                for name in (CKPT_DIR, CONFIG_FILE, METRICS_FILE, METRICS_JSONL):
                    p = os.path.join(workdir, name)
                    if os.path.isdir(p):
                        shutil.rmtree(p)
                    elif os.path.exists(p):
                        os.remove(p)
        elif diff and not resume:
            raise ConfigMismatchError(
                f"{workdir} holds a run whose config differs in {diff}; pass resume=True "
                "(CLI --resume) to continue it with the new config, overwrite=True "
                "(--overwrite) to start afresh, or choose another workdir"
            )
        elif diff:
            log.warning("resuming %s with a config that differs in %s (config.json keeps the "
                        "original)", workdir, diff)
            return
        else:
            return
    if _is_main():
        _write_json(path, json.loads(config.to_json()))


def _warn_schedule(config: Any, total_steps: int) -> None:
    warm = int(config.optim.warmup_steps)
    if warm >= total_steps:
        log.warning("optim.warmup_steps=%d >= the run's %d steps: the learning rate never "
                    "reaches optim.lr=%g", warm, total_steps, float(config.optim.lr))


# ----------------------------------------------------------------------------- train
def train(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    resume: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Train ``config`` in ``workdir`` (resuming a run with the same config); returns the final
    metrics.

    The return value (also ``workdir/metrics.json``) is ``{"step", "train": last train
    metrics, "splits": {split: flat metrics}}``. See the module docstring for ``resume`` and
    ``overwrite``. Read the training curve back with ``read_curve(workdir)``.
    """
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    prepare_data(config)
    config = resolve_config(config)
    _claim_workdir(config, workdir, resume, overwrite)

    total_steps, steps_per_epoch = schedule_lengths(config)
    _warn_schedule(config, total_steps)
    s = setup_lib.build(config, total_steps=total_steps, steps_per_epoch=steps_per_epoch)
    task, state, mesh = s.task, s.state, s.mesh
    train_it = make_pipeline(config.data, "train", task=task.data_task(config), train=True,
                             seed=int(config.train.seed))
    ckpt = _checkpointer(config, workdir)
    start = ckpt.latest_step()
    if start is not None:
        from refjax.train.checkpoint import abstract_tree

        state = ckpt.restore(start, target=abstract_tree(state, s.shardings), data_iter=train_it)
        log.info("resumed from %s step %d", ckpt.directory, start)
    step = int(jax.device_get(state.step))

    tc = config.train
    gbs = int(config.data.batch_size)
    writer = MetricWriter(workdir)
    bar = ProgressBar(total_steps, initial=step, disable=not tc.progress, file=sys.stderr)
    last: dict[str, Any] = {}
    t0, s0 = time.perf_counter(), step
    try:
        with s.activate():
            while step < total_steps:
                state, metrics = s.train_step(state, s.global_batch(next(train_it)))
                step += 1
                logging_now = step % int(tc.log_every) == 0 or step == total_steps
                eval_now = bool(tc.eval_every) and step % int(tc.eval_every) == 0
                save_now = (
                    step % int(tc.ckpt_every) == 0 or eval_now or step == total_steps
                    or step == int(tc.stop_after)
                )
                if logging_now or save_now:
                    last = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    bad = sorted(k for k, v in last.items() if not math.isfinite(v))
                    if bad:  # the one NaN check of the loop (Checkpointer.save checks the state)
                        raise NonFiniteStateError(f"non-finite {bad} at step {step}: {last}")
                if logging_now:
                    dt = time.perf_counter() - t0
                    rate = {"steps_per_sec": (step - s0) / dt,
                            "examples_per_sec": (step - s0) * gbs / dt}
                    writer.write(step, {**last, "lr": float(s.schedule(step - 1)), **rate})
                    bar.update(step, loss=last["loss"], examples=(step - s0) * gbs)
                    t0, s0 = time.perf_counter(), step
                else:
                    bar.update(step)
                ckpt_metrics = None
                if eval_now:
                    split = "val" if "val" in config.eval.splits else config.eval.splits[0]
                    res = evaluate_split(task, config, s.eval_step, state.variables(), split,
                                         mesh, int(tc.eval_max_batches))
                    writer.write(step, {f"{split}/{k}": v for k, v in res.items()})
                    ckpt_metrics = res
                if save_now:
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
            splits = {sp: evaluate_split(task, config, s.eval_step, state.variables(), sp, mesh)
                      for sp in config.eval.splits}
    finally:
        bar.close()
        writer.close()
        ckpt.close()
        train_it.close()  # stops worker processes and frees their shared memory
    if not last:  # nothing trained in this call (a finished run): keep the recorded metrics
        last = _last_train_record(workdir)
    result = {"step": step, "train": last, "splits": splits}
    if _is_main():
        _write_json(os.path.join(workdir, METRICS_FILE), result)
    return result


def read_curve(workdir: str, prefix: str | None = None) -> list[dict[str, Any]]:
    """The training curve of a run: the records of ``metrics.jsonl`` in step order, the later
    record winning for a step logged twice (after a crash); ``prefix`` keeps train records
    (``"train"``: those with a ``loss``) or one split's eval records (e.g. ``"val"``)."""
    path = os.path.join(workdir, METRICS_JSONL)
    if not os.path.isfile(path):
        return []
    by_step: dict[tuple[int, bool], dict[str, Any]] = {}
    for rec in read_jsonl(path):
        is_eval = any("/" in k for k in rec)
        by_step[(int(rec["step"]), is_eval)] = rec
    records = [by_step[k] for k in sorted(by_step)]
    if prefix == "train":
        return [r for r in records if "loss" in r]
    if prefix:
        return [r for r in records if any(k.startswith(prefix + "/") for k in r)]
    return records


def _last_train_record(workdir: str) -> dict[str, Any]:
    curve = read_curve(workdir, "train")
    if not curve:
        return {}
    return {k: v for k, v in curve[-1].items() if k not in ("step", "time")}


# ----------------------------------------------------------------------------- restore
def load_config_json(workdir: str) -> ml_collections.ConfigDict:
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{workdir} is not a refjax run directory (no {CONFIG_FILE})")
    with open(path, encoding="utf-8") as f:
        return config_lib.from_json(f.read())


def restore_variables(
    config: Any,
    workdir: str,
    step: int | None = None,
    mesh: Any = None,
    rules: Any = None,
) -> tuple[Task, Any, dict[str, Any], Any, int]:
    """``(task, model, variables, variable shardings, step)`` of a checkpoint of ``workdir``
    (default: the best, else the latest): params, frozen variables and batch statistics only,
    restored onto ``mesh`` (default ``config.mesh``; any shape: Orbax reshards) without
    building an optimizer or reading its state."""
    task = get_task(config.task)
    task.check_tokenizer(config)
    model = task.build_model(config)
    mesh = mesh if mesh is not None else parallel.create_mesh(config.mesh)
    rules = rules if rules is not None else parallel.rules_for(config.layout)
    sample = task.dummy_batch(config, mesh.devices.size)
    abstract, shardings = abstract_variables(task, config, model, mesh, rules, sample)
    with _checkpointer(config, workdir) as ckpt:
        if step is None:
            step = ckpt.best_step() or ckpt.latest_step()
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {workdir}/{CKPT_DIR}")
        variables = ckpt.restore_variables(step, target=abstract)
    return task, model, variables, shardings, int(step)


def restore_train_state(config: Any, workdir: str, step: int | None = None, mesh: Any = None,
                        rules: Any = None) -> tuple[Any, Any, int]:
    """``(state, shardings, step)``: the whole train state (optimizer included) of a
    checkpoint, onto ``mesh`` (e.g. a different shape than the run that wrote it)."""
    task = get_task(config.task)
    model = task.build_model(config)
    mesh = mesh if mesh is not None else parallel.create_mesh(config.mesh)
    rules = rules if rules is not None else parallel.rules_for(config.layout)
    from refjax.train.optim import make_optimizer

    tx, _ = make_optimizer(config.optim, max(int(config.train.total_steps or 1), 1), 1)
    sample = task.dummy_batch(config, mesh.devices.size)
    abstract, shardings = abstract_train_state(task, config, model, tx, mesh, rules, sample)
    with _checkpointer(config, workdir) as ckpt:
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {workdir}/{CKPT_DIR}")
        state = ckpt.restore(step, target=abstract)
    return state, shardings, int(step)


def evaluate(
    config: ml_collections.ConfigDict | None,
    workdir: str,
    splits: Sequence[str] | None = None,
    step: int | None = None,
    out_dir: str | None = None,
) -> dict[str, Any]:
    """Evaluate a checkpoint of ``workdir`` (default: the best, else the latest) on ``splits``
    (default ``config.eval.splits``); ``config=None`` reads ``workdir/config.json``.
    Writes ``<out_dir or workdir>/eval_step<N>.json`` and returns ``{"step", "splits": {...}}``.
    """
    workdir = os.path.abspath(workdir)
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"workdir {workdir} does not exist")
    config = load_config_json(workdir) if config is None else resolve_config(config)
    prepare_data(config)
    splits = tuple(splits or config.eval.splits)
    mesh = parallel.create_mesh(config.mesh)
    rules = parallel.rules_for(config.layout)
    task, model, variables, shardings, step = restore_variables(config, workdir, step, mesh,
                                                                rules)
    eval_step = jit_eval_step(make_eval_step(task, model, config), shardings, mesh)
    with jax.set_mesh(mesh):
        import flax.linen as nn

        with nn.logical_axis_rules(rules):
            result = {"step": step, "splits": {
                sp: evaluate_split(task, config, eval_step, variables, sp, mesh) for sp in splits
            }}
    if _is_main():
        out_dir = out_dir or workdir
        os.makedirs(out_dir, exist_ok=True)
        _write_json(os.path.join(out_dir, f"eval_step{step}.json"), result)
    return result


def export_params(
    workdir: str,
    out_dir: str,
    step: int | None = None,
    *,
    data_dir: str | None = None,
    sets: Sequence[str] = (),
    files: Sequence[str] = (METRICS_FILE, METRICS_JSONL),
) -> str:
    """Write a parameters-only copy of a run (best, else latest, or ``step``): ``config.json``
    (``data.data_dir`` replaced by ``data_dir`` when given, then ``sets`` applied: e.g. the
    training machine's ``data.num_workers`` or ``data.tokenizer_path`` reset for the machines
    that will read it), ``checkpoints/<step>/variables`` (no optimizer state) and ``files``
    copied from the run. ``python -m refjax eval`` and ``Predictor.from_workdir`` read the
    result like a run. ``out_dir`` must not exist. The parameters are restored with the run's
    own config; ``sets`` only change what is written, so they must not change the model."""
    workdir, out_dir = os.path.abspath(workdir), os.path.abspath(out_dir)
    if os.path.exists(out_dir):
        raise FileExistsError(f"{out_dir} exists; remove it or choose another output")
    config = load_config_json(workdir)
    written = load_config_json(workdir)
    if data_dir is not None:
        with written.unlocked():
            written.data.data_dir = data_dir
    config_lib.apply_overrides(written, sets)  # unknown keys fail here, before any work
    task, _, variables, _, step = restore_variables(
        config, workdir, step, parallel.create_mesh({"data": 1}, jax.devices()[:1]),
        parallel.rules_for("dp"))
    tmp = out_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    _write_json(os.path.join(tmp, CONFIG_FILE), json.loads(written.to_json()))
    for name in files:
        if os.path.isfile(os.path.join(workdir, name)):
            shutil.copy(os.path.join(workdir, name), os.path.join(tmp, name))
    with _checkpointer(config, tmp) as ckpt:
        ckpt.save_variables(step, jax.device_get(variables))
    os.replace(tmp, out_dir)
    return out_dir


def load_for_inference(
    workdir: str, step: int | None = None, sets: Sequence[str] = ()
) -> tuple[Task, Any, dict[str, Any], ml_collections.ConfigDict]:
    """``(task, model, variables, config)`` from a train workdir's checkpoint (default: the
    best, else the latest): ``{"params", "frozen", "batch_stats"}`` replicated over all local
    devices; no optimizer state is built or read. ``sets`` override the run's config (e.g.
    ``data.data_dir=...`` where the dataset and its tokenizer live on this machine)."""
    workdir = os.path.abspath(workdir)
    config = load_config_json(workdir)
    if sets:
        config_lib.apply_overrides(config, sets)
    mesh = parallel.create_mesh({"data": -1}, jax.local_devices())
    rules = parallel.rules_for("dp")
    task, model, variables, _, _ = restore_variables(config, workdir, step, mesh, rules)
    return task, model, variables, config
