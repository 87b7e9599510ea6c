"""refjax ViT towers without torch: parameter counts of the real RAS towers (eval_shape), logical
axes and fsdp_tp sharding on the 8-device fake mesh, scan == unscanned, remat, features, the
antialiased bicubic kernel, and the converter's key handling (prefixes, ignored / unknown /
missing keys, legacy DINOv2 layout, round trips, the CLI checkpoint)."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from refjax import parallel
from refjax.convert import vit as conv
from refjax.convert.common import ConversionError
from refjax.models import vit

# transformers 5.23 counts (meta device; spec/ras.md section 14)
REAL_COUNTS = {
    "clip-vit-large-patch14-336": 303_507_456,
    "siglip-so400m-patch14-384": 428_225_600,
    "dinov2-large": 304_368_640,
}
TINY = dict(hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4, image_size=32,
            patch_size=8)
TINY_CONFIGS = {
    "clip": vit.ViTConfig(family="clip", **TINY),
    "siglip": vit.ViTConfig(family="siglip", hidden_act="gelu_pytorch_tanh",
                            image_mean=vit.HALF, image_std=vit.HALF, **TINY),
    "dinov2": vit.ViTConfig(family="dinov2", hidden_act="gelu", use_swiglu_ffn=True,
                            qkv_bias=False, **TINY),
    "dinov2_registers": vit.ViTConfig(family="dinov2_registers", hidden_act="gelu",
                                      num_register_tokens=2, **TINY),
}


def _random_params(cfg, seed=0):
    """Noise of the parameters' shapes (norm scales around 1); no init run needed."""
    params = nn.unbox(vit.abstract_params(cfg))
    rng = np.random.default_rng(seed)
    flat = jax.tree_util.tree_flatten_with_path(params)
    leaves = []
    for path, x in flat[0]:
        noise = rng.standard_normal(x.shape).astype(np.float32)
        name = parallel.path_str(path)
        if name.endswith(("scale", "lambda1")):
            leaves.append(1.0 + 0.1 * noise)
        else:
            leaves.append(0.1 * noise)
    return jax.tree_util.tree_unflatten(flat[1], leaves)


@pytest.mark.parametrize("preset", sorted(REAL_COUNTS))
def test_real_parameter_counts(preset):
    for scan in (True, False):
        cfg = vit.vit_config(preset, scan=scan)
        assert vit.param_count(vit.abstract_params(cfg)) == REAL_COUNTS[preset]


@pytest.mark.parametrize("preset", sorted(REAL_COUNTS))
def test_every_param_has_logical_axes(preset):
    abstract = vit.abstract_params(vit.vit_config(preset))
    leaves = jax.tree_util.tree_flatten_with_path(
        abstract, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))[0]
    assert leaves
    for path, x in leaves:
        name = parallel.path_str(path)
        assert isinstance(x, nn.LogicallyPartitioned), f"{name} has no logical axes"
        assert len(x.names) == x.value.ndim, (name, x.names, x.value.shape)
        known = set(parallel.LOGICAL_AXES) | {"norm", None}
        assert set(x.names) <= known, (name, x.names)


@pytest.mark.parametrize("preset", sorted(REAL_COUNTS))
def test_fsdp_tp_shards_every_large_parameter(preset):
    cfg = vit.vit_config(preset)
    mesh = parallel.create_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    p = cfg.patch_size
    init = lambda rng: vit.vision_tower(cfg).init(rng, jnp.zeros((1, p, p, 3)))  # noqa: E731

    def placed(rules):
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            abstract = jax.eval_shape(init, jax.random.key(0))
        shardings = parallel.logical_shardings(abstract, mesh, rules)
        shapes = parallel.strip_boxes(abstract)
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            shapes, shardings)["params"]

    parallel.assert_params_sharded(placed(parallel.rules_for("fsdp_tp")))
    with pytest.raises(ValueError, match="fully replicated"):  # the check can fail
        parallel.assert_params_sharded(placed(parallel.rules_for("dp")))


