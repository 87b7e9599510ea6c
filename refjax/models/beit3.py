"""BEiT-3 multiway one-tower encoder (torchscale ``BEiT3``), as spec/oneref.md section 1.

A = vision expert, B = language expert in every layer; the only shared computation is the
joint softmax attention. Parameter names mirror torchscale's state_dict keys, so the converter
(``refjax.convert.beit3``) is a key map:

``text_embed``, ``vision_embed/{proj,cls_token,mask_token}``, ``embed_positions/{A,B}``,
``encoder/layers/{self_attn/{q,k,v,out}_proj/{A,B}, self_attn/inner_attn_ln/{A,B},
self_attn_layer_norm/{A,B}, ffn/{A,B}/{fc1,fc2,ffn_layernorm}, final_layer_norm/{A,B}}``
(scanned: one stacked tree with a leading ``layers`` axis; unscanned: ``layers_0 ...``),
``encoder/layer_norm/{A,B}``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from refjax.models.layers import (  # noqa: F401  (REMAT_POLICIES re-exported)
    ATTENTION_IMPLS,
    REMAT_POLICIES,
    LayerNorm,
    attention,
    check_remat_policy,
    dense,
    drop_path,
    gelu_exact,
    multiway,
    remat,
    resize_grid_bicubic,
)


@dataclasses.dataclass(frozen=True)
class BEiT3Config:
    """Encoder hyper-parameters (torchscale EncoderConfig names in comments)."""

    dim: int = 768  # encoder_embed_dim
    depth: int = 12  # encoder_layers
    heads: int = 12  # encoder_attention_heads
    mlp_dim: int = 3072  # encoder_ffn_embed_dim
    vocab_size: int = 64010
    img_size: int = 384  # sets the vision position table: (img/patch)^2 + 1 + 2 rows
    patch_size: int = 16
    in_chans: int = 3
    max_source_positions: int = 1024  # text position table rows
    layernorm_eps: float = 1e-5
    drop_path_rate: float = 0.0
    dtype: str = "float32"  # compute dtype; parameters are always float32
    scan: bool = True
    remat_policy: str = "none"
    attention_impl: str | None = None  # None: einsum on CPU, else XLA/cuDNN auto; see attention

    def __post_init__(self):
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} is not divisible by heads {self.heads}")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} not divisible by patch {self.patch_size}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"unknown attention_impl {self.attention_impl!r}; "
                             f"one of {ATTENTION_IMPLS}")
        check_remat_policy(self.remat_policy)

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_vision_positions(self) -> int:
        return self.grid**2 + 1 + 2

    @property
    def compute_dtype(self) -> Any:
        return jnp.dtype(self.dtype)

    def replace(self, **kw) -> BEiT3Config:
        return dataclasses.replace(self, **kw)


VARIANTS = {
    "tiny": dict(dim=64, depth=2, heads=4, mlp_dim=128, img_size=64, vocab_size=512),
    "base": dict(dim=768, depth=12, heads=12, mlp_dim=3072),
    "large": dict(dim=1024, depth=24, heads=16, mlp_dim=4096),
}


def beit3_config(variant: str = "base", **overrides: Any) -> BEiT3Config:
    """A named configuration (``tiny``, ``base``, ``large``) with field overrides."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown BEiT-3 variant {variant!r}; one of {sorted(VARIANTS)}")
    return BEiT3Config(**{**VARIANTS[variant], **overrides})


class _Ffn(nn.Module):
    cfg: BEiT3Config

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        dt = c.compute_dtype
        h = dense(c.mlp_dim, ("embed", "mlp"), dtype=dt, name="fc1")(x)
        h = gelu_exact(h)
        h = LayerNorm(c.layernorm_eps, dt, axis_name="mlp", name="ffn_layernorm")(h)
        return dense(c.dim, ("mlp", "embed"), dtype=dt, name="fc2")(h)


class _Pair(nn.Module):
    """Holds the A (vision) and B (language) experts of one multiway sub-module."""

    make: Any  # callable(name) -> module
    split: int

    @nn.compact
    def __call__(self, x):
        a, b = self.make("A"), self.make("B")
        return multiway(a, b, x, self.split, self.is_initializing())


def _ln(cfg: BEiT3Config, dtype: Any):
    return lambda n: LayerNorm(cfg.layernorm_eps, dtype, name=n)


