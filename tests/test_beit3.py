"""BEiT-3 encoder: parameter counts, scan/unscan equality, interpolation, converter errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from refjax.convert import beit3 as conv
from refjax.convert.common import ConversionError, load_state_dict, save_safetensors
from refjax.models.beit3 import BEiT3, beit3_config, param_count
from refjax.models.layers import bicubic_matrix, resize_grid_bicubic
from tests.torch_util import require_torch


@pytest.mark.parametrize("variant,expected", [("base", 221_279_232), ("large", 673_091_584)])
def test_param_count_at_384(variant, expected):
    cfg = beit3_config(variant, img_size=384)
    shapes = jax.eval_shape(
        BEiT3(cfg).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32), None,
        jnp.zeros((1, 384, 384, 3)),
    )
    assert param_count(shapes["params"]) == expected


def _tiny(scan, **kw):
    return beit3_config("tiny", img_size=32, scan=scan, **{"depth": 2, **kw})


def _unscan(params, depth):
    """Scanned params -> unscanned layout (layers_i)."""
    enc = dict(params["encoder"])
    stacked = enc.pop("layers")
    for i in range(depth):
        enc[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
    return {**params, "encoder": enc}


@pytest.mark.parametrize("remat", ["none", "full"])
def test_scanned_equals_unscanned(remat):
    cfg_s, cfg_u = _tiny(True, remat_policy=remat), _tiny(False, remat_policy=remat)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, 100, (2, 6)))
    pad = jnp.asarray(np.array([[0, 0, 0, 0, 1, 1], [0] * 6]))
    img = jnp.asarray(rng.standard_normal((2, 32, 32, 3)), jnp.float32)
    from flax import linen as nn

    v = nn.unbox(jax.jit(BEiT3(cfg_s).init)(jax.random.key(1), ids, pad, img))
    out_s, _ = jax.jit(BEiT3(cfg_s).apply)(v, ids, pad, img)
    vu = {"params": _unscan(v["params"], cfg_s.depth)}
    out_u, _ = jax.jit(BEiT3(cfg_u).apply)(vu, ids, pad, img)
    np.testing.assert_allclose(np.asarray(out_s), np.asarray(out_u), atol=1e-6)

    # gradients agree too (remat must not change them)
    def loss(p, cfg):
        return jnp.sum(BEiT3(cfg).apply({"params": p}, ids, pad, img)[0] ** 2)

    gs = jax.jit(jax.grad(loss), static_argnums=1)(v["params"], cfg_s)
    gu = jax.jit(jax.grad(loss), static_argnums=1)(vu["params"], cfg_u)
    np.testing.assert_allclose(
        np.asarray(gs["text_embed"]["embedding"]), np.asarray(gu["text_embed"]["embedding"]),
        rtol=1e-5, atol=1e-6)


def test_bicubic_equals_torch_interpolate():
    """Same maths as F.interpolate(mode="bicubic"), compared in float64.

    (torch's float32 kernel itself differs from its float64 result by ~4e-6 on this input:
    that is torch's float32 rounding, so the exact comparison is made in float64.)
    """
    torch = require_torch()
    rng = np.random.default_rng(0)
    grid = rng.standard_normal((14, 14, 5))
    t = torch.from_numpy(grid.transpose(2, 0, 1)[None])
    for size in [(24, 24), (9, 11)]:
        ref = torch.nn.functional.interpolate(t, size=size, mode="bicubic",
                                              align_corners=False)[0].numpy().transpose(1, 2, 0)
        ours = resize_grid_bicubic(grid, size)
        np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-12)
    # the float32 jax path agrees to float32 precision
    ours32 = np.asarray(resize_grid_bicubic(jnp.asarray(grid, jnp.float32), (24, 24)))
    np.testing.assert_allclose(ours32, resize_grid_bicubic(grid, (24, 24)), atol=1e-5)


def test_bicubic_rows_sum_to_one():
    m = bicubic_matrix(14, 24)
    np.testing.assert_allclose(m.sum(1), 1.0, atol=1e-12)


def test_position_interpolation_keeps_leading_rows():
    rng = np.random.default_rng(0)
    table = rng.standard_normal((3 + 14 * 14, 8)).astype(np.float32)
    out = conv.interpolate_vision_positions(table, 24)
    assert out.shape == (3 + 24 * 24, 8)
    np.testing.assert_array_equal(out[:3], table[:3])
    with pytest.raises(ConversionError, match="embed_positions.A.weight"):
        conv.interpolate_vision_positions(table[:-1], 24)


def _random_sd(cfg, seed=0):
    from flax import linen as nn

    v = nn.unbox(BEiT3(cfg).init(jax.random.key(seed), jnp.zeros((1, 3), jnp.int32), None,
                                 jnp.zeros((1, cfg.img_size, cfg.img_size, 3))))
    return conv.to_torch(v["params"], cfg), v["params"]


def test_safetensors_roundtrip_with_prefix_and_interpolation(tmp_path):
    cfg224 = beit3_config("tiny", img_size=64)  # 4x4 grid in the checkpoint
    sd, _ = _random_sd(cfg224)
    wrapped = {"beit3." + k: v for k, v in sd.items()}
    wrapped["mlm_head.weight"] = np.zeros((3, 3), np.float32)  # a wrapper's extra key
    path = str(tmp_path / "ckpt.safetensors")
    save_safetensors(path, wrapped)
    loaded = load_state_dict(path)
    cfg_big = beit3_config("tiny", img_size=96)  # 6x6 grid: positions interpolated
    params, report = conv.from_torch(loaded, cfg_big)
    assert report.unexpected == ["mlm_head.weight"] and not report.missing
    assert params["embed_positions"]["A"].shape == (3 + 36, cfg_big.dim)
    # same-size conversion is exact both ways
    params2, _ = conv.from_torch(loaded, cfg224)
    back = conv.to_torch(params2, cfg224)
    for k, v in sd.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)


def test_shape_mismatch_and_missing_keys_are_named():
    cfg = _tiny(True)
    sd, _ = _random_sd(cfg)
    bad = dict(sd)
    bad["encoder.layers.1.ffn.A.fc1.weight"] = np.zeros((7, cfg.dim), np.float32)
    with pytest.raises(ConversionError, match=r"encoder\.layers\.1\.ffn\.A\.fc1\.weight"):
        conv.from_torch(bad, cfg)
    missing = dict(sd)
    del missing["encoder.layer_norm.B.bias"]
    with pytest.raises(ConversionError, match=r"encoder\.layer_norm\.B\.bias"):
        conv.from_torch(missing, cfg)


def test_infer_config_from_state_dict():
    cfg = beit3_config("tiny", img_size=48)
    sd, _ = _random_sd(cfg)
    got = conv.infer_config(sd, heads=cfg.heads)
    assert (got.dim, got.depth, got.mlp_dim, got.vocab_size, got.img_size) == (
        cfg.dim, cfg.depth, cfg.mlp_dim, cfg.vocab_size, 48)


def test_any_image_size_and_bad_inputs():
    cfg = _tiny(True)
    model = BEiT3(cfg)
    v = model.init(jax.random.key(0), jnp.zeros((1, 3), jnp.int32), None,
                   jnp.zeros((1, 32, 32, 3)))
    out, aux = model.apply(v, image=jnp.zeros((1, 48, 64, 3)))
    assert out.shape == (1, 1 + 3 * 4, cfg.dim) and aux["grid"] == (3, 4)
    with pytest.raises(ValueError, match="not divisible"):
        model.apply(v, image=jnp.zeros((1, 40, 32, 3)))
    with pytest.raises(ValueError, match="needs text_ids, image"):
        model.apply(v)
    with pytest.raises(ValueError, match="unknown attention_impl 'flash'"):
        beit3_config("tiny", attention_impl="flash")


def test_bf16_compute_keeps_float32_params():
    cfg = _tiny(True, dtype="bfloat16")
    model = BEiT3(cfg)
    v = model.init(jax.random.key(0), jnp.zeros((1, 3), jnp.int32), None,
                   jnp.zeros((1, 32, 32, 3)))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(v))
    out, _ = model.apply(v, jnp.zeros((1, 3), jnp.int32), None, jnp.zeros((1, 32, 32, 3)))
    assert np.isfinite(np.asarray(out, np.float32)).all()


def test_einsum_attention_equals_dot_product_attention():
    """The CPU attention path (heads-major einsums) computes what jax.nn.dot_product_attention
    computes, with padded keys masked; ``None`` resolves to it on CPU; bad names are refused."""
    from refjax.models.layers import attention

    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 7, 3, 8)), jnp.float32) for _ in range(3))
    pad = jnp.asarray([[0] * 7, [0] * 4 + [1] * 3], jnp.int32)
    ref = attention(q, k, v, pad, scale=0.3, implementation="xla")
    ein = attention(q, k, v, pad, scale=0.3, implementation="einsum")
    np.testing.assert_allclose(np.asarray(ein), np.asarray(ref), atol=1e-6)
    auto = attention(q, k, v, pad, scale=0.3)
    np.testing.assert_array_equal(np.asarray(auto), np.asarray(ein))
    # a padded key gets no weight: changing it leaves the output unchanged
    v2 = v.at[1, 5].set(100.0)
    np.testing.assert_allclose(
        np.asarray(attention(q, k, v2, pad, scale=0.3, implementation="einsum")),
        np.asarray(ein), atol=1e-6)
    with pytest.raises(ValueError, match="unknown attention implementation"):
        attention(q, k, v, pad, scale=0.3, implementation="flash")
