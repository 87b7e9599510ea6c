"""The ViT vision towers of the RAS encoder ensemble (spec/ras.md section 3): CLIP, SigLIP and
DINOv2 (with or without registers), with Hugging Face ``transformers`` 5 semantics.

One config (:class:`ViTConfig`, ``family`` one of :data:`FAMILIES`) serves the three towers;
:func:`vision_tower` builds the right module. Every tower takes NHWC float pixels already
normalised with the config's ``image_mean`` / ``image_std`` (the data pipeline's job) and returns
``(last_hidden_state (B, T, D), aux)`` with ``aux``:

- ``features``: (B, h, w, D) patch tokens for mask pooling - CLIP: ``hidden_states[select_layer]``
  without the CLS token (LLaVA's choice, -2 = penultimate layer); SigLIP: the post-LN
  ``last_hidden_state``; DINOv2: the final normed patch tokens (CLS and registers dropped);
- ``grid``: ``(h, w)``, the patch grid (sides floored to the patch, as the patch conv does);
- ``pooler_output``: (B, D) where HF has one (CLIP: post-LN CLS; SigLIP: the attention-pooling
  head when ``use_head``; DINOv2: the normed CLS);
- ``hidden_states``: with ``output_hidden_states``, the tuple of HF ``output_hidden_states``
  (the encoder input, then every layer's output; before any final LayerNorm).

Inputs whose patch grid differs from the config's (``image_size // patch_size``) resample the
position table bicubically exactly as each HF class does (CLIP, SigLIP, DINOv2: PyTorch bicubic,
A = -0.75; DINOv2 with registers: ``antialias=True``, which is a different, Keys A = -0.5,
support-scaled kernel - :func:`bicubic_aa_matrix`).

Parameter names follow the HF modules (``embeddings``, ``encoder/layers`` (scanned: one stacked
tree with a leading ``layers`` axis; unscanned ``layers_0 ...``), ``layer_norm1``, ``self_attn``,
``mlp/fc1`` ...), so ``refjax.convert.vit`` is a key map.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from refjax.models.layers import (
    ATTENTION_IMPLS,
    LayerNorm,
    attention,
    check_remat_policy,
    dense,
    remat,
    resize_grid_bicubic,
)

FAMILIES = ("clip", "siglip", "dinov2", "dinov2_registers")
ACTIVATIONS = ("quick_gelu", "gelu", "gelu_pytorch_tanh", "gelu_new")

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)

# HF config.json model_type -> family
MODEL_TYPES = {
    "clip": "clip",
    "clip_vision_model": "clip",
    "siglip": "siglip",
    "siglip_vision_model": "siglip",
    "dinov2": "dinov2",
    "dinov2_with_registers": "dinov2_registers",
}

# HF config defaults of each family's vision config class (transformers 5.23), used for the
# fields a config.json leaves out.
_HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "clip": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, num_channels=3, image_size=224, patch_size=32,
                 hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=512),
    "siglip": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                   num_attention_heads=12, num_channels=3, image_size=224, patch_size=16,
                   hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, vision_use_head=True),
    "dinov2": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, mlp_ratio=4,
                   hidden_act="gelu", layer_norm_eps=1e-6, image_size=224, patch_size=14,
                   num_channels=3, qkv_bias=True, layerscale_value=1.0, use_swiglu_ffn=False,
                   use_mask_token=True),
    "dinov2_registers": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                             mlp_ratio=4, hidden_act="gelu", layer_norm_eps=1e-6,
                             image_size=224, patch_size=16, num_channels=3, qkv_bias=True,
                             layerscale_value=1.0, use_swiglu_ffn=False, num_register_tokens=4),
}
_DEFAULT_NORM = {
    "clip": (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
    "siglip": (HALF, HALF),
    "dinov2": (IMAGENET_MEAN, IMAGENET_STD),
    "dinov2_registers": (IMAGENET_MEAN, IMAGENET_STD),
}


def _square(v: Any, name: str) -> int:
    if isinstance(v, (list, tuple)):
        if len(v) != 2 or v[0] != v[1]:
            raise ValueError(f"{name} {v!r}: only square sizes are supported")
        v = v[0]
    return int(v)


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """Hyper-parameters of one vision tower (HF config.json names in comments).

    ``family`` selects the architecture: ``clip`` (class token, bias-free patch conv,
    ``pre_layrnorm``, post-LN on the pooled CLS), ``siglip`` (no class token, patch bias, post-LN
    on every token, optional attention-pooling ``head``), ``dinov2`` / ``dinov2_registers`` (CLS,
    mask token, register tokens, layer scale, final LayerNorm).
    """

    family: str = "clip"
    hidden_size: int = 768
    intermediate_size: int = 3072  # dinov2: int(hidden_size * mlp_ratio)
    num_layers: int = 12  # num_hidden_layers
    num_heads: int = 12  # num_attention_heads
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    qkv_bias: bool = True  # dinov2 only (CLIP/SigLIP always have q/k/v biases)
    layerscale_value: float = 1.0  # dinov2: init of lambda1 (weights come from checkpoints)
    use_swiglu_ffn: bool = False  # dinov2 giant
    num_register_tokens: int = 0  # dinov2_registers
    use_mask_token: bool = True  # dinov2 (registers: always)
    use_head: bool = True  # siglip: vision_use_head
    projection_dim: int = 512  # clip: kept for the config round trip only (no projection here)
    select_layer: int = -2  # clip: index into hidden_states for ``features`` (LLaVA: -2)
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    dtype: str = "float32"  # compute dtype; parameters are always float32
    scan: bool = True
    remat_policy: str = "none"
    attention_impl: str | None = None  # None: einsum on CPU, else XLA/cuDNN auto

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"unknown ViT family {self.family!r}; one of {FAMILIES}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads "
                             f"{self.num_heads}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"unknown hidden_act {self.hidden_act!r}; one of {ACTIVATIONS}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"unknown attention_impl {self.attention_impl!r}; "
                             f"one of {ATTENTION_IMPLS}")
        check_remat_policy(self.remat_policy)
        if not -(self.num_layers + 1) <= self.select_layer <= self.num_layers:
            raise ValueError(f"select_layer {self.select_layer} outside the "
                             f"{self.num_layers + 1} hidden states")
        if self.image_size < self.patch_size:
            raise ValueError(f"image_size {self.image_size} < patch_size {self.patch_size}")
        if self.family != "dinov2_registers" and self.num_register_tokens:
            raise ValueError(f"family {self.family!r} has no register tokens")
        if len(self.image_mean) != self.num_channels or len(self.image_std) != self.num_channels:
            raise ValueError("image_mean / image_std need one value per channel")

    # -- derived -------------------------------------------------------------------------------
    @property
    def grid(self) -> int:
        """Side of the patch grid the position table was trained for."""
        return self.image_size // self.patch_size

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def is_dinov2(self) -> bool:
        return self.family in ("dinov2", "dinov2_registers")

    @property
    def has_cls(self) -> bool:
        return self.family != "siglip"

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patch tokens (CLS and registers)."""
        return int(self.has_cls) + self.num_register_tokens

    @property
    def has_mask_token(self) -> bool:
        return self.family == "dinov2_registers" or (self.family == "dinov2"
                                                     and self.use_mask_token)

    @property
    def swiglu_dim(self) -> int:
        """Hidden width of DINOv2's SwiGLU FFN (HF ``Dinov2SwiGLUFFN``)."""
        return (int(self.intermediate_size * 2 / 3) + 7) // 8 * 8

    @property
    def select_index(self) -> int:
        """``select_layer`` as a non-negative index into the ``num_layers + 1`` hidden states."""
        return self.select_layer % (self.num_layers + 1)

    @property
    def compute_dtype(self) -> Any:
        return jnp.dtype(self.dtype)

    def replace(self, **kw: Any) -> ViTConfig:
        return dataclasses.replace(self, **kw)

    # -- Hugging Face config.json ----------------------------------------------------------------
    @classmethod
    def from_hf(cls, config: Mapping[str, Any], family: str | None = None,
                **overrides: Any) -> ViTConfig:
        """A config from a HF ``config.json`` dict: a vision model's (``CLIPVisionModel``,
        ``SiglipVisionModel``, ``Dinov2Model``, ``Dinov2WithRegistersModel``) or a two-tower
        model's (its ``vision_config`` is used). Fields the file leaves out take the HF class
        defaults; ``overrides`` set any field (``scan``, ``dtype``, ``image_mean`` ...)."""
        model_type = config.get("model_type")
        inferred = MODEL_TYPES.get(model_type) if model_type else None
        if family is None:
            if inferred is None:
                raise ValueError(f"config.json model_type {model_type!r} is not one of "
                                 f"{sorted(MODEL_TYPES)}; pass family=")
            family = inferred
        elif inferred is not None and inferred != family:
            raise ValueError(f"config.json model_type {model_type!r} is a {inferred} model, "
                             f"not {family}")
        if family not in FAMILIES:
            raise ValueError(f"unknown ViT family {family!r}; one of {FAMILIES}")
        vision = config.get("vision_config", config)
        c = {**_HF_DEFAULTS[family], **{k: v for k, v in vision.items() if v is not None}}
        hidden = int(c["hidden_size"])
        heads = int(c["num_attention_heads"])
        if c.get("head_dim") not in (None, hidden // heads):
            raise ValueError(f"head_dim {c['head_dim']} != hidden_size / num_attention_heads")
        kw: dict[str, Any] = dict(
            family=family,
            hidden_size=hidden,
            num_layers=int(c["num_hidden_layers"]),
            num_heads=heads,
            image_size=_square(c["image_size"], "image_size"),
            patch_size=_square(c["patch_size"], "patch_size"),
            num_channels=int(c["num_channels"]),
            hidden_act=str(c["hidden_act"]),
            layer_norm_eps=float(c["layer_norm_eps"]),
        )
        if family in ("clip", "siglip"):
            kw["intermediate_size"] = int(c["intermediate_size"])
        if family == "clip":
            kw["projection_dim"] = int(c.get("projection_dim", 512))
        if family == "siglip":
            kw["use_head"] = bool(c["vision_use_head"])
        if family in ("dinov2", "dinov2_registers"):
            kw.update(
                intermediate_size=int(hidden * c["mlp_ratio"]),
                qkv_bias=bool(c["qkv_bias"]),
                layerscale_value=float(c["layerscale_value"]),
                use_swiglu_ffn=bool(c["use_swiglu_ffn"]),
            )
        if family == "dinov2":
            kw["use_mask_token"] = bool(c["use_mask_token"])
        if family == "dinov2_registers":
            kw["num_register_tokens"] = int(c["num_register_tokens"])
        mean, std = _DEFAULT_NORM[family]
        kw.update(image_mean=mean, image_std=std)
        kw.update(overrides)
        for k in ("image_mean", "image_std"):
            kw[k] = tuple(float(x) for x in kw[k])
        return cls(**kw)

    def to_hf(self) -> dict[str, Any]:
        """The ``config.json`` dict of the matching HF vision model (transformers 5)."""
        common = dict(
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            image_size=self.image_size,
            patch_size=self.patch_size,
            num_channels=self.num_channels,
            hidden_act=self.hidden_act,
            layer_norm_eps=self.layer_norm_eps,
        )
        if self.family == "clip":
            return dict(common, model_type="clip_vision_model",
                        architectures=["CLIPVisionModel"],
                        intermediate_size=self.intermediate_size,
                        projection_dim=self.projection_dim)
        if self.family == "siglip":
            return dict(common, model_type="siglip_vision_model",
                        architectures=["SiglipVisionModel"],
                        intermediate_size=self.intermediate_size, vision_use_head=self.use_head)
        ratio = self.intermediate_size / self.hidden_size
        if int(self.hidden_size * ratio) != self.intermediate_size:
            raise ValueError(f"intermediate_size {self.intermediate_size} is not expressible as "
                             f"int(hidden_size * mlp_ratio)")
        out = dict(common, mlp_ratio=int(ratio) if ratio == int(ratio) else ratio,
                   qkv_bias=self.qkv_bias, layerscale_value=self.layerscale_value,
                   use_swiglu_ffn=self.use_swiglu_ffn)
        if self.family == "dinov2":
            return dict(out, model_type="dinov2", architectures=["Dinov2Model"],
                        use_mask_token=self.use_mask_token)
        return dict(out, model_type="dinov2_with_registers",
                    architectures=["Dinov2WithRegistersModel"],
                    num_register_tokens=self.num_register_tokens)


PRESETS: dict[str, dict[str, Any]] = {
    # openai/clip-vit-large-patch14-336 vision_config (LLaVA-1.5's tower)
    "clip-vit-large-patch14-336": dict(
        family="clip", hidden_size=1024, intermediate_size=4096, num_layers=24, num_heads=16,
        image_size=336, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5,
        projection_dim=768, select_layer=-2,
        image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD),
    # google/siglip-so400m-patch14-384 vision_config
    "siglip-so400m-patch14-384": dict(
        family="siglip", hidden_size=1152, intermediate_size=4304, num_layers=27, num_heads=16,
        image_size=384, patch_size=14, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
        use_head=True, image_mean=HALF, image_std=HALF),
    # facebook/dinov2-large
    "dinov2-large": dict(
        family="dinov2", hidden_size=1024, intermediate_size=4096, num_layers=24, num_heads=16,
        image_size=518, patch_size=14, hidden_act="gelu", layer_norm_eps=1e-6, qkv_bias=True,
        layerscale_value=1.0, use_swiglu_ffn=False, use_mask_token=True,
        image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD),
    # facebook/dinov2-with-registers-large
    "dinov2-with-registers-large": dict(
        family="dinov2_registers", hidden_size=1024, intermediate_size=4096, num_layers=24,
        num_heads=16, image_size=518, patch_size=14, hidden_act="gelu", layer_norm_eps=1e-6,
        qkv_bias=True, layerscale_value=1.0, use_swiglu_ffn=False, num_register_tokens=4,
        image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD),
}


def vit_config(name: str, **overrides: Any) -> ViTConfig:
    """A preset (:data:`PRESETS`: the RAS towers at their native resolutions) with overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown ViT preset {name!r}; one of {sorted(PRESETS)}")
    return ViTConfig(**{**PRESETS[name], **overrides})


# -- resampling ----------------------------------------------------------------------------------
def _keys_cubic(x: np.ndarray, a: float) -> np.ndarray:
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def bicubic_aa_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out, in) matrix of PyTorch's antialiased 1-D bicubic resampling
    (``F.interpolate(mode="bicubic", antialias=True, align_corners=False)`` with ``size=``).

    Unlike the plain kernel (:func:`refjax.models.layers.bicubic_matrix`, A = -0.75, taps clamped
    to the border) this is PIL's filter: Keys' cubic with A = -0.5, its support stretched by the
    scale when downsampling, taps outside the input dropped and the weights renormalised. Output
    pixel ``i`` is centred at ``scale * (i + 0.5)``, ``scale = in / out``.
    """
    scale = in_size / out_size
    support = 2.0 * scale if scale >= 1.0 else 2.0
    inv = 1.0 / scale if scale >= 1.0 else 1.0
    m = np.zeros((out_size, in_size), np.float64)
    for i in range(out_size):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        taps = np.arange(lo, hi, dtype=np.float64)
        w = _keys_cubic((taps - center + 0.5) * inv, -0.5)
        total = w.sum()
        m[i, lo:hi] = w / total if total != 0.0 else w
    return m


def resize_grid(grid: jax.Array, out_hw: Sequence[int], *, antialias: bool = False) -> jax.Array:
    """Resize a (h, w, C) grid to ``out_hw`` as PyTorch bicubic (``antialias`` as torch's flag),
    in float32 at full matmul precision (plain: ``layers.resize_grid_bicubic``)."""
    g = grid.astype(jnp.float32)
    if not antialias:
        return resize_grid_bicubic(g, out_hw)
    my = bicubic_aa_matrix(grid.shape[0], out_hw[0]).astype(np.float32)
    mx = bicubic_aa_matrix(grid.shape[1], out_hw[1]).astype(np.float32)
    out = jnp.einsum("yh,hwc->ywc", my, g, precision=jax.lax.Precision.HIGHEST)
    return jnp.einsum("xw,ywc->yxc", mx, out, precision=jax.lax.Precision.HIGHEST)


def _interpolate_patch_positions(table: jax.Array, cfg: ViTConfig, grid_hw: tuple[int, int],
                                 antialias: bool) -> jax.Array:
    """(g*g, D) patch position rows -> (h*w, D) for the input's grid (unchanged if equal)."""
    g = cfg.grid
    if tuple(grid_hw) == (g, g):
        return table
    d = table.shape[-1]
    out = resize_grid(table.reshape(g, g, d), grid_hw, antialias=antialias)
    return out.reshape(grid_hw[0] * grid_hw[1], d)


# -- blocks --------------------------------------------------------------------------------------
def activation(name: str, x: jax.Array) -> jax.Array:
    """HF ``ACT2FN[name]`` evaluated in float32, cast back to the input dtype."""
    xf = x.astype(jnp.float32)
    if name == "quick_gelu":
        y = xf * jax.nn.sigmoid(1.702 * xf)
    elif name == "gelu":
        y = jax.nn.gelu(xf, approximate=False)
    elif name in ("gelu_pytorch_tanh", "gelu_new"):
        y = jax.nn.gelu(xf, approximate=True)
    else:
        raise ValueError(f"unknown activation {name!r}; one of {ACTIVATIONS}")
    return y.astype(x.dtype)


def _ln(cfg: ViTConfig, name: str, dtype: Any = None) -> LayerNorm:
    return LayerNorm(cfg.layer_norm_eps, cfg.compute_dtype if dtype is None else dtype, name=name)


class Mlp(nn.Module):
    """fc1 -> activation -> fc2 (CLIP/SigLIP/DINOv2 MLP), or DINOv2's SwiGLU
    (``down_proj(silu(gate_proj(x)) * up_proj(x))``)."""

    cfg: ViTConfig
    swiglu: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.cfg
        dt = c.compute_dtype
        if self.swiglu:
            gate = dense(c.swiglu_dim, ("embed", "mlp"), dtype=dt, name="gate_proj")(x)
            up = dense(c.swiglu_dim, ("embed", "mlp"), dtype=dt, name="up_proj")(x)
            g = jax.nn.silu(gate.astype(jnp.float32)).astype(dt)
            return dense(c.hidden_size, ("mlp", "embed"), dtype=dt, name="down_proj")(g * up)
        h = dense(c.intermediate_size, ("embed", "mlp"), dtype=dt, name="fc1")(x)
        h = activation(c.hidden_act, h)
        return dense(c.hidden_size, ("mlp", "embed"), dtype=dt, name="fc2")(h)


class SelfAttention(nn.Module):
    """q/k/v projections (``qkv_bias``), softmax attention in float32, output projection
    (``out_proj`` for CLIP/SigLIP, ``o_proj`` for DINOv2)."""

    cfg: ViTConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.cfg
        dt = c.compute_dtype
        b, t, _ = x.shape
        bias = c.qkv_bias or not c.is_dinov2

        def proj(name):
            return dense(c.hidden_size, ("embed", "heads"), use_bias=bias, dtype=dt, name=name)

        q = proj("q_proj")(x).reshape(b, t, c.num_heads, c.head_dim)
        k = proj("k_proj")(x).reshape(b, t, c.num_heads, c.head_dim)
        v = proj("v_proj")(x).reshape(b, t, c.num_heads, c.head_dim)
        q = nn.with_logical_constraint(q, ("act_batch", "act_len", "act_heads", None))
        o = attention(q, k, v, None, scale=c.head_dim**-0.5, implementation=c.attention_impl)
        out_name = "o_proj" if c.is_dinov2 else "out_proj"
        return dense(c.hidden_size, ("heads", "embed"), dtype=dt, name=out_name)(
            o.reshape(b, t, c.hidden_size)
        )


class LayerScale(nn.Module):
    """DINOv2 ``layer_scale``: ``x * lambda1``."""

    cfg: ViTConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.with_logical_partitioning(
            nn.initializers.constant(self.cfg.layerscale_value), ("norm",))
        lam = self.param("lambda1", init, (self.cfg.hidden_size,), jnp.float32)
        return x * lam.astype(x.dtype)


class EncoderLayer(nn.Module):
    """One pre-LN block: ``x + attn(ln1(x))``, ``x + mlp(ln2(x))`` (DINOv2: each branch scaled
    by its LayerScale). HF names: CLIP/SigLIP ``layer_norm1, self_attn, layer_norm2, mlp``;
    DINOv2 ``norm1, attention, layer_scale1, norm2, mlp, layer_scale2``.

    With ``scan_form`` the call is ``((x, selected), index) -> ((x, selected), ys)``: ``selected``
    (or None) keeps the output of layer ``select_index - 1`` (CLIP ``features``) and ``ys`` is the
    layer's output when ``collect`` (for ``hidden_states``), else None.
    """

    cfg: ViTConfig
    scan_form: bool = False
    collect: bool = False

    @nn.compact
    def __call__(self, x, index=None):
        c = self.cfg
        if self.scan_form:
            x, selected = x
        x = nn.with_logical_constraint(x, ("act_batch", "act_len", "act_embed"))
        if c.is_dinov2:
            h = SelfAttention(c, name="attention")(_ln(c, "norm1")(x))
            x = x + LayerScale(c, name="layer_scale1")(h)
            h = Mlp(c, c.use_swiglu_ffn, name="mlp")(_ln(c, "norm2")(x))
            x = x + LayerScale(c, name="layer_scale2")(h)
        else:
            x = x + SelfAttention(c, name="self_attn")(_ln(c, "layer_norm1")(x))
            x = x + Mlp(c, name="mlp")(_ln(c, "layer_norm2")(x))
        if not self.scan_form:
            return x
        if selected is not None:
            selected = jnp.where(index + 1 == c.select_index, x, selected)
        return (x, selected), (x if self.collect else None)


class Encoder(nn.Module):
    """``encoder``: the layer stack, scanned (``layers``, one stacked tree) or not (``layers_i``).

    Returns ``(x, hidden_states or None, selected or None)``: ``selected`` is
    ``hidden_states[cfg.select_index]`` when ``select`` (CLIP features), kept in the scan carry
    so it costs no per-layer stack when ``hidden_states`` are not asked for.
    """

    cfg: ViTConfig
    collect: bool = False
    select: bool = False

    @nn.compact
    def __call__(self, x: jax.Array):
        c = self.cfg
        layer_cls = remat(EncoderLayer, c.remat_policy)
        hidden = [x]
        selected = None
        if c.scan:
            if self.select:
                selected = x if c.select_index == 0 else jnp.zeros_like(x)
            scanned = nn.scan(
                layer_cls,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=0,
                length=c.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            (x, selected), ys = scanned(c, True, self.collect, name="layers")(
                (x, selected), jnp.arange(c.num_layers)
            )
            if self.collect:
                hidden.extend(ys[i] for i in range(c.num_layers))
        else:
            for i in range(c.num_layers):
                x = layer_cls(c, name=f"layers_{i}")(x)
                hidden.append(x)
            if self.select:
                selected = hidden[c.select_index]
        return x, (tuple(hidden) if self.collect else None), selected


def _conv(cfg: ViTConfig, use_bias: bool, name: str) -> nn.Conv:
    p = cfg.patch_size
    return nn.Conv(
        cfg.hidden_size, (p, p), strides=(p, p), padding="VALID", use_bias=use_bias,
        dtype=cfg.compute_dtype,
        kernel_init=nn.with_logical_partitioning(
            nn.initializers.lecun_normal(), (None, None, "conv_in", "embed")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
        name=name,
    )


def _patchify(cfg: ViTConfig, conv: nn.Conv, pixels: jax.Array):
    if pixels.ndim != 4 or pixels.shape[-1] != cfg.num_channels:
        raise ValueError(f"pixels must be NHWC with {cfg.num_channels} channels, "
                         f"got shape {pixels.shape}")
    if pixels.shape[1] < cfg.patch_size or pixels.shape[2] < cfg.patch_size:
        raise ValueError(f"image {pixels.shape[1]}x{pixels.shape[2]} is smaller than one "
                         f"{cfg.patch_size}px patch")
    x = conv(pixels.astype(cfg.compute_dtype))
    b, gh, gw, d = x.shape
    return x.reshape(b, gh * gw, d), (gh, gw)


def _pos_init(std: float = 0.02):
    return nn.initializers.normal(std)


def _grid_features(tokens: jax.Array, grid_hw: tuple[int, int]) -> jax.Array:
    b, _, d = tokens.shape
    return tokens.reshape(b, grid_hw[0], grid_hw[1], d)


class CLIPVisionTower(nn.Module):
    """HF ``CLIPVisionModel``: patch conv (no bias) + class embedding + position embedding,
    ``pre_layrnorm``, pre-LN layers with ``hidden_act`` (quick_gelu) MLPs, ``post_layernorm`` on
    the CLS output (``pooler_output``). ``features`` = ``hidden_states[select_layer]`` patch
    tokens as (B, h, w, D)."""

    config: ViTConfig

    @nn.compact
    def __call__(self, pixels: jax.Array, *, output_hidden_states: bool = False):
        c = self.config
        x, grid_hw = _EmbeddingsCLIP(c, name="embeddings")(pixels)
        x = _ln(c, "pre_layrnorm")(x)
        x, hidden, selected = Encoder(c, output_hidden_states, True, name="encoder")(x)
        pooled = LayerNorm(c.layer_norm_eps, jnp.float32, name="post_layernorm")(x[:, 0])
        feats = _grid_features(selected[:, 1:], grid_hw)
        aux = {"pooler_output": pooled, "features": feats, "grid": grid_hw}
        if hidden is not None:
            aux["hidden_states"] = hidden
        return x, aux


class _EmbeddingsCLIP(nn.Module):
    cfg: ViTConfig

    @nn.compact
    def __call__(self, pixels):
        c = self.cfg
        d = c.hidden_size
        cls = self.param("class_embedding",
                         nn.with_logical_partitioning(_pos_init(d**-0.5), ("embed",)),
                         (d,), jnp.float32)
        pos = self.param("position_embedding",
                         nn.with_logical_partitioning(_pos_init(), (None, "embed")),
                         (c.grid**2 + 1, d), jnp.float32)
        x, grid_hw = _patchify(c, _conv(c, False, "patch_embedding"), pixels)
        b = x.shape[0]
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (b, 1, d)), x], axis=1)
        table = jnp.concatenate(
            [pos[:1], _interpolate_patch_positions(pos[1:], c, grid_hw, antialias=False)], axis=0)
        return x + table.astype(x.dtype)[None], grid_hw


