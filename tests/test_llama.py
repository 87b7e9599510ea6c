"""refjax ``Llama`` without torch: config parsing, parameter counts, logical axes and sharding,
sharded == single-device forward, bf16 compute, causality, KV-cache semantics, the converter's
key handling and checkpoint round trips."""

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import linen as nn

from refjax import parallel
from refjax.convert import hf
from refjax.convert import llama as conv
from refjax.convert.common import ConversionError
from refjax.models.llama import (
    Llama,
    LlamaConfig,
    gqa_attention,
    init_cache,
    llama_config,
    param_count,
    param_template,
    positions_from_mask,
)

TINY = llama_config("tiny")  # vocab 256, d 64, 2 layers, 4 heads / 2 kv heads, mlp 128
ALLOWED_AXES = {"embed", "vocab", "heads", "kv", "mlp", "layers", "norm"}

# lmsys/vicuna-13b-v1.5 config.json (transformers 4.31 writes rope_scaling, no rope_theta)
VICUNA_13B_JSON = {
    "architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2,
    "hidden_act": "silu", "hidden_size": 5120, "initializer_range": 0.02,
    "intermediate_size": 13824, "max_length": 4096, "max_position_embeddings": 4096,
    "model_type": "llama", "num_attention_heads": 40, "num_hidden_layers": 40,
    "num_key_value_heads": 40, "pad_token_id": 0, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": None, "tie_word_embeddings": False, "torch_dtype": "float16",
    "transformers_version": "4.32.0.dev0", "use_cache": True, "vocab_size": 32000,
}


