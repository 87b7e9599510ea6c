"""The RAS frozen-encoder feature cache (refjax.data.ras_features): features written once per
image equal the towers run on the pipeline's pixels, the towers saved with the cache are the
ones a pixel run of the same config starts with, and a pipeline reading the cache gives rows
with ``features_<encoder>`` that drive the model like the pixels do."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from refjax.data.pipeline import make_pipeline
from refjax.data.ras_features import FeatureStore, square_pixels
from refjax.data.sources import open_scenes
from refjax.ras_features import encode_fn, write_features
from refjax.tasks import get_task
from refjax.tasks.ras import model_config, model_inputs
from tests import ras_task_util as U
from tests.data_fixtures import refshapes_tiny_dir  # noqa: F401


@pytest.fixture(scope="module")
def cache(refshapes_tiny_dir, tmp_path_factory):  # noqa: F811
    c = U.small_config(refshapes_tiny_dir)
    with c.unlocked():
        c.model.encoders = ("clip", "dinov2")  # (ConvNeXt: slow to compile on CPU)
    out = str(tmp_path_factory.mktemp("ras_feats") / "cache")
    stats = write_features(c, out, splits=["val"], batch_size=8, progress=False)
    return c, out, stats


@pytest.fixture(scope="module")
def initial(cache):
    """The variables a pixel run of the config starts with (``create_train_state``'s key)."""
    from refjax.train.state import _init_variables

    c = cache[0]
    task = get_task("ras")
    model = task.build_model(c)
    init_key, _ = jax.random.split(jax.random.key(int(c.train.seed)))
    return jax.jit(lambda k, b: _init_variables(task, model, c, k, b))(
        init_key, task.dummy_batch(c, 1))


def test_cache_layout(cache):
    c, out, stats = cache
    cfg = model_config(c)
    with open(os.path.join(out, "meta.json")) as f:
        meta = json.load(f)
    ids = json.load(open(os.path.join(out, "ids.json")))
    assert stats["images"] == meta["count"] == len(ids) == len(set(ids)) == 12
    assert meta["tower_source"].startswith("random init")
    for n in cfg.encoder_names:
        assert meta["encoders"][n]["shape"] == [*cfg.grid(n), cfg.feature_dim(n)]
        size = os.path.getsize(os.path.join(out, f"{n}.bin"))
        assert size == 12 * int(np.prod(meta["encoders"][n]["shape"])) * 4
    print(f"feature cache: {stats['images']} images, {stats['bytes']} bytes, "
          f"{stats['seconds']:.2f} s")


def test_cached_features_equal_on_the_fly(cache, initial):
    c, out, _ = cache
    cfg = model_config(c)
    store = FeatureStore(out)
    towers = store.tower_params(cfg.encoder_names)
    data = get_task("ras").data_task(c)
    with make_pipeline(c.data, "val", task=data, train=False, seed=0) as it:
        batch = next(it)  # pixel rows (no features_dir)
    # the towers (RAS.encode, normalised as the task does) on the pipeline's pixels (the
    # data task's expand2square path, not the writer's); the same weights and pixels, so the
    # only difference is float rounding: XLA's CPU convolutions round differently with the
    # position of an image in its batch (values are O(1); a wrong weight, pixel or
    # normalisation differs by O(1))
    run = encode_fn(cfg)
    ids = json.load(open(os.path.join(out, "ids.json")))
    pairs = open_scenes("refshapes", "val", c.data.data_dir, "tiny").expression_index()
    rows = {int(pairs[e][0]): i for i, e in enumerate(batch["expr_index"])}  # record -> row
    assert len(rows) >= 2
    np.testing.assert_array_equal(  # the same uint8 pixels as the writer saw
        batch["pixels_clip"][rows[0]],
        square_pixels(open_scenes("refshapes", "val", c.data.data_dir, "tiny")[0]["image"],
                      {"clip": cfg.input_size("clip")}, data.spec.fill)["clip"])
    live = run(towers, {n: batch[f"pixels_{n}"] for n in cfg.encoder_names})
    worst = {}
    for rec, i in rows.items():
        cached = store.lookup(ids[rec])  # the cache of the val split is in record order
        for n in cfg.encoder_names:
            d = float(np.max(np.abs(np.asarray(live[n][i]) - cached[n])))
            worst[n] = max(worst.get(n, 0.0), d)
    print(f"cached vs on-the-fly features, max abs diff per tower: "
          f"{ {n: f'{d:.1e}' for n, d in worst.items()} }")
    assert max(worst.values()) <= 1e-5

    # the towers saved with the cache are those of the pixel run's initial state
    assert set(initial["frozen"]) == set(cfg.encoder_names)
    for n in cfg.encoder_names:
        for a, b in zip(jax.tree.leaves(initial["frozen"][n]), jax.tree.leaves(towers[n])):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_pipeline_reads_the_cache(cache, initial):
    c, out, _ = cache
    cfg = model_config(c)
    task = get_task("ras")
    with c.unlocked():
        cf = c.copy_and_resolve_references()
    with cf.unlocked():
        cf.data.features_dir = out
    assert task.frozen_subtrees(cf) == ()  # no towers in the model
    with make_pipeline(cf.data, "val", task=task.data_task(cf), train=False, seed=0) as it:
        fb = next(it)
    with make_pipeline(c.data, "val", task=task.data_task(c), train=False, seed=0) as it:
        pb = next(it)
    assert not any(k.startswith("pixels_") for k in fb)
    for k in pb:
        if not k.startswith("pixels_"):
            np.testing.assert_array_equal(fb[k], pb[k], err_msg=k)
    store = FeatureStore(out)
    ids = json.load(open(os.path.join(out, "ids.json")))
    np.testing.assert_array_equal(fb["features_clip"][0], store.lookup(ids[0])["clip"])
    # the model on cached features = the model on pixels (same frozen towers)
    model = task.build_model(c)
    kw_p = model_inputs(pb, c, cfg, features=False, train=False)
    kw_f = model_inputs(fb, cf, cfg, features=True, train=False)
    kw_p.pop("mode"), kw_f.pop("mode")
    params = {**initial["params"], **initial["frozen"]}  # the towers: the cache's (above)
    fwd = jax.jit(lambda p, kw: model.apply({"params": p}, **kw, mode="nar")[0])
    lp = fwd(params, kw_p)
    lf = fwd(initial["params"], kw_f)
    valid = jnp.asarray(pb["pool_valid"]) > 0
    diff = float(jnp.max(jnp.where(valid, jnp.abs(lp - lf), 0.0)))
    print(f"NAR logits, pixels vs cached features: max abs diff {diff:.2e}")
    assert diff <= 1e-5
