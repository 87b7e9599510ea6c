"""OneRef referring heads (REC box head, RES mask head) on top of the BEiT-3 encoder.

Spec: spec/oneref.md sections 2.1-2.3 and 2.6. Submodule and parameter names mirror the
PyTorch state_dict of ``BEiT3ForGrounding`` so that a checkpoint converter is a key map:

====================================  ===========================================  ==========
Flax path                             PyTorch key                                  transform
====================================  ===========================================  ==========
params/vision_head/kernel             vision_head.weight                           W.T
params/language_head/kernel           language_head.weight                         W.T
params/visu_proj/{kernel,bias}        visu_proj.{weight,bias}                      W.T / -
params/text_proj/{kernel,bias}        text_proj.{weight,bias} (unused)             W.T / -
params/bbox_embed/layers_{i}/kernel   bbox_embed.layers.{i}.weight                 W.T
params/bbox_embed/layers_{i}/bias     bbox_embed.layers.{i}.bias                   -
params/logit_scale                    logit_scale                                  -
params/seg_conv{k}/kernel             seg_conv{k}.weight  (in, out, 2, 2)          none
params/bn{k}/{scale,bias}             bn{k}.{weight,bias}                          -
batch_stats/bn{k}/{mean,var}          bn{k}.{running_mean,running_var}             -
(none)                                bn{k}.num_batches_tracked                    dropped
====================================  ===========================================  ==========

In ``OneRef`` the backbone lives under ``beit3`` and the heads sit at the top level, exactly as
in the PyTorch module; ``OneRefHeads`` holds the same head tree on its own.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from refjax.models.layers import default_kernel_init, dense, torch_uniform

Array = jax.Array
Dtype = Any

HIGHEST = jax.lax.Precision.HIGHEST
LOGIT_SCALE_INIT = math.log(1 / 0.07)


# ----------------------------------------------------------------------------- initialisers
def _trunc_normal_02(key, shape, dtype=jnp.float32):
    """torch ``trunc_normal_(std=.02, a=-.02, b=.02)`` as used by BEiT3Wrapper._init_weights."""
    return jax.nn.initializers.truncated_normal(0.02, dtype, lower=-1.0, upper=1.0)(key, shape)


def _dense(
    features: int,
    fan_in: int,
    *,
    name: str,
    use_bias: bool = True,
    out_axis: str | None = "mlp",
    kernel_init=None,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
) -> nn.Dense:
    """``layers.dense`` with PyTorch's default init and logical axes ('embed', out_axis) on the
    kernel; bias vectors of width D are named 'embed' (they follow the embed->fsdp rule) and the
    4-wide box bias gets (None,)."""
    return dense(
        features,
        ("embed", out_axis),
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=kernel_init or default_kernel_init,
        bias_axes=("embed",) if out_axis is not None else (None,),
        torch_init_fan_in=fan_in,
        name=name,
    )


# ----------------------------------------------------------------------------- building blocks
def l2n(x: Array, axis: int = -1) -> Array:
    """``x / max(||x||, 1e-12)`` in float32 (torch ``F.normalize``)."""
    x = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(x * x, axis=axis, keepdims=True))
    return x / jnp.maximum(norm, 1e-12)


class BBoxMLP(nn.Module):
    """``bbox_embed``: Linear(D,D) ReLU Linear(D,D) ReLU Linear(D,4) (keys layers_0/1/2)."""

    dim: int
    out_dim: int = 4
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = nn.relu(_dense(self.dim, self.dim, name="layers_0", **kw)(x))
        x = nn.relu(_dense(self.dim, self.dim, name="layers_1", **kw)(x))
        return _dense(self.out_dim, self.dim, name="layers_2", out_axis=None, **kw)(x)


class ConvTranspose2x2(nn.Module):
    """ConvTranspose2d(k=2, s=2, padding=0, bias=False) on NHWC input, as einsum + reshape.

    The kernel is stored in PyTorch layout ``(in, out, 2, 2)``:
    ``out[n, 2i+a, 2j+b, o] = sum_c x[n, i, j, c] * W[c, o, a, b]``.
    """

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cin = x.shape[-1]
        # torch computes fan_in of a ConvTranspose weight (in, out, kh, kw) as out * kh * kw.
        w = self.param(
            "kernel",
            nn.with_logical_partitioning(
                torch_uniform(self.features * 4), ("embed", "mlp", None, None)
            ),
            (cin, self.features, 2, 2),
            self.param_dtype,
        )
        b, h, wd, _ = x.shape
        y = jnp.einsum("nijc,coab->niajbo", x.astype(self.dtype), w.astype(self.dtype))
        return y.reshape(b, 2 * h, 2 * wd, self.features)


class BatchNorm(nn.Module):
    """PyTorch ``BatchNorm2d`` semantics over the last (channel) axis.

    ``momentum`` is in Flax convention (running = m * running + (1 - m) * batch; PyTorch 0.1 ->
    0.9). Unlike ``flax.linen.BatchNorm`` the running variance is updated with the *unbiased*
    batch variance, as PyTorch does; normalisation uses the biased one. Statistics are taken over
    the whole (global) batch when jitted over a sharded batch (the reference is per-GPU).
    """

    use_running_average: bool = True
    momentum: float = 0.9
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = x.shape[-1]
        zeros = nn.with_logical_partitioning(lambda s: jnp.zeros(s, jnp.float32), ("embed",))
        ones = nn.with_logical_partitioning(lambda s: jnp.ones(s, jnp.float32), ("embed",))
        ra_mean = self.variable("batch_stats", "mean", zeros, (c,))
        ra_var = self.variable("batch_stats", "var", ones, (c,))
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)), (c,),
            self.param_dtype,
        )
        bias = self.param(
            "bias", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)), (c,),
            self.param_dtype,
        )
        xf = x.astype(jnp.float32)
        if self.use_running_average:
            mean, var = ra_mean.value, ra_var.value
        else:
            axes = tuple(range(x.ndim - 1))
            n = math.prod(x.shape[:-1])
            mean = jnp.mean(xf, axis=axes)
            var = jnp.mean(jnp.square(xf - mean), axis=axes)
            if not self.is_initializing():
                unbiased = var * (n / max(n - 1, 1))
                ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
                ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * unbiased
        y = (xf - mean) * jax.lax.rsqrt(var + self.epsilon)
        y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
        return y.astype(self.dtype)


# ----------------------------------------------------------------------------- heads
def _heads_forward(
    mod: nn.Module,
    encoder_out: Array,
    vision_len: int,
    *,
    use_seg_head: bool,
    deterministic: bool,
    dtype: Dtype,
    param_dtype: Dtype,
    sim_scale: float = 1.0,
    seg_dim: int | None = None,
    seg_convs: int = 3,
    features: bool = False,
) -> tuple[dict[str, Array], dict[str, Array]]:
    """Spec 2.1-2.3. Must be called inside ``mod``'s compact method; creates the head
    submodules directly under ``mod`` (so OneRef keeps the PyTorch top-level names).

    ``sim_scale`` multiplies the cosines used as pooling weights and as box-mask / segmentation
    logits; 1.0 is OneRef (parity). A larger scale (an inverse temperature) sharpens the pooling,
    an option for training from scratch, where the cosines' [-1, 1] range is very flat.

    ``seg_dim`` (None = D, OneRef) is the RES head's channel width: with a narrower width the
    three transposed convs and BatchNorms run at ``seg_dim`` channels and ``t_cls`` is mapped to
    ``seg_dim`` by an extra bias-free ``seg_text_proj`` (then l2-normalised) for the cosine.
    A cheaper mask head for small CPU budgets; the upsampled maps dominate the step otherwise.
    ``seg_convs`` (3 = OneRef) is the number of 2x transposed-conv stages: 3 puts the logits at
    H/2 for 16-pixel patches; use 2 for 8-pixel patches to keep H/2.

    ``features`` (a hook for MRefM, ``refjax.models.mrefm``) adds the l2-normalised token
    embeddings to ``aux``: ``patch_tokens`` (B, P, D) = l2n(vision_head(V))[:, 1:] and
    ``text_tokens`` (B, Nt, D) = l2n(language_head(Tf)), float32. Outputs are unchanged."""
    dim = encoder_out.shape[-1]
    num_patches = vision_len - 1
    grid = math.isqrt(num_patches)
    if vision_len < 2 or grid * grid != num_patches or encoder_out.shape[1] <= vision_len:
        raise ValueError(
            f"OneRef heads need a square patch grid and text tokens: vision_len={vision_len}, "
            f"encoder_out={encoder_out.shape}"
        )
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    trunc = _trunc_normal_02

    v = encoder_out[:, :vision_len]
    tf = encoder_out[:, vision_len:]
    vc = l2n(_dense(dim, dim, name="vision_head", use_bias=False, kernel_init=trunc, **kw)(v))
    tc = l2n(_dense(dim, dim, name="language_head", use_bias=False, kernel_init=trunc, **kw)(tf))
    v_cls, v_i, t_cls = vc[:, 0], vc[:, 1:], tc[:, 0]
    sim = jnp.einsum("bd,bpd->bp", t_cls, v_i, precision=HIGHEST) * sim_scale

    src = _dense(dim, dim, name="visu_proj", **kw)(v)[:, 1:].astype(jnp.float32)
    weights = jax.nn.softmax(sim, axis=-1)
    pooled = jnp.einsum("bp,bpd->bd", weights, src, precision=HIGHEST)
    box = jax.nn.sigmoid(BBoxMLP(dim, name="bbox_embed", **kw)(pooled).astype(jnp.float32))

    text_proj = _dense(dim, dim, name="text_proj", **kw)  # unused; kept for checkpoints
    if mod.is_initializing():
        text_proj(tf[:, :1])
    logit_scale = mod.param(
        "logit_scale",
        nn.with_logical_partitioning(lambda k, s, d: jnp.full(s, LOGIT_SCALE_INIT, d), ()),
        (),
        param_dtype,
    )

    outputs = {"box": box, "sim": sim, "v_cls": v_cls, "t_cls": t_cls}
    if use_seg_head:
        width = seg_dim or dim
        if width <= 0 or seg_convs < 1:
            raise ValueError(f"seg_dim and seg_convs must be positive, got {seg_dim}, {seg_convs}")
        feat = v[:, 1:].reshape(v.shape[0], grid, grid, dim)
        for k in range(1, seg_convs + 1):
            feat = ConvTranspose2x2(width, name=f"seg_conv{k}", **kw)(feat)
            feat = BatchNorm(use_running_average=deterministic, name=f"bn{k}", **kw)(feat)
            if k < seg_convs:
                feat = nn.relu(feat)
        t_seg = t_cls
        if width != dim:
            proj = _dense(width, dim, name="seg_text_proj", use_bias=False, kernel_init=trunc, **kw)
            t_seg = l2n(proj(t_cls))
        cos = jnp.einsum("bd,bhwd->bhw", t_seg, l2n(feat), precision=HIGHEST)
        outputs["seg_logits"] = cos * sim_scale
    aux = {"logit_scale": logit_scale.astype(jnp.float32), "vision_len": vision_len}
    if features:
        aux.update(patch_tokens=v_i, text_tokens=tc)
    return outputs, aux


class OneRefHeads(nn.Module):
    """REC (+ optional RES) heads on a joint encoder output ``(B, vision_len + Nt, D)``.

    Returns ``(outputs, aux)``: outputs has ``box`` (B,4) sigmoid cxcywh on the canvas,
    ``sim`` (B,P) patch cosines, ``v_cls``/``t_cls`` (B,D) unit vectors and, with
    ``use_seg_head``, ``seg_logits`` (B, 8g, 8g) = (B, H/2, W/2) cosines; aux has
    ``logit_scale`` (unused by the default losses) and ``vision_len``. ``deterministic``
    selects BatchNorm running statistics; in training pass ``mutable=['batch_stats']``.
    """

    dim: int
    use_seg_head: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    sim_scale: float = 1.0
    seg_dim: int | None = None
    seg_convs: int = 3

    @nn.compact
    def __call__(
        self, encoder_out: Array, vision_len: int, deterministic: bool = True
    ) -> tuple[dict[str, Array], dict[str, Any]]:
        if encoder_out.shape[-1] != self.dim:
            raise ValueError(f"encoder_out width {encoder_out.shape[-1]} != dim {self.dim}")
        return _heads_forward(
            self,
            encoder_out,
            vision_len,
            use_seg_head=self.use_seg_head,
            deterministic=deterministic,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            sim_scale=self.sim_scale,
            seg_dim=self.seg_dim,
            seg_convs=self.seg_convs,
        )


class OneRef(nn.Module):
    """``BEiT3ForGrounding``: BEiT-3 encoder (``beit3``) plus the OneRef heads at top level.

    ``dtype=None`` uses the backbone's compute dtype for the head matmuls (norms, softmax and
    outputs stay float32).
    """

    backbone_config: Any
    use_seg_head: bool = False
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    sim_scale: float = 1.0  # 1.0 = OneRef; see _heads_forward
    seg_dim: int | None = None  # None = D (OneRef); see _heads_forward
    seg_convs: int = 3  # 2x upsampling stages (3 = OneRef); see _heads_forward

    @nn.compact
    def __call__(
        self,
        text_ids: Array,
        text_padding: Array,
        image: Array,
        vision_mask: Array | None = None,
        *,
        deterministic: bool = True,
    ) -> tuple[dict[str, Array], dict[str, Any]]:
        from refjax.models.beit3 import BEiT3

        encoder_out, aux = BEiT3(self.backbone_config, name="beit3")(
            text_ids=text_ids,
            text_padding=text_padding,
            image=image,
            vision_mask=vision_mask,
            deterministic=deterministic,
        )
        outputs, head_aux = _heads_forward(
            self,
            encoder_out,
            aux["vision_len"],
            use_seg_head=self.use_seg_head,
            deterministic=deterministic,
            dtype=self.dtype or getattr(self.backbone_config, "compute_dtype", jnp.float32),
            param_dtype=self.param_dtype,
            sim_scale=self.sim_scale,
            seg_dim=self.seg_dim,
            seg_convs=self.seg_convs,
        )
        return outputs, {**aux, **head_aux}
