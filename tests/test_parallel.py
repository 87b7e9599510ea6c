"""refjax.parallel on the 8 fake CPU devices."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from refjax import parallel

EMBED, MLP = 256, 1024  # each kernel is 1 MiB in float32


def _dense(features, names):
    return nn.Dense(
        features,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), names),
        bias_init=nn.with_logical_partitioning(nn.initializers.normal(0.1), names[-1:]),
    )


class ToyMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.with_logical_constraint(x, ("act_batch", "act_embed"))
        h = nn.gelu(_dense(MLP, ("embed", "mlp"))(x))
        h = nn.with_logical_constraint(h, ("act_batch", "act_mlp"))
        y = _dense(EMBED, ("mlp", "embed"))(h)
        return nn.with_logical_constraint(y, ("act_batch", "act_embed"))


def _init(key):
    return ToyMLP().init(key, jnp.zeros((1, EMBED)))


def _x():
    return jax.random.normal(jax.random.key(1), (16, EMBED))


def test_create_mesh_sizes_and_auto_axes():
    mesh = parallel.create_mesh({"fsdp": -1, "tensor": 2})
    assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 2}
    assert all(t == AxisType.Auto for t in mesh.axis_types)
    assert dict(parallel.create_mesh().shape) == {"data": 8, "fsdp": 1, "tensor": 1}
    assert dict(parallel.create_mesh([("data", 2), ("fsdp", 4)]).shape)["fsdp"] == 4
    with pytest.raises(ValueError, match="at most one"):
        parallel.create_mesh({"data": -1, "fsdp": -1})
    with pytest.raises(ValueError, match="needs 6 devices"):
        parallel.create_mesh({"data": 3, "fsdp": 2})
    with pytest.raises(ValueError, match="unknown mesh axes"):
        parallel.create_mesh({"model": 2})


def test_rules_cover_model_names():
    names = {
        "embed",
        "mlp",
        "heads",
        "kv",
        "vocab",
        "layers",
        "patch",
        "conv_in",
        "act_batch",
        "act_len",
        "act_embed",
        "act_mlp",
        "act_heads",
    }
    for layout in parallel.LAYOUTS:
        rules = dict(parallel.rules_for(layout))
        assert names <= set(rules)
        assert rules["act_batch"] == ("data", "fsdp")
    assert all(v is None for k, v in parallel.rules_for("dp") if not k.startswith("act_"))
    assert dict(parallel.rules_for("fsdp"))["mlp"] is None
    assert dict(parallel.rules_for("fsdp_tp"))["vocab"] == "tensor"
    with pytest.raises(ValueError):
        parallel.rules_for("zero3")


@pytest.mark.parametrize(
    "layout,mesh_cfg,k1,b1,k2",
    [
        ("dp", {"data": 8}, (EMBED, MLP), (MLP,), (MLP, EMBED)),
        ("fsdp", {"data": 2, "fsdp": 4}, (EMBED // 4, MLP), (MLP,), (MLP, EMBED // 4)),
        (
            "fsdp_tp",
            {"data": 2, "fsdp": 2, "tensor": 2},
            (EMBED // 2, MLP // 2),
            (MLP // 2,),
            (MLP // 2, EMBED // 2),
        ),
    ],
)
def test_shard_shapes_per_layout(layout, mesh_cfg, k1, b1, k2):
    mesh = parallel.create_mesh(mesh_cfg)
    params, shardings = parallel.create_sharded(
        _init, mesh, parallel.rules_for(layout), jax.random.key(0)
    )
    p = params["params"]
    assert p["Dense_0"]["kernel"].addressable_shards[0].data.shape == k1
    assert p["Dense_0"]["bias"].addressable_shards[0].data.shape == b1
    assert p["Dense_1"]["kernel"].addressable_shards[0].data.shape == k2
    assert jax.tree.structure(shardings) == jax.tree.structure(params)
    assert p["Dense_0"]["kernel"].sharding == shardings["params"]["Dense_0"]["kernel"]


def test_replicated_parameter_check():
    mesh = parallel.create_mesh({"data": 8})
    dp, _ = parallel.create_sharded(_init, mesh, parallel.rules_for("dp"), jax.random.key(0))
    with pytest.raises(ValueError) as err:
        parallel.assert_params_sharded(dp)
    assert "params/Dense_0/kernel" in str(err.value)
    assert "params/Dense_1/kernel" in str(err.value)
    assert "bias" not in str(err.value)  # small parameters may stay replicated
    fsdp_mesh = parallel.create_mesh({"fsdp": 8})
    fsdp, _ = parallel.create_sharded(
        _init, fsdp_mesh, parallel.rules_for("fsdp"), jax.random.key(0)
    )
    parallel.assert_params_sharded(fsdp)
    # Abstract trees with shardings are checked the same way.
    abstract = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), dp
    )
    with pytest.raises(ValueError):
        parallel.assert_params_sharded(abstract)


def test_indivisible_dims_stay_replicated():
    class Odd(nn.Module):
        @nn.compact
        def __call__(self, x):
            return _dense(10, ("embed", "vocab"))(x)

    mesh = parallel.create_mesh({"fsdp": 2, "tensor": 4})
    params, _ = parallel.create_sharded(
        lambda k: Odd().init(k, jnp.zeros((1, 8))),
        mesh,
        parallel.rules_for("fsdp_tp"),
        jax.random.key(0),
    )
    kernel = params["params"]["Dense_0"]["kernel"]
    assert kernel.sharding.is_equivalent_to(NamedSharding(mesh, P("fsdp", None)), 2)


def test_forward_same_on_one_device_and_mesh():
    x = _x()
    ref_params = _init(jax.random.key(0))
    ref = jax.jit(ToyMLP().apply)(nn.unbox(ref_params), x)

    mesh = parallel.create_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    rules = parallel.rules_for("fsdp_tp")
    params, shardings = parallel.create_sharded(_init, mesh, rules, jax.random.key(0))
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), params, nn.unbox(ref_params)
    )
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        xs = parallel.host_batch_to_global(np.asarray(x), mesh)
        fwd = jax.jit(ToyMLP().apply, in_shardings=(shardings, parallel.data_sharding(mesh)))
        y = fwd(params, xs)
    assert y.sharding.is_equivalent_to(NamedSharding(mesh, P(("data", "fsdp"), None)), 2)
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_host_batch_to_global():
    mesh = parallel.create_mesh({"data": 4, "fsdp": 2})
    batch = {"x": np.arange(32.0).reshape(16, 2), "n": np.int32(3)}
    out = parallel.host_batch_to_global(batch, mesh)
    assert out["x"].shape == (16, 2)
    assert out["x"].sharding == NamedSharding(mesh, P(("data", "fsdp")))
    assert out["x"].addressable_shards[0].data.shape == (2, 2)
    assert out["n"].sharding.is_fully_replicated
    np.testing.assert_array_equal(np.asarray(out["x"]), batch["x"])
