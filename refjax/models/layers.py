"""Shared Linen building blocks: dense/LayerNorm with logical axes, attention, drop path,
multiway (per-modality) routing and PyTorch-exact bicubic resampling.

Conventions: parameters are float32 and carry logical axis names (mapped to mesh axes by the
rule table in ``refjax.parallel``); compute runs in ``dtype``; norms, softmax and GELU run in
float32.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any
Axes = tuple[str | None, ...]

default_kernel_init = nn.initializers.lecun_normal()

# Named rematerialisation policies (config ``remat_policy``) -> jax.checkpoint_policies names.
REMAT_POLICIES = {
    "none": None,
    "full": "nothing_saveable",
    "nothing_saveable": "nothing_saveable",
    "dots_saveable": "dots_saveable",
    "dots_with_no_batch_dims_saveable": "dots_with_no_batch_dims_saveable",
    "everything_saveable": "everything_saveable",
}


def check_remat_policy(name: str) -> None:
    """Raise naming the known policies when ``name`` is not one of ``REMAT_POLICIES``."""
    if name not in REMAT_POLICIES:
        raise ValueError(f"unknown remat_policy {name!r}; one of {sorted(REMAT_POLICIES)}")


def remat(module_cls: type, policy_name: str) -> type:
    """``module_cls`` wrapped in ``nn.remat`` with the named policy ("none": unchanged)."""
    check_remat_policy(policy_name)
    name = REMAT_POLICIES[policy_name]
    if name is None:
        return module_cls
    policy = getattr(jax.checkpoint_policies, name)
    return nn.remat(module_cls, policy=policy, prevent_cse=False)


def torch_uniform(fan_in: int) -> Callable:
    """PyTorch's default Linear/Conv init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (kernel and bias)."""
    bound = 1.0 / float(np.sqrt(fan_in))

    def init(key: jax.Array, shape: Sequence[int], dtype: Dtype = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def dense(
    features: int,
    axes: Axes,
    *,
    use_bias: bool = True,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    kernel_init: Callable = default_kernel_init,
    bias_init: Callable | None = None,
    bias_axes: Axes | None = None,
    torch_init_fan_in: int | None = None,
    name: str | None = None,
) -> nn.Dense:
    """nn.Dense whose kernel carries logical ``axes`` (in, out) and bias ``bias_axes`` (default
    ``axes[-1:]``). ``torch_init_fan_in`` gives PyTorch's default Linear init to the kernel
    (unless ``kernel_init`` is given explicitly) and the bias; otherwise the bias is zeros."""
    if torch_init_fan_in is not None:
        if kernel_init is default_kernel_init:
            kernel_init = torch_uniform(torch_init_fan_in)
        bias_init = bias_init or torch_uniform(torch_init_fan_in)
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(kernel_init, axes),
        bias_init=nn.with_logical_partitioning(
            bias_init or nn.initializers.zeros_init(),
            axes[-1:] if bias_axes is None else bias_axes,
        ),
        name=name,
    )


class LayerNorm(nn.Module):
    """LayerNorm computed in float32 (two-pass variance, PyTorch eps), output cast to ``dtype``.

    Parameters ``scale`` and ``bias`` carry the logical axis ``axis_name``.
    """

    eps: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    axis_name: str | None = "norm"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.ones_init(), (self.axis_name,)),
            (d,),
            self.param_dtype,
        )
        bias = self.param(
            "bias",
            nn.with_logical_partitioning(nn.initializers.zeros_init(), (self.axis_name,)),
            (d,),
            self.param_dtype,
        )
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
        return y.astype(self.dtype)


def gelu_exact(x: jax.Array) -> jax.Array:
    """Exact (erf) GELU evaluated in float32, cast back to the input dtype."""
    return nn.gelu(x.astype(jnp.float32), approximate=False).astype(x.dtype)


def drop_path(
    x: jax.Array, rate: jax.Array | float, *, deterministic: bool, rng: jax.Array | None
) -> jax.Array:
    """Per-sample stochastic depth (timm semantics: kept samples scaled by 1/keep)."""
    if deterministic:
        return x
    keep = 1.0 - jnp.asarray(rate, jnp.float32)
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = jax.random.bernoulli(rng, keep, shape)
    scale = jnp.where(keep > 0, 1.0 / jnp.maximum(keep, 1e-12), 0.0)
    return jnp.where(mask, x * scale.astype(x.dtype), jnp.zeros_like(x))