class _EmbeddingsSiglip(nn.Module):
    cfg: ViTConfig

    @nn.compact
    def __call__(self, pixels):
        c = self.cfg
        pos = self.param("position_embedding",
                         nn.with_logical_partitioning(_pos_init(), (None, "embed")),
                         (c.grid**2, c.hidden_size), jnp.float32)
        x, grid_hw = _patchify(c, _conv(c, True, "patch_embedding"), pixels)
        table = _interpolate_patch_positions(pos, c, grid_hw, antialias=False)
        return x + table.astype(x.dtype)[None], grid_hw


class _MultiheadAttention(nn.Module):
    """``torch.nn.MultiheadAttention`` (batch_first, no masks): packed ``in_proj`` (D, 3D) =
    [q | k | v] projections, softmax attention in float32, ``out_proj``."""

    cfg: ViTConfig

    @nn.compact
    def __call__(self, query: jax.Array, x: jax.Array) -> jax.Array:
        c = self.cfg
        dt = c.compute_dtype
        d, h, hd = c.hidden_size, c.num_heads, c.head_dim
        w = self.param(
            "in_proj_kernel",
            nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "heads")),
            (d, 3 * d), jnp.float32).astype(dt)
        bias = self.param(
            "in_proj_bias",
            nn.with_logical_partitioning(nn.initializers.zeros_init(), ("heads",)),
            (3 * d,), jnp.float32).astype(dt)
        b, tq, _ = query.shape
        t = x.shape[1]
        q = query.astype(dt) @ w[:, :d] + bias[:d]
        k = x.astype(dt) @ w[:, d:2 * d] + bias[d:2 * d]
        v = x.astype(dt) @ w[:, 2 * d:] + bias[2 * d:]
        o = attention(q.reshape(b, tq, h, hd), k.reshape(b, t, h, hd), v.reshape(b, t, h, hd),
                      None, scale=hd**-0.5, implementation=c.attention_impl)
        return dense(d, ("heads", "embed"), dtype=dt, name="out_proj")(o.reshape(b, tq, d))


