"""LLaMA / Vicuna decoder (Hugging Face ``LlamaForCausalLM`` semantics) with an explicit KV cache.

Spec: spec/ras.md sections 5-6 and 13 (the RAS LLM is Vicuna-13B v1.5 = LLaMA-2-13B).

Parameter tree (``params/...``), one logical axis name per dimension; the converter
(``refjax.convert.llama``) maps HF keys onto it:

==============================================  ==================================  ==========
Flax path                                       HF key (``model.`` prefix)          transform
==============================================  ==================================  ==========
embed_tokens/embedding (vocab, embed)           embed_tokens.weight                 -
layers/self_attn/q_proj/kernel (embed,heads,kv) layers.{i}.self_attn.q_proj.weight  W.T, split
layers/self_attn/{k,v}_proj/kernel              layers.{i}.self_attn.{k,v}_proj...  W.T, split
layers/self_attn/o_proj/kernel (heads,kv,embed) layers.{i}.self_attn.o_proj.weight  W.T, split
layers/mlp/{gate,up}_proj/kernel (embed, mlp)   layers.{i}.mlp.{gate,up}_proj...    W.T
layers/mlp/down_proj/kernel (mlp, embed)        layers.{i}.mlp.down_proj.weight     W.T
layers/{input,post_attention}_layernorm/scale   layers.{i}.*_layernorm.weight       -
norm/scale (norm)                               norm.weight                         -
lm_head/kernel (embed, vocab), untied only      lm_head.weight (no prefix)          W.T
==============================================  ==================================  ==========

Scanned layers carry a leading ``layers`` axis; unscanned ones are ``layers_0 ...``. Biases
(``attention_bias`` / ``mlp_bias``) sit beside their kernels.

Numerics: parameters float32; matmuls in the config's compute ``dtype``; RMSNorm, RoPE, SiLU,
the attention softmax and the logits (float32 accumulation and output) in float32. The final
normed hidden states are returned in float32.

Positions: ``positions=None`` means ``arange(T)`` (plus the cache index when a cache is given),
exactly what HF ``LlamaForCausalLM.forward`` does when it gets an ``attention_mask`` and no
``position_ids``. With left padding HF ``generate`` instead uses ``cumsum(mask) - 1`` (pads 0):
that is :func:`positions_from_mask`, which :func:`greedy_generate` uses. Right padding gives the
same positions both ways on the real tokens.

KV cache: an explicit pytree in and out (not a Linen collection), preallocated to ``max_length``
(static shapes under jit): ``{"k", "v": (layers, B, max_length, kv_heads, head_dim), "mask":
(B, max_length) bool (slots holding real tokens), "index": () int32 (slots written)}``. A call
with ``cache=`` writes its ``T`` tokens into slots ``[index, index + T)`` of every row and
attends over all written, non-pad slots up to each query's own slot; ``aux["cache"]`` is the
updated cache. Slots past ``max_length`` are not checked under jit: keep ``index + T <=
max_length`` (``greedy_generate`` checks it). Left and right padded prompts both work: pad slots
are masked out forever, so right-padded rows simply have a masked gap before their generated
tokens; give per-row ``positions`` (``positions_from_mask``) so a right-padded row sees the
same positions as without padding. Dynamic-NTK RoPE recomputes its frequencies from the
largest position of each call (stateless; like HF the cached keys keep the rotation they were
written with).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from refjax.models.layers import check_remat_policy, remat

Array = jax.Array
Dtype = Any

ROPE_TYPES = ("default", "linear", "dynamic", "llama3")
# The projections LoRA can adapt (``LlamaConfig.lora_targets``; all of them by default).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTENTION_IMPLS = (None, "xla", "cudnn", "einsum")
INIT_STD = 0.02  # HF initializer_range

BATCH_LEN_EMBED = ("act_batch", "act_len", "act_embed")
BATCH_LEN_HEADS = ("act_batch", "act_len", "act_heads", None)
BATCH_LEN_MLP = ("act_batch", "act_len", "act_mlp")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Decoder hyper-parameters (HF ``LlamaConfig`` names) plus refjax execution options."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: = num_attention_heads (no GQA)
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rope_type: str = "default"  # default | linear | dynamic | llama3
    rope_factor: float = 1.0  # linear / dynamic / llama3
    rope_low_freq_factor: float = 1.0  # llama3
    rope_high_freq_factor: float = 4.0  # llama3
    rope_original_max_position_embeddings: int | None = None  # llama3; None: max_position_emb.
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    # execution options (not part of the HF config)
    dtype: str = "float32"  # compute dtype; parameters are always float32
    scan: bool = True
    remat_policy: str = "none"
    attention_impl: str | None = None  # None: einsum on CPU, jax.nn.dot_product_attention else
    # LoRA (Hu et al. 2021): rank 0 = off; each target projection adds (alpha / rank) * x A B
    # with A (in, rank) ~ U(+-1/sqrt(fan_in)) and B (rank, out) = 0, so a fresh adapter is a
    # no-op. ``merge_lora`` folds the adapters into the kernels (HF export, plain inference).
    lora_rank: int = 0
    lora_alpha: float = 0.0  # 0: = lora_rank (scale 1)
    lora_targets: tuple[str, ...] = LORA_TARGETS

    def __post_init__(self):
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(f"hidden_size {self.hidden_size} is not divisible by "
                                 f"num_attention_heads {self.num_attention_heads}")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple "
                             f"of num_key_value_heads {self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for RoPE")
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"unsupported rope_type {self.rope_type!r}; one of {ROPE_TYPES}")
        check_remat_policy(self.remat_policy)
        if self.lora_rank < 0:
            raise ValueError(f"lora_rank must be >= 0, got {self.lora_rank}")
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        bad = sorted(set(self.lora_targets) - set(LORA_TARGETS))
        if bad:
            raise ValueError(f"unknown lora_targets {bad}; known {list(LORA_TARGETS)}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"unknown attention_impl {self.attention_impl!r}; "
                             f"one of {ATTENTION_IMPLS}")

    @property
    def lora_scale(self) -> float:
        """``lora_alpha / lora_rank`` (0 when LoRA is off)."""
        if not self.lora_rank:
            return 0.0
        return (self.lora_alpha or self.lora_rank) / self.lora_rank

    def lora_for(self, name: str) -> int:
        """The LoRA rank of projection ``name`` (0: none)."""
        return self.lora_rank if name in self.lora_targets else 0

    @property
    def compute_dtype(self) -> Any:
        return jnp.dtype(self.dtype)

    def replace(self, **kw: Any) -> LlamaConfig:
        return dataclasses.replace(self, **kw)

    @classmethod
    def from_hf(cls, config: Mapping[str, Any] | Any, **overrides: Any) -> LlamaConfig:
        """From an HF ``config.json`` dict (or a ``transformers`` config object).

        Reads RoPE settings from transformers 5.x ``rope_parameters`` or 4.x ``rope_theta`` /
        ``rope_scaling`` (``type`` or ``rope_type``); missing keys take HF ``LlamaConfig``
        defaults. ``overrides`` set any field (e.g. ``dtype``, ``scan``, ``remat_policy``).
        """
        d = dict(config.to_dict() if hasattr(config, "to_dict") else config)

        def get(key: str, default: Any) -> Any:
            v = d.get(key)
            return default if v is None else v

        act = get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"hidden_act {act!r} is not supported (LLaMA uses 'silu')")
        rp = dict(d.get("rope_parameters") or {})
        rs = dict(d.get("rope_scaling") or {})
        if "rope_type" in rp or "type" in rp:
            scaling = rp
        else:
            scaling = {**rs, **rp}
        theta = rp.get("rope_theta", d.get("rope_theta"))
        theta = 10000.0 if theta is None else float(theta)
        rope_type = scaling.get("rope_type", scaling.get("type", "default")) or "default"
        if float(scaling.get("partial_rotary_factor", 1.0) or 1.0) != 1.0:
            raise ValueError("partial_rotary_factor != 1 is not supported")
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"unsupported rope type {rope_type!r}; one of {ROPE_TYPES}")
        heads = int(get("num_attention_heads", 32))
        hidden = int(get("hidden_size", 4096))
        head_dim = d.get("head_dim")
        kw: dict[str, Any] = dict(
            vocab_size=int(get("vocab_size", 32000)),
            hidden_size=hidden,
            intermediate_size=int(get("intermediate_size", 11008)),
            num_hidden_layers=int(get("num_hidden_layers", 32)),
            num_attention_heads=heads,
            num_key_value_heads=int(get("num_key_value_heads", heads)),
            head_dim=None if head_dim is None else int(head_dim),
            rms_norm_eps=float(get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(get("max_position_embeddings", 2048)),
            rope_theta=theta,
            rope_type=rope_type,
            rope_factor=float(scaling.get("factor", 1.0) or 1.0),
            rope_low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
            rope_high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
            rope_original_max_position_embeddings=scaling.get("original_max_position_embeddings"),
            tie_word_embeddings=bool(get("tie_word_embeddings", False)),
            attention_bias=bool(get("attention_bias", False)),
            mlp_bias=bool(get("mlp_bias", False)),
        )
        kw.update(overrides)
        return cls(**kw)

    def to_hf(self) -> dict[str, Any]:
        """An HF ``config.json`` dict (``rope_parameters`` for 5.x plus ``rope_theta`` /
        ``rope_scaling`` for 4.x readers)."""
        rope: dict[str, Any] = {"rope_type": self.rope_type, "rope_theta": self.rope_theta}
        if self.rope_type in ("linear", "dynamic", "llama3"):
            rope["factor"] = self.rope_factor
        if self.rope_type == "llama3":
            rope["low_freq_factor"] = self.rope_low_freq_factor
            rope["high_freq_factor"] = self.rope_high_freq_factor
            rope["original_max_position_embeddings"] = self.original_max_positions
        scaling = None if self.rope_type == "default" else {
            k: v for k, v in rope.items() if k != "rope_theta"}
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_act": "silu",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_parameters": rope,
            "rope_theta": self.rope_theta,
            "rope_scaling": scaling,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "mlp_bias": self.mlp_bias,
            "attention_dropout": 0.0,
        }

    @property
    def original_max_positions(self) -> int:
        m = self.rope_original_max_position_embeddings
        return self.max_position_embeddings if m is None else int(m)


PRESETS: dict[str, dict[str, Any]] = {
    # LLaMA-2-13B geometry (lmsys/vicuna-13b-v1.5 config.json)
    "vicuna-13b-v1.5": dict(vocab_size=32000, hidden_size=5120, intermediate_size=13824,
                            num_hidden_layers=40, num_attention_heads=40,
                            num_key_value_heads=40, rms_norm_eps=1e-5, rope_theta=10000.0,
                            max_position_embeddings=4096, tie_word_embeddings=False),
    # LLaMA-2-7B geometry (lmsys/vicuna-7b-v1.5)
    "vicuna-7b-v1.5": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                           num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                           rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=4096,
                           tie_word_embeddings=False),
    # for tests and smoke runs
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                 max_position_embeddings=512),
}


def llama_config(name: str = "vicuna-13b-v1.5", **overrides: Any) -> LlamaConfig:
    """A preset (``vicuna-13b-v1.5``, ``vicuna-7b-v1.5``, ``tiny``) with field overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown LLaMA preset {name!r}; one of {sorted(PRESETS)}")
    return LlamaConfig(**{**PRESETS[name], **overrides})


