"""The setup chain, written once: mesh -> rules -> task/model -> optimizer -> state -> jitted steps.

Used by the trainer, the experiments and the tests::

    s = setup.build(config, total_steps=1000)
    with s.activate():
        state, metrics = s.train_step(s.state, s.global_batch(host_batch))

``build(..., abstract=True)`` makes no arrays (a ``ShapeDtypeStruct`` state): for restore
targets and compile checks (``s.train_step.lower(s.state, s.abstract_batch())``).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import Mesh

from refjax import parallel
from refjax.tasks import Task, get_task
from refjax.train.optim import make_optimizer
from refjax.train.state import (
    TrainState,
    abstract_train_state,
    create_train_state,
    load_initial,
)
from refjax.train.steps import (
    EvalStep,
    TrainStep,
    jit_eval_step,
    jit_train_step,
    make_eval_step,
    make_train_step,
)


@dataclasses.dataclass
class Setup:
    """Everything a training or evaluation loop needs, built from one config."""

    config: Any
    task: Task
    model: nn.Module
    mesh: Mesh
    rules: parallel.Rules
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    state: TrainState  # arrays, or ShapeDtypeStructs when built with abstract=True
    shardings: TrainState
    train_step: TrainStep  # jitted
    eval_step: EvalStep  # jitted; takes ``state.variables()``

    @contextlib.contextmanager
    def activate(self) -> Iterator[None]:
        """The mesh and logical-axis-rules context the jitted steps run under."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            yield

    def global_batch(self, host_batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's host batch as global arrays sharded over the batch axes."""
        return parallel.host_batch_to_global(dict(host_batch), self.mesh)

    def abstract_batch(self, batch_size: int | None = None) -> dict[str, jax.ShapeDtypeStruct]:
        """``ShapeDtypeStruct`` of a global train batch (the task's dummy batch)."""
        bs = batch_size or int(self.config.data.batch_size)
        sharding = parallel.data_sharding(self.mesh)
        return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding)
                for k, v in self.task.dummy_batch(self.config, bs).items()}


def build(
    config: Any,
    *,
    total_steps: int,
    steps_per_epoch: int | None = None,
    mesh: Mesh | None = None,
    rules: parallel.Rules | None = None,
    devices: Sequence[jax.Device] | None = None,
    abstract: bool = False,
    load_init: bool = True,
    seed: int | None = None,
    sample_batch: Mapping[str, np.ndarray] | None = None,
) -> Setup:
    """The ``Setup`` of ``config`` (``config.task`` names the task; the config must already be
    resolved, see ``trainer.resolve_config``).

    ``mesh``/``rules`` default to ``config.mesh``/``config.layout`` (over ``devices``);
    ``seed`` to ``config.train.seed``; ``sample_batch`` (shapes only, a global batch) to the
    task's dummy batch of ``data.batch_size`` rows. ``load_init`` loads ``config.init`` and the
    task's frozen checkpoints into a fresh state.
    """
    task = get_task(config.task)
    mesh = mesh if mesh is not None else parallel.create_mesh(config.mesh, devices)
    rules = rules if rules is not None else parallel.rules_for(config.layout)
    model = task.build_model(config)
    tx, schedule = make_optimizer(config.optim, total_steps, steps_per_epoch)
    if sample_batch is None:
        sample_batch = task.dummy_batch(config, int(config.data.batch_size))
    if abstract:
        state, shardings = abstract_train_state(task, config, model, tx, mesh, rules, sample_batch)
    else:
        rng = int(config.train.seed) if seed is None else seed
        state, shardings = create_train_state(
            task, config, model, tx, mesh, rules, rng, sample_batch
        )
        if load_init:
            state = load_initial(state, shardings, task, config)
    train_step = jit_train_step(make_train_step(task, model, tx, config), shardings, mesh)
    eval_step = jit_eval_step(make_eval_step(task, model, config), shardings.variables(), mesh)
    return Setup(config, task, model, mesh, rules, tx, schedule, state, shardings, train_step,
                 eval_step)
