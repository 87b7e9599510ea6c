"""LoRA on the LLaMA (spec ras.md 6): a fresh adapter is a no-op, a trained one equals its merged
kernel, HF export merges it, and RAS ``lora=on`` freezes the decoder weights but not the adapters,
with the projectors at a tenth of the learning rate."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs.ras import LORA_FROZEN, LORA_LR_SCALE
from refjax.convert import llama as conv
from refjax.models.llama import Llama, LlamaConfig, add_missing_lora, has_lora, merge_lora
from refjax.train.config import load_config
from refjax.train.optim import make_optimizer, param_path, parse_lr_scale


def _cfg(scan: bool, rank: int = 0) -> LlamaConfig:
    return LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, scan=scan, lora_rank=rank,
                       lora_alpha=8.0 if rank else 0.0)


def _ids():
    return jnp.asarray(np.random.default_rng(0).integers(0, 61, (2, 7)), jnp.int32)


def _init(cfg: LlamaConfig):
    return nn.unbox(Llama(cfg).init(jax.random.key(1), _ids())["params"])


def _logits(cfg: LlamaConfig, params) -> np.ndarray:
    logits, _ = Llama(cfg).apply({"params": params}, _ids())
    return np.asarray(logits, np.float32)


def _randomise_b(params, seed: int = 2):
    """Every ``lora_b`` drawn at random (a trained adapter); everything else unchanged."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda p, x: (rng.normal(0, 0.05, np.shape(x)).astype(np.float32)
                      if getattr(p[-1], "key", None) == "lora_b" else x), params)


@pytest.mark.parametrize("scan", [True, False])
def test_fresh_adapter_is_a_no_op(scan):
    base_cfg, lora_cfg = _cfg(scan), _cfg(scan, rank=4)
    base = jax.tree.map(np.asarray, _init(base_cfg))
    lora = add_missing_lora(base, _init(lora_cfg))  # the base weights, fresh adapters
    assert has_lora(lora) and not has_lora(base)
    np.testing.assert_array_equal(_logits(lora_cfg, lora), _logits(base_cfg, base))


@pytest.mark.parametrize("scan", [True, False])
def test_trained_adapter_equals_its_merged_kernel(scan):
    base_cfg, lora_cfg = _cfg(scan), _cfg(scan, rank=4)
    lora = _randomise_b(jax.tree.map(np.asarray, _init(lora_cfg)))
    merged = merge_lora(lora, lora_cfg.lora_scale)
    assert not has_lora(merged)
    a, b = _logits(lora_cfg, lora), _logits(base_cfg, merged)
    assert np.abs(a - _logits(base_cfg, merge_lora(lora, 0.0))).max() > 1e-3  # it matters
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=0)


def test_hf_export_merges_the_adapters():
    lora_cfg = _cfg(True, rank=4)
    lora = _randomise_b(jax.tree.map(np.asarray, _init(lora_cfg)))
    _, sd = conv.to_hf(lora, lora_cfg)
    _, want = conv.to_hf(merge_lora(lora, lora_cfg.lora_scale), _cfg(True))
    assert sorted(sd) == sorted(want) and not any("lora" in k for k in sd)
    for k in want:
        np.testing.assert_array_equal(sd[k], want[k])


def test_lora_config_errors():
    with pytest.raises(ValueError, match="lora_targets"):
        LlamaConfig(lora_rank=2, lora_targets=("q", "attn"))
    with pytest.raises(ValueError, match="lora_rank"):
        LlamaConfig(lora_rank=-1)
    with pytest.raises(ValueError, match="regex=factor"):
        parse_lr_scale(("mask_projector/",))
    with pytest.raises(ValueError, match="stages 2-3"):
        load_config("configs/ras/stage1.py:tiny,lora=on")


@pytest.mark.parametrize("variant", ["tiny", "13b"])
def test_ras_lora_freezes_the_decoder_and_scales_the_projectors(variant):
    config = load_config(f"configs/ras/stage2.py:{variant},lora=on")
    assert config.model.llm["lora_rank"] == (8 if variant == "tiny" else 128)
    assert config.optim.frozen == LORA_FROZEN
    # a parameter tree with the RAS paths: the LLM (scanned), a projector, the head
    llm = _randomise_b(jax.tree.map(np.asarray, _init(_cfg(True, rank=4))))
    params = {"llm": llm, "mask_projector": {"kernel": np.ones((4, 3), np.float32)},
              "head": {"kernel": np.ones((3, 1), np.float32)}}
    optim = dict(config.optim)
    optim["lr_scale"] = LORA_LR_SCALE  # tiny keeps one lr; check the 13b rule on both
    tx, _ = make_optimizer(optim, total_steps=10)
    state = tx.init(params)
    grads = jax.tree.map(np.ones_like, params)
    for _ in range(3):  # past step 0, where warm-up gives a zero learning rate
        updates, state = tx.update(grads, state, params)
    paths = jax.tree.leaves(param_path(params))
    ups = dict(zip(paths, jax.tree.leaves(updates)))
    frozen = [p for p in paths if p.startswith("llm/layers/") and "/lora_" not in p]
    adapters = [p for p in paths if "/lora_" in p]
    assert frozen and adapters
    assert all(np.all(ups[p] == 0) for p in frozen)
    assert all(np.all(ups[p] != 0) for p in adapters)
    assert np.all(ups["llm/embed_tokens/embedding"] != 0)  # embeddings train (AR's [SEG] row)
    # with the same gradient, Adam's step is the same everywhere: the projector's is a tenth
    np.testing.assert_allclose(ups["mask_projector/kernel"], 0.1 * ups["head/kernel"][0, 0],
                               rtol=1e-6)
    # frozen leaves hold no optimizer slots
    n_slots = sum(np.size(x) for x in jax.tree.leaves(state))
    n_train = sum(np.size(params_leaf) for p, params_leaf in zip(paths, jax.tree.leaves(params))
                  if p not in frozen)
    assert n_slots <= 2 * n_train + 16
    assert isinstance(tx, optax.GradientTransformation)
