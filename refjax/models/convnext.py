"""ConvNeXt trunk (Liu et al. 2022), as HF ``ConvNextModel`` and timm / open_clip ``convnext_*``.

RAS's ConvNeXt-CLIP tower is open_clip's timm ``convnext_xxlarge`` trunk (spec/ras.md 3.1):
depths 3/4/30/3, dims 384/768/1536/3072, LayerNorm eps 1e-5 everywhere; RAS pools the last stage
output (stride 32). HF ``ConvNextModel`` fixes every LayerNorm at eps 1e-6 except the final one
(``config.layer_norm_eps``); ``eps`` and ``final_eps`` express both.

Inputs are NHWC. Parameter tree (names chosen to read like the timm keys; the converters in
``refjax.convert.convnext`` map both layouts onto it):

``stem_conv``, ``stem_norm``, ``stages_{i}/{downsample_norm, downsample_conv}`` (stages > 0),
``stages_{i}/blocks/{conv_dw, norm, fc1, fc2, gamma}`` (scanned: stacked on a leading ``layers``
axis; unscanned: ``stages_{i}/blocks_{j}/...``), ``head_norm`` (the final LayerNorm, when
``final_norm``).

Logical axes: conv kernels ``(None, None, "conv_in", "embed")`` (depthwise: ``(None, None, None,
"embed")``), conv biases and ``gamma`` ``("embed",)``, ``fc1`` ``("embed", "mlp")``, ``fc2``
``("mlp", "embed")``, LayerNorms ``("norm",)``, scanned blocks get a leading ``"layers"``.
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
    LayerNorm,
    check_remat_policy,
    dense,
    drop_path,
    gelu_exact,
    remat,
)


@dataclasses.dataclass(frozen=True)
class ConvNeXtConfig:
    """ConvNeXt hyper-parameters (HF ``ConvNextConfig`` / timm ``ConvNeXt`` names in comments)."""

    depths: tuple[int, ...] = (3, 3, 9, 3)
    dims: tuple[int, ...] = (96, 192, 384, 768)  # HF hidden_sizes
    in_chans: int = 3  # HF num_channels
    patch_size: int = 4  # stem conv kernel = stride
    kernel_size: int = 7  # depthwise conv (padding kernel_size // 2)
    mlp_ratio: int = 4
    layer_scale_init: float | None = 1e-6  # None or <= 0: no layer-scale gamma (HF, timm)
    drop_path_rate: float = 0.0  # linear 0 -> rate over all blocks, as HF and timm
    eps: float = 1e-6  # every LayerNorm but the final one (HF: fixed 1e-6; open_clip xxl: 1e-5)
    final_eps: float | None = None  # the final LayerNorm (HF layer_norm_eps); None: ``eps``
    final_norm: bool = True  # HF ``layernorm`` / timm ``head.norm``
    dtype: str = "float32"  # compute dtype; parameters are always float32
    scan: bool = True  # scan the blocks of every stage (nn.scan over a ``layers`` axis)
    remat_policy: str = "none"  # see refjax.models.layers.REMAT_POLICIES

    def __post_init__(self):
        object.__setattr__(self, "depths", tuple(int(d) for d in self.depths))
        object.__setattr__(self, "dims", tuple(int(d) for d in self.dims))
        if len(self.depths) != len(self.dims) or not self.depths:
            raise ValueError(f"depths {self.depths} and dims {self.dims} must have equal length")
        if any(d < 1 for d in self.depths):
            raise ValueError(f"every stage needs at least one block, got depths {self.depths}")
        check_remat_policy(self.remat_policy)

    @property
    def has_layer_scale(self) -> bool:
        return self.layer_scale_init is not None and self.layer_scale_init > 0

    @property
    def head_eps(self) -> float:
        return self.eps if self.final_eps is None else self.final_eps

    @property
    def compute_dtype(self) -> Any:
        return jnp.dtype(self.dtype)

    @property
    def stride(self) -> int:
        """Output stride of the last stage (32 for the standard 4-stage trunk)."""
        return self.patch_size * 2 ** (len(self.depths) - 1)

    def drop_path_rates(self) -> list[np.ndarray]:
        """Per-stage drop path rates: ``linspace(0, rate, sum(depths))`` split by stage."""
        rates = np.linspace(0.0, self.drop_path_rate, sum(self.depths)).astype(np.float32)
        return np.split(rates, np.cumsum(self.depths)[:-1])

    def replace(self, **kw: Any) -> ConvNeXtConfig:
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (tuples as lists)."""
        d = dataclasses.asdict(self)
        d["depths"], d["dims"] = list(self.depths), list(self.dims)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ConvNeXtConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown ConvNeXtConfig keys {unknown}")
        return cls(**dict(d))


