"""refjax.train.optim: schedules, AdamW semantics, freezing, clipping, accumulation."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from refjax.train import optim


def _cfg(**kw):
    """A complete optimizer section (every key is required) with ``kw`` overriding."""
    from configs.common import optim_section

    weight_decy = kw.pop("weight_decy", None)  # a misspelt key, kept to test the error
    cfg = ml_collections.ConfigDict(optim_section(**kw))
    if weight_decy is not None:
        cfg["weight_decy"] = weight_decy
    return cfg


def _step(tx, params, grads, state):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), updates, state


def test_param_path_names():
    tree = {
        "beit3": {"encoder": {"layers": [{"kernel": 1}, {"kernel": 2}]}},
        "head": {"bias": nn.LogicallyPartitioned(jnp.zeros(2), ("mlp",))},
    }
    paths = optim.param_path(tree)
    assert paths["beit3"]["encoder"]["layers"][1]["kernel"] == "beit3/encoder/layers/1/kernel"
    assert paths["head"]["bias"].value == "head/bias"


def test_warmup_cosine_schedule():
    lr, warm, total = 1e-3, 10, 110
    sched = optim.make_schedule(_cfg(lr=lr, warmup_steps=warm, min_lr_ratio=0.1), total)
    assert float(sched(0)) == 0.0
    np.testing.assert_allclose(float(sched(5)), lr / 2, rtol=1e-6)
    np.testing.assert_allclose(float(sched(warm)), lr, rtol=1e-6)
    for s in (35, 60, 95):
        frac = (s - warm) / (total - warm)
        want = lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        np.testing.assert_allclose(float(sched(s)), want, rtol=1e-5)
    np.testing.assert_allclose(float(sched(total)), 0.1 * lr, rtol=1e-5)


def test_epoch_cosine_matches_oneref_lambdalr():
    lr, spe, epochs = 2.5e-4, 7, 10
    sched = optim.make_schedule(_cfg(lr=lr, schedule="epoch_cosine"), spe * epochs, spe)
    got = np.array([float(sched(s)) for s in range(spe * epochs)])
    want = np.repeat([lr * 0.5 * (1 + math.cos(math.pi * e / epochs)) for e in range(epochs)], spe)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        optim.make_schedule(_cfg(lr=lr, schedule="epoch_cosine"), 70)


def test_unknown_keys_and_schedules_raise():
    with pytest.raises(KeyError, match="weight_decy"):
        optim.make_optimizer(_cfg(lr=1.0, weight_decy=0.1), 10)
    partial = ml_collections.ConfigDict({"lr": 1.0, "schedule": "constant"})
    with pytest.raises(KeyError, match="lacks .*'b1'"):  # no silent defaults
        optim.make_optimizer(partial, 10)
    with pytest.raises(ValueError, match="unknown schedule"):
        optim.make_optimizer(_cfg(lr=1.0, schedule="linear"), 10)


def test_adamw_matches_torch_formula():
    lr, wd, b1, b2, eps = 1e-2, 0.1, 0.9, 0.999, 1e-8
    tx, _ = optim.make_optimizer(_cfg(lr=lr, weight_decay=wd, schedule="constant"), 10)
    p = {"w": jnp.array([1.0, -2.0, 0.5])}
    grads = [jnp.array([0.3, -0.1, 0.0]), jnp.array([-0.2, 0.4, 1.0])]
    state = tx.init(p)
    ref, m, v = np.array(p["w"], np.float64), 0.0, 0.0
    for t, g in enumerate(grads, 1):
        p, _, state = _step(tx, p, {"w": g}, state)
        g = np.asarray(g, np.float64)
        ref = ref * (1 - lr * wd)
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        ref = ref - lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
    np.testing.assert_allclose(np.asarray(p["w"]), ref, rtol=1e-5)


def test_frozen_params_get_zero_updates_and_no_state():
    cfg = _cfg(lr=1e-2, weight_decay=0.5, frozen=["beit3/"], grad_clip_norm=1.0, accum_steps=1)
    tx, _ = optim.make_optimizer(cfg, 100)
    params = {"beit3": {"w": jnp.ones((3, 4))}, "head": {"w": jnp.ones((4,))}}
    grads = jax.tree.map(lambda x: jnp.full_like(x, 3.0), params)
    state = tx.init(params)
    mus = [x for x in jax.tree.leaves(state) if getattr(x, "shape", ()) == (3, 4)]
    assert not mus  # no Adam moments are kept for frozen parameters
    for _ in range(3):
        params, updates, state = _step(tx, params, grads, state)
        assert np.all(np.asarray(updates["beit3"]["w"]) == 0.0)
        assert np.all(np.asarray(updates["head"]["w"]) != 0.0)
    np.testing.assert_array_equal(np.asarray(params["beit3"]["w"]), np.ones((3, 4)))


def test_weight_decay_mask():
    cfg = _cfg(lr=0.1, weight_decay=0.5, wd_mask=r".*kernel$", schedule="constant")
    tx, _ = optim.make_optimizer(cfg, 10)
    params = {"dense": {"kernel": jnp.full((2,), 2.0), "bias": jnp.full((2,), 2.0)}}
    zeros = jax.tree.map(jnp.zeros_like, params)
    _, updates, _ = _step(tx, params, zeros, tx.init(params))
    np.testing.assert_allclose(np.asarray(updates["dense"]["kernel"]), -0.1 * 0.5 * 2.0)
    assert np.all(np.asarray(updates["dense"]["bias"]) == 0.0)


def test_clipping_uses_trainable_gradients_only():
    def run(cfg, g_scale):
        tx, _ = optim.make_optimizer(cfg, 10)
        params = {"a": jnp.ones(3), "frozen": jnp.ones(3)}
        state = tx.init(params)
        u = jnp.array([0.6, 0.0, 0.8])
        for scale in g_scale:
            grads = {"a": scale * u, "frozen": jnp.full(3, 1e6)}
            params, updates, state = _step(tx, params, grads, state)
        return np.asarray(updates["a"])

    base = dict(lr=0.1, schedule="constant", weight_decay=0.0, frozen="frozen")
    clipped = run(_cfg(grad_clip_norm=1.0, **base), [100.0, 1.0])
    np.testing.assert_allclose(clipped, run(_cfg(**base), [1.0, 1.0]), rtol=1e-6)
    assert not np.allclose(run(_cfg(**base), [100.0, 1.0]), clipped)


def test_gradient_accumulation_equals_big_batch():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(16, 5)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(16, 2)), jnp.float32)
    params0 = {"w": jnp.asarray(rng.normal(size=(5, 2)), jnp.float32), "b": jnp.zeros(2)}

    def loss(p, xb, yb):
        return jnp.mean((xb @ p["w"] + p["b"] - yb) ** 2)

    grad = jax.jit(jax.grad(loss))
    base = dict(lr=0.05, warmup_steps=2, weight_decay=0.1, grad_clip_norm=0.5)
    big_tx, _ = optim.make_optimizer(_cfg(**base), 20)
    acc_tx, _ = optim.make_optimizer(_cfg(accum_steps=4, **base), 20)
    step = jax.jit(_step, static_argnums=0)
    big, big_state = params0, big_tx.init(params0)
    acc, acc_state = params0, acc_tx.init(params0)
    for _ in range(3):  # three optimizer updates (the first has lr 0 from the warm-up)
        big, _, big_state = step(big_tx, big, grad(big, x, y), big_state)
        for i in range(4):
            before = acc
            mb = slice(4 * i, 4 * i + 4)
            acc, _, acc_state = step(acc_tx, acc, grad(acc, x[mb], y[mb]), acc_state)
            if i < 3:
                jax.tree.map(np.testing.assert_array_equal, acc, before)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), acc, big)
    assert not np.allclose(np.asarray(big["w"]), np.asarray(params0["w"]))


def test_optimizer_state_follows_parameter_shardings():
    from refjax import parallel

    cfg = _cfg(lr=1e-3, frozen="beit3/", wd_mask=".*kernel", accum_steps=2, grad_clip_norm=1.0)
    tx, _ = optim.make_optimizer(cfg, 100)

    def init(key):
        box = nn.LogicallyPartitioned
        params = {
            "beit3": {"kernel": box(jax.random.normal(key, (8, 16)), ("embed", "mlp"))},
            "head": {"kernel": box(jnp.ones((16, 8)), ("mlp", "embed")), "bias": jnp.ones(4)},
        }
        return {"params": params, "opt": tx.init(params)}

    mesh = parallel.create_mesh({"fsdp": 4, "tensor": 2})
    state, shardings = parallel.create_sharded(
        init, mesh, parallel.rules_for("fsdp_tp"), jax.random.key(0)
    )
    assert jax.tree.structure(state) == jax.tree.structure(shardings)
    mu = [x for x in jax.tree.leaves(state["opt"]) if x.shape == (16, 8)]
    assert mu and all(
        x.sharding.spec == state["params"]["head"]["kernel"].sharding.spec for x in mu
    )
    assert not [x for x in jax.tree.leaves(state["opt"]) if x.shape == (8, 16)]  # frozen: no state
    grads = jax.tree.map(jnp.ones_like, state["params"])
    with jax.set_mesh(mesh):
        updates, _ = jax.jit(tx.update)(grads, state["opt"], state["params"])
    assert not np.any(np.asarray(updates["beit3"]["kernel"]))