class _Attention(nn.Module):
    """Multiway q/k/v/out projections around the joint softmax attention, with sub-LN."""

    cfg: BEiT3Config
    split: int

    @nn.compact
    def __call__(self, h, key_padding):
        c = self.cfg
        dt = c.compute_dtype
        hd = c.dim // c.heads
        b, t, _ = h.shape

        def proj(axes, name):
            return _Pair(lambda n: dense(c.dim, axes, dtype=dt, name=n), self.split, name=name)

        q = proj(("embed", "heads"), "q_proj")(h).reshape(b, t, c.heads, hd)
        k = proj(("embed", "heads"), "k_proj")(h).reshape(b, t, c.heads, hd)
        v = proj(("embed", "heads"), "v_proj")(h).reshape(b, t, c.heads, hd)
        q = nn.with_logical_constraint(q, ("act_batch", "act_len", "act_heads", None))
        o = attention(q, k, v, key_padding, scale=hd**-0.5, implementation=c.attention_impl)
        o = _Pair(_ln(c, dt), self.split, name="inner_attn_ln")(o.reshape(b, t, c.dim))
        return proj(("heads", "embed"), "out_proj")(o)


class EncoderLayer(nn.Module):
    """One Magneto sub-LN multiway layer: pre-LN attention and FFN, both with drop path.

    With ``scan_form`` the call returns ``(x, None)`` so the layer can be ``nn.scan``-ned.
    """

    cfg: BEiT3Config
    split: int
    deterministic: bool = True
    scan_form: bool = False

    @nn.compact
    def __call__(self, x, drop_rate, key_padding):
        c = self.cfg
        dt = c.compute_dtype
        x = nn.with_logical_constraint(x, ("act_batch", "act_len", "act_embed"))
        h = _Pair(_ln(c, dt), self.split, name="self_attn_layer_norm")(x)
        o = _Attention(c, self.split, name="self_attn")(h, key_padding)
        rng = None if self.deterministic else self.make_rng("dropout")
        x = x + drop_path(o, drop_rate, deterministic=self.deterministic, rng=rng)
        h = _Pair(_ln(c, dt), self.split, name="final_layer_norm")(x)
        f = _Pair(lambda n: _Ffn(c, name=n), self.split, name="ffn")(h)
        rng = None if self.deterministic else self.make_rng("dropout")
        x = x + drop_path(f, drop_rate, deterministic=self.deterministic, rng=rng)
        return (x, None) if self.scan_form else x


