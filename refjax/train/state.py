"""The train state, its sharded creation from any task, and loading initial variables.

``create_train_state`` follows the house pattern (spec/jax-stack.md 2(c)): ``eval_shape`` of the
init function -> shardings from the logical axis rules -> ``jax.jit(init, out_shardings=...)``
(``parallel.create_sharded``). ``abstract_train_state`` / ``abstract_variables`` give restore
targets without initialising anything.

Parameters come in two collections: ``params`` (trained; the optimizer holds slots for them) and
``frozen`` (inputs that are never trained: a MIM tokenizer, frozen vision towers; no optimizer
slots). The model sees both merged as its ``params``; the task names the frozen top-level
subtrees. Both are sharded by the same rules and saved with the state.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from refjax import parallel
from refjax.tasks import Task

log = logging.getLogger(__name__)

VARIABLE_FIELDS = ("params", "frozen", "batch_stats")


@flax.struct.dataclass
class TrainState:
    """Everything a training step reads and writes (a pytree; checkpointed as a whole)."""

    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any  # trained parameters
    frozen: Any  # parameters that are inputs, never trained (no optimizer slots)
    batch_stats: Any  # BatchNorm running statistics (empty without BatchNorm)
    opt_state: Any
    rng: jax.Array  # typed PRNG key; per-step keys are folded from it and ``step``

    def variables(self) -> dict[str, Any]:
        """``{"params", "frozen", "batch_stats"}``: what evaluation and inference read."""
        return {"params": self.params, "frozen": self.frozen, "batch_stats": self.batch_stats}


def model_variables(variables: Mapping[str, Any]) -> dict[str, Any]:
    """The model's ``apply`` variables: trained and frozen parameters merged, plus
    ``batch_stats``."""
    frozen = variables.get("frozen") or {}
    params = dict(variables["params"])
    clash = set(params) & set(frozen)
    if clash:
        raise ValueError(f"subtrees {sorted(clash)} are both trained and frozen")
    return {"params": {**params, **frozen}, "batch_stats": variables.get("batch_stats") or {}}


def _as_key(rng: Any) -> jax.Array:
    if isinstance(rng, int):
        return jax.random.key(rng)
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        return rng
    return jax.random.wrap_key_data(rng)


def _split_frozen(params: Mapping[str, Any], names: Sequence[str]) -> tuple[dict, dict]:
    missing = [n for n in names if n not in params]
    if missing:
        raise ValueError(f"frozen subtrees {missing} are not in the model; it has {sorted(params)}")
    trained = {k: v for k, v in params.items() if k not in names}
    return trained, {k: params[k] for k in names}


def _init_variables(
    task: Task, model: nn.Module, config: Any, key: jax.Array, batch: Mapping[str, Any]
) -> dict[str, Any]:
    variables = model.init(
        {"params": key, "dropout": key}, **task.model_inputs(batch, config), deterministic=True
    )
    params, frozen = _split_frozen(variables["params"], task.frozen_subtrees(config))
    return {"params": params, "frozen": frozen, "batch_stats": variables.get("batch_stats", {})}


def _state_init_fn(task: Task, model: nn.Module, tx: optax.GradientTransformation, config: Any):
    def init_fn(key: jax.Array, batch: Mapping[str, Any]) -> TrainState:
        init_key, state_key = jax.random.split(key)
        v = _init_variables(task, model, config, init_key, batch)
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=v["params"],
            frozen=v["frozen"],
            batch_stats=v["batch_stats"],
            opt_state=tx.init(v["params"]),
            rng=state_key,
        )

    return init_fn


def _zeros(batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
    return {k: np.zeros(np.shape(x), np.asarray(x).dtype) for k, x in batch.items()}


def create_train_state(
    task: Task,
    config: Any,
    model: nn.Module,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    rules: parallel.Rules,
    rng: Any,
    sample_batch: Mapping[str, Any],
) -> tuple[TrainState, TrainState]:
    """A freshly initialised, sharded ``TrainState`` and its shardings (same structure).

    ``sample_batch`` only gives input shapes and dtypes (a global batch). ``rng`` is a typed
    key, raw key data or an int seed. Initial weights (``config.init``, the task's frozen
    checkpoints) are loaded by ``load_initial``.
    """
    init_fn = _state_init_fn(task, model, tx, config)
    return parallel.create_sharded(init_fn, mesh, rules, _as_key(rng), _zeros(sample_batch))


def _abstract(init_fn: Any, mesh: Mesh, rules: parallel.Rules, *args: Any) -> tuple[Any, Any]:
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        boxed = jax.eval_shape(init_fn, *args)
    shardings = parallel.logical_shardings(boxed, mesh, rules)
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        parallel.strip_boxes(boxed),
        shardings,
    )
    return abstract, shardings


def abstract_train_state(
    task: Task,
    config: Any,
    model: nn.Module,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    rules: parallel.Rules,
    sample_batch: Mapping[str, Any],
) -> tuple[TrainState, TrainState]:
    """``(ShapeDtypeStruct tree with shardings, shardings)`` of the train state, without
    initialising anything: the restore target for checkpoints and the input of compile checks."""
    init_fn = _state_init_fn(task, model, tx, config)
    return _abstract(init_fn, mesh, rules, jax.random.key(0), _zeros(sample_batch))


def abstract_variables(
    task: Task,
    config: Any,
    model: nn.Module,
    mesh: Mesh,
    rules: parallel.Rules,
    sample_batch: Mapping[str, Any],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Like ``abstract_train_state`` for ``{"params", "frozen", "batch_stats"}`` only: what
    inference restores (no optimizer is built or read)."""

    def init_fn(key: jax.Array, batch: Mapping[str, Any]) -> dict[str, Any]:
        return _init_variables(task, model, config, key, batch)

    return _abstract(init_fn, mesh, rules, jax.random.key(0), _zeros(sample_batch))


