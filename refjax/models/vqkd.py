"""BEiT v2 VQ-KD visual tokenizer in tokenizer mode (``vqkd_encoder_base_decoder_3x768x12_clip``),
the MRefM image target of spec/oneref.md 3.3 and 8.

Only the encoder and the quantizer exist here (the decoder and the CLIP teacher are training-only).
Pipeline, as the official ``VQKD.get_codebook_indices``:

1. ``x * 255`` only if ``x.max() <= 1`` over the whole batch, then ``x / 127.5 - 1`` (pad 0 -> -1);
2. a BEiT v2 ``VisionTransformer`` encoder: patch conv (with bias), cls token, absolute positions
   (interpolated on the fly, bicubic with ``scale_factor = (g + 0.1) / sqrt(N)``), pre-LN blocks
   whose qkv projection has no bias but separate ``q_bias`` / ``v_bias`` (k bias zero), exact
   GELU, LayerNorm eps 1e-6, no layer scale; ``fc_norm`` (LayerNorm) on the patch tokens;
3. ``encode_task_layer``: Linear(D, D) -> tanh -> Linear(D, code_dim), in float32;
4. l2-normalise; ids = argmin over the codebook (used as stored) of ``|z|^2 + |e|^2 - 2 z.e``.

Parameter names mirror the official state_dict (``refjax.convert.vqkd`` is a key map):
``encoder/{patch_embed/proj, cls_token, pos_embed, blocks/{norm1, attn/{qkv, q_bias, v_bias,
proj}, norm2, mlp/{fc1, fc2}}, fc_norm}`` (blocks scanned: one stacked tree with a leading
``layers`` axis; unscanned: ``blocks_0 ...``), ``encode_task_layer/{layers_0, layers_2}``,
``quantize/embedding`` (K, code_dim). The qkv kernel is stored as (D, 3, D) (q/k/v, heads).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
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
    cubic_weight,
    dense,
    gelu_exact,
    remat,
)

HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class VQKDConfig:
    """Tokenizer hyper-parameters (official names in comments)."""

    dim: int = 768  # embed_dim
    depth: int = 12
    heads: int = 12  # num_heads
    mlp_dim: int = 3072  # embed_dim * mlp_ratio
    patch_size: int = 16
    img_size: int = 224  # pretraining size: the position table has (img/patch)^2 + 1 rows
    in_chans: int = 3
    codebook_size: int = 8192  # n_code
    code_dim: int = 32
    layernorm_eps: float = 1e-6
    dtype: str = "float32"  # encoder compute dtype; task layer and quantizer run in float32
    scan: bool = True
    remat_policy: str = "none"
    attention_impl: str | None = None

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
        """Side of the pretraining patch grid (14 for 224 px, patch 16)."""
        return self.img_size // self.patch_size

    @property
    def num_positions(self) -> int:
        return self.grid**2 + 1

    @property
    def compute_dtype(self) -> Any:
        return jnp.dtype(self.dtype)

    def replace(self, **kw) -> VQKDConfig:
        return dataclasses.replace(self, **kw)


VARIANTS = {
    # vqkd_encoder_base_decoder_3x768x12_clip (the OneRef / BEiT v2 tokenizer)
    "base": dict(dim=768, depth=12, heads=12, mlp_dim=3072, codebook_size=8192, code_dim=32),
    # test / smoke sizes
    "tiny": dict(dim=32, depth=2, heads=4, mlp_dim=128, codebook_size=512, code_dim=32),
    "small": dict(dim=64, depth=2, heads=4, mlp_dim=256, codebook_size=8192, code_dim=32),
}


def vqkd_config(variant: str = "base", **overrides: Any) -> VQKDConfig:
    """A named configuration (``base``, ``tiny``, ``small``) with field overrides."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown VQ-KD variant {variant!r}; one of {sorted(VARIANTS)}")
    return VQKDConfig(**{**VARIANTS[variant], **overrides})


