"""RAS on the 8-fake-device mesh: RAS-13B (Vicuna-13B + four towers + projectors) leaves no
parameter >= 1 MiB replicated under fsdp_tp (eval_shape only), and a tiny RAS's jitted sharded
NAR forward equals its single-device forward for the dp, fsdp and fsdp_tp layouts."""

import functools

import jax
import numpy as np
import pytest
from flax import linen as nn

from refjax import parallel
from refjax.models import ras
from tests import ras_util as U

MESH = {"data": 2, "fsdp": 2, "tensor": 2}


def _placed(abstract, mesh, rules):
    shardings = parallel.logical_shardings(abstract, mesh, rules)
    shapes = parallel.strip_boxes(abstract)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, shardings)


@pytest.mark.parametrize("decoding", ["nar", "ar"])
def test_ras_13b_fsdp_tp_shards_every_large_parameter(decoding):
    cfg = ras.ras_13b(decoding=decoding)
    mesh = parallel.create_mesh(MESH)
    rules = parallel.rules_for("fsdp_tp")
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        abstract = ras.abstract_variables(cfg, seq_len=8, pool_max=2, canvas=16)
    placed = _placed(abstract, mesh, rules)["params"]
    assert set(placed) >= {"clip", "siglip", "dinov2", "convnext", "llm", "mask_projector",
                           "image_projector"}
    parallel.assert_params_sharded(placed)
    # every large tower / projector kernel is split over both model axes where it can be
    big = placed["mask_projector"]["fc1"]["kernel"]
    assert big.sharding.shard_shape(big.shape) == (6528 // 2, 5120 // 2)
    if decoding == "nar":  # the check fails when the layout replicates parameters
        with pytest.raises(ValueError, match="llm/embed_tokens/embedding"):
            parallel.assert_params_sharded(
                _placed(abstract, mesh, parallel.rules_for("dp"))["params"])


@functools.lru_cache(maxsize=1)
def _single_device_reference():
    cfg, model, v = U.setup("nar")
    b = _batch(cfg)
    cpu0 = jax.devices()[0]
    out, _ = U.nar_fn()(jax.device_put(v, cpu0), jax.device_put(U.nar_inputs(b), cpu0))
    return np.asarray(out)


def _batch(cfg):
    b = U.batch(cfg, [[20, U.PH, 21], [22, 23, 24], [25], [26, U.PH, U.PH]], [3, 5, 1, 4],
                [1, 0, 0, 2], seed=3)
    return U.nar_inputs(b)


@pytest.mark.parametrize("layout", ["dp", "fsdp", "fsdp_tp"])
def test_sharded_nar_forward_equals_single_device(layout):
    cfg, model, v_host = U.setup("nar")
    mesh = parallel.create_mesh(MESH)
    rules = parallel.rules_for(layout)
    abstract = ras.abstract_variables(cfg, batch_size=2, seq_len=U.MAX_LEN,
                                      pool_max=U.POOL_MAX, refs_max=U.REFS_MAX, canvas=U.S)
    shardings = parallel.logical_shardings(abstract, mesh, rules)
    v = jax.tree.map(lambda x, sh: jax.device_put(x, sh), v_host, shardings)
    if layout == "fsdp_tp":
        parallel.assert_params_sharded(v["params"], min_bytes=16 << 10)
        emb = v["params"]["llm"]["embed_tokens"]["embedding"]
        assert emb.sharding.shard_shape(emb.shape) == (128, 32)
    b = _batch(cfg)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        batch = parallel.host_batch_to_global(b, mesh)
        out, _ = U.nar_fn()(v, batch)
    ref = _single_device_reference()
    diff = np.abs(np.asarray(out) - ref).max()
    print(f"{layout}: sharded vs single-device NAR logits max diff {diff:.2e}")
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5, rtol=0)
