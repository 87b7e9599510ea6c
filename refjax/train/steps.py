"""Task-agnostic train and eval steps, and their jitted, sharded forms.

Call the jitted steps under ``with jax.set_mesh(mesh), nn.logical_axis_rules(rules):`` (never
``with mesh:``), so the model's logical activation constraints resolve onto the mesh.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from refjax import parallel
from refjax.tasks import Task
from refjax.train.state import TrainState, model_variables

Batch = dict[str, Any]
TrainStep = Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]
EvalStep = Callable[[dict[str, Any], Batch], dict[str, jax.Array]]


def make_train_step(
    task: Task, model: nn.Module, tx: optax.GradientTransformation, config: Any
) -> TrainStep:
    """``train_step(state, batch) -> (state, metrics)``: one optimizer update.

    Drop-path randomness is ``fold_in(state.rng, state.step)``; the task's mutable collections
    (BatchNorm statistics) are updated from the batch; the task sees the global step as
    ``batch["step"]``. Frozen variables are inputs (no gradient, no update). Gradient
    accumulation and frozen-by-regex parameters are handled by ``tx`` (``config.optim``).
    Metrics are the task's loss terms, ``grad_norm`` (of all trained gradients, before
    clipping) and ``param_norm``.
    """
    mutable = list(task.mutable)

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        rng = jax.random.fold_in(state.rng, state.step)
        batch = {**batch, "step": state.step}
        frozen = jax.lax.stop_gradient(state.frozen)

        def loss_fn(params: Any) -> tuple[jax.Array, tuple[dict, Any]]:
            variables = model_variables(
                {"params": params, "frozen": frozen, "batch_stats": state.batch_stats}
            )
            (outputs, aux), new_vars = model.apply(
                variables,
                **task.model_inputs(batch, config),
                deterministic=False,
                rngs={"dropout": rng},
                mutable=mutable,
            )
            loss, metrics = task.loss(outputs, aux, batch, config)
            return loss, (metrics, new_vars.get("batch_stats", state.batch_stats))

        (_, (metrics, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params
        )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            **metrics,
            "grad_norm": optax.tree.norm(grads),
            "param_norm": optax.tree.norm(params),
        }
        new_state = state.replace(
            step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state
        )
        return new_state, metrics

    return train_step


def make_eval_step(task: Task, model: nn.Module, config: Any) -> EvalStep:
    """``eval_step(variables, batch) -> per-sample outputs`` (``TrainState.variables()``;
    running BatchNorm statistics), as the task's ``eval_outputs`` define them."""

    def eval_step(variables: dict[str, Any], batch: Batch) -> dict[str, jax.Array]:
        outputs, aux = model.apply(
            model_variables(variables), **task.model_inputs(batch, config), deterministic=True
        )
        return task.eval_outputs(outputs, aux, batch, config)

    return eval_step


def jit_train_step(train_step: TrainStep, state_shardings: Any, mesh: Mesh) -> TrainStep:
    """The jitted train step: state shardings in and out (the state is donated), batches over
    the batch axes, replicated metrics."""
    return jax.jit(
        train_step,
        in_shardings=(state_shardings, parallel.data_sharding(mesh)),
        out_shardings=(state_shardings, NamedSharding(mesh, P())),
        donate_argnums=0,
    )


def jit_eval_step(eval_step: EvalStep, variable_shardings: Any, mesh: Mesh) -> EvalStep:
    """The jitted eval step: per-sample outputs sharded like the batch (read this process's
    rows with ``local_rows``)."""
    batch_sh = parallel.data_sharding(mesh)
    return jax.jit(eval_step, in_shardings=(variable_shardings, batch_sh), out_shardings=batch_sh)


def local_rows(x: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded global array, in global order, as numpy."""
    if jax.process_count() == 1:
        return np.asarray(x)
    shards = {}
    for s in x.addressable_shards:
        start = (s.index[0].start or 0) if s.index else 0
        shards.setdefault(start, s.data)
    return np.concatenate([np.asarray(shards[k]) for k in sorted(shards)], axis=0)


def variable_shardings(state_shardings: TrainState) -> dict[str, Any]:
    """The ``TrainState.variables()`` part of the state's shardings."""
    return state_shardings.variables()