# ------------------------------------------------------------------------------------------
# RoPE


def _default_inv_freq(theta: float, dim: int) -> np.ndarray:
    """``1 / theta ** (arange(0, dim, 2) / dim)`` in float32, as HF computes it in torch."""
    exps = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    return (np.float32(1.0) / np.power(np.float32(theta), exps)).astype(np.float32)


def rope_inv_freq(cfg: LlamaConfig) -> np.ndarray:
    """The static inverse frequencies (head_dim / 2,) of ``default``, ``linear`` and ``llama3``
    RoPE (HF ``ROPE_INIT_FUNCTIONS``); ``dynamic`` returns the unscaled ones (see
    :func:`rope_cos_sin`)."""
    dim = cfg.head_dim
    inv = _default_inv_freq(cfg.rope_theta, dim)
    if cfg.rope_type == "linear":
        return (inv / np.float32(cfg.rope_factor)).astype(np.float32)
    if cfg.rope_type == "llama3":
        f32 = np.float32
        factor = f32(cfg.rope_factor)
        low, high = f32(cfg.rope_low_freq_factor), f32(cfg.rope_high_freq_factor)
        old = f32(cfg.original_max_positions)
        low_wavelen, high_wavelen = old / low, old / high
        wavelen = f32(2 * math.pi) / inv
        scaled = np.where(wavelen > low_wavelen, inv / factor, inv).astype(f32)
        smooth = ((old / wavelen - low) / (high - low)).astype(f32)
        smoothed = ((f32(1) - smooth) * scaled / factor + smooth * scaled).astype(f32)
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, scaled).astype(f32)
    return inv