class Encoder(nn.Module):
    """``encoder``: the layer stack (scanned or not) plus the final per-modality LayerNorm."""

    cfg: BEiT3Config
    split: int
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, key_padding):
        c = self.cfg
        rates = np.linspace(0.0, c.drop_path_rate, c.depth).astype(np.float32)
        layer_cls = remat(EncoderLayer, c.remat_policy)
        if c.scan:
            scanned = nn.scan(
                layer_cls,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(0, nn.broadcast),
                length=c.depth,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            x, _ = scanned(c, self.split, self.deterministic, True, name="layers")(
                x, jnp.asarray(rates), key_padding
            )
        else:
            for i in range(c.depth):
                x = layer_cls(c, self.split, self.deterministic, name=f"layers_{i}")(
                    x, jnp.float32(rates[i]), key_padding
                )
        return _Pair(_ln(c, jnp.float32), self.split, name="layer_norm")(x)


class BEiT3(nn.Module):
    """The BEiT-3 encoder. Returns ``(encoder_out (B, N, D), aux)``.

    Inputs: ``text_ids`` int (B, Lt), ``text_padding`` (B, Lt) 1/True on pads, ``image`` float
    NHWC (B, H, W, 3) with H, W divisible by the patch (other sizes than ``img_size`` resample
    the patch positions bicubically), ``vision_mask`` bool (B, patches) MIM mask. Vision-only,
    text-only and joint modes follow from which inputs are given. ``aux`` holds
    ``vision_len`` (tokens before the text; 0 without image), ``multiway_split`` (-1, 0 or
    vision_len as torchscale) and ``padding_mask`` (B, N).
    """

    config: BEiT3Config

    @nn.compact
    def __call__(
        self,
        text_ids: jax.Array | None = None,
        text_padding: jax.Array | None = None,
        image: jax.Array | None = None,
        vision_mask: jax.Array | None = None,
        *,
        deterministic: bool = True,
    ) -> tuple[jax.Array, dict[str, Any]]:
        c = self.config
        dt = c.compute_dtype
        text_embed = nn.Embed(
            c.vocab_size,
            c.dim,
            dtype=dt,
            embedding_init=nn.with_logical_partitioning(
                nn.initializers.normal(c.dim**-0.5), ("vocab", "embed")
            ),
            name="text_embed",
        )
        vision_embed = VisionEmbedding(c, name="vision_embed")
        positions = PositionTables(c, name="embed_positions")
        if text_ids is None and image is None:
            raise ValueError("BEiT3 needs text_ids, image, or both")
        parts, pads = [], []
        grid_hw = None
        if image is not None:
            v, grid_hw = vision_embed(image, vision_mask)
            v = v + positions.vision(grid_hw).astype(v.dtype)[None]
            parts.append(v)
            pads.append(jnp.zeros(v.shape[:2], bool))
        if text_ids is not None:
            t = text_embed(text_ids.astype(jnp.int32))
            t = t + positions.text(text_ids.shape[1]).astype(t.dtype)[None]
            parts.append(t)
            tp = (
                jnp.zeros(text_ids.shape, bool)
                if text_padding is None
                else text_padding.astype(bool)
            )
            pads.append(tp)
        elif self.is_initializing():
            text_embed(jnp.zeros((1, 1), jnp.int32))
            positions.text(1)
        if image is None and self.is_initializing():
            vision_embed.init_only()
        x = jnp.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
        pad = jnp.concatenate(pads, axis=1) if len(pads) > 1 else pads[0]
        x = (x * (1 - pad[..., None].astype(x.dtype))).astype(c.compute_dtype)

        vision_len = parts[0].shape[1] if image is not None else 0
        if image is None:
            split = 0
        elif text_ids is None:
            split = -1
        else:
            split = vision_len
        key_padding = pad if text_ids is not None else None
        x = Encoder(c, split, deterministic, name="encoder")(x, key_padding)
        aux = {"vision_len": vision_len, "multiway_split": split, "padding_mask": pad,
               "grid": grid_hw}
        return x, aux


class VisionEmbedding(nn.Module):
    """Patch conv (with bias), MIM mask token and cls token."""

    cfg: BEiT3Config

    def setup(self):
        c = self.cfg
        self.proj = nn.Conv(
            c.dim,
            (c.patch_size, c.patch_size),
            strides=(c.patch_size, c.patch_size),
            padding="VALID",
            dtype=c.compute_dtype,
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.lecun_normal(), (None, None, "conv_in", "embed")
            ),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
            name="proj",
        )
        zeros = nn.with_logical_partitioning(nn.initializers.zeros_init(), (None, None, "embed"))
        self.cls_token = self.param("cls_token", zeros, (1, 1, c.dim), jnp.float32)
        self.mask_token = self.param("mask_token", zeros, (1, 1, c.dim), jnp.float32)

    def init_only(self):
        p = self.cfg.patch_size
        self.proj(jnp.zeros((1, p, p, self.cfg.in_chans), self.cfg.compute_dtype))

    def __call__(self, image, vision_mask=None):
        c = self.cfg
        b, h, w, _ = image.shape
        if h % c.patch_size or w % c.patch_size:
            raise ValueError(f"image size {h}x{w} is not divisible by patch {c.patch_size}")
        x = self.proj(image.astype(c.compute_dtype))  # (B, h/p, w/p, D)
        gh, gw = x.shape[1], x.shape[2]
        x = x.reshape(b, gh * gw, c.dim)
        if vision_mask is not None:
            if vision_mask.shape != (b, gh * gw):
                raise ValueError(f"vision_mask shape {vision_mask.shape} != {(b, gh * gw)}")
            wm = vision_mask.astype(x.dtype)[..., None]
            x = x * (1 - wm) + self.mask_token.astype(x.dtype) * wm
        cls = jnp.broadcast_to(self.cls_token.astype(x.dtype), (b, 1, c.dim))
        return jnp.concatenate([cls, x], axis=1), (gh, gw)


class PositionTables(nn.Module):
    """Fairseq-style position tables: A (vision, grid^2 + 3 rows), B (text); rows start at 2."""

    cfg: BEiT3Config

    def setup(self):
        c = self.cfg
        init = nn.with_logical_partitioning(nn.initializers.normal(1.0), (None, "embed"))
        self.A = self.param("A", init, (c.num_vision_positions, c.dim), jnp.float32)
        self.B = self.param("B", init, (c.max_source_positions, c.dim), jnp.float32)

    def vision(self, grid_hw) -> jax.Array:
        c = self.cfg
        gh, gw = grid_hw
        table = self.A[2:]
        if (gh, gw) != (c.grid, c.grid):
            patches = table[1:].reshape(c.grid, c.grid, c.dim)
            patches = resize_grid_bicubic(patches, (gh, gw)).reshape(gh * gw, c.dim)
            table = jnp.concatenate([table[:1], patches], axis=0)
        return table

    def text(self, length: int) -> jax.Array:
        if length + 2 > self.cfg.max_source_positions:
            raise ValueError(
                f"text length {length} exceeds max_source_positions - 2 = "
                f"{self.cfg.max_source_positions - 2}"
            )
        return self.B[2 : 2 + length]


def param_count(tree: Any) -> int:
    """Number of scalars in a parameter tree (boxed or not)."""
    leaves = jax.tree.leaves(nn.unbox(tree))
    return int(sum(math.prod(x.shape) for x in leaves))
