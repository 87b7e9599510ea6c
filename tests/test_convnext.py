"""ConvNeXt without torch: shapes and parameter count, sharding of the xxlarge trunk on the fake
mesh, the eps options, scanned vs unscanned blocks, and the HF / timm / open_clip / FB key
layouts of the converter (timm itself cannot be installed here: its layout is derived by key
renaming from the HF layout)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from refjax import parallel
from refjax.convert import convnext as conv
from refjax.convert.common import ConversionError, conv_to_flax, linear_t, load_params
from refjax.models.convnext import (
    ConvNeXt,
    ConvNeXtConfig,
    convnext_config,
    init_fn,
    param_count,
    param_template,
)

TINY = convnext_config("tiny_test")  # depths 1/1/2/1, dims 8/16/24/32, HF eps


def random_params(cfg: ConvNeXtConfig, seed: int = 0) -> dict:
    """Random float32 params shaped like ``ConvNeXt(cfg)`` (numpy, no jitted init)."""
    rng = np.random.default_rng(seed)

    def one(path, x):
        name = path[-1].key
        if name == "scale":
            return (1 + 0.1 * rng.standard_normal(x.shape)).astype(np.float32)
        if name == "gamma":
            return rng.uniform(0.1, 0.5, x.shape).astype(np.float32)
        if name == "bias":
            return (0.05 * rng.standard_normal(x.shape)).astype(np.float32)
        fan_in = x.shape[-2] if "fc" in str(path[-2].key) else int(np.prod(x.shape[-4:-1]))
        return (rng.standard_normal(x.shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(one, param_template(cfg))


def hf_to_timm_key(k: str) -> str:
    """The timm name of an HF ConvNextModel key (written independently of the converter)."""
    k = k.replace("embeddings.patch_embeddings.", "stem.0.")
    k = k.replace("embeddings.layernorm.", "stem.1.")
    k = re.sub(r"^encoder\.stages\.(\d+)\.downsampling_layer\.", r"stages.\1.downsample.", k)
    k = re.sub(r"^encoder\.stages\.(\d+)\.layers\.", r"stages.\1.blocks.", k)
    for a, b in (("dwconv", "conv_dw"), ("layernorm.", "norm."), ("pwconv1", "mlp.fc1"),
                 ("pwconv2", "mlp.fc2"), ("layer_scale_parameter", "gamma")):
        k = k.replace(a, b)
    return "head.norm." + k[len("norm."):] if k.startswith("norm.") else k


def timm_to_fb_key(k: str) -> str:
    """The facebookresearch ConvNeXt name of a timm key."""
    k = k.replace("stem.", "downsample_layers.0.")
    k = re.sub(r"^stages\.(\d+)\.downsample\.", r"downsample_layers.\1.", k)
    k = re.sub(r"^stages\.(\d+)\.blocks\.", r"stages.\1.", k)
    k = k.replace("conv_dw", "dwconv").replace("mlp.fc", "pwconv")
    return k.replace("head.norm.", "norm.").replace("head.fc.", "head.")


def assert_trees_equal(a, b):
    fa = jax.tree_util.tree_flatten_with_path(a)[0]
    fb = dict(jax.tree_util.tree_flatten_with_path(b)[0])
    assert [p for p, _ in fa] == list(fb)
    for p, x in fa:
        np.testing.assert_array_equal(np.asarray(x), np.asarray(fb[p]), err_msg=str(p))


def forward(cfg, params, x):
    return jax.jit(lambda p, x: ConvNeXt(cfg).apply({"params": p}, x))(params, x)


@pytest.fixture(scope="module")
def tiny():
    params = random_params(TINY, seed=0)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 32, 32, 3)), jnp.float32)
    out, aux = forward(TINY, params, x)
    return params, x, out, aux


# ---------------------------------------------------------------- shapes, sharding


def test_hf_xxlarge_shape_param_count_and_outputs():
    cfg = convnext_config("hf_convnext_xxlarge")
    assert param_count(param_template(cfg)) == 843_398_016
    img = jax.ShapeDtypeStruct((1, 64, 96, 3), jnp.float32)
    variables = jax.eval_shape(init_fn(cfg, 32), jax.random.key(0))
    out, aux = jax.eval_shape(lambda v, x: ConvNeXt(cfg).apply(v, x), variables, img)
    assert out.shape == (1, 3072) and out.dtype == jnp.float32
    assert [s.shape for s in aux["stages"]] == [
        (1, 16, 24, 384), (1, 8, 12, 768), (1, 4, 6, 1536), (1, 2, 3, 3072)]
    assert aux["features"].shape == (1, 2, 3, 3072)
    # scanned + rematerialised stages trace under grad (what training a tower would run)
    remat = cfg.replace(remat_policy="dots_saveable", dtype="bfloat16")
    loss = lambda v, x: ConvNeXt(remat).apply(v, x)[1]["features"].astype(jnp.float32).mean()  # noqa: E731
    grads = jax.eval_shape(jax.grad(loss), variables, img)
    assert grads["params"]["stages_2"]["blocks"]["fc1"]["kernel"].value.shape == (30, 1536, 6144)
    # the open_clip trunk has the same tensors (eps is not a parameter)
    xxl = convnext_config("convnext_xxlarge")
    assert xxl.eps == xxl.head_eps == 1e-5 and xxl.stride == 32
    assert param_count(param_template(xxl)) == 843_398_016


def test_every_parameter_has_logical_axes_and_stage3_is_scanned():
    cfg = convnext_config("convnext_xxlarge")
    boxed = jax.eval_shape(init_fn(cfg, 32), jax.random.key(0))["params"]
    leaves = jax.tree_util.tree_flatten_with_path(
        boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))[0]
    allowed = {"embed", "mlp", "heads", "kv", "vocab", "layers", "patch", "conv_in", "norm", None}
    for path, leaf in leaves:
        assert isinstance(leaf, nn.LogicallyPartitioned), path
        assert set(leaf.names) <= allowed and len(leaf.names) == leaf.value.ndim, path
        assert leaf.value.dtype == jnp.float32, path
    fc1 = boxed["stages_2"]["blocks"]["fc1"]["kernel"]
    assert fc1.names == ("layers", "embed", "mlp") and fc1.value.shape == (30, 1536, 6144)


def test_xxlarge_fsdp_tp_leaves_no_large_parameter_replicated():
    cfg = convnext_config("convnext_xxlarge", dtype="bfloat16")
    mesh = parallel.create_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    rules = parallel.rules_for("fsdp_tp")

    def placed(rules_):
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules_):
            abstract = jax.eval_shape(init_fn(cfg, 32, batch=4), jax.random.key(0))
        sh = parallel.logical_shardings(abstract, mesh, rules_)
        return jax.tree.map(lambda s, h: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=h),
                            parallel.strip_boxes(abstract), sh)["params"]

    params = placed(rules)
    parallel.assert_params_sharded(params)
    fc1 = params["stages_2"]["blocks"]["fc1"]["kernel"]
    assert fc1.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    with pytest.raises(ValueError, match="stages_3/blocks/fc1/kernel"):
        parallel.assert_params_sharded(placed(parallel.rules_for("dp")))


# ---------------------------------------------------------------- numerics


def test_outputs_pooled_final_norm(tiny):
    params, x, out, aux = tiny
    feats = np.asarray(aux["features"], np.float64)
    assert feats.shape == (2, 1, 1, 32) and out.shape == (2, 32)
    pooled = feats.mean(axis=(1, 2))
    ln = (pooled - pooled.mean(-1, keepdims=True)) / np.sqrt(pooled.var(-1) + 1e-12)[:, None]
    ref = ln * params["head_norm"]["scale"] + params["head_norm"]["bias"]
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)
    no_head = TINY.replace(final_norm=False)
    p = {k: v for k, v in params.items() if k != "head_norm"}
    out2, aux2 = forward(no_head, p, x)
    np.testing.assert_array_equal(np.asarray(out2), np.asarray(aux2["features"]))
    np.testing.assert_array_equal(np.asarray(aux2["features"]), np.asarray(aux["features"]))


def test_eps_options_change_their_layer_norms(tiny):
    params, x, out, aux = tiny
    # eps: every LayerNorm but the final one (stem, downsample, blocks)
    out_e, aux_e = forward(TINY.replace(eps=1e-2), params, x)
    assert np.abs(np.asarray(aux_e["stem"]) - np.asarray(aux["stem"])).max() > 1e-4
    assert np.abs(np.asarray(aux_e["features"]) - np.asarray(aux["features"])).max() > 1e-4
    # final_eps: only the pooled output
    out_f, aux_f = forward(TINY.replace(final_eps=1e-1), params, x)
    np.testing.assert_array_equal(np.asarray(aux_f["features"]), np.asarray(aux["features"]))
    assert np.abs(np.asarray(out_f) - np.asarray(out)).max() > 1e-4
    # final_eps None follows eps (the open_clip trunk: 1e-5 everywhere)
    assert ConvNeXtConfig(eps=1e-5).head_eps == 1e-5


def test_scanned_and_unscanned_blocks_agree(tiny):
    params, x, out, aux = tiny
    flat = TINY.replace(scan=False)
    p_flat, _, report = conv.from_hf(conv.to_hf(params, TINY), flat)
    assert "blocks_1" in p_flat["stages_2"] and "blocks" not in p_flat["stages_2"]
    out_u, aux_u = forward(flat, p_flat, x)
    np.testing.assert_allclose(np.asarray(out_u), np.asarray(out), atol=1e-6, rtol=0)
    for a, b in zip(aux_u["stages"], aux["stages"]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0)
    # remat changes nothing numerically
    out_r, _ = forward(TINY.replace(remat_policy="full"), params, x)
    np.testing.assert_allclose(np.asarray(out_r), np.asarray(out), atol=1e-6, rtol=0)


def test_drop_path_train_mode_is_stochastic_and_finite(tiny):
    params, x, out, _ = tiny
    cfg = TINY.replace(drop_path_rate=0.5)
    fwd = jax.jit(lambda p, x, k: ConvNeXt(cfg).apply(
        {"params": p}, x, deterministic=False, rngs={"dropout": k})[0])
    a, b = fwd(params, x, jax.random.key(1)), fwd(params, x, jax.random.key(2))
    assert np.isfinite(np.asarray(a)).all()
    assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-3


def test_bfloat16_compute_keeps_float32_params_and_final_norm(tiny):
    params, x, _, _ = tiny
    cfg = TINY.replace(dtype="bfloat16")
    out, aux = jax.eval_shape(lambda p, x: ConvNeXt(cfg).apply({"params": p}, x), params, x)
    assert aux["features"].dtype == aux["stem"].dtype == jnp.bfloat16
    assert out.dtype == jnp.float32
    shapes = jax.eval_shape(init_fn(cfg, 32), jax.random.key(0))["params"]
    dtypes = {v.dtype for v in jax.tree.leaves(parallel.strip_boxes(shapes))}
    assert dtypes == {np.dtype(np.float32)}


# ---------------------------------------------------------------- converters


def test_timm_layout_gives_the_same_params_as_hf(tiny):
    params = tiny[0]
    sd_hf = conv.to_hf(params, TINY)
    sd_timm = {hf_to_timm_key(k): v for k, v in sd_hf.items()}
    p_hf, _, r_hf = conv.from_hf(sd_hf, TINY)
    p_timm, cfg_t, r_timm = conv.from_timm(sd_timm, TINY)
    assert not (r_hf.unexpected or r_hf.missing or r_timm.unexpected or r_timm.missing)
    assert_trees_equal(p_hf, params)
    assert_trees_equal(p_timm, params)
    back = conv.to_timm(params, TINY)
    assert set(back) == set(sd_timm)
    for k in back:
        np.testing.assert_array_equal(back[k], sd_timm[k], err_msg=k)
    p_rt, _, _ = conv.from_timm(back, TINY)
    assert_trees_equal(p_rt, params)
    # transforms really transpose: torch conv (out, in, kh, kw), linear (out, in)
    assert sd_timm["stem.0.weight"].shape == (8, 3, 4, 4)
    np.testing.assert_array_equal(conv_to_flax(sd_timm["stem.0.weight"]),
                                  params["stem_conv"]["kernel"])
    np.testing.assert_array_equal(linear_t(sd_timm["stages.2.blocks.1.mlp.fc1.weight"]),
                                  params["stages_2"]["blocks"]["fc1"]["kernel"][1])


def test_timm_open_clip_and_fb_layouts_and_inferred_config(tiny):
    params = tiny[0]
    sd_timm = conv.to_timm(params, TINY)
    # timm classifier: ignored by name
    with_fc = {**sd_timm, "head.fc.weight": np.zeros((10, 32), np.float32),
               "head.fc.bias": np.zeros(10, np.float32)}
    p, cfg, r = conv.from_timm(with_fc)  # config inferred from shapes
    assert r.ignored == ["head.fc.bias", "head.fc.weight"] and not r.unexpected
    assert (cfg.depths, cfg.dims, cfg.eps, cfg.final_eps) == ((1, 1, 2, 1), (8, 16, 24, 32),
                                                             1e-6, 1e-6)
    assert_trees_equal(p, params)
    # open_clip: trunk under visual.trunk., CLIP projection and text tower ignored
    oc = {"visual.trunk." + k: v for k, v in sd_timm.items()}
    oc.update({"visual.head.proj.weight": np.zeros((16, 32), np.float32),
               "logit_scale": np.zeros((), np.float32),
               "token_embedding.weight": np.zeros((5, 16), np.float32)})
    p, _, r = conv.from_timm(oc, TINY)
    assert r.ignored == ["logit_scale", "token_embedding.weight", "visual.head.proj.weight"]
    assert not r.unexpected and not r.missing
    assert_trees_equal(p, params)
    back = conv.to_timm(params, TINY, prefix="visual.trunk.")
    assert set(back) == {k for k in oc if k.startswith("visual.trunk.")}
    # facebookresearch original keys
    fb = {timm_to_fb_key(k): v for k, v in with_fc.items()}
    assert "downsample_layers.0.0.weight" in fb and "stages.2.1.pwconv1.weight" in fb
    p, _, r = conv.from_timm(fb, TINY)
    assert r.ignored == ["head.fc.bias", "head.fc.weight"] and not r.unexpected
    assert_trees_equal(p, params)


def test_errors_name_the_key(tiny):
    sd = conv.to_timm(tiny[0], TINY)
    bad = dict(sd)
    bad["stages.2.blocks.1.mlp.fc2.weight"] = np.zeros((24, 95), np.float32)
    with pytest.raises(ConversionError, match=r"stages\.2\.blocks\.1\.mlp\.fc2\.weight"):
        conv.from_timm(bad, TINY)
    missing = {k: v for k, v in sd.items() if k != "stages.1.downsample.0.bias"}
    with pytest.raises(ConversionError, match=r"stages\.1\.downsample\.0\.bias"):
        conv.from_timm(missing, TINY)
    p, _, r = conv.from_timm({**sd, "stages.0.blocks.0.extra": np.zeros(3)}, TINY)
    assert r.unexpected == ["stages.0.blocks.0.extra"]
    with pytest.raises(ConversionError, match="eps"):
        conv.to_hf(tiny[0], TINY.replace(eps=1e-5))


def test_infer_timm_config_of_xxlarge_picks_eps_1e5():
    xxl = convnext_config("convnext_xxlarge")
    tmpl = param_template(xxl)
    sd = {}
    for r in conv.convnext_rules(xxl, "timm"):
        node = tmpl
        for k in r.path:
            node = node[k]
        shape = node.shape[1:] if r.layer is not None else node.shape
        if r.to_flax is conv_to_flax:
            shape = (shape[3], shape[2], shape[0], shape[1])
        elif r.to_flax is linear_t:
            shape = shape[::-1]
        sd[r.torch_key] = np.broadcast_to(np.float32(0), shape)  # no memory
    cfg = conv.infer_timm_config(sd)
    assert cfg == xxl
    assert conv.infer_timm_config(sd, eps=1e-6).eps == 1e-6


def test_convert_cli_hf_and_timm(tiny, tmp_path):
    params = tiny[0]
    hf_dir = str(tmp_path / "hf")
    conv.to_hf(params, TINY, out_dir=hf_dir)
    report = conv.convert_cli(hf_dir, str(tmp_path / "out_hf"), layout="hf")
    assert not report.missing and not report.unexpected and report.converted
    restored, meta = load_params(str(tmp_path / "out_hf"))
    assert meta["model"] == "convnext" and meta["layout"] == "hf"
    assert ConvNeXtConfig.from_dict(meta["config"]) == TINY
    assert_trees_equal(restored, params)

    from refjax.convert.common import save_safetensors

    f = str(tmp_path / "open_clip_model.safetensors")
    save_safetensors(f, conv.to_timm(params, TINY, prefix="visual.trunk."))
    report = conv.convert_cli(str(tmp_path), str(tmp_path / "out_timm"), layout="timm",
                              eps=1e-5, scan=False)
    assert not report.missing and not report.unexpected
    restored, meta = load_params(str(tmp_path / "out_timm"))
    cfg = ConvNeXtConfig.from_dict(meta["config"])
    assert meta["layout"] == "timm" and meta["source"] == f
    assert cfg == TINY.replace(eps=1e-5, final_eps=1e-5, scan=False)
    assert_trees_equal(conv.from_hf(conv.to_hf(restored, cfg.replace(eps=1e-6)), TINY)[0],
                       params)