def rope_cos_sin(cfg: LlamaConfig, positions: Array) -> tuple[Array, Array]:
    """float32 ``cos, sin`` of shape (B, T, head_dim) for integer ``positions`` (B, T)."""
    dim = cfg.head_dim
    if cfg.rope_type == "dynamic":
        # HF dynamic NTK: seq_len = max position + 1 of this call, never below max_position_emb.
        seq_len = jnp.maximum(jnp.max(positions).astype(jnp.float32) + 1.0,
                              float(cfg.max_position_embeddings))
        factor = jnp.float32(cfg.rope_factor)
        base = cfg.rope_theta * (
            (factor * seq_len / cfg.max_position_embeddings) - (factor - 1)
        ) ** (dim / (dim - 2))
        exps = jnp.arange(0, dim, 2, dtype=jnp.float32) / dim
        inv = 1.0 / jnp.power(base.astype(jnp.float32), exps)
    else:
        inv = jnp.asarray(rope_inv_freq(cfg))
    freqs = positions.astype(jnp.float32)[..., None] * inv
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def _rotate_half(x: Array) -> Array:
    h = x.shape[-1] // 2
    return jnp.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """HF ``apply_rotary_pos_emb`` (rotate_half convention) on (B, T, heads, head_dim), in
    float32, cast back to ``x.dtype``."""
    xf = x.astype(jnp.float32)
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return (xf * c + _rotate_half(xf) * s).astype(x.dtype)