PRESETS: dict[str, dict[str, Any]] = {
    # open_clip / timm convnext_xxlarge trunk (RAS ConvNeXt-CLIP): eps 1e-5 everywhere.
    "convnext_xxlarge": dict(depths=(3, 4, 30, 3), dims=(384, 768, 1536, 3072), eps=1e-5,
                             final_eps=1e-5, layer_scale_init=1e-6),
    # HF ConvNextModel defaults (facebook/convnext-tiny-224 shape): 1e-6 blocks, 1e-12 final.
    "hf_convnext_tiny": dict(depths=(3, 3, 9, 3), dims=(96, 192, 384, 768), eps=1e-6,
                             final_eps=1e-12),
    # the xxlarge shape as HF ConvNextConfig would express it (843,398,016 parameters).
    "hf_convnext_xxlarge": dict(depths=(3, 4, 30, 3), dims=(384, 768, 1536, 3072), eps=1e-6,
                                final_eps=1e-12),
    "tiny_test": dict(depths=(1, 1, 2, 1), dims=(8, 16, 24, 32), eps=1e-6, final_eps=1e-12),
}


def convnext_config(preset: str = "convnext_xxlarge", **overrides: Any) -> ConvNeXtConfig:
    """A named configuration from :data:`PRESETS` with field overrides."""
    if preset not in PRESETS:
        raise ValueError(f"unknown ConvNeXt preset {preset!r}; one of {sorted(PRESETS)}")
    return ConvNeXtConfig(**{**PRESETS[preset], **overrides})


def _conv(features: int, kernel: int, stride: int, padding: Any, axes: tuple, dtype: Any,
          name: str, groups: int = 1) -> nn.Conv:
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=padding,
        feature_group_count=groups,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), axes[-1:]),
        name=name,
    )


class Block(nn.Module):
    """dwconv k x k -> LayerNorm -> Linear 4x -> GELU (exact) -> Linear -> gamma -> drop path
    -> residual. With ``scan_form`` the call returns ``(x, None)`` for ``nn.scan``."""

    cfg: ConvNeXtConfig
    dim: int
    deterministic: bool = True
    scan_form: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, drop_rate: jax.Array) -> Any:
        c = self.cfg
        dt = c.compute_dtype
        x = nn.with_logical_constraint(x, ("act_batch", None, None, "act_embed"))
        p = c.kernel_size // 2
        h = _conv(self.dim, c.kernel_size, 1, ((p, p), (p, p)), (None, None, None, "embed"),
                  dt, "conv_dw", groups=self.dim)(x)
        h = LayerNorm(c.eps, dt, name="norm")(h)
        h = dense(c.mlp_ratio * self.dim, ("embed", "mlp"), dtype=dt, name="fc1")(h)
        h = gelu_exact(h)
        h = nn.with_logical_constraint(h, ("act_batch", None, None, "act_mlp"))
        h = dense(self.dim, ("mlp", "embed"), dtype=dt, name="fc2")(h)
        if c.has_layer_scale:
            init = nn.initializers.constant(c.layer_scale_init)
            gamma = self.param("gamma", nn.with_logical_partitioning(init, ("embed",)),
                               (self.dim,), jnp.float32)
            h = h * gamma.astype(h.dtype)
        rng = None if self.deterministic else self.make_rng("dropout")
        x = x + drop_path(h, drop_rate, deterministic=self.deterministic, rng=rng)
        return (x, None) if self.scan_form else x


