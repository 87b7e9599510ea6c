"""Overfitting a fixed batch of 16 RefShapes examples with the real setup chain and steps."""

from __future__ import annotations

import jax
import numpy as np

from refjax import parallel
from refjax.data.pipeline import make_pipeline
from refjax.tasks import get_task
from refjax.train import setup
from refjax.train.config import apply_overrides, load_config
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


def first_batch(config) -> dict[str, np.ndarray]:
    data_task = get_task(config.task).data_task(config)
    with make_pipeline(config.data, "train", task=data_task, train=True, seed=0) as it:
        return next(it)


def test_overfit_16_examples(refshapes_tiny_dir):  # noqa: F811
    jax.config.update("jax_disable_most_optimizations", True)
    try:
        config = small_config(
            refshapes_tiny_dir,
            "loss.use_box_mask_constraint=False",  # cosine logits cannot drive focal/dice to 0
            "optim.lr=5e-3", "optim.warmup_steps=10", "optim.schedule=warmup_cosine",
            "optim.weight_decay=0.0",
        )
        batch_np = first_batch(config)  # 16 (augmented) examples, then fixed
        assert int(batch_np["valid"].sum()) == 16
        # One device keeps compile and steps fast (sharding has its own tests).
        s = setup.build(config, total_steps=STEPS, devices=jax.devices()[:1], seed=0)
        state, losses = s.state, []
        with s.activate():
            batch = s.global_batch(batch_np)
            for _ in range(STEPS):
                state, metrics = s.train_step(state, batch)
                losses.append(float(metrics["loss"]))
            per_sample = jax.device_get(s.eval_step(state.variables(), batch))
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
        batch_np = first_batch(config)
        model = get_task(config.task).build_model(config)
        inputs = (batch_np["text_ids"], batch_np["text_padding"], batch_np["image"])
        other = parallel.strip_boxes(jax.jit(model.init)(jax.random.key(7), *inputs))
        path = str(tmp_path / "beit3_ckpt")
        save_params(path, other["params"]["beit3"], {"model": "beit3"})

        one = jax.devices()[:1]
        fresh = setup.build(config, total_steps=10, devices=one, seed=0).state
        with config.unlocked():
            config.init = path
        s = setup.build(config, total_steps=10, devices=one, seed=0)
        state = s.state
        eq = lambda a, b: jax.tree.all(jax.tree.map(np.array_equal, a, b))  # noqa: E731
        assert eq(state.params["beit3"], other["params"]["beit3"])
        assert not eq(fresh.params["beit3"], other["params"]["beit3"])
        assert eq(state.params["visu_proj"], fresh.params["visu_proj"])  # heads: fresh init
        before = jax.device_get(state.params)

        with s.activate():
            state, metrics = s.train_step(state, s.global_batch(batch_np))
        assert np.isfinite(float(metrics["loss"]))
        assert eq(state.params["beit3"], before["beit3"])  # frozen: bit-identical
        assert not eq(state.params["bbox_embed"], before["bbox_embed"])  # heads train
    finally:
        jax.config.update("jax_disable_most_optimizations", False)