def positions_from_mask(attention_mask: Array, offset: Array | int = 0) -> Array:
    """HF ``generate`` positions: ``cumsum(mask) - 1`` per row (pads get 0), plus ``offset``
    ((B,) or scalar: real tokens already seen, for a continued sequence)."""
    m = jnp.asarray(attention_mask).astype(jnp.int32)
    pos = jnp.where(m > 0, jnp.cumsum(m, axis=-1) - 1, 0)
    off = jnp.asarray(offset, jnp.int32)
    return (pos + (off[:, None] if off.ndim == 1 else off)).astype(jnp.int32)


# ------------------------------------------------------------------------------------------
# Layers


class Proj(nn.Module):
    """A projection contracting the last ``in_dims`` input dimensions into ``features``.

    The kernel (in dims + features) carries logical ``axes``; the bias the last
    ``len(features)`` of them. Compute in ``dtype``, result in ``out_dtype`` (default
    ``dtype``; float32 accumulation either way where XLA supports it).
    """

    features: tuple[int, ...]
    axes: tuple[str | None, ...]
    in_dims: int = 1
    use_bias: bool = False
    dtype: Dtype = jnp.float32
    out_dtype: Dtype | None = None
    lora_rank: int = 0  # > 0: a LoRA adapter (``lora_a``, ``lora_b``) beside the kernel
    lora_scale: float = 1.0

    @nn.compact
    def __call__(self, x: Array) -> Array:
        in_shape = tuple(x.shape[-self.in_dims:])
        shape = in_shape + tuple(self.features)
        if len(self.axes) != len(shape):
            raise ValueError(f"axes {self.axes} do not match kernel shape {shape}")
        init = nn.initializers.normal(INIT_STD)
        kernel = self.param("kernel", nn.with_logical_partitioning(init, self.axes), shape,
                            jnp.float32)
        out_dtype = self.dtype if self.out_dtype is None else self.out_dtype
        contract = tuple(range(x.ndim - self.in_dims, x.ndim))
        y = jax.lax.dot_general(
            x.astype(self.dtype), kernel.astype(self.dtype),
            ((contract, tuple(range(self.in_dims))), ((), ())),
            preferred_element_type=jnp.float32,
        )
        if self.use_bias:
            bias = self.param(
                "bias",
                nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                             self.axes[-len(self.features):]),
                tuple(self.features), jnp.float32,
            )
            y = y + bias
        if self.lora_rank:
            r = self.lora_rank
            bound = float(np.prod(in_shape)) ** -0.5
            a_init = lambda key, shape, dtype: jax.random.uniform(  # noqa: E731
                key, shape, dtype, -bound, bound)
            # The rank axis is named "embed" where the tensor has no "embed" axis of its own,
            # so that every adapter is sharded (fsdp) like the kernel beside it.
            a_axes, b_axes = self.axes[: self.in_dims], self.axes[self.in_dims:]
            lora_a = self.param("lora_a", nn.with_logical_partitioning(
                a_init, a_axes + (None if "embed" in a_axes else "embed",)),
                in_shape + (r,), jnp.float32)
            lora_b = self.param("lora_b", nn.with_logical_partitioning(
                nn.initializers.zeros_init(), (None if "embed" in b_axes else "embed",) + b_axes),
                (r,) + tuple(self.features), jnp.float32)
            h = jax.lax.dot_general(
                x.astype(self.dtype), lora_a.astype(self.dtype),
                ((contract, tuple(range(self.in_dims))), ((), ())),
                preferred_element_type=jnp.float32,
            )
            y = y + self.lora_scale * jax.lax.dot_general(
                h.astype(self.dtype), lora_b.astype(self.dtype),
                (((h.ndim - 1,), (0,)), ((), ())), preferred_element_type=jnp.float32,
            )
        return y.astype(out_dtype)