# ----------------------------------------------------------------------------- helpers
def preprocess(images: jax.Array) -> jax.Array:
    """Official ``pre_process('default')``: ``x*255`` iff ``max(x) <= 1`` over the whole batch,
    then ``x / 127.5 - 1`` (float32). Images in [0, 1] with zero padding map pad to -1."""
    x = jnp.asarray(images).astype(jnp.float32)
    x = jnp.where(jnp.max(x) <= 1.0, x * 255.0, x)
    return x / 127.5 - 1.0


def bicubic_matrix_scale(in_size: int, scale_factor: float, a: float = -0.75) -> np.ndarray:
    """(out, in) float32 matrix of 1-D ``F.interpolate(mode='bicubic', scale_factor=s,
    align_corners=False)``: ``out = floor(in * s)`` and source coordinate
    ``(dst + 0.5) / s - 0.5`` (the given scale, not in/out), taps clamped to the border,
    computed in float32 as PyTorch's CPU kernel does."""
    out_size = int(math.floor(in_size * scale_factor))
    if out_size < 1:
        raise ValueError(f"scale_factor {scale_factor} gives an empty output for {in_size}")
    ratio = np.float32(1.0 / scale_factor)
    dst = np.arange(out_size, dtype=np.float32)
    src = ratio * (dst + np.float32(0.5)) - np.float32(0.5)
    base = np.floor(src)
    t = (src - base).astype(np.float32)
    m = np.zeros((out_size, in_size), np.float32)
    for k, wk in enumerate(cubic_weight(t, a)):
        idx = np.clip(base.astype(np.int64) + k - 1, 0, in_size - 1)
        np.add.at(m, (np.arange(out_size), idx), wk.astype(np.float32))
    return m


def position_scale(grid_hw: Sequence[int], num_patches: int) -> tuple[float, float]:
    """The official on-the-fly scale factors ``(g + 0.1) / sqrt(N)`` for (gh, gw)."""
    gh, gw = grid_hw
    return (gh + 0.1) / math.sqrt(num_patches), (gw + 0.1) / math.sqrt(num_patches)


def interpolate_positions(pos_embed: Any, grid_hw: Sequence[int]) -> Any:
    """Official ``interpolate_pos_encoding`` of a (1, 1 + g0^2, D) table for a (gh, gw) grid.

    Unchanged when ``gh * gw == g0^2`` (as the official forward, which only interpolates when
    the token count differs); otherwise the patch rows are resampled bicubically with
    ``scale_factor = (g + 0.1) / g0`` per axis, never with ``size=(gh, gw)``.
    """
    n = pos_embed.shape[1] - 1
    g0 = math.isqrt(n)
    gh, gw = grid_hw
    if gh * gw == n:
        return pos_embed
    sh, sw = position_scale(grid_hw, n)
    my, mx = bicubic_matrix_scale(g0, sh), bicubic_matrix_scale(g0, sw)
    if my.shape[0] != gh or mx.shape[0] != gw:
        raise ValueError(f"position interpolation gives {my.shape[0]}x{mx.shape[0]}, "
                         f"expected {gh}x{gw}")
    cls, patches = pos_embed[:, :1], pos_embed[0, 1:].reshape(g0, g0, -1)
    if isinstance(pos_embed, np.ndarray):
        out = np.einsum("yh,hwc->ywc", my, patches.astype(np.float32))
        out = np.einsum("xw,ywc->yxc", mx, out).astype(pos_embed.dtype)
        return np.concatenate([cls, out.reshape(1, gh * gw, -1)], axis=1)
    out = jnp.einsum("yh,hwc->ywc", my, patches.astype(jnp.float32), precision=HIGHEST)
    out = jnp.einsum("xw,ywc->yxc", mx, out, precision=HIGHEST)
    return jnp.concatenate([cls, out.reshape(1, gh * gw, -1).astype(cls.dtype)], axis=1)


