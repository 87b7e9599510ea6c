"""Pure OneRef REC/RES train and eval steps, and their jitted, sharded forms.

Call the jitted steps under ``with jax.set_mesh(mesh), nn.logical_axis_rules(rules):`` (never
``with mesh:``), so the model's logical activation constraints resolve onto the mesh.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from refjax import parallel
from refjax.evaluate.metrics import oneref_batch_metrics
from refjax.losses.oneref import oneref_loss
from refjax.models.oneref import OneRef
from refjax.train.state import TrainState, model_inputs

Batch = dict[str, Any]
TrainStep = Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]
EvalStep = Callable[[TrainState, Batch], dict[str, jax.Array]]


def make_train_step(model: OneRef, tx: optax.GradientTransformation, config: Any) -> TrainStep:
    """``train_step(state, batch) -> (state, metrics)``: one optimizer update.

    Drop-path randomness is ``fold_in(state.rng, state.step)``; BatchNorm statistics are
    updated from the batch; the loss is ``oneref_loss(outputs, batch, config.loss)``. Gradient
    accumulation and frozen parameters are handled by ``tx`` (``config.optim``). Metrics are
    the loss terms, ``grad_norm`` (of all gradients, before clipping) and ``param_norm``.
    """
    loss_cfg = config.loss

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        rng = jax.random.fold_in(state.rng, state.step)

        def loss_fn(params: Any) -> tuple[jax.Array, tuple[dict, Any]]:
            (outputs, _), new_vars = model.apply(
                {"params": params, "batch_stats": state.batch_stats},
                *model_inputs(batch),
                deterministic=False,
                rngs={"dropout": rng},
                mutable=["batch_stats"],
            )
            loss, metrics = oneref_loss(outputs, batch, loss_cfg)
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


def make_eval_step(model: OneRef, config: Any) -> EvalStep:
    """``eval_step(state, batch) -> per-sample metrics`` (running BatchNorm statistics).

    The dict is ``oneref_batch_metrics`` (``box_iou``, ``correct``, with the RES head also
    ``mask_inter``/``mask_union``/``mask_iou``; ``valid``) plus ``kind`` (the expression kind
    ids), ready for ``MetricAccumulator.update``.
    """
    del config  # the metrics depend only on the outputs present

    def eval_step(state: TrainState, batch: Batch) -> dict[str, jax.Array]:
        outputs, _ = model.apply(
            {"params": state.params, "batch_stats": state.batch_stats},
            *model_inputs(batch),
            deterministic=True,
        )
        out = oneref_batch_metrics(outputs, batch)
        out["valid"] = batch["valid"]
        out["kind"] = batch["kind"]
        return {k: jnp.asarray(v) for k, v in out.items()}

    return eval_step


def jit_steps(
    train_step: TrainStep, eval_step: EvalStep, state_shardings: Any, mesh: Mesh
) -> tuple[TrainStep, EvalStep]:
    """``(jitted_train, jitted_eval)`` with state shardings, batches over the batch axes.

    Train donates the state and returns replicated metrics; eval returns per-sample arrays
    sharded like the batch (read this process's rows with ``local_rows``).
    """
    batch_sh = parallel.data_sharding(mesh)
    replicated = NamedSharding(mesh, P())
    jitted_train = jax.jit(
        train_step,
        in_shardings=(state_shardings, batch_sh),
        out_shardings=(state_shardings, replicated),
        donate_argnums=0,
    )
    jitted_eval = jax.jit(
        eval_step, in_shardings=(state_shardings, batch_sh), out_shardings=batch_sh
    )
    return jitted_train, jitted_eval


def local_rows(x: jax.Array) -> Any:
    """This process's rows of a batch-sharded global array, in global order, as numpy."""
    import numpy as np

    if jax.process_count() == 1:
        return np.asarray(x)
    shards = {}
    for s in x.addressable_shards:
        start = (s.index[0].start or 0) if s.index else 0
        shards.setdefault(start, s.data)
    return np.concatenate([np.asarray(shards[k]) for k in sorted(shards)], axis=0)
