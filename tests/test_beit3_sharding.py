"""BEiT-3 on the 8-fake-device mesh: fsdp leaves no large parameter replicated, and a jitted
sharded forward equals the single-device forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from refjax import parallel
from refjax.models.beit3 import BEiT3, beit3_config


def _init_fn(cfg, b=2, lt=8):
    model = BEiT3(cfg)
    ids = jnp.zeros((b, lt), jnp.int32)
    img = jnp.zeros((b, cfg.img_size, cfg.img_size, 3))
    return lambda rng: model.init(rng, ids, None, img)


def test_base_384_fsdp_shards_every_large_parameter():
    cfg = beit3_config("base", img_size=384)
    mesh = parallel.create_mesh({"data": 1, "fsdp": 8})
    rules = parallel.rules_for("fsdp")
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        abstract = jax.eval_shape(_init_fn(cfg, b=1, lt=4), jax.random.key(0))
    shardings = parallel.logical_shardings(abstract, mesh, rules)
    shapes = parallel.strip_boxes(abstract)
    placed = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          shapes, shardings)
    parallel.assert_params_sharded(placed["params"])
    # and the check does fail when the layout replicates parameters
    dp = parallel.rules_for("dp")
    dp_sh = parallel.logical_shardings(abstract, mesh, dp)
    placed_dp = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                             shapes, dp_sh)
    with pytest.raises(ValueError, match="text_embed/embedding"):
        parallel.assert_params_sharded(placed_dp["params"])


@pytest.mark.parametrize("layout,mesh_cfg", [
    ("fsdp", {"data": 2, "fsdp": 4}),
    ("fsdp_tp", {"data": 2, "fsdp": 2, "tensor": 2}),
])
def test_sharded_forward_equals_single_device(layout, mesh_cfg):
    cfg = beit3_config("base", depth=2, img_size=64, vocab_size=1024, max_source_positions=64)
    mesh = parallel.create_mesh(mesh_cfg)
    rules = parallel.rules_for(layout)
    variables, _ = parallel.create_sharded(_init_fn(cfg), mesh, rules, jax.random.key(0))
    if layout == "fsdp":
        parallel.assert_params_sharded(variables["params"], min_bytes=1 << 20)

    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.vocab_size, (8, 8)).astype(np.int32)
    pad = np.zeros((8, 8), np.int32)
    pad[::2, 5:] = 1
    img = rng.standard_normal((8, 64, 64, 3)).astype(np.float32)

    model = BEiT3(cfg)
    fwd = lambda v, a, b, c: model.apply(v, a, b, c)[0]
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        batch = parallel.host_batch_to_global((ids, pad, img), mesh)
        out_sharded = jax.jit(fwd)(variables, *batch)
    host_vars = jax.tree.map(np.asarray, variables)
    cpu0 = jax.devices()[0]
    out_single = jax.jit(fwd)(jax.device_put(host_vars, cpu0),
                              *jax.device_put((ids, pad, img), cpu0))
    np.testing.assert_allclose(np.asarray(out_sharded), np.asarray(out_single), atol=2e-5, rtol=0)