class _PoolingHead(nn.Module):
    """SigLIP ``head`` (``SiglipMultiheadAttentionPoolingHead``): a learned ``probe`` query
    attends over the tokens (``attention``), then ``x + mlp(layernorm(x))``; returns (B, D)."""

    cfg: ViTConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.cfg
        d = c.hidden_size
        probe = self.param("probe", nn.with_logical_partitioning(
            nn.initializers.normal(1.0), (None, None, "embed")), (1, 1, d), jnp.float32)
        query = jnp.broadcast_to(probe, (x.shape[0], 1, d))
        o = _MultiheadAttention(c, name="attention")(query, x)
        y = o + Mlp(c, name="mlp")(_ln(c, "layernorm")(o))
        return y[:, 0]


class SiglipVisionTower(nn.Module):
    """HF ``SiglipVisionModel``: patch conv (with bias) + position embedding (no class token),
    pre-LN layers with gelu-tanh MLPs, ``post_layernorm`` on every token, and (``use_head``)
    the attention-pooling ``head`` giving ``pooler_output``. ``features`` = the post-LN
    ``last_hidden_state`` as (B, h, w, D)."""

    config: ViTConfig

    @nn.compact
    def __call__(self, pixels: jax.Array, *, output_hidden_states: bool = False):
        c = self.config
        x, grid_hw = _EmbeddingsSiglip(c, name="embeddings")(pixels)
        x, hidden, _ = Encoder(c, output_hidden_states, False, name="encoder")(x)
        x = LayerNorm(c.layer_norm_eps, jnp.float32, name="post_layernorm")(x)
        aux: dict[str, Any] = {"features": _grid_features(x, grid_hw), "grid": grid_hw}
        if c.use_head:
            aux["pooler_output"] = _PoolingHead(c, name="head")(x.astype(c.compute_dtype))
        if hidden is not None:
            aux["hidden_states"] = hidden
        return x, aux