def test_sharded_forward_equals_single_device():
    """SigLIP (with its pooling head) under fsdp_tp on the fake mesh == one device."""
    cfg = TINY_CONFIGS["siglip"]
    mesh = parallel.create_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    rules = parallel.rules_for("fsdp_tp")
    model = vit.vision_tower(cfg)
    host = _random_params(cfg)
    x = np.random.default_rng(4).standard_normal((4, 32, 32, 3)).astype(np.float32)
    fwd = jax.jit(lambda p, x: model.apply({"params": p}, x))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        abstract = jax.eval_shape(
            lambda: model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3))))["params"]
        shardings = parallel.logical_shardings(abstract, mesh, rules)
        params = jax.device_put(host, shardings)
        assert params["encoder"]["layers"]["mlp"]["fc1"]["kernel"].sharding.spec == P(
            None, "fsdp", "tensor")
        out, aux = fwd(params, parallel.host_batch_to_global(x, mesh))
    cpu0 = jax.devices()[0]
    ref, ref_aux = fwd(jax.device_put(host, cpu0), jax.device_put(x, cpu0))
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(aux["pooler_output"]),
                               np.asarray(ref_aux["pooler_output"]), atol=2e-5, rtol=0)


def _forward(cfg, params, x, hidden=True):
    """Jitted forward (op-by-op Linen would be far slower on CPU)."""
    fn = jax.jit(lambda p, x: vit.vision_tower(cfg).apply(
        {"params": p}, x, output_hidden_states=hidden))
    return fn(params, x)


def _to_unscanned(cfg, params):
    cfg_d, sd = conv.to_hf(params, cfg)
    flat, flat_cfg, report = conv.from_hf((cfg_d, sd), scan=False, select_layer=cfg.select_layer,
                                          image_mean=cfg.image_mean, image_std=cfg.image_std)
    assert not report.missing and not report.unexpected
    assert flat_cfg == cfg.replace(scan=False)
    assert f"layers_{cfg.num_layers - 1}" in flat["encoder"] and "layers" not in flat["encoder"]
    return flat, flat_cfg


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_scan_equals_unscanned(family):
    cfg = TINY_CONFIGS[family]
    params = _random_params(cfg)
    flat, flat_cfg = _to_unscanned(cfg, params)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 40, 27, 3)), jnp.float32)
    out_s, aux_s = _forward(cfg, params, x)
    out_u, aux_u = _forward(flat_cfg, flat, x)
    assert aux_s["grid"] == aux_u["grid"] == (5, 3)
    assert aux_s["features"].shape == (2, 5, 3, cfg.hidden_size)
    np.testing.assert_allclose(out_u, out_s, atol=1e-5, rtol=0)
    np.testing.assert_allclose(aux_u["features"], aux_s["features"], atol=1e-5, rtol=0)
    assert len(aux_s["hidden_states"]) == len(aux_u["hidden_states"]) == cfg.num_layers + 1
    for a, b in zip(aux_u["hidden_states"], aux_s["hidden_states"]):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    if "pooler_output" in aux_s:
        np.testing.assert_allclose(aux_u["pooler_output"], aux_s["pooler_output"], atol=1e-5)


def test_remat_policy_keeps_outputs_and_gradients():
    cfg = TINY_CONFIGS["dinov2"]
    params = _random_params(cfg)
    x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 32, 32, 3)), jnp.float32)

    def value_and_grad(c):
        def loss(p):
            return jnp.sum(vit.vision_tower(c).apply({"params": p}, x)[1]["features"] ** 2)

        return jax.jit(jax.value_and_grad(loss))(params)

    v, g = value_and_grad(cfg)
    v_r, g_r = value_and_grad(cfg.replace(remat_policy="dots_with_no_batch_dims_saveable"))
    np.testing.assert_allclose(v_r, v, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_r)):
        np.testing.assert_allclose(b, a, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="remat_policy"):
        cfg.replace(remat_policy="sometimes")


@pytest.mark.parametrize("select_layer", [-2, 0])
def test_clip_features_follow_select_layer(select_layer):
    """Scanned, without hidden states (the scan-carry path) == hidden_states[select_layer]
    of the unscanned model."""
    cfg = TINY_CONFIGS["clip"].replace(select_layer=select_layer)
    params = _random_params(cfg)
    flat, flat_cfg = _to_unscanned(cfg, params)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 32, 32, 3)), jnp.float32)
    _, aux = _forward(cfg, params, x, hidden=False)
    assert "hidden_states" not in aux
    _, aux_u = _forward(flat_cfg, flat, x)
    want = np.asarray(aux_u["hidden_states"][select_layer][:, 1:]).reshape(2, 4, 4, 32)
    np.testing.assert_allclose(aux["features"], want, atol=1e-5, rtol=0)
    np.testing.assert_allclose(aux_u["features"], want, atol=0, rtol=0)