@functools.cache
def _params(cfg: LlamaConfig, seed: int = 0):
    """Random numpy parameters in the model's tree (no jitted init: it costs seconds); norm
    scales away from 1 so that a dropped scale would show."""
    rng = np.random.default_rng(seed)

    def one(path, x):
        if parallel.path_str(path).endswith("scale"):
            return (1 + 0.1 * rng.standard_normal(x.shape)).astype(np.float32)
        return (0.05 * rng.standard_normal(x.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(one, param_template(cfg))


@functools.cache
def _fwd(cfg: LlamaConfig, **static):
    model = Llama(cfg)
    return jax.jit(lambda p, ids, mask, pos: model.apply({"params": p}, ids, mask, pos,
                                                         **static))


def _ids(b, t, seed=0, vocab=TINY.vocab_size):
    return np.random.default_rng(seed).integers(0, vocab, (b, t)).astype(np.int32)


# ----------------------------------------------------------------------------- config


def test_vicuna_config_json_gives_the_preset():
    assert LlamaConfig.from_hf(VICUNA_13B_JSON) == llama_config("vicuna-13b-v1.5")
    cfg = llama_config("vicuna-13b-v1.5")
    assert (cfg.head_dim, cfg.num_key_value_heads, cfg.rope_type) == (128, 40, "default")
    assert LlamaConfig.from_hf(cfg.to_hf()) == cfg


@pytest.mark.parametrize("v4,v5", [
    ({"rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 2.0}},
     {"rope_parameters": {"rope_type": "linear", "rope_theta": 5e5, "factor": 2.0}}),
    ({"rope_theta": 1e4, "rope_scaling": {"type": "dynamic", "factor": 3.0}},
     {"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 3.0}}),
    ({"rope_theta": 5e5, "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 8192}},
     {"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0,
                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 8192}}),
])
def test_rope_settings_read_from_4x_and_5x_configs(v4, v5):
    base = {"hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 128}
    a, b = LlamaConfig.from_hf({**base, **v4}), LlamaConfig.from_hf({**base, **v5})
    assert a == b and a.rope_type != "default" and a.rope_factor > 1
    assert LlamaConfig.from_hf(a.to_hf()) == a


def test_config_errors_name_the_problem():
    with pytest.raises(ValueError, match="hidden_act"):
        LlamaConfig.from_hf({"hidden_act": "gelu"})
    with pytest.raises(ValueError, match="yarn"):
        LlamaConfig.from_hf({"rope_parameters": {"rope_type": "yarn", "factor": 2.0}})
    with pytest.raises(ValueError, match="num_key_value_heads"):
        LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=3)
    with pytest.raises(ValueError, match="remat_policy"):
        TINY.replace(remat_policy="sometimes")


# ----------------------------------------------------------------------------- shapes


def test_vicuna_parameter_counts():
    assert param_count(llama_config("vicuna-13b-v1.5")) == 13_015_864_320
    assert param_count(llama_config("vicuna-7b-v1.5")) == 6_738_415_616
    # tying drops exactly the LM head
    tied = llama_config("vicuna-7b-v1.5", tie_word_embeddings=True)
    assert param_count(tied) == 6_738_415_616 - 32000 * 4096


def _abstract_13b():
    cfg = llama_config("vicuna-13b-v1.5")
    return jax.eval_shape(Llama(cfg).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))


def test_every_parameter_has_logical_axes():
    abstract = _abstract_13b()
    boxes = jax.tree.leaves(abstract, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert boxes and all(isinstance(b, nn.LogicallyPartitioned) for b in boxes)
    for box in boxes:
        assert len(box.names) == len(box.value.shape)
        assert set(box.names) <= ALLOWED_AXES, box.names
    params = abstract["params"]
    assert params["layers"]["self_attn"]["q_proj"]["kernel"].names == (
        "layers", "embed", "heads", "kv")
    assert params["layers"]["mlp"]["down_proj"]["kernel"].names == ("layers", "mlp", "embed")
    assert params["lm_head"]["kernel"].names == ("embed", "vocab")
    assert params["embed_tokens"]["embedding"].names == ("vocab", "embed")


def _placed(abstract, mesh, rules):
    shardings = parallel.logical_shardings(abstract, mesh, rules)
    shapes = parallel.strip_boxes(abstract)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, shardings)


def test_13b_fsdp_tp_leaves_no_large_parameter_replicated():
    mesh = parallel.create_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    rules = parallel.rules_for("fsdp_tp")
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        abstract = _abstract_13b()
    placed = _placed(abstract, mesh, rules)
    parallel.assert_params_sharded(placed["params"])
    q = placed["params"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    # and the check does fail where the layout replicates
    with pytest.raises(ValueError, match="embed_tokens/embedding"):
        parallel.assert_params_sharded(_placed(abstract, mesh, parallel.rules_for("dp"))["params"])


def _prefill_and_step(cfg):
    model = Llama(cfg)

    def fwd(p, ids, mask):
        logits, aux = model.apply({"params": p}, ids, mask, cache=init_cache(cfg, 4, 10))
        step, _ = model.apply({"params": p}, ids[:, :1], mask[:, :1], jnp.full((4, 1), 8),
                              cache=aux["cache"])
        return logits, step

    return jax.jit(fwd)


_SHARD_IDS = _ids(4, 8, seed=3)
_SHARD_MASK = np.ones((4, 8), np.int32)
_SHARD_MASK[1, 6:] = 0


@functools.cache
def _single_device_reference():
    cpu0 = jax.devices()[0]
    args = jax.device_put((_params(TINY), _SHARD_IDS, _SHARD_MASK), cpu0)
    return jax.tree.map(np.asarray, _prefill_and_step(TINY)(*args))


@pytest.mark.parametrize("layout", ["dp", "fsdp", "fsdp_tp"])
def test_sharded_forward_and_decode_equal_single_device(layout):
    """Parameters placed by the logical rules on the 2x2x2 mesh; a prefill into the KV cache
    plus one decode step equal the single-device result."""
    cfg = TINY
    mesh = parallel.create_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    rules = parallel.rules_for(layout)
    host_params = _params(cfg)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        abstract = jax.eval_shape(Llama(cfg).init, jax.random.key(0),
                                  jnp.zeros((1, 4), jnp.int32))
        shardings = parallel.logical_shardings(abstract, mesh, rules)["params"]
        params = jax.device_put(host_params, shardings)
        if layout != "dp":
            parallel.assert_params_sharded(params, min_bytes=16 << 10)
        if layout == "fsdp_tp":
            spec = params["layers"]["mlp"]["gate_proj"]["kernel"].sharding.spec
            assert spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
        batch = parallel.host_batch_to_global((_SHARD_IDS, _SHARD_MASK), mesh)
        sharded = _prefill_and_step(cfg)(params, *batch)
    for a, b in zip(sharded, _single_device_reference()):
        err = float(np.abs(np.asarray(a) - b).max())
        print(f"[llama sharding] {layout}: max |diff| = {err:.3g}")
        assert err <= 1e-5


# ----------------------------------------------------------------------------- numerics


def test_bf16_compute_keeps_float32_params_logits_and_hidden_states():
    cfg = TINY.replace(dtype="bfloat16")
    params = _params(TINY)
    ids = _ids(2, 9, seed=4)
    logits, aux = _fwd(cfg, output_hidden_states=True)(params, ids, None, None)
    ref, _ = _fwd(TINY, output_hidden_states=True)(params, ids, None, None)
    assert logits.dtype == jnp.float32 and aux["hidden_states"].dtype == jnp.float32
    assert aux["all_hidden_states"].dtype == jnp.float32
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    logits, ref = np.asarray(logits), np.asarray(ref)
    assert np.isfinite(logits).all()
    err = np.abs(logits - ref).max()
    assert 0 < err <= 0.05 * np.abs(ref).max(), err  # bf16 rounding, not a different model


def test_gqa_attention_implementations_agree_with_repeat_kv_reference():
    rng = np.random.default_rng(11)
    q = rng.standard_normal((2, 5, 4, 8)).astype(np.float32)
    k = rng.standard_normal((2, 7, 2, 8)).astype(np.float32)
    v = rng.standard_normal((2, 7, 2, 8)).astype(np.float32)
    mask = rng.random((2, 5, 7)) > 0.3
    mask[0, 1] = False  # a fully masked row stays finite
    kr, vr = np.repeat(k, 2, axis=2), np.repeat(v, 2, axis=2)  # HF repeat_kv: head h -> h // 2
    logits = np.einsum("bqhd,bkhd->bhqk", q, kr) * 0.3
    logits = np.where(mask[:, None], logits, -1e30)
    probs = np.exp(logits - logits.max(-1, keepdims=True)) * mask[:, None]
    probs = probs / np.maximum(probs.sum(-1, keepdims=True), 1e-30)
    ref = np.einsum("bhqk,bkhd->bqhd", probs, vr)
    for impl in ("einsum", "xla"):
        out = np.asarray(gqa_attention(q, k, v, mask, scale=0.3, implementation=impl))
        assert np.isfinite(out).all()
        keep = mask.any(-1)
        np.testing.assert_allclose(out[keep], ref[keep], atol=1e-5, rtol=0)


def test_causality():
    params = _params(TINY)
    ids = _ids(2, 9, seed=5)
    changed = ids.copy()
    changed[:, 6] = (changed[:, 6] + 1) % TINY.vocab_size
    f = _fwd(TINY, output_hidden_states=True)
    (a, aux_a), (b, aux_b) = f(params, ids, None, None), f(params, changed, None, None)
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_array_equal(a[:, :6], b[:, :6])
    np.testing.assert_array_equal(np.asarray(aux_a["all_hidden_states"])[:, :, :6],
                                  np.asarray(aux_b["all_hidden_states"])[:, :, :6])
    assert np.abs(a[:, 6:] - b[:, 6:]).min(axis=-1).max() > 0


def test_inputs_embeds_and_hidden_states_only_paths():
    params = _params(TINY)
    model = Llama(TINY)
    ids = _ids(2, 9, seed=6)
    logits, aux = _fwd(TINY)(params, ids, None, None)
    emb = jax.jit(lambda p, i: model.apply({"params": p}, i, method=Llama.embed))(params, ids)
    assert emb.shape == (2, 9, TINY.hidden_size) and emb.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(emb), params["embed_tokens"]["embedding"][ids])
    from_embeds = jax.jit(lambda p, e: (
        model.apply({"params": p}, inputs_embeds=e),
        model.apply({"params": p}, inputs_embeds=e, return_logits=False)))
    (l2, _), (none, aux3) = from_embeds(params, emb)
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(l2))
    assert none is None
    np.testing.assert_array_equal(np.asarray(aux["hidden_states"]),
                                  np.asarray(aux3["hidden_states"]))
    with pytest.raises(ValueError, match="exactly one"):
        jax.eval_shape(lambda p: model.apply({"params": p}, ids, inputs_embeds=emb), params)
    # init through the embeddings path without logits still creates every parameter
    v = jax.eval_shape(lambda: Llama(TINY).init(
        jax.random.key(0), inputs_embeds=jnp.zeros((1, 2, TINY.hidden_size)),
        return_logits=False))
    assert jax.tree.structure(nn.unbox(v)["params"]) == jax.tree.structure(params)


@pytest.mark.parametrize("policy", ["none", "full", "dots_saveable"])
def test_remat_policy_wraps_each_layer(policy):
    """The named policy reaches jax.checkpoint around the scanned layer (traced only)."""
    cfg = TINY.replace(remat_policy=policy)
    jaxpr = jax.make_jaxpr(lambda p: Llama(cfg).apply({"params": p}, _ids(1, 4)))(_params(TINY))
    text = str(jaxpr)
    assert ("checkpoint" in text or "remat" in text) == (policy != "none")
    if policy != "none":
        # jax 0.10 prints ``policy=DotsSaveable(...)``, jax 0.12 ``policy=<function
        # dots_saveable ...>``
        named = "policy=DotsSaveable" in text or "policy=<function dots_saveable" in text
        assert named == (policy == "dots_saveable")


# ----------------------------------------------------------------------------- KV cache


@functools.cache
def _step(cfg):
    model = Llama(cfg)
    return jax.jit(lambda p, i, m, q, c: model.apply({"params": p}, i, m, q, cache=c))


@pytest.mark.parametrize("scan", [True, False])
def test_cache_prefill_then_steps_equals_full_forward(scan):
    cfg = TINY.replace(scan=scan)
    params = _params(TINY) if scan else conv.from_tensors(
        conv.to_hf(_params(TINY), TINY)[1], cfg)[0]
    ids = _ids(2, 9, seed=8)
    full, _ = _fwd(cfg)(params, ids, None, None)
    ones = np.ones((2, 9), np.int32)
    pos = np.broadcast_to(np.arange(9, dtype=np.int32), (2, 9))
    step = _step(cfg)
    cache = init_cache(cfg, 2, 12)
    assert cache["k"].shape == (cfg.num_hidden_layers, 2, 12, cfg.num_key_value_heads,
                                cfg.head_dim)
    out, aux = step(params, ids[:, :5], ones[:, :5], pos[:, :5], cache)
    outs = [out]
    for i in range(5, 9):
        out, aux = step(params, ids[:, i:i + 1], ones[:, :1], pos[:, i:i + 1], aux["cache"])
        outs.append(out)
    assert int(aux["cache"]["index"]) == 9
    assert np.asarray(aux["cache"]["mask"]).sum(axis=1).tolist() == [9, 9]
    cached = np.concatenate([np.asarray(o) for o in outs], axis=1)
    err = float(np.abs(cached - np.asarray(full)).max())
    print(f"[llama cache] scan={scan}: max |diff| = {err:.3g}")
    assert err <= 1e-5


def test_cache_right_padding_gap_equals_unpadded_row():
    """A right-padded prompt leaves masked slots before the next token; with per-row
    positions the continuation equals the unpadded row's full forward."""
    params = _params(TINY)
    ids = _ids(2, 5, seed=9)
    mask = np.ones((2, 5), np.int32)
    mask[0, 3:] = 0  # row 0 has 3 real tokens, row 1 five
    nxt = _ids(2, 1, seed=10)
    step = _step(TINY)
    logits, aux = step(params, ids, mask, positions_from_mask(mask), init_cache(TINY, 2, 12))
    out, aux = step(params, nxt, np.ones((2, 1), np.int32), mask.sum(axis=1, keepdims=True),
                    aux["cache"])
    assert np.asarray(aux["cache"]["mask"]).tolist()[0][:6] == [1, 1, 1, 0, 0, 1]
    row = np.concatenate([ids[:1, :3], nxt[:1]], axis=1)
    full, _ = jax.jit(lambda p, i: Llama(TINY).apply({"params": p}, i))(params, row)
    full = np.asarray(full)[0]
    err = max(np.abs(np.asarray(out)[0, 0] - full[-1]).max(),
              np.abs(np.asarray(logits)[0, :3] - full[:3]).max())
    print(f"[llama cache] right-pad gap vs unpadded: max |diff| = {err:.3g}")
    assert err <= 1e-5


def test_positions_from_mask():
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    np.testing.assert_array_equal(positions_from_mask(mask), [[0, 0, 0, 1, 2], [0, 1, 2, 0, 0]])
    np.testing.assert_array_equal(positions_from_mask(mask[:, -1:], np.array([3, 3])),
                                  [[3], [3]])


# ----------------------------------------------------------------------------- converter


def _export(tmp_path, cfg, params, name="hf", dtype=np.float32):
    d = str(tmp_path / name)
    conv.export_hf(params, cfg, d, dtype=dtype)
    return d


@pytest.mark.parametrize("tied", [False, True])
def test_hf_export_import_round_trip_is_exact(tmp_path, tied):
    cfg = TINY.replace(tie_word_embeddings=tied, attention_bias=tied, mlp_bias=tied)
    params = _params(cfg, seed=2)
    d = _export(tmp_path, cfg, params)
    config, sd = hf.read_checkpoint(d)
    assert ("lm_head.weight" in sd) == (not tied)
    assert config["tie_word_embeddings"] == tied and config["model_type"] == "llama"
    assert sd["model.layers.1.self_attn.k_proj.weight"].shape == (2 * 16, 64)
    back, cfg2, report = conv.from_hf(d)
    assert cfg2 == cfg and not report.missing and not report.unexpected
    jax.tree.map(np.testing.assert_array_equal, back, params)


def test_converter_reports_keys_by_name(tmp_path):
    cfg = TINY
    _, sd = conv.to_hf(_params(cfg), cfg)
    sd = dict(sd)
    sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(8, np.float32)
    sd["model.extra.weight"] = np.ones(3, np.float32)
    params, report = conv.from_tensors(sd, cfg)
    assert report.unexpected == ["model.extra.weight"]
    assert report.ignored == ["model.layers.0.self_attn.rotary_emb.inv_freq"]
    missing = {k: v for k, v in sd.items() if k != "model.layers.1.mlp.up_proj.weight"}
    with pytest.raises(ConversionError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        conv.from_tensors(missing, cfg)
    partial, rep = conv.from_tensors(missing, cfg, strict=False)
    assert rep.missing == ["model.layers.1.mlp.up_proj.weight"]
    assert "up_proj" not in partial["layers"]["mlp"] and "gate_proj" in partial["layers"]["mlp"]
    bad = dict(sd, **{"model.layers.0.mlp.down_proj.weight": np.ones((64, 100), np.float32)})
    with pytest.raises(ConversionError, match=r"model\.layers\.0\.mlp\.down_proj\.weight"):
        conv.from_tensors(bad, cfg)
    untied_missing = {k: v for k, v in sd.items() if k != "lm_head.weight"}
    with pytest.raises(ConversionError, match="lm_head.weight"):
        conv.from_tensors(untied_missing, cfg)
    # a tied model ignores a stored lm_head
    tied = cfg.replace(tie_word_embeddings=True)
    _, rep = conv.from_tensors(sd, tied)
    assert "lm_head.weight" in rep.ignored and rep.unexpected == ["model.extra.weight"]


def test_bf16_sharded_checkpoint_and_convert_cli(tmp_path):
    cfg = TINY
    params = _params(cfg)
    config, sd = conv.to_hf(params, cfg)
    src = str(tmp_path / "bf16")
    hf.write_checkpoint(src, config, {k: v.astype(ml_dtypes.bfloat16) for k, v in sd.items()},
                        max_shard_bytes=40_000)
    with open(f"{src}/{hf.INDEX}") as f:
        assert len(set(json.load(f)["weight_map"].values())) > 1
    out = str(tmp_path / "orbax")
    report = conv.convert_cli(src, out)
    assert not report.missing and not report.unexpected
    loaded, cfg2 = conv.load_converted(out)
    assert cfg2 == cfg
    expect = jax.tree.map(lambda x: np.asarray(x).astype(ml_dtypes.bfloat16).astype(np.float32),
                          params)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), loaded, expect)
    assert all(np.asarray(x).dtype == np.float32 for x in jax.tree.leaves(loaded))
    meta = json.load(open(f"{out}/refjax_meta.json"))
    # JSON has no tuples (lora_targets): compare with the config as JSON writes it
    want = json.loads(json.dumps(dataclasses.asdict(cfg)))
    assert meta["model"] == "llama" and meta["config"] == want