class Stage(nn.Module):
    """Optional downsample (LayerNorm + conv 2x2 stride 2) and the stage's blocks."""

    cfg: ConvNeXtConfig
    index: int
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.cfg
        dt = c.compute_dtype
        i, dim = self.index, c.dims[self.index]
        if i > 0:
            x = LayerNorm(c.eps, dt, name="downsample_norm")(x)
            x = _conv(dim, 2, 2, "VALID", (None, None, "conv_in", "embed"), dt,
                      "downsample_conv")(x)
        rates = c.drop_path_rates()[i]
        block_cls = remat(Block, c.remat_policy)
        if c.scan:
            scanned = nn.scan(
                block_cls,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(0,),
                length=c.depths[i],
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            x, _ = scanned(c, dim, self.deterministic, True, name="blocks")(
                x, jnp.asarray(rates)
            )
        else:
            for j in range(c.depths[i]):
                x = block_cls(c, dim, self.deterministic, name=f"blocks_{j}")(
                    x, jnp.float32(rates[j])
                )
        return x


class ConvNeXt(nn.Module):
    """The ConvNeXt trunk. ``__call__(images (B, H, W, C), deterministic=True) -> (out, aux)``.

    ``aux``: ``stem`` (stem output, HF ``hidden_states[0]``), ``stages`` (the stage outputs,
    NHWC, HF ``hidden_states[1:]``), ``features`` (last stage output at stride
    ``cfg.stride``, (B, h, w, C): what RAS pools). ``out``: with ``final_norm`` the HF
    ``pooler_output`` / open_clip trunk output (spatial mean, then the final LayerNorm, float32),
    else ``features``.
    """

    config: ConvNeXtConfig

    @nn.compact
    def __call__(
        self, images: jax.Array, *, deterministic: bool = True
    ) -> tuple[jax.Array, dict[str, Any]]:
        c = self.config
        dt = c.compute_dtype
        if images.ndim != 4 or images.shape[-1] != c.in_chans:
            raise ValueError(
                f"images must be NHWC with {c.in_chans} channels, got shape {images.shape}"
            )
        if min(images.shape[1:3]) < c.stride:
            raise ValueError(f"image size {images.shape[1:3]} is smaller than stride {c.stride}")
        x = _conv(c.dims[0], c.patch_size, c.patch_size, "VALID",
                  (None, None, "conv_in", "embed"), dt, "stem_conv")(images.astype(dt))
        x = LayerNorm(c.eps, dt, name="stem_norm")(x)
        stem = x
        stages = []
        for i in range(len(c.depths)):
            x = Stage(c, i, deterministic, name=f"stages_{i}")(x)
            stages.append(x)
        aux = {"stem": stem, "stages": stages, "features": x}
        if not c.final_norm:
            return x, aux
        pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        out = LayerNorm(c.head_eps, jnp.float32, name="head_norm")(pooled)
        return out, aux


def init_fn(cfg: ConvNeXtConfig, image_size: int | Sequence[int] = 64, batch: int = 1):
    """``rng -> variables`` for ``ConvNeXt(cfg)`` on a (batch, H, W, in_chans) zero image."""
    hw = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    image = jnp.zeros((batch, *hw, cfg.in_chans), jnp.float32)
    return lambda rng: ConvNeXt(cfg).init(rng, image)


def param_template(cfg: ConvNeXtConfig) -> dict:
    """Unboxed parameter shapes of ``ConvNeXt(cfg)`` (no computation)."""
    shapes = jax.eval_shape(init_fn(cfg, cfg.stride), jax.random.key(0))
    return nn.unbox(shapes)["params"]


def param_count(tree: Any) -> int:
    """Number of scalars in a parameter tree (boxed or not)."""
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(nn.unbox(tree))))