def test_bfloat16_compute_keeps_float32_params_and_close_outputs():
    cfg = TINY_CONFIGS["dinov2_registers"]
    params = _random_params(cfg)
    x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 32, 32, 3)), jnp.float32)
    out32, _ = _forward(cfg, params, x, hidden=False)
    cfg16 = cfg.replace(dtype="bfloat16")
    out16, aux16 = _forward(cfg16, params, x, hidden=False)
    abstract = nn.unbox(vit.abstract_params(cfg16))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(abstract))
    assert out16.dtype == jnp.float32  # final LayerNorm in float32
    err = float(jnp.max(jnp.abs(out16 - out32)))
    assert 0 < err < 0.1, err


def test_antialiased_bicubic_matrix_properties():
    for n_in, n_out in [(4, 2), (37, 24), (5, 7), (3, 1)]:
        m = vit.bicubic_aa_matrix(n_in, n_out)
        np.testing.assert_allclose(m.sum(1), 1.0, atol=1e-12)
    np.testing.assert_allclose(vit.bicubic_aa_matrix(6, 6), np.eye(6), atol=1e-12)
    # it is not the plain (A = -0.75, clamped) kernel, up or down
    from refjax.models.layers import bicubic_matrix

    for n_in, n_out in [(4, 7), (8, 3)]:
        assert np.abs(vit.bicubic_aa_matrix(n_in, n_out) - bicubic_matrix(n_in, n_out)).max() > 1e-2


def test_config_from_hf_and_back():
    for family, cfg in TINY_CONFIGS.items():
        d = cfg.to_hf()
        back = vit.ViTConfig.from_hf(d, image_mean=cfg.image_mean, image_std=cfg.image_std)
        assert back == cfg, family
    # a hub two-tower config.json: the vision_config is used, missing fields take HF defaults
    two_tower = {"model_type": "clip", "projection_dim": 768,
                 "vision_config": {"hidden_size": 1024, "intermediate_size": 4096,
                                   "num_hidden_layers": 24, "num_attention_heads": 16,
                                   "image_size": 336, "patch_size": 14, "projection_dim": 768}}
    assert vit.ViTConfig.from_hf(two_tower) == vit.vit_config("clip-vit-large-patch14-336")
    dino = {"model_type": "dinov2", "hidden_size": 1024, "num_hidden_layers": 24,
            "num_attention_heads": 16, "image_size": 518, "patch_size": 14, "mlp_ratio": 4}
    assert vit.ViTConfig.from_hf(dino) == vit.vit_config("dinov2-large")
    with pytest.raises(ValueError, match="dinov2"):
        vit.ViTConfig.from_hf(dino, family="clip")
    with pytest.raises(ValueError, match="model_type"):
        vit.ViTConfig.from_hf({"model_type": "bert"})


def test_two_tower_keys_ignored_unknown_reported_missing_and_shape_errors():
    cfg = TINY_CONFIGS["clip"]
    params = _random_params(cfg)
    config_dict, sd = conv.to_hf(params, cfg)
    hub = {"vision_model." + k: v for k, v in sd.items()}
    hub.update({
        "text_model.embeddings.token_embedding.weight": np.zeros((10, 4), np.float32),
        "text_model.embeddings.position_ids": np.zeros((1, 4), np.int64),
        "vision_model.embeddings.position_ids": np.zeros((1, 17), np.int64),
        "logit_scale": np.zeros((), np.float32),
        "text_projection.weight": np.zeros((8, 4), np.float32),
        "visual_projection.weight": np.zeros((8, 32), np.float32),
        "vision_model.encoder.layers.0.extra.weight": np.zeros((2,), np.float32),
    })
    two_tower_cfg = {"model_type": "clip", "vision_config": config_dict}
    got, got_cfg, report = conv.from_hf((two_tower_cfg, hub))
    assert got_cfg == cfg.replace()
    assert report.unexpected == ["vision_model.encoder.layers.0.extra.weight"]
    assert report.ignored == sorted([
        "text_model.embeddings.token_embedding.weight", "text_model.embeddings.position_ids",
        "vision_model.embeddings.position_ids", "logit_scale", "text_projection.weight",
        "visual_projection.weight"])
    assert not report.missing
    jax.tree.map(np.testing.assert_array_equal, got, jax.tree.map(np.asarray, params))
    # bfloat16 files are read as float32
    import ml_dtypes

    bf = {k: v.astype(ml_dtypes.bfloat16) for k, v in sd.items()}
    got_bf, _, _ = conv.from_hf((config_dict, bf))
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(got_bf))

    missing = dict(sd)
    del missing["encoder.layers.1.mlp.fc2.bias"]
    with pytest.raises(ConversionError, match=r"encoder\.layers\.1\.mlp\.fc2\.bias"):
        conv.from_hf((config_dict, missing))
    _, _, rep = conv.from_hf((config_dict, missing), strict=False)
    assert rep.missing == ["encoder.layers.1.mlp.fc2.bias"]
    bad = dict(sd)
    bad["embeddings.position_embedding.weight"] = np.zeros((10, 32), np.float32)
    with pytest.raises(ConversionError, match=r"embeddings\.position_embedding\.weight"):
        conv.from_hf((config_dict, bad))
    clash = dict(hub, **{"embeddings.class_embedding": sd["embeddings.class_embedding"]})
    with pytest.raises(ConversionError, match="class_embedding"):
        conv.from_hf((two_tower_cfg, clash))