class _EmbeddingsDinov2(nn.Module):
    cfg: ViTConfig

    @nn.compact
    def __call__(self, pixels, bool_masked_pos=None):
        c = self.cfg
        d = c.hidden_size
        cls = self.param("cls_token", nn.with_logical_partitioning(
            _pos_init(), (None, None, "embed")), (1, 1, d), jnp.float32)
        mask_token = None
        if c.has_mask_token:
            mask_token = self.param("mask_token", nn.with_logical_partitioning(
                nn.initializers.zeros_init(), (None, "embed")), (1, d), jnp.float32)
        registers = None
        if c.num_register_tokens:
            registers = self.param("register_tokens", nn.with_logical_partitioning(
                nn.initializers.zeros_init(), (None, None, "embed")),
                (1, c.num_register_tokens, d), jnp.float32)
        pos = self.param("position_embeddings", nn.with_logical_partitioning(
            _pos_init(), (None, None, "embed")), (1, c.grid**2 + 1, d), jnp.float32)
        x, grid_hw = _patchify(c, _conv(c, True, "patch_embeddings"), pixels)
        b = x.shape[0]
        if bool_masked_pos is not None:
            if mask_token is None:
                raise ValueError("bool_masked_pos given but the config has no mask token")
            if bool_masked_pos.shape != x.shape[:2]:
                raise ValueError(f"bool_masked_pos shape {bool_masked_pos.shape} != "
                                 f"{x.shape[:2]} (batch, patches)")
            x = jnp.where(bool_masked_pos.astype(bool)[..., None],
                          mask_token.astype(x.dtype)[None], x)
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (b, 1, d)), x], axis=1)
        antialias = c.family == "dinov2_registers"
        table = jnp.concatenate(
            [pos[0, :1], _interpolate_patch_positions(pos[0, 1:], c, grid_hw, antialias)], 0)
        x = x + table.astype(x.dtype)[None]
        if registers is not None:
            regs = jnp.broadcast_to(registers.astype(x.dtype), (b, c.num_register_tokens, d))
            x = jnp.concatenate([x[:, :1], regs, x[:, 1:]], axis=1)
        return x, grid_hw