# ----------------------------------------------------------------------------- initial weights
def put_like(tree: Any, template: Any, shardings: Any, what: str) -> Any:
    """``tree`` cast and placed like ``template`` (structure and shapes must match)."""
    t_struct, s_struct = jax.tree.structure(template), jax.tree.structure(tree)
    if t_struct != s_struct:
        raise ValueError(f"{what}: parameter tree does not match the model:\n"
                         f"checkpoint {s_struct}\nmodel      {t_struct}")

    def one(path: Any, x: Any, t: Any, s: Any) -> jax.Array:
        if tuple(np.shape(x)) != tuple(t.shape):
            raise ValueError(f"{what}: {parallel.path_str(path)} has shape {np.shape(x)}, "
                             f"the model needs {tuple(t.shape)}")
        return jax.device_put(np.asarray(x, dtype=t.dtype), s)

    return jax.tree_util.tree_map_with_path(one, tree, template, shardings)


def read_variables(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(variables, meta)`` of an initial checkpoint: a refjax train workdir (its best, else
    latest, checkpoint's ``params``/``frozen``/``batch_stats``; meta ``{}``) or a converted
    checkpoint written by ``refjax.convert`` (``params`` [+ ``batch_stats``] and its meta)."""
    if os.path.isdir(os.path.join(path, "checkpoints")):
        from refjax.train.checkpoint import Checkpointer

        with Checkpointer(os.path.join(path, "checkpoints")) as ckpt:
            step = ckpt.best_step() or ckpt.latest_step()
            if step is None:
                raise FileNotFoundError(f"no checkpoint under {path}/checkpoints")
            variables = ckpt.restore_variables(step)
        log.info("init: variables of %s step %d", path, step)
        return variables, {}
    from refjax.convert.common import load_variables

    variables, meta = load_variables(path)
    log.info("init: %s (%s)", path, meta.get("model", "?"))
    return variables, meta


def _replace_subtrees(
    state_tree: Mapping[str, Any], shard_tree: Mapping[str, Any], new: Mapping[str, Any], what: str
) -> dict[str, Any]:
    out = dict(state_tree)
    for name, sub in new.items():
        if name not in out:
            raise ValueError(f"{what}: the model has no subtree {name!r}; it has {sorted(out)}")
        out[name] = put_like(sub, out[name], shard_tree[name], f"{what}/{name}")
    return out


def load_initial(state: TrainState, shardings: TrainState, task: Task, config: Any) -> TrainState:
    """``state`` with ``config.init`` (mapped by ``task.map_init``) and the task's frozen
    checkpoints (``task.frozen_init``) loaded. The optimizer state is kept (fresh AdamW
    moments do not depend on the parameter values)."""
    params, frozen, stats = dict(state.params), dict(state.frozen), dict(state.batch_stats)
    init = config.get("init") if hasattr(config, "get") else None
    if init:
        loaded, meta = read_variables(str(init))
        model_trees = {"params": {**params, **frozen}, "batch_stats": stats}
        mapped = task.map_init(loaded, meta, model_trees)
        new_params = mapped.get("params") or {}
        trained = {k: v for k, v in new_params.items() if k in params}
        params = _replace_subtrees(params, shardings.params, trained, f"init {init}")
        frozen = _replace_subtrees(
            frozen, shardings.frozen,
            {k: v for k, v in new_params.items() if k in frozen}, f"init {init}",
        )
        stats = _replace_subtrees(stats, shardings.batch_stats, mapped.get("batch_stats") or {},
                                  f"init {init}: batch_stats")
    for name, path in task.frozen_init(config).items():
        loaded, _ = read_variables(path)
        tree = loaded.get("frozen", {}).get(name) or loaded["params"]
        frozen = _replace_subtrees(frozen, shardings.frozen, {name: tree}, f"frozen {path}")
    return state.replace(params=params, frozen=frozen, batch_stats=stats)