class RMSNorm(nn.Module):
    """LLaMA RMSNorm in float32: ``scale * x / sqrt(mean(x^2) + eps)``, output in ``dtype``."""

    eps: float = 1e-6
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(),
                                                                 ("norm",)),
                           (x.shape[-1],), jnp.float32)
        xf = x.astype(jnp.float32)
        var = jnp.mean(jnp.square(xf), axis=-1, keepdims=True)
        return (scale * (xf * jax.lax.rsqrt(var + self.eps))).astype(self.dtype)


def gqa_attention(q: Array, k: Array, v: Array, mask: Array, *, scale: float,
                  implementation: str | None = None) -> Array:
    """Grouped-query attention. ``q`` (B, T, H, Dh), ``k``/``v`` (B, S, KV, Dh) with KV | H
    (query head h reads kv head h // (H / KV), as HF ``repeat_kv``), ``mask`` (B, T, S) bool
    True = attend. Logits and softmax in float32; a fully masked row gives a uniform average
    (finite), never NaN."""
    if implementation is None and jax.default_backend() == "cpu":
        implementation = "einsum"
    if implementation != "einsum":
        return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], scale=scale,
                                            implementation=implementation)
    b, t, h, dh = q.shape
    kv = k.shape[2]
    qg = q.reshape(b, t, kv, h // kv, dh)
    logits = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
    logits = logits * jnp.float32(scale)
    logits = jnp.where(mask[:, None, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, h, dh)


def _lora(cfg: LlamaConfig, name: str) -> dict[str, Any]:
    return {"lora_rank": cfg.lora_for(name), "lora_scale": cfg.lora_scale}


def has_lora(params: Any) -> bool:
    """Whether a parameter tree holds LoRA adapters."""
    return any(getattr(p[-1], "key", None) in ("lora_a", "lora_b")
               for p, _ in jax.tree_util.tree_leaves_with_path(params))


def merge_lora(params: Mapping[str, Any], scale: float) -> dict[str, Any]:
    """``params`` with every adapter folded into its kernel (``kernel + scale * A @ B``) and
    the ``lora_a`` / ``lora_b`` leaves dropped; works on scanned (layer-stacked) trees."""

    def walk(node: Any) -> Any:
        if not isinstance(node, Mapping):
            return node
        out = {k: walk(v) for k, v in node.items() if k not in ("lora_a", "lora_b")}
        if "lora_a" in node and "lora_b" in node:
            a, b, k = (np.asarray(nn.unbox(node[n]), np.float32)
                       for n in ("lora_a", "lora_b", "kernel"))
            lead = a.ndim + b.ndim - k.ndim - 2  # the scan's layer axis, if any
            r = a.shape[-1]
            am = a.reshape(a.shape[:lead] + (-1, r))
            bm = b.reshape(b.shape[:lead] + (r, -1))
            out["kernel"] = (k + scale * np.matmul(am, bm).reshape(k.shape)).astype(np.float32)
        return out

    return walk(dict(params))


def add_missing_lora(params: Mapping[str, Any], like: Mapping[str, Any]) -> dict[str, Any]:
    """``params`` (a tree without adapters, e.g. a converted checkpoint) with the ``lora_a`` /
    ``lora_b`` leaves of ``like`` (a freshly initialised LoRA model) where it lacks them."""

    def walk(node: Any, ref: Any) -> Any:
        if not isinstance(node, Mapping) or not isinstance(ref, Mapping):
            return node
        out = {k: walk(v, ref.get(k)) for k, v in node.items()}
        for k in ("lora_a", "lora_b"):
            if k in ref and k not in out:
                out[k] = nn.unbox(ref[k])
        return out

    return walk(dict(params), dict(like))


class Attention(nn.Module):
    """``self_attn``: q/k/v/o projections, RoPE, GQA attention, optional KV-cache write."""

    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x, mask, cos, sin, index=None, kv_cache=None):
        c = self.cfg
        dt = c.compute_dtype
        nh, nkv, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        bias = c.attention_bias
        q = Proj((nh, hd), ("embed", "heads", "kv"), use_bias=bias, dtype=dt, name="q_proj",
                 **_lora(c, "q_proj"))(x)
        k = Proj((nkv, hd), ("embed", "heads", "kv"), use_bias=bias, dtype=dt, name="k_proj",
                 **_lora(c, "k_proj"))(x)
        v = Proj((nkv, hd), ("embed", "heads", "kv"), use_bias=bias, dtype=dt, name="v_proj",
                 **_lora(c, "v_proj"))(x)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        q = nn.with_logical_constraint(q, BATCH_LEN_HEADS)
        new_cache = None
        if kv_cache is not None:
            ck, cv = kv_cache
            k = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, index, 0, 0))
            v = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, index, 0, 0))
            new_cache = (k, v)
            k, v = k.astype(dt), v.astype(dt)
        o = gqa_attention(q, k, v, mask, scale=hd**-0.5, implementation=c.attention_impl)
        o = nn.with_logical_constraint(o, BATCH_LEN_HEADS)
        out = Proj((c.hidden_size,), ("heads", "kv", "embed"), in_dims=2, use_bias=bias,
                   dtype=dt, name="o_proj", **_lora(c, "o_proj"))(o)
        return out, new_cache


class MLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))`` (SiLU in float32)."""

    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        dt = c.compute_dtype
        m, b = c.intermediate_size, c.mlp_bias
        gate = Proj((m,), ("embed", "mlp"), use_bias=b, dtype=dt, name="gate_proj",
                 **_lora(c, "gate_proj"))(x)
        up = Proj((m,), ("embed", "mlp"), use_bias=b, dtype=dt, name="up_proj",
                 **_lora(c, "up_proj"))(x)
        h = (nn.silu(gate.astype(jnp.float32)).astype(dt) * up)
        h = nn.with_logical_constraint(h, BATCH_LEN_MLP)
        return Proj((c.hidden_size,), ("mlp", "embed"), use_bias=b, dtype=dt,
                    name="down_proj", **_lora(c, "down_proj"))(h)


class DecoderLayer(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``.

    Returns ``(x, (new_kv_cache, layer_input or None))`` (the scan form: carry, outputs).
    """

    cfg: LlamaConfig
    collect: bool = False  # also return the layer input (for output_hidden_states)

    @nn.compact
    def __call__(self, x, mask, cos, sin, index=None, kv_cache=None):
        c = self.cfg
        dt = c.compute_dtype
        x = nn.with_logical_constraint(x, BATCH_LEN_EMBED)
        x_in = x
        h = RMSNorm(c.rms_norm_eps, dt, name="input_layernorm")(x)
        a, new_cache = Attention(c, name="self_attn")(h, mask, cos, sin, index, kv_cache)
        x = x + a
        h = RMSNorm(c.rms_norm_eps, dt, name="post_attention_layernorm")(x)
        x = x + MLP(c, name="mlp")(h)
        x = nn.with_logical_constraint(x, BATCH_LEN_EMBED)
        return x, (new_cache, x_in if self.collect else None)


# ------------------------------------------------------------------------------------------
# Model


def init_cache(cfg: LlamaConfig, batch_size: int, max_length: int,
               dtype: Dtype | None = None) -> dict[str, Array]:
    """An empty KV cache for ``batch_size`` rows of up to ``max_length`` tokens
    (``dtype`` defaults to the compute dtype)."""
    dt = cfg.compute_dtype if dtype is None else jnp.dtype(dtype)
    shape = (cfg.num_hidden_layers, batch_size, max_length, cfg.num_key_value_heads,
             cfg.head_dim)
    return {
        "k": jnp.zeros(shape, dt),
        "v": jnp.zeros(shape, dt),
        "mask": jnp.zeros((batch_size, max_length), bool),
        "index": jnp.zeros((), jnp.int32),
    }


CACHE_LOGICAL_AXES = {
    "k": ("layers", "act_batch", "act_len", "act_heads", None),
    "v": ("layers", "act_batch", "act_len", "act_heads", None),
    "mask": ("act_batch", "act_len"),
    "index": (),
}