def multiway(
    a: Callable[[jax.Array], jax.Array],
    b: Callable[[jax.Array], jax.Array],
    x: jax.Array,
    split: int,
    initializing: bool = False,
) -> jax.Array:
    """Apply expert ``a`` to tokens ``[:split]`` and ``b`` to ``[split:]`` (sequence axis 1).

    ``split == -1`` routes everything to ``a`` (vision only), ``split == 0`` everything to ``b``
    (text only), as torchscale's MultiwayNetwork. While ``initializing``, the unused expert is
    also called on a one-token slice so both experts' parameters always exist.
    """
    if split == -1 or split >= x.shape[1]:
        if initializing:
            b(x[:, :1])
        return a(x)
    if split == 0:
        if initializing:
            a(x[:, :1])
        return b(x)
    return jnp.concatenate([a(x[:, :split]), b(x[:, split:])], axis=1)


ATTENTION_IMPLS = (None, "xla", "cudnn", "einsum")


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    key_padding: jax.Array | None,
    *,
    scale: float,
    implementation: str | None = None,
) -> jax.Array:
    """Multi-head attention over (B, T, H, Dh) inputs with a key padding mask (True = pad).

    ``implementation``: ``"xla"`` / ``"cudnn"`` go through ``jax.nn.dot_product_attention``
    (the fused cuDNN kernel on GPU where shapes and dtypes allow); ``"einsum"`` is the same
    computation written as two heads-major einsums around a float32 softmax, which XLA:CPU
    runs faster (BENCHMARKS.md). ``None`` picks ``"einsum"`` on CPU and
    ``jax.nn.dot_product_attention``'s own choice elsewhere.
    """
    if implementation not in ATTENTION_IMPLS:
        raise ValueError(f"unknown attention implementation {implementation!r}; "
                         f"one of {ATTENTION_IMPLS}")
    if implementation is None and jax.default_backend() == "cpu":
        implementation = "einsum"
    if implementation == "einsum":
        return _einsum_attention(q, k, v, key_padding, scale)
    mask = None
    if key_padding is not None:
        mask = jnp.logical_not(key_padding.astype(bool))[:, None, None, :]
    return jax.nn.dot_product_attention(
        q, k, v, mask=mask, scale=scale, implementation=implementation
    )


def _einsum_attention(q, k, v, key_padding, scale: float) -> jax.Array:
    """softmax(q k^T * scale) v with padded keys masked, softmax in float32."""
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * scale
    if key_padding is not None:
        pad = key_padding.astype(bool)[:, None, None, :]
        logits = jnp.where(pad, jnp.finfo(jnp.float32).min, logits)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def cubic_weight(t: np.ndarray, a: float) -> list[np.ndarray]:
    """The four cubic-convolution weights (offsets -1, 0, 1, 2) for fractional positions t."""

    def near(d):  # |d| <= 1
        return ((a + 2) * d - (a + 3)) * d * d + 1

    def far(d):  # 1 < |d| < 2
        return ((a * d - 5 * a) * d + 8 * a) * d - 4 * a

    return [far(t + 1), near(t), near(1 - t), far(2 - t)]


def bicubic_matrix(in_size: int, out_size: int, a: float = -0.75) -> np.ndarray:
    """(out, in) matrix of PyTorch's 1-D bicubic resampling (align_corners=False, A=-0.75).

    Source coordinate ``(dst + 0.5) * in/out - 0.5`` (not clamped for cubic), taps clamped to
    the border, exactly as ``torch.nn.functional.interpolate(mode="bicubic")`` with ``size=``.
    """
    scale = in_size / out_size
    dst = np.arange(out_size, dtype=np.float64)
    src = (dst + 0.5) * scale - 0.5
    base = np.floor(src)
    t = src - base
    w = cubic_weight(t, a)
    m = np.zeros((out_size, in_size), np.float64)
    for k, wk in enumerate(w):
        idx = np.clip(base.astype(np.int64) + k - 1, 0, in_size - 1)
        np.add.at(m, (np.arange(out_size), idx), wk)
    return m


def resize_grid_bicubic(grid: Any, out_hw: Sequence[int]) -> Any:
    """Resize a (h, w, C) grid to ``out_hw`` with PyTorch bicubic semantics (numpy or jax)."""
    h, w = grid.shape[0], grid.shape[1]
    my, mx = bicubic_matrix(h, out_hw[0]), bicubic_matrix(w, out_hw[1])
    if isinstance(grid, np.ndarray):  # host path (converters): float64 maths
        out = np.einsum("yh,hwc->ywc", my, grid.astype(np.float64))
        out = np.einsum("xw,ywc->yxc", mx, out)
        return out.astype(grid.dtype)
    my, mx = my.astype(np.float32), mx.astype(np.float32)
    out = jnp.einsum("yh,hwc->ywc", my, grid, precision=jax.lax.Precision.HIGHEST)
    return jnp.einsum("xw,ywc->yxc", mx, out, precision=jax.lax.Precision.HIGHEST)