class Dinov2Tower(nn.Module):
    """HF ``Dinov2Model`` / ``Dinov2WithRegistersModel``: patch conv + CLS (+ register tokens
    after the CLS, without positions), ``mask_token`` for ``bool_masked_pos``, pre-LN layers
    with LayerScale (MLP or SwiGLU FFN), final ``layernorm``. ``last_hidden_state`` is the normed
    sequence, ``pooler_output`` its CLS, ``features`` its patch tokens as (B, h, w, D)."""

    config: ViTConfig

    @nn.compact
    def __call__(self, pixels: jax.Array, bool_masked_pos: jax.Array | None = None, *,
                 output_hidden_states: bool = False):
        c = self.config
        x, grid_hw = _EmbeddingsDinov2(c, name="embeddings")(pixels, bool_masked_pos)
        x, hidden, _ = Encoder(c, output_hidden_states, False, name="encoder")(x)
        x = LayerNorm(c.layer_norm_eps, jnp.float32, name="layernorm")(x)
        aux: dict[str, Any] = {
            "pooler_output": x[:, 0],
            "features": _grid_features(x[:, c.num_prefix_tokens:], grid_hw),
            "grid": grid_hw,
        }
        if hidden is not None:
            aux["hidden_states"] = hidden
        return x, aux


