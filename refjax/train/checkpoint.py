"""Orbax checkpointing: train state + grain iterator, keep-N plus best-by-metric, NaN guard.

A thin wrapper over the v0 ``orbax.checkpoint.CheckpointManager`` so that moving to the v1 API
later touches one file. A ``TrainState`` is saved as two items, ``variables`` (params, frozen,
batch_stats) and ``train`` (step, optimizer state, rng), so inference restores the variables
without reading (or building) the optimizer state; any other pytree is saved as one item.
Saves are asynchronous; Orbax writes each step into a temporary directory and only
renames/commits it when complete, so a process killed mid-write never leaves a step that
``latest_step`` reports or ``restore`` reads.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from refjax.train.state import TrainState

STATE, VARIABLES, TRAIN, DATA_ITER = "state", "variables", "train", "data_iter"


class _NoUntrackedMetricWarning(logging.Filter):
    """Orbax warns on every save without metrics when a best-metric policy is set; refjax saves
    between evaluations on purpose (those steps are kept by the latest-N policy)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Requested `tracked_metric`; did not provide metrics" not in record.getMessage()


logging.getLogger("absl").addFilter(_NoUntrackedMetricWarning())


class NonFiniteStateError(FloatingPointError):
    """Raised instead of saving a state that holds NaN or Inf."""


@jax.jit
def _all_finite(leaves: list[jax.Array]) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def check_finite(tree: Any) -> bool:
    """True when every floating-point leaf of ``tree`` is free of NaN and Inf (one jitted call)."""
    leaves = [
        x
        for x in jax.tree.leaves(tree)
        if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)
    ]
    leaves += [np.float64(x) for x in jax.tree.leaves(tree) if isinstance(x, float)]
    return True if not leaves else bool(_all_finite(leaves))


def abstract_tree(tree: Any, shardings: Any = None) -> Any:
    """``ShapeDtypeStruct`` tree for restoring ``tree`` (arrays or abstract values).

    ``shardings`` (same structure) gives the target shardings; by default a leaf keeps its own.
    """
    if shardings is None:
        shardings = jax.tree.map(lambda x: getattr(x, "sharding", None), tree)
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), tree, shardings
    )


def _restore_target(target: Any) -> Any:
    if target is None:
        return None
    if all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(target)):
        return target
    return abstract_tree(target)