def l2n(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """``F.normalize(x, dim=-1)``: x / max(||x||, eps), float32."""
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def codebook_distances(z: jax.Array, codebook: jax.Array) -> jax.Array:
    """``|z|^2 + |e|^2 - 2 z.e`` (..., K) in float32, in the official order of operations."""
    z = z.astype(jnp.float32)
    e = codebook.astype(jnp.float32)
    zz = jnp.sum(z * z, axis=-1, keepdims=True)
    ee = jnp.sum(e * e, axis=-1)
    return zz + ee - 2.0 * jnp.einsum("...c,kc->...k", z, e, precision=HIGHEST)


# ----------------------------------------------------------------------------- modules
class _QKV(nn.Module):
    """``attn.qkv`` (no bias): kernel (D, 3, D) = torch weight (3D, D) transposed, split."""

    dim: int
    dtype: Any

    @nn.compact
    def __call__(self, x):
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(nn.initializers.lecun_normal(in_axis=0, out_axis=(1, 2)),
                                         ("embed", None, "heads")),
            (x.shape[-1], 3, self.dim),
            jnp.float32,
        )
        return jnp.einsum("btd,dse->btse", x.astype(self.dtype), kernel.astype(self.dtype))


class Attention(nn.Module):
    """BEiT v2 attention: bias ``cat(q_bias, 0, v_bias)``, q scaled by head_dim^-0.5."""

    cfg: VQKDConfig

    @nn.compact
    def __call__(self, h):
        c = self.cfg
        dt = c.compute_dtype
        b, t, _ = h.shape
        hd = c.dim // c.heads
        zeros = nn.with_logical_partitioning(nn.initializers.zeros_init(), ("heads",))
        q_bias = self.param("q_bias", zeros, (c.dim,), jnp.float32)
        v_bias = self.param("v_bias", zeros, (c.dim,), jnp.float32)
        qkv = _QKV(c.dim, dt, name="qkv")(h)
        q = (qkv[:, :, 0] + q_bias.astype(dt)).reshape(b, t, c.heads, hd)
        k = qkv[:, :, 1].reshape(b, t, c.heads, hd)
        v = (qkv[:, :, 2] + v_bias.astype(dt)).reshape(b, t, c.heads, hd)
        o = attention(q, k, v, None, scale=hd**-0.5, implementation=c.attention_impl)
        return dense(c.dim, ("heads", "embed"), dtype=dt, name="proj")(o.reshape(b, t, c.dim))


class Mlp(nn.Module):
    cfg: VQKDConfig

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        dt = c.compute_dtype
        h = gelu_exact(dense(c.mlp_dim, ("embed", "mlp"), dtype=dt, name="fc1")(x))
        return dense(c.dim, ("mlp", "embed"), dtype=dt, name="fc2")(h)


class Block(nn.Module):
    """Pre-LN transformer block (no layer scale, no drop path: the tokenizer runs frozen)."""

    cfg: VQKDConfig
    scan_form: bool = False

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        dt = c.compute_dtype
        x = nn.with_logical_constraint(x, ("act_batch", "act_len", "act_embed"))
        x = x + Attention(c, name="attn")(LayerNorm(c.layernorm_eps, dt, name="norm1")(x))
        x = x + Mlp(c, name="mlp")(LayerNorm(c.layernorm_eps, dt, name="norm2")(x))
        return (x, None) if self.scan_form else x


class PatchEmbed(nn.Module):
    """``patch_embed``: Conv2d(in_chans, D, patch, stride patch) with bias, as ``proj``."""

    cfg: VQKDConfig

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        return nn.Conv(
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
        )(x.astype(c.compute_dtype))