def test_siglip_two_tower_and_dinov2_legacy_layout():
    cfg = TINY_CONFIGS["siglip"]
    params = _random_params(cfg)
    config_dict, sd = conv.to_hf(params, cfg)
    hub = {"vision_model." + k: v for k, v in sd.items()}
    hub.update({"logit_scale": np.zeros((1,), np.float32),
                "logit_bias": np.zeros((1,), np.float32),
                "text_model.head.weight": np.zeros((4, 4), np.float32)})
    got, _, report = conv.from_hf(({"model_type": "siglip", "vision_config": config_dict}, hub))
    assert report.ignored == ["logit_bias", "logit_scale", "text_model.head.weight"]
    assert not report.unexpected
    jax.tree.map(np.testing.assert_array_equal, got, jax.tree.map(np.asarray, params))

    # DINOv2 as on the hub: legacy attention names and fused SwiGLU input
    cfg = TINY_CONFIGS["dinov2"]
    params = _random_params(cfg)
    config_dict, sd = conv.to_hf(params, cfg)
    legacy = {"classifier.weight": np.zeros((3, 64), np.float32)}
    for k, v in sd.items():
        if ".mlp.up_proj." in k:
            continue
        if ".mlp.gate_proj." in k:
            up = sd[k.replace("gate_proj", "up_proj")]
            legacy["dinov2." + k.replace("gate_proj", "weights_in")] = np.concatenate([v, up], 0)
            continue
        for new_name, old_name in (("attention.q_proj", "attention.attention.query"),
                                   ("attention.k_proj", "attention.attention.key"),
                                   ("attention.v_proj", "attention.attention.value"),
                                   ("attention.o_proj", "attention.output.dense"),
                                   ("mlp.down_proj", "mlp.weights_out")):
            k = k.replace(f".{new_name}.", f".{old_name}.")
        legacy["dinov2." + k] = v
    assert any("attention.attention.query" in k for k in legacy)
    got, _, report = conv.from_hf((config_dict, legacy))
    assert report.ignored == ["classifier.weight"] and not report.unexpected
    jax.tree.map(np.testing.assert_array_equal, got, jax.tree.map(np.asarray, params))


def test_convert_cli_writes_a_loadable_checkpoint(tmp_path):
    from refjax.convert.hf import write_checkpoint

    cfg = TINY_CONFIGS["dinov2_registers"]
    params = _random_params(cfg)
    config_dict, sd = conv.to_hf(params, cfg)
    hf_dir = tmp_path / "hf"
    write_checkpoint(str(hf_dir), config_dict, sd)
    (hf_dir / "preprocessor_config.json").write_text(
        '{"image_mean": [0.1, 0.2, 0.3], "image_std": [0.4, 0.5, 0.6]}')
    report = conv.convert_cli("dinov2_registers", str(hf_dir), str(tmp_path / "out"))
    assert not report.missing and not report.unexpected
    loaded, loaded_cfg = conv.load_converted(str(tmp_path / "out"))
    assert loaded_cfg == dataclasses.replace(cfg, image_mean=(0.1, 0.2, 0.3),
                                             image_std=(0.4, 0.5, 0.6))
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, loaded),
                 jax.tree.map(np.asarray, params))
    with pytest.raises(ValueError, match="not clip"):
        conv.convert_cli("clip", str(hf_dir), str(tmp_path / "out2"))