TOWERS: dict[str, type[nn.Module]] = {
    "clip": CLIPVisionTower,
    "siglip": SiglipVisionTower,
    "dinov2": Dinov2Tower,
    "dinov2_registers": Dinov2Tower,
}


def vision_tower(config: ViTConfig) -> nn.Module:
    """The tower module of ``config.family``; call it as ``tower.apply(variables, pixels)``."""
    return TOWERS[config.family](config)


def init_params(config: ViTConfig, rng: jax.Array | None = None) -> Any:
    """Boxed (logically partitioned) random parameters of the tower, initialised on a one-patch
    input (positions are sized by ``image_size``, not by the input)."""
    p = config.patch_size
    x = jnp.zeros((1, p, p, config.num_channels), jnp.float32)
    rng = jax.random.key(0) if rng is None else rng
    return jax.jit(vision_tower(config).init)(rng, x)["params"]


def abstract_params(config: ViTConfig) -> Any:
    """``jax.eval_shape`` of :func:`init_params` (boxed ShapeDtypeStructs, no computation)."""
    return jax.eval_shape(lambda: init_params(config))


def param_count(tree: Any) -> int:
    """Number of scalars in a parameter tree (boxed or not)."""
    leaves = jax.tree.leaves(nn.unbox(tree))
    return int(sum(math.prod(x.shape) for x in leaves))
