"""Overfitting a fixed batch of 16 RefShapes examples with the real state/step functions."""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np

from refjax import parallel
from refjax.data.pipeline import make_pipeline
from refjax.train.config import apply_overrides, load_config
from refjax.train.optim import make_optimizer
from refjax.train.state import build_model, create_train_state
from refjax.train.steps import jit_steps, make_eval_step, make_train_step
from refjax.train.trainer import resolve_config
from tests.data_fixtures import refshapes_tiny_dir  # noqa: F401

STEPS = 250


def small_config(data_dir: str, *sets: str):
    config = load_config("configs/oneref/rec_res.py:tiny")
    apply_overrides(config, [
        f"data.data_dir={data_dir}", "data.dataset_config=tiny",
        "model.dim=32", "model.depth=2", "model.heads=2", "model.mlp_dim=64",
        "model.img_size=64", "data.max_text_len=16", "data.batch_size=16",
        "data.eval_batch_size=16", *sets,
    ])
    return resolve_config(config)


def test_overfit_16_examples(refshapes_tiny_dir):  # noqa: F811
    jax.config.update("jax_disable_most_optimizations", True)
    try:
        config = small_config(
            refshapes_tiny_dir,
            "loss.use_box_mask_constraint=False",  # cosine logits cannot drive focal/dice to 0
            "optim.lr=5e-3", "optim.warmup_steps=10", "optim.schedule=warmup_cosine",
            "optim.weight_decay=0.0",
        )
        with make_pipeline(config, "train", train=True, seed=0) as it:
            batch_np = next(it)  # 16 (augmented) examples, then fixed
        assert int(batch_np["valid"].sum()) == 16
        # One device keeps compile and steps fast (sharding has its own tests).
        mesh = parallel.create_mesh(config.mesh, jax.devices()[:1])
        rules = parallel.rules_for(config.layout)
        model = build_model(config)
        tx, _ = make_optimizer(config.optim, STEPS)
        state, shardings = create_train_state(config, model, tx, mesh, rules, 0, batch_np)
        jtrain, jeval = jit_steps(
            make_train_step(model, tx, config), make_eval_step(model, config), shardings, mesh
        )
        losses = []
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            batch = parallel.host_batch_to_global(batch_np, mesh)
            for _ in range(STEPS):
                state, metrics = jtrain(state, batch)
                losses.append(float(metrics["loss"]))
            per_sample = jax.device_get(jeval(state, batch))
        assert int(state.step) == STEPS
        assert np.all(np.isfinite(losses))
        assert losses[-1] <= 0.1 * losses[0], (losses[0], losses[-1])
        # The overfit boxes are right: Acc@0.5 on the training batch.
        assert per_sample["correct"].mean() >= 0.9
        assert set(per_sample) >= {"box_iou", "correct", "valid", "kind"}
    finally:
        jax.config.update("jax_disable_most_optimizations", False)


def test_frozen_backbone_initialised_from_converted_checkpoint(refshapes_tiny_dir, tmp_path):  # noqa: F811
    from refjax.convert.common import save_params

    jax.config.update("jax_disable_most_optimizations", True)
    try:
        config = small_config(refshapes_tiny_dir, "data.batch_size=4", "optim.frozen=^beit3/",
                              "optim.lr=1e-2", "optim.warmup_steps=0")
        with make_pipeline(config, "train", train=True, seed=0) as it:
            batch_np = next(it)
        model = build_model(config)
        inputs = (batch_np["text_ids"], batch_np["text_padding"], batch_np["image"])
        other = parallel.strip_boxes(jax.jit(model.init)(jax.random.key(7), *inputs))
        path = str(tmp_path / "beit3_ckpt")
        save_params(path, other["params"]["beit3"], {"model": "beit3"})

        mesh = parallel.create_mesh(config.mesh, jax.devices()[:1])
        rules = parallel.rules_for(config.layout)
        tx, _ = make_optimizer(config.optim, 10)
        fresh, _ = create_train_state(config, model, tx, mesh, rules, 0, batch_np)
        apply_overrides(config, [f"init={path}"])
        state, shardings = create_train_state(config, model, tx, mesh, rules, 0, batch_np)
        eq = lambda a, b: jax.tree.all(jax.tree.map(np.array_equal, a, b))  # noqa: E731
        assert eq(state.params["beit3"], other["params"]["beit3"])
        assert not eq(fresh.params["beit3"], other["params"]["beit3"])
        assert eq(state.params["visu_proj"], fresh.params["visu_proj"])  # heads: fresh init
        before = jax.device_get(state.params)

        jtrain, _ = jit_steps(make_train_step(model, tx, config), make_eval_step(model, config),
                              shardings, mesh)
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            state, metrics = jtrain(state, parallel.host_batch_to_global(batch_np, mesh))
        assert np.isfinite(float(metrics["loss"]))
        assert eq(state.params["beit3"], before["beit3"])  # frozen: bit-identical
        assert not eq(state.params["bbox_embed"], before["bbox_embed"])  # heads train
    finally:
        jax.config.update("jax_disable_most_optimizations", False)