class Llama(nn.Module):
    """LLaMA decoder + LM head (HF ``LlamaForCausalLM``). See the module docstring.

    ``__call__(input_ids=None, attention_mask=None, positions=None, *, inputs_embeds=None,
    cache=None, return_logits=True, output_hidden_states=False) -> (logits or None, aux)``.
    ``aux``: ``hidden_states`` (B, T, D) float32 final normed states; ``positions`` used;
    ``cache`` (updated cache, or None); with ``output_hidden_states`` also
    ``all_hidden_states`` (layers + 1, B, T, D), HF's tuple stacked (embeddings, outputs of
    layers 1..L-1, final normed states).
    """

    config: LlamaConfig

    def setup(self):
        c = self.config
        self.embed_tokens = nn.Embed(
            c.vocab_size, c.hidden_size, dtype=c.compute_dtype, param_dtype=jnp.float32,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(INIT_STD),
                                                        ("vocab", "embed")),
        )

    def embed(self, input_ids: Array) -> Array:
        """Token embeddings (B, T, D) in the compute dtype (ids must be in [0, vocab))."""
        return self.embed_tokens(jnp.asarray(input_ids).astype(jnp.int32))

    @nn.compact
    def __call__(
        self,
        input_ids: Array | None = None,
        attention_mask: Array | None = None,
        positions: Array | None = None,
        *,
        inputs_embeds: Array | None = None,
        cache: Mapping[str, Array] | None = None,
        return_logits: bool = True,
        output_hidden_states: bool = False,
    ) -> tuple[Array | None, dict[str, Any]]:
        c = self.config
        dt = c.compute_dtype
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Llama needs exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            x = self.embed(input_ids)
        else:
            x = jnp.asarray(inputs_embeds).astype(dt)
            if self.is_initializing():
                self.embed(jnp.zeros((1, 1), jnp.int32))
        b, t, _ = x.shape
        x = nn.with_logical_constraint(x, BATCH_LEN_EMBED)
        valid = (jnp.ones((b, t), bool) if attention_mask is None
                 else jnp.asarray(attention_mask).astype(bool))

        if cache is None:
            index = None
            slots_q = jnp.arange(t)
            causal = slots_q[:, None] >= slots_q[None, :]
            mask = causal[None] & valid[:, None, :]
            offset = 0
        else:
            index = jnp.asarray(cache["index"], jnp.int32)
            kv_mask = jax.lax.dynamic_update_slice(cache["mask"], valid, (0, index))
            slots_q = index + jnp.arange(t)
            causal = jnp.arange(kv_mask.shape[1])[None, :] <= slots_q[:, None]
            mask = causal[None] & kv_mask[:, None, :]
            offset = index
        if positions is None:
            positions = jnp.broadcast_to(offset + jnp.arange(t, dtype=jnp.int32), (b, t))
        positions = jnp.asarray(positions, jnp.int32)
        cos, sin = rope_cos_sin(c, positions)

        layer_cls = remat(DecoderLayer, c.remat_policy)
        kv_in = None if cache is None else (cache["k"], cache["v"])
        if c.scan:
            scanned = nn.scan(
                layer_cls,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, 0),
                length=c.num_hidden_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            x, (kv_out, collected) = scanned(c, output_hidden_states, name="layers")(
                x, mask, cos, sin, index, kv_in)
        else:
            kvs, cols = [], []
            for i in range(c.num_hidden_layers):
                kv_i = None if kv_in is None else (kv_in[0][i], kv_in[1][i])
                x, (kv_o, col) = layer_cls(c, output_hidden_states, name=f"layers_{i}")(
                    x, mask, cos, sin, index, kv_i)
                kvs.append(kv_o)
                cols.append(col)
            kv_out = None if kv_in is None else (jnp.stack([k for k, _ in kvs]),
                                                 jnp.stack([v for _, v in kvs]))
            collected = jnp.stack(cols) if output_hidden_states else None

        hidden = RMSNorm(c.rms_norm_eps, jnp.float32, name="norm")(x)
        hidden = nn.with_logical_constraint(hidden, BATCH_LEN_EMBED)
        logits = None
        if return_logits or self.is_initializing():
            h = hidden if return_logits else hidden[:, :1]
            if c.tie_word_embeddings:
                table = self.embed_tokens.embedding
                logits = jnp.einsum("btd,vd->btv", h.astype(dt), table.astype(dt),
                                    preferred_element_type=jnp.float32)
            else:
                logits = Proj((c.vocab_size,), ("embed", "vocab"), dtype=dt,
                              out_dtype=jnp.float32, name="lm_head")(h)
            logits = nn.with_logical_constraint(logits, ("act_batch", "act_len", "act_mlp"))
            if not return_logits:
                logits = None

        aux: dict[str, Any] = {"hidden_states": hidden, "positions": positions, "cache": None}
        if cache is not None:
            aux["cache"] = {"k": kv_out[0], "v": kv_out[1], "mask": kv_mask,
                            "index": index + t}
        if output_hidden_states:
            aux["all_hidden_states"] = jnp.concatenate(
                [collected.astype(jnp.float32), hidden[None]], axis=0)
        return logits, aux