class Encoder(nn.Module):
    """``encoder``: BEiT v2 VisionTransformer returning ``fc_norm`` of the patch tokens
    (B, gh*gw, D) in float32, plus the patch grid (gh, gw)."""

    cfg: VQKDConfig

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        dt = c.compute_dtype
        b, h, w, _ = x.shape
        if h < c.patch_size or w < c.patch_size:
            raise ValueError(f"image {h}x{w} is smaller than one {c.patch_size}px patch")
        x = PatchEmbed(c, name="patch_embed")(x)
        gh, gw = x.shape[1], x.shape[2]
        x = x.reshape(b, gh * gw, c.dim)
        tn = nn.initializers.truncated_normal(0.02)
        cls = self.param("cls_token", nn.with_logical_partitioning(tn, (None, None, "embed")),
                         (1, 1, c.dim), jnp.float32)
        pos = self.param("pos_embed", nn.with_logical_partitioning(tn, (None, None, "embed")),
                         (1, c.num_positions, c.dim), jnp.float32)
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(dt), (b, 1, c.dim)), x], axis=1)
        x = x + interpolate_positions(pos, (gh, gw)).astype(dt)
        block_cls = remat(Block, c.remat_policy)
        if c.scan:
            x, _ = nn.scan(
                block_cls,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                length=c.depth,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(c, True, name="blocks")(x)
        else:
            for i in range(c.depth):
                x = block_cls(c, name=f"blocks_{i}")(x)
        x = LayerNorm(c.layernorm_eps, jnp.float32, name="fc_norm")(x[:, 1:])
        return x, (gh, gw)


class EncodeTaskLayer(nn.Module):
    """``encode_task_layer``: Linear(D, D) -> tanh -> Linear(D, code_dim), in float32."""

    cfg: VQKDConfig

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        tn = nn.initializers.truncated_normal(0.02)
        h = dense(c.dim, ("embed", "mlp"), kernel_init=tn, name="layers_0")(x.astype(jnp.float32))
        return dense(c.code_dim, ("mlp", None), kernel_init=tn, name="layers_2")(jnp.tanh(h))


class Quantizer(nn.Module):
    """``quantize``: nearest codebook row (squared L2) of the l2-normalised code."""

    cfg: VQKDConfig

    @nn.compact
    def __call__(self, z):
        c = self.cfg

        def init(key, shape, dtype=jnp.float32):
            return l2n(jax.random.normal(key, shape, dtype)).astype(dtype)

        codebook = self.param(
            "embedding",
            nn.with_logical_partitioning(init, ("vocab", None)),
            (c.codebook_size, c.code_dim),
            jnp.float32,
        )
        z = l2n(z)
        ids = jnp.argmin(codebook_distances(z, codebook), axis=-1).astype(jnp.int32)
        return ids, z, jnp.take(codebook, ids, axis=0)


class VQKD(nn.Module):
    """The frozen VQ-KD tokenizer. ``VQKD(cfg)(images01) -> (ids, aux)``.

    ``images01``: float NHWC (B, H, W, 3) in [0, 1] (zero padding), or in [0, 255] (then not
    rescaled, as the official ``pre_process``). Any H, W of at least one patch: the grid is
    (H // patch, W // patch) and the position table is interpolated as the official code.
    Returns ``ids`` (B, gh*gw) int32 (row-major patches) and ``aux`` with ``features``
    (B, N, D) float32 encoder output (``fc_norm``, before the task layer), ``embed`` (B, N,
    code_dim) the l2-normalised codes, ``quantized`` their codebook rows, and ``grid``.
    Outputs are wrapped in ``stop_gradient`` (the tokenizer is a frozen input).
    """

    config: VQKDConfig

    @nn.compact
    def __call__(self, images01: jax.Array) -> tuple[jax.Array, dict[str, Any]]:
        c = self.config
        if images01.ndim != 4 or images01.shape[-1] != c.in_chans:
            raise ValueError(f"expected NHWC images with {c.in_chans} channels, "
                             f"got shape {images01.shape}")
        x = preprocess(images01)
        feats, grid = Encoder(c, name="encoder")(x)
        z = EncodeTaskLayer(c, name="encode_task_layer")(feats)
        ids, embed, quantized = Quantizer(c, name="quantize")(z)
        sg = jax.lax.stop_gradient
        aux = {"features": sg(feats), "embed": sg(embed), "quantized": sg(quantized),
               "grid": grid}
        return sg(ids), aux


def param_count(tree: Any) -> int:
    """Number of scalars in a parameter tree (boxed or not)."""
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(nn.unbox(tree))))
