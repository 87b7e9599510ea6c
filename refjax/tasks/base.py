"""The task interface: what the generic trainer, evaluator and predictor need from a task.

A task (one module in ``refjax/tasks/``, registered by name in ``refjax.tasks``) owns everything
that differs between OneRef REC/RES, MRefM pretraining and RAS: the model it builds from the
config, the data fields it needs (a ``refjax.data.spec.DataTask``), how a batch becomes model
inputs, the loss, the per-sample eval outputs and the accumulator that reduces them over all
processes, which parameter subtrees are frozen inputs (kept out of the optimizer), how an initial
checkpoint maps onto its parameters, and what a predictor returns. ``refjax.train`` names no task.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Protocol

import flax.linen as nn
import jax
import numpy as np

from refjax.data.spec import DataTask

log = logging.getLogger(__name__)

Batch = Mapping[str, Any]
Variables = dict[str, Any]  # {"params": ..., "batch_stats": ..., "frozen": ...} subtrees


class Accumulator(Protocol):
    """Host-side reduction of per-sample eval outputs (sums, so processes can be added)."""

    def update(self, rows: Mapping[str, np.ndarray]) -> None:
        """Add one batch of this process's rows (numpy, one entry per sample; ``valid``)."""

    def allreduce(self) -> Accumulator:
        """A new accumulator holding the sums over all jax processes."""

    def result(self) -> dict[str, float]:
        """Flat metrics: ``{name: value}`` and, for breakdowns, ``{"<group>/<name>": value}``."""


class Task:
    """Base class of refjax tasks; subclasses override what differs (see the module docstring).

    ``mutable``: model collections a train step updates (``("batch_stats",)`` for BatchNorm).
    """

    name: str = ""
    mutable: tuple[str, ...] = ()

    # -- config and model ------------------------------------------------------------------
    def resolve_config(self, config: Any) -> None:
        """Fill values derived at train start into an unlocked ``config`` (in place), e.g. a
        vocabulary size read from the dataset's tokenizer. Saved with the run."""

    def check_tokenizer(self, config: Any) -> None:
        """Raise if a restored model's vocabulary cannot be the tokenizer the data will use
        (called before restoring a checkpoint for evaluation or prediction)."""

    def build_model(self, config: Any) -> nn.Module:
        raise NotImplementedError

    def data_task(self, config: Any) -> DataTask:
        """The pipeline's per-task half (fields, tokenizer, augmentation, extra stages)."""
        raise NotImplementedError

    def dummy_batch(self, config: Any, batch_size: int) -> dict[str, np.ndarray]:
        """Zeros with every field and shape of a real batch (for ``eval_shape``, init and
        compile checks): the data task's blank rows, stacked."""
        row = self.data_task(config).blank()
        return {k: np.zeros((batch_size, *np.shape(v)), np.asarray(v).dtype)
                for k, v in row.items()}

    def model_inputs(self, batch: Batch, config: Any) -> dict[str, Any]:
        """Keyword inputs of ``model.apply`` for a batch (the step adds ``deterministic``)."""
        raise NotImplementedError

    def frozen_subtrees(self, config: Any) -> tuple[str, ...]:
        """Top-level parameter subtrees that are inputs, never trained: they live in
        ``TrainState.frozen`` (sharded, checkpointed, no optimizer slots)."""
        return ()

    # -- training and evaluation -----------------------------------------------------------
    def loss(
        self, outputs: Any, aux: Mapping[str, Any], batch: Batch, config: Any
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """``(loss, metrics)``; ``batch["step"]`` holds the global step in training."""
        raise NotImplementedError

    def eval_outputs(
        self, outputs: Any, aux: Mapping[str, Any], batch: Batch, config: Any
    ) -> dict[str, jax.Array]:
        """Per-sample arrays (leading batch axis) for the accumulator; include ``valid``."""
        raise NotImplementedError

    def make_accumulator(self, config: Any) -> Accumulator:
        raise NotImplementedError

    # -- checkpoints and inference ---------------------------------------------------------
    def frozen_init(self, config: Any) -> dict[str, str]:
        """``{frozen subtree: checkpoint path}`` to load into ``TrainState.frozen`` at start."""
        return {}

    def map_init(self, loaded: Variables, meta: Mapping[str, Any], model: Variables) -> Variables:
        """Map an initial checkpoint (``config.init``) onto the model's variable subtrees.

        ``loaded`` holds ``params`` (and ``batch_stats``) as read; ``meta`` its
        ``refjax_meta.json`` (empty for a train workdir); ``model`` the model's own trees
        (shapes only). Returns ``{"params": {subtree: tree}, "batch_stats": {...}}`` with the
        subtrees to replace. Default: every top-level subtree the model also has; the others
        are dropped with a log line naming them.
        """
        out: Variables = {}
        for coll in ("params", "batch_stats"):
            src, dst = loaded.get(coll) or {}, model.get(coll) or {}
            dropped = sorted(set(src) - set(dst))
            if dropped:
                log.info("init: dropping %s subtrees the model does not have: %s", coll, dropped)
            out[coll] = {k: v for k, v in src.items() if k in dst}
        return out

    def make_predictor(self, model: nn.Module, variables: Variables, config: Any) -> Any:
        """The task's inference object (``refjax.predict.Predictor.from_workdir`` returns it)."""
        raise NotImplementedError(f"task {self.name!r} has no predictor")
