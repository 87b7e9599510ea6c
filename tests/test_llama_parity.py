"""Parity of refjax ``Llama`` with transformers ``LlamaForCausalLM`` (random weights, fp32, CPU).

Every reference model is written with ``save_pretrained`` and read back through OUR converter
(``refjax.convert.llama.from_hf``).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from refjax.convert import llama as conv
from refjax.models.llama import (
    Llama,
    greedy_generate,
    init_cache,
    positions_from_mask,
    rope_inv_freq,
)
from tests.torch_util import require_torch

TOL = 1e-5

BASE = dict(vocab_size=192, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
            max_position_embeddings=128)
CONFIGS = {
    # GQA 4/2, untied, rope theta 1e4 (the Vicuna layout in miniature)
    "base": dict(BASE),
    # llama3 RoPE scaling (all three frequency bands at head_dim 32), tied embeddings,
    # attention/MLP biases and an explicit head_dim != hidden / heads
    "llama3_tied": dict(BASE, head_dim=32, tie_word_embeddings=True, attention_bias=True,
                        mlp_bias=True, rope_parameters={
                            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 16}),
    "linear": dict(BASE, num_hidden_layers=1, rope_parameters={
        "rope_type": "linear", "rope_theta": 10000.0, "factor": 2.5}),
    # max_position_embeddings 8 < sequence length: the NTK base is rescaled
    "dynamic": dict(BASE, num_hidden_layers=1, max_position_embeddings=8, rope_parameters={
        "rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}),
}
MEASURED: dict[str, float] = {}


def _report(name: str, err: float) -> None:
    MEASURED[name] = err
    print(f"[llama parity] {name}: max |diff| = {err:.3g}")


@functools.cache
def _pair(name: str, tmp_root: str):
    torch = require_torch()
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM

    torch.manual_seed(sorted(CONFIGS).index(name))
    hc = HFConfig(**CONFIGS[name], attn_implementation="eager")
    model = LlamaForCausalLM(hc).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.05 * torch.randn_like(p))
    directory = f"{tmp_root}/{name}"
    model.save_pretrained(directory)
    params, cfg, report = conv.from_hf(directory)
    assert not report.unexpected and not report.missing, report.summary()
    return torch, model, cfg, params, directory


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("llama_hf"))


@functools.cache
def _fwd(cfg, **static):
    """One jitted forward per config (memoised: tests share compilations)."""
    model = Llama(cfg)

    @jax.jit
    def f(params, ids, mask, pos):
        return model.apply({"params": params}, ids, mask, pos, **static)

    return f


@functools.cache
def _step(cfg):
    model = Llama(cfg)
    return jax.jit(lambda p, i, m, q, c: model.apply({"params": p}, i, m, q, cache=c))


B, T = 3, 11  # one (B, T) for the full-forward tests, so they share one compilation


def _hf(torch, model, ids, mask=None, pos=None, **kw):
    t = lambda a: None if a is None else torch.from_numpy(np.asarray(a, np.int64))
    with torch.no_grad():
        return model(input_ids=t(ids), attention_mask=t(mask), position_ids=t(pos), **kw)


def _ids(cfg, b, t, seed=0):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, (b, t)).astype(np.int32)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_and_hidden_states_no_padding(tmp_root, name):
    torch, hf_model, cfg, params, _ = _pair(name, tmp_root)
    ids = _ids(cfg, B, 13)  # 13 > 8 = max_position_embeddings of "dynamic"
    ref = _hf(torch, hf_model, ids, output_hidden_states=True)
    logits, aux = _fwd(cfg, output_hidden_states=True)(params, ids, None, None)
    err = float(np.abs(np.asarray(logits) - ref.logits.numpy()).max())
    _report(f"{name}/logits", err)
    assert logits.dtype == jnp.float32 and err <= TOL
    hs = np.stack([h.numpy() for h in ref.hidden_states])
    err = float(np.abs(np.asarray(aux["all_hidden_states"]) - hs).max())
    _report(f"{name}/all_hidden_states", err)
    assert err <= TOL
    last = np.asarray(aux["all_hidden_states"][-1])
    assert np.array_equal(np.asarray(aux["hidden_states"]), last)


@pytest.mark.parametrize("name", ["base", "llama3_tied"])
def test_rope_inverse_frequencies(tmp_root, name):
    _, hf_model, cfg, _, _ = _pair(name, tmp_root)
    ref = hf_model.model.rotary_emb.inv_freq.numpy()
    np.testing.assert_allclose(rope_inv_freq(cfg), ref, rtol=1e-6, atol=0)


def _padded_mask(b, t, side):
    mask = np.ones((b, t), np.int32)
    if side == "right":
        mask[0, t - 4:] = 0
        mask[2, t - 1:] = 0
    else:
        mask[0, :4] = 0
        mask[2, :1] = 0
    return mask


@pytest.mark.parametrize("name", ["base", "llama3_tied"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_logits_with_padding(tmp_root, name, side):
    """attention_mask with zeros: real positions match HF with its default positions (arange,
    what HF forward does) and with explicit HF-generate positions (cumsum - 1)."""
    torch, hf_model, cfg, params, _ = _pair(name, tmp_root)
    ids = _ids(cfg, B, T, seed=1)
    mask = _padded_mask(B, T, side)
    real = mask.astype(bool)
    f = _fwd(cfg)
    ref = _hf(torch, hf_model, ids, mask).logits.numpy()
    arange = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T))  # = positions=None
    logits, _ = f(params, ids, mask, arange)
    err = float(np.abs(np.asarray(logits)[real] - ref[real]).max())
    _report(f"{name}/{side}_pad/default_positions", err)
    assert err <= TOL
    pos = np.asarray(positions_from_mask(mask))
    ref = _hf(torch, hf_model, ids, mask, pos).logits.numpy()
    logits, _ = f(params, ids, mask, pos)
    err = float(np.abs(np.asarray(logits)[real] - ref[real]).max())
    _report(f"{name}/{side}_pad/mask_positions", err)
    assert err <= TOL


def test_inputs_embeds_path_matches_hf(tmp_root):
    torch, hf_model, cfg, params, _ = _pair("base", tmp_root)
    ids = _ids(cfg, 2, 9, seed=2)
    model = Llama(cfg)
    emb = model.apply({"params": params}, ids, method=Llama.embed)
    # splice: replace two slots by arbitrary vectors, as RAS splices projected mask tokens
    emb = np.array(emb)
    emb[:, 3:5] = np.random.default_rng(3).standard_normal((2, 2, cfg.hidden_size)) * 0.05
    logits, aux = jax.jit(lambda p, e: model.apply({"params": p}, inputs_embeds=e))(params, emb)
    with torch.no_grad():
        ref = hf_model(inputs_embeds=torch.from_numpy(emb), output_hidden_states=True)
    err = float(np.abs(np.asarray(logits) - ref.logits.numpy()).max())
    _report("base/inputs_embeds/logits", err)
    assert err <= TOL
    hs_only, aux2 = jax.jit(lambda p, e: model.apply({"params": p}, inputs_embeds=e,
                                                     return_logits=False))(params, emb)
    assert hs_only is None
    err = float(np.abs(np.asarray(aux2["hidden_states"]) - ref.hidden_states[-1].numpy()).max())
    _report("base/inputs_embeds/hidden_states_only", err)
    assert err <= TOL


@pytest.mark.parametrize("side", ["none", "left"])
def test_kv_cache_decoding_matches_full_forward(tmp_root, side):
    """Prefill 6 tokens into a cache of 12 slots, then feed the next 4 one at a time: every
    step's logits equal HF's and our full forward over the whole sequence."""
    torch, hf_model, cfg, params, _ = _pair("base", tmp_root)
    b, t0, t = B, 7, T
    ids = _ids(cfg, b, t, seed=4)
    mask = np.ones((b, t), np.int32)
    if side == "left":
        mask[0, :3] = 0
        mask[1, :1] = 0
        pos = np.asarray(positions_from_mask(mask))
    else:  # HF's default positions; our cache default (index + arange) gives the same
        pos = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))
    real = mask.astype(bool)
    ref = _hf(torch, hf_model, ids, mask, pos).logits.numpy()
    full, _ = _fwd(cfg)(params, ids, mask, pos)

    step = _step(cfg)
    cache = init_cache(cfg, b, 14)
    out, aux = step(params, ids[:, :t0], mask[:, :t0], pos[:, :t0], cache)
    outs = [np.asarray(out)]
    for i in range(t0, t):
        out, aux = step(params, ids[:, i:i + 1], mask[:, i:i + 1], pos[:, i:i + 1],
                        aux["cache"])
        outs.append(np.asarray(out))
    assert int(aux["cache"]["index"]) == t
    cached = np.concatenate(outs, axis=1)
    err_hf = float(np.abs(cached[real] - ref[real]).max())
    err_self = float(np.abs(cached[real] - np.asarray(full)[real]).max())
    _report(f"base/kv_cache/{side}_pad/vs_hf", err_hf)
    _report(f"base/kv_cache/{side}_pad/vs_full_forward", err_self)
    assert err_hf <= TOL and err_self <= TOL


@pytest.mark.parametrize("name", ["base", "llama3_tied"])
def test_greedy_generate_matches_hf(tmp_root, name):
    torch, hf_model, cfg, params, _ = _pair(name, tmp_root)
    b, t, n = 3, 7, 6
    ids = _ids(cfg, b, t, seed=5)
    mask = np.ones((b, t), np.int32)
    mask[0, :3] = 0  # left padding, as HF generate expects
    mask[2, :1] = 0
    ids = np.where(mask > 0, ids, 0)
    hf_model.generation_config.eos_token_id = None
    hf_model.generation_config.pad_token_id = 0
    with torch.no_grad():
        ref = hf_model.generate(input_ids=torch.from_numpy(ids.astype(np.int64)),
                                attention_mask=torch.from_numpy(mask.astype(np.int64)),
                                do_sample=False, max_new_tokens=n, min_new_tokens=n)
    ref_new = ref[:, t:].numpy()
    ours = np.asarray(greedy_generate(Llama(cfg), params, ids, mask, max_new_tokens=n,
                                      max_length=t + n + 3))
    print(f"[llama parity] {name}/generate: ours {ours.tolist()} hf {ref_new.tolist()}")
    assert np.array_equal(ours, ref_new)


def test_greedy_generate_right_padding_equals_left_padding(tmp_root):
    """Right-padded prompts (a masked gap in the cache before the new tokens) generate the
    same ids as the same prompts left padded (checked against HF above)."""
    _, _, cfg, params, _ = _pair("base", tmp_root)
    b, t, n = 3, 7, 6  # the shapes of test_greedy_generate_matches_hf: one compilation
    ids = _ids(cfg, b, t, seed=6)
    lengths = np.array([4, 7, 6])
    right = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
    left = right[:, ::-1].copy()
    ids_left = np.zeros_like(ids)
    for r, length in enumerate(lengths):
        ids_left[r, t - length:] = ids[r, :length]
    ids_right = np.where(right > 0, ids, 0)
    gen = functools.partial(greedy_generate, Llama(cfg), params, max_new_tokens=n,
                            max_length=t + n + 3)
    out_right = np.asarray(gen(ids_right, right))
    out_left = np.asarray(gen(ids_left, left))
    assert np.array_equal(out_right, out_left)


def test_unscanned_conversion_matches(tmp_root):
    torch, hf_model, cfg, _, directory = _pair("llama3_tied", tmp_root)
    params, ucfg, report = conv.from_hf(directory, scan=False)
    assert "layers_1" in params and "layers" not in params and not report.missing
    ids = _ids(ucfg, B, T, seed=7)
    logits, _ = _fwd(ucfg)(params, ids, None, None)
    err = float(np.abs(np.asarray(logits) - _hf(torch, hf_model, ids).logits.numpy()).max())
    _report("llama3_tied/unscanned/logits", err)
    assert err <= TOL


@pytest.mark.parametrize("name", ["base", "llama3_tied"])
def test_export_round_trip_loads_strictly_into_hf(tmp_root, name):
    torch, hf_model, cfg, params, _ = _pair(name, tmp_root)
    from transformers import LlamaForCausalLM

    out = f"{tmp_root}/{name}_export"
    conv.export_hf(params, cfg, out)
    back, info = LlamaForCausalLM.from_pretrained(out, output_loading_info=True,
                                                  attn_implementation="eager")
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert back.config.tie_word_embeddings == cfg.tie_word_embeddings
    ref_sd = hf_model.state_dict()
    back_sd = back.state_dict()
    assert set(ref_sd) == set(back_sd)
    for k, v in ref_sd.items():
        assert torch.equal(v, back_sd[k]), k
    ids = _ids(cfg, 2, 9, seed=8)
    with torch.no_grad():
        a = back(torch.from_numpy(ids.astype(np.int64))).logits
        b = hf_model(torch.from_numpy(ids.astype(np.int64))).logits
    assert torch.equal(a, b)
