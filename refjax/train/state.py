"""The OneRef train state, the model built from a config, and sharded state creation.

``create_train_state`` follows the house pattern (spec/jax-stack.md 2(c)): ``eval_shape`` of the
init function -> shardings from the logical axis rules -> ``jax.jit(init, out_shardings=...)``
(``parallel.create_sharded``), then optionally loads pretrained weights onto those shardings.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from refjax import parallel
from refjax.models.beit3 import VARIANTS, BEiT3Config, beit3_config
from refjax.models.oneref import OneRef

log = logging.getLogger(__name__)

MODEL_INPUTS = ("text_ids", "text_padding", "image")
_BACKBONE_FIELDS = ("dim", "depth", "heads", "mlp_dim", "vocab_size", "img_size", "patch_size",
                    "dtype", "scan", "remat_policy", "drop_path_rate", "attention_impl")


@flax.struct.dataclass
class TrainState:
    """Everything a training step reads and writes (a pytree; checkpointed as a whole)."""

    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any
    batch_stats: Any  # BatchNorm running statistics (empty without the RES head)
    opt_state: Any
    rng: jax.Array  # typed PRNG key; per-step keys are folded from it and ``step``


def backbone_config(model_cfg: Mapping[str, Any]) -> BEiT3Config:
    """The BEiT-3 config of ``config.model``: the variant plus every non-None field."""
    variant = model_cfg["variant"]
    if variant not in VARIANTS:
        raise ValueError(f"unknown model variant {variant!r}; one of {sorted(VARIANTS)}")
    overrides = {k: model_cfg[k] for k in _BACKBONE_FIELDS if model_cfg.get(k) is not None}
    return beit3_config(variant, **overrides)


def build_model(config: Any) -> OneRef:
    """``OneRef`` from ``config.model`` (``use_seg_head`` for RES)."""
    return OneRef(
        backbone_config(config.model),
        use_seg_head=bool(config.model.use_seg_head),
        sim_scale=float(config.model.get("sim_scale", 1.0)),
        seg_dim=config.model.get("seg_dim") or None,
        seg_convs=int(config.model.get("seg_convs", 3)),
    )


def model_inputs(batch: Mapping[str, Any]) -> tuple[Any, Any, Any]:
    """Positional model inputs ``(text_ids, text_padding, image)`` of a batch."""
    return tuple(batch[k] for k in MODEL_INPUTS)  # type: ignore[return-value]


def _as_key(rng: Any) -> jax.Array:
    if isinstance(rng, int):
        return jax.random.key(rng)
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        return rng
    return jax.random.wrap_key_data(rng)


def create_train_state(
    config: Any,
    model: OneRef,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    rules: parallel.Rules,
    rng: Any,
    sample_batch: Mapping[str, Any],
) -> tuple[TrainState, TrainState]:
    """A freshly initialised, sharded ``TrainState`` and its shardings (same structure).

    ``sample_batch`` only gives input shapes and dtypes (``text_ids``, ``text_padding``,
    ``image``; a global batch). ``rng`` is a typed key, raw key data or an int seed. When
    ``config.init`` is set, the parameters (and BatchNorm statistics, where the source has
    them) are replaced by the pretrained ones; see ``load_pretrained``.
    """
    inputs = tuple(
        np.zeros(np.shape(x), np.asarray(x).dtype) for x in model_inputs(sample_batch)
    )

    def init_fn(key: jax.Array, text_ids: Any, text_padding: Any, image: Any) -> TrainState:
        init_key, state_key = jax.random.split(key)
        variables = model.init(
            {"params": init_key, "dropout": init_key},
            text_ids, text_padding, image, deterministic=True,
        )
        params = variables["params"]
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            batch_stats=variables.get("batch_stats", {}),
            opt_state=tx.init(params),
            rng=state_key,
        )

    state, shardings = parallel.create_sharded(init_fn, mesh, rules, _as_key(rng), *inputs)
    init = config.get("init") if hasattr(config, "get") else None
    if init:
        state = load_pretrained(state, shardings, init)
    return state, shardings


# ----------------------------------------------------------------------------- pretrained
def _put(tree: Any, template: Any, shardings: Any, what: str) -> Any:
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


def _restore_workdir_variables(path: str) -> dict[str, Any]:
    from refjax.train.checkpoint import Checkpointer

    with Checkpointer(os.path.join(path, "checkpoints")) as ckpt:
        step = ckpt.best_step() or ckpt.latest_step()
        if step is None:
            raise FileNotFoundError(f"no checkpoint under {path}/checkpoints")
        restored = ckpt.restore(step)
    log.info("init: variables of %s step %d", path, step)
    return {"params": restored["params"], "batch_stats": restored.get("batch_stats") or {}}


def load_pretrained(state: TrainState, shardings: TrainState, path: str) -> TrainState:
    """``state`` with pretrained weights from ``path``.

    ``path`` is (1) a converted BEiT-3 checkpoint (``refjax convert beit3``): replaces
    ``params['beit3']``; (2) a converted OneRef checkpoint (a parameter tree with ``beit3`` and
    the heads, or ``{'params', 'batch_stats'}``): replaces every subtree it holds (a REC
    checkpoint leaves a RES head at its initialisation); or (3) a refjax train workdir: its
    best (else latest) checkpoint's ``params`` and ``batch_stats``. The optimizer state is
    kept (fresh AdamW moments do not depend on the parameter values).
    """
    if os.path.isdir(os.path.join(path, "checkpoints")):
        variables = _restore_workdir_variables(path)
    else:
        from refjax.convert.common import load_params

        loaded, meta = load_params(path)
        if "params" in loaded and isinstance(loaded["params"], Mapping):
            variables = {"params": loaded["params"], "batch_stats": loaded.get("batch_stats")}
        elif "beit3" in loaded:
            variables = {"params": loaded}
        else:
            variables = {"params": {"beit3": loaded}}
        log.info("init: %s (%s)", path, meta.get("model", "?"))
    params, batch_stats = dict(state.params), dict(state.batch_stats)
    for name, sub in variables["params"].items():
        if name not in params:
            raise ValueError(f"init {path}: the model has no parameter subtree {name!r}")
        params[name] = _put(sub, params[name], shardings.params[name], f"init {path}: {name}")
    for name, sub in (variables.get("batch_stats") or {}).items():
        if name in batch_stats:
            batch_stats[name] = _put(sub, batch_stats[name], shardings.batch_stats[name],
                                     f"init {path}: batch_stats/{name}")
    return state.replace(params=params, batch_stats=batch_stats)


def abstract_train_state(
    model: OneRef,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    rules: parallel.Rules,
    sample_batch: Mapping[str, Any],
) -> tuple[TrainState, TrainState]:
    """``(ShapeDtypeStruct tree with shardings, shardings)`` of the train state, without
    initialising anything: the restore target for checkpoints."""
    import flax.linen as nn

    def init_fn(key: jax.Array) -> TrainState:
        variables = model.init(
            {"params": key, "dropout": key}, *model_inputs(sample_batch), deterministic=True
        )
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=variables["params"],
            batch_stats=variables.get("batch_stats", {}),
            opt_state=tx.init(variables["params"]),
            rng=key,
        )

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        boxed = jax.eval_shape(init_fn, jax.random.key(0))
    shardings = parallel.logical_shardings(boxed, mesh, rules)
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        parallel.strip_boxes(boxed),
        shardings,
    )
    return abstract, shardings