# ------------------------------------------------------------------------------------------
# Helpers


def param_template(cfg: LlamaConfig) -> dict:
    """Unboxed parameter shapes (``jax.ShapeDtypeStruct``) of ``Llama(cfg)``."""
    shapes = jax.eval_shape(Llama(cfg).init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    return nn.unbox(shapes)["params"]


def param_count(cfg: LlamaConfig) -> int:
    """Number of parameters of ``Llama(cfg)`` (from ``eval_shape``, nothing allocated)."""
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(param_template(cfg))))


def last_token_index(attention_mask: Array) -> Array:
    """(B,) index of each row's last real token (left or right padding)."""
    m = jnp.asarray(attention_mask).astype(bool)
    idx = jnp.arange(m.shape[1])
    return jnp.max(jnp.where(m, idx, -1), axis=1)


def greedy_generate(
    model: Llama,
    params: Any,
    input_ids: Array,
    attention_mask: Array | None = None,
    *,
    max_new_tokens: int,
    max_length: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int = 0,
) -> Array:
    """Greedy decoding with the KV cache (HF ``generate(do_sample=False)`` semantics).

    The prompt (B, T) may be left or right padded (``attention_mask`` 1 = real token); prompt
    positions are :func:`positions_from_mask`, each new token takes the next position of its
    row, and the first new token is read at each row's last real prompt token. After
    ``eos_token_id`` a row emits ``pad_token_id``. Returns the (B, max_new_tokens) new ids.
    The jitted program is cached per (model, shapes, options).
    """
    input_ids = jnp.asarray(input_ids, jnp.int32)
    b, t = input_ids.shape
    if attention_mask is None:
        attention_mask = jnp.ones((b, t), jnp.int32)
    max_length = t + max_new_tokens if max_length is None else max_length
    if max_new_tokens < 1 or t + max_new_tokens > max_length:
        raise ValueError(f"need 1 <= max_new_tokens and prompt {t} + max_new_tokens "
                         f"{max_new_tokens} <= max_length {max_length}")
    run = _generate_fn(model, b, max_length, max_new_tokens, eos_token_id, pad_token_id)
    return run(params, input_ids, jnp.asarray(attention_mask).astype(bool))


@functools.lru_cache(maxsize=32)
def _generate_fn(model: Llama, b: int, max_length: int, max_new_tokens: int,
                 eos_token_id: int | None, pad_token_id: int):
    cfg = model.config

    @jax.jit
    def run(params, ids, mask):
        cache = init_cache(cfg, b, max_length)
        logits, aux = model.apply({"params": params}, ids, mask, positions_from_mask(mask),
                                  cache=cache)
        last = last_token_index(mask)
        first = jnp.argmax(logits[jnp.arange(b), last], axis=-1).astype(jnp.int32)
        next_pos = jnp.sum(mask.astype(jnp.int32), axis=1)
        done = jnp.zeros((b,), bool)
        if eos_token_id is not None:
            done = first == eos_token_id

        def step(carry, _):
            tok, pos, cache, done = carry
            logits, aux = model.apply({"params": params}, tok[:, None], jnp.ones((b, 1), bool),
                                      pos[:, None], cache=cache)
            nxt = jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)
            nxt = jnp.where(done, pad_token_id, nxt)
            if eos_token_id is not None:
                done = done | (nxt == eos_token_id)
            return (nxt, pos + 1, aux["cache"], done), nxt

        _, rest = jax.lax.scan(step, (first, next_pos, aux["cache"], done), None,
                               length=max_new_tokens - 1)
        return jnp.concatenate([first[:, None], rest.T], axis=1)

    return run