class Checkpointer:
    """Saves and restores ``{state, data_iter}`` steps under ``directory``.

    Keeps the ``max_to_keep`` latest steps plus, when ``best_fn`` is given (a function of the
    metrics dict passed to ``save``), the ``keep_best`` best ones by ``best_mode`` ('max'/'min').
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        max_to_keep: int = 3,
        best_fn: Callable[[Mapping[str, Any]], float] | None = None,
        best_mode: str = "max",
        keep_best: int = 1,
        save_interval_steps: int = 1,
        async_save: bool = True,
    ):
        if best_mode not in ("max", "min"):
            raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
        policies: list[Any] = [ocp.checkpoint_managers.LatestN(n=max_to_keep)]
        if best_fn is not None:
            policies.append(
                ocp.checkpoint_managers.BestN(
                    get_metric_fn=best_fn,
                    reverse=best_mode == "min",
                    n=keep_best,
                    keep_checkpoints_without_metrics=False,
                )
            )
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=save_interval_steps,
            enable_async_checkpointing=async_save,
            best_fn=best_fn,
            best_mode=best_mode,
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
            create=True,
        )
        self.directory = os.path.abspath(os.fspath(directory))
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def save(
        self,
        step: int,
        state: Any,
        *,
        data_iter: Any = None,
        metrics: Mapping[str, Any] | None = None,
        force: bool = False,
    ) -> bool:
        """Start an asynchronous save; returns whether a save was started.

        Raises ``NonFiniteStateError`` (and saves nothing) when ``state`` holds NaN/Inf.
        ``data_iter`` is a grain iterator (``DataLoaderIterator`` or ``DatasetIterator``).
        """
        if not check_finite(state):
            raise NonFiniteStateError(f"refusing to checkpoint step {step}: state has NaN/Inf")
        items = {k: ocp.args.StandardSave(v) for k, v in _items(state).items()}
        if data_iter is not None:
            items[DATA_ITER] = grain.checkpoint.CheckpointSave(data_iter)
        metrics = None if metrics is None else {k: _plain(v) for k, v in metrics.items()}
        return self._manager.save(
            step, args=ocp.args.Composite(**items), metrics=metrics, force=force
        )

    def restore(self, step: int | None = None, target: Any = None, *, data_iter: Any = None) -> Any:
        """The state saved at ``step`` (default: the latest complete step).

        ``target`` is an abstract tree of ``jax.ShapeDtypeStruct(..., sharding=...)`` (or a tree
        of arrays whose shardings are used) onto which the arrays are restored; ``data_iter``, if
        given, is set to the saved iterator position in place.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
        if target is None and self._is_train_state(step):
            raise ValueError("restoring a TrainState needs its abstract target "
                             "(train.state.abstract_train_state); use restore_variables for "
                             "the variables alone")
        parts = _items(target) if target is not None else {STATE: None}
        items = {k: ocp.args.StandardRestore(_restore_target(v)) for k, v in parts.items()}
        if data_iter is not None:
            items[DATA_ITER] = grain.checkpoint.CheckpointRestore(data_iter)
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        if STATE in parts:
            return restored[STATE]
        v, t = restored[VARIABLES], restored[TRAIN]
        return TrainState(step=t["step"], params=v["params"], frozen=v["frozen"],
                          batch_stats=v["batch_stats"], opt_state=t["opt_state"], rng=t["rng"])

    def save_variables(self, step: int, variables: Mapping[str, Any],
                       metrics: Mapping[str, Any] | None = None) -> None:
        """Save ``{"params", "frozen", "batch_stats"}`` alone (a parameters-only run, e.g. a
        shipped checkpoint): ``restore_variables`` reads it; ``restore`` of a TrainState
        cannot. Waits until the step is committed."""
        if not check_finite(variables):
            raise NonFiniteStateError(f"refusing to checkpoint step {step}: NaN/Inf")
        metrics = None if metrics is None else {k: _plain(v) for k, v in metrics.items()}
        args = ocp.args.Composite(**{VARIABLES: ocp.args.StandardSave(dict(variables))})
        self._manager.save(step, args=args, metrics=metrics, force=True)
        self._manager.wait_until_finished()

    def restore_variables(self, step: int | None = None, target: Any = None) -> dict[str, Any]:
        """Only the ``{"params", "frozen", "batch_stats"}`` of a saved ``TrainState`` (no
        optimizer state is read), onto ``target``'s shardings (default: as saved, on one
        device)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
        args = ocp.args.Composite(**{VARIABLES: ocp.args.StandardRestore(_restore_target(target))})
        return dict(self._manager.restore(step, args=args)[VARIABLES])

    def _is_train_state(self, step: int) -> bool:
        return os.path.isdir(os.path.join(self.directory, str(step), VARIABLES))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def best_step(self) -> int | None:
        """The best step by ``best_fn`` (the latest step when no ``best_fn`` was given)."""
        return self._manager.best_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def metrics(self, step: int) -> Any:
        return self._manager.metrics(step)

    def wait_until_finished(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _items(state: Any) -> dict[str, Any]:
    """The checkpoint items of ``state``: a TrainState (or its abstract twin) is split into
    ``variables`` and ``train``; anything else is one ``state`` item."""
    if isinstance(state, TrainState):
        return {VARIABLES: state.variables(),
                TRAIN: {"step": state.step, "opt_state": state.opt_state, "rng": state.rng}}
    return {STATE: state}


def _plain(v: Any) -> Any:
    """Metrics as JSON-friendly python scalars."""
    if hasattr(v, "shape") and np.shape(v) == ():
        return np.asarray(v).item()
    return v


def save_params_only(path: str | os.PathLike, params: Any, *, force: bool = True) -> None:
    """Write a parameter tree (converter outputs, inference) to ``path`` and wait for it."""
    if not check_finite(params):
        raise NonFiniteStateError(f"refusing to save parameters with NaN/Inf to {path}")
    ckptr = ocp.StandardCheckpointer()
    try:
        ckptr.save(os.path.abspath(os.fspath(path)), params, force=force)
        ckptr.wait_until_finished()
    finally:
        ckptr.close()


def restore_params(path: str | os.PathLike, target: Any = None) -> Any:
    """Read a tree written by ``save_params_only``, onto ``target``'s shapes and shardings."""
    ckptr = ocp.StandardCheckpointer()
    try:
        return ckptr.restore(os.path.abspath(os.fspath(path)), _restore_target(target))
    finally:
        ckptr.close()
