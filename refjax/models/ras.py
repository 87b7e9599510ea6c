"""RAS: mask-centric LMM selecting a group of candidate masks (spec/ras.md sections 3-5, 13).

One Linen module, :class:`RAS`, holding (top-level parameter subtrees, the names the task uses
for freezing, learning-rate groups and sharding):

- the frozen vision towers, one subtree per encoder name (``clip``, ``siglip``, ``dinov2``,
  ``convnext``; any subset, each at its own input size). They run under
  ``jax.lax.stop_gradient``; a ``features`` input (precomputed, exact because the towers are
  frozen) skips a tower, and then its parameters are not needed (nor created at init);
- ``mask_projector`` (``fc1`` D_in -> d, exact GELU, ``fc2`` d -> d): one token per mask from
  the area-weighted pooled features of every encoder (spec 3.3), optionally each pooled vector
  normalised by a LayerNorm without affine (``encoder_norm``, spec 3.3 recommended deviation),
  plus the pooled 2D sinusoidal position map (``use_pe2d``); shared by candidates and
  references;
- ``image_projector`` (LLaVA-1.5 ``mlp2x_gelu`` on the CLIP patch features -> global visual
  tokens; absent with ``image_tokens=False``, e.g. stage 1);
- ``mask_pool_pre`` / ``mask_ref_pre`` (d,): the learnable ``<mask-pool-pre>`` /
  ``<mask-ref-pre>`` prefix embeddings;
- ``llm``: :class:`refjax.models.llama.Llama`;
- ``head`` (NAR: ``Linear(d, 1)``, prior bias ``-log((1 - pi) / pi)``; or ``mlp``) or
  ``seg_proj`` (AR baseline: ``Linear(d, d)``, scores = ``<seg_proj(h), t(c_i)> * scale``).

Sequence layout (built on the host by :mod:`refjax.data.ras_layout`): ``input_ids`` (B, L) hold
text token ids (>= 0) and negative sentinels marking slots spliced from projected vectors:
:data:`IMAGE_TOKEN` (global visual token), :data:`CAND_TOKEN` (candidate mask token),
:data:`REF_TOKEN` (reference mask token), :data:`POOL_PRE` / :data:`REF_PRE` (the prefixes);
``slot_index`` (B, L) says which image token / candidate / reference a slot takes. The splice
is a gather from one per-example table (static shapes, jit-friendly). Padded candidates are
never placed in the sequence, so they cannot influence valid ones.

Geometry (spec 3.2): masks arrive at the resolution of the square canvas (the host's
``expand2square``); every encoder sees the same canvas resized to its input size ``Z``; cell
``u`` of an encoder's ``h x w`` grid (stride ``s``) covers canvas rows ``[u s S / Z,
(u + 1) s S / Z)``, the last row / column extended to the canvas edge (a ViT whose input is not
a multiple of the patch drops that strip; the extension keeps every mask pooled).
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

from refjax.models import convnext as convnext_lib
from refjax.models import llama as llama_lib
from refjax.models import vit as vit_lib
from refjax.models.convnext import ConvNeXt, ConvNeXtConfig
from refjax.models.layers import dense, gelu_exact
from refjax.models.llama import Llama, LlamaConfig
from refjax.models.vit import ViTConfig

Array = jax.Array

# Sentinel ids in ``input_ids`` (LLaVA's IMAGE_TOKEN_INDEX is -200).
IMAGE_TOKEN = -200
CAND_TOKEN = -201
REF_TOKEN = -202
POOL_PRE = -203
REF_PRE = -204
SENTINELS = (IMAGE_TOKEN, CAND_TOKEN, REF_TOKEN, POOL_PRE, REF_PRE)
IGNORE_INDEX = -100

HEADS = ("linear", "mlp")
DECODINGS = ("nar", "ar")
MODES = ("nar", "ar", "lm", "ar_decode")
_RESERVED = ("llm", "mask_projector", "image_projector", "mask_pool_pre", "mask_ref_pre",
             "head", "seg_proj", "encoder_norm")
MASKED_SCORE = -1e9  # AR scores of padded candidates (finite: safe under softmax)


# ------------------------------------------------------------------------------------------
# Config


def _tower_kind(cfg: Any) -> str:
    if isinstance(cfg, ViTConfig):
        return "vit"
    if isinstance(cfg, ConvNeXtConfig):
        return "convnext"
    raise TypeError(f"encoder config must be a ViTConfig or ConvNeXtConfig, got "
                    f"{type(cfg).__name__}")


def _pairs(x: Any) -> tuple[tuple[str, Any], ...]:
    if x is None:
        return ()
    items = x.items() if isinstance(x, Mapping) else x
    return tuple((str(k), v) for k, v in items)


@dataclasses.dataclass(frozen=True)
class RASConfig:
    """RAS hyper-parameters.

    ``encoders``: ordered mapping encoder name -> tower config (``ViTConfig`` of family clip /
    siglip / dinov2 / dinov2_registers, or ``ConvNeXtConfig``); stored as a tuple of pairs
    (hashable), pass a dict. ``image_sizes``: name -> input side ``Z`` (defaults: a ViT's
    ``image_size``; required for ConvNeXt). The compute dtype is ``llm.dtype``.
    """

    llm: LlamaConfig = dataclasses.field(default_factory=LlamaConfig)
    encoders: Any = ()
    image_sizes: Any = ()
    use_pe2d: bool = True  # 2D sinusoidal position map pooled like a feature map (spec 3.1)
    pe2d_grid: int = 64
    pe2d_dim: int = 128  # per axis (map has 2 * pe2d_dim channels)
    pe2d_temperature: float = 1e4
    encoder_norm: bool = True  # LayerNorm without affine on each pooled encoder vector
    encoder_norm_eps: float = 1e-6
    pool_eps: float = 1e-6  # f = sum A F / (sum A + pool_eps) (spec 3.3)
    image_tokens: bool = True  # global visual tokens (LLaVA image projector); False in stage 1
    image_encoder: str = "clip"  # whose features feed the image projector
    head: str = "linear"  # linear | mlp (NAR classifier)
    head_hidden: int = 1024  # mlp head width
    head_prior: float = 0.05  # bias init -log((1 - pi) / pi)
    decoding: str = "nar"  # nar | ar (the baseline of spec 5.6)
    seg_token_id: int = 32000  # [SEG] (AR); a vocabulary row of the LLM
    eos_token_id: int = 2
    ar_score_scale: float | None = None  # None: d ** -0.5

    def __post_init__(self):
        enc = _pairs(self.encoders)
        object.__setattr__(self, "encoders", enc)
        names = [n for n, _ in enc]
        if not names:
            raise ValueError("RASConfig needs at least one encoder")
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate encoder names {names}")
        for n, c in enc:
            _tower_kind(c)
            if n in _RESERVED or not n.isidentifier():
                raise ValueError(f"encoder name {n!r} is reserved or not an identifier")
        given = dict(_pairs(self.image_sizes))
        unknown = sorted(set(given) - set(names))
        if unknown:
            raise ValueError(f"image_sizes for unknown encoders {unknown}")
        sizes = []
        for n, c in enc:
            z = given.get(n, c.image_size if isinstance(c, ViTConfig) else None)
            if z is None:
                raise ValueError(f"encoder {n!r} (ConvNeXt) needs an image_sizes entry")
            z = int(z)
            stride = c.patch_size if isinstance(c, ViTConfig) else c.stride
            if z < stride:
                raise ValueError(f"encoder {n!r}: input {z} < stride {stride}")
            sizes.append((n, z))
        object.__setattr__(self, "image_sizes", tuple(sizes))
        if self.image_tokens:
            if self.image_encoder not in names:
                raise ValueError(f"image_encoder {self.image_encoder!r} is not an encoder "
                                 f"({names})")
            c = dict(enc)[self.image_encoder]
            if not isinstance(c, ViTConfig):
                raise ValueError("image_encoder must be a ViT tower")
        if self.head not in HEADS:
            raise ValueError(f"unknown head {self.head!r}; one of {HEADS}")
        if self.decoding not in DECODINGS:
            raise ValueError(f"unknown decoding {self.decoding!r}; one of {DECODINGS}")
        if not 0.0 < self.head_prior < 1.0:
            raise ValueError(f"head_prior {self.head_prior} must be in (0, 1)")
        if self.decoding == "ar":
            for k in ("seg_token_id", "eos_token_id"):
                v = getattr(self, k)
                if not 0 <= v < self.llm.vocab_size:
                    raise ValueError(f"{k} {v} outside the LLM vocabulary "
                                     f"[0, {self.llm.vocab_size})")
            if self.seg_token_id == self.eos_token_id:
                raise ValueError("seg_token_id == eos_token_id")

    # -- derived -------------------------------------------------------------------------------
    @property
    def encoder_configs(self) -> dict[str, Any]:
        return dict(self.encoders)

    @property
    def encoder_names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.encoders)

    @property
    def d(self) -> int:
        return self.llm.hidden_size

    @property
    def compute_dtype(self) -> Any:
        return self.llm.compute_dtype

    def input_size(self, name: str) -> int:
        return dict(self.image_sizes)[name]

    def stride(self, name: str) -> int:
        c = self.encoder_configs[name]
        return c.patch_size if isinstance(c, ViTConfig) else c.stride

    def grid(self, name: str) -> tuple[int, int]:
        """The feature grid (h, w) of encoder ``name`` at its input size (floored)."""
        g = self.input_size(name) // self.stride(name)
        return g, g

    def feature_dim(self, name: str) -> int:
        c = self.encoder_configs[name]
        return c.hidden_size if isinstance(c, ViTConfig) else c.dims[-1]

    @property
    def pe2d_channels(self) -> int:
        return 2 * self.pe2d_dim if self.use_pe2d else 0

    @property
    def pooled_dim(self) -> int:
        """D_in: concatenated pooled width (spec: 6528 for the RAS-13B ensemble)."""
        return sum(self.feature_dim(n) for n in self.encoder_names) + self.pe2d_channels

    @property
    def num_image_tokens(self) -> int:
        if not self.image_tokens:
            return 0
        h, w = self.grid(self.image_encoder)
        return h * w

    def replace(self, **kw: Any) -> RASConfig:
        return dataclasses.replace(self, **kw)

    # -- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (the checkpoint meta); :meth:`from_dict` reads it back."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name == "llm":
                v = dataclasses.asdict(v)
            elif f.name == "encoders":
                v = [{"name": n, "kind": _tower_kind(c),
                      "config": (c.to_dict() if isinstance(c, ConvNeXtConfig)
                                 else _vit_to_dict(c))} for n, c in v]
            elif f.name == "image_sizes":
                v = {n: z for n, z in v}
            out[f.name] = v
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], **overrides: Any) -> RASConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown RASConfig keys {unknown}")
        kw = dict(d)
        kw["llm"] = LlamaConfig(**kw["llm"]) if "llm" in kw else LlamaConfig()
        encs = []
        for e in kw.get("encoders", ()):
            if e["kind"] == "vit":
                c = dict(e["config"])
                for k in ("image_mean", "image_std"):
                    c[k] = tuple(c[k])
                encs.append((e["name"], ViTConfig(**c)))
            elif e["kind"] == "convnext":
                encs.append((e["name"], ConvNeXtConfig.from_dict(e["config"])))
            else:
                raise ValueError(f"unknown encoder kind {e['kind']!r}")
        kw["encoders"] = tuple(encs)
        kw.update(overrides)
        return cls(**kw)


def _vit_to_dict(c: ViTConfig) -> dict[str, Any]:
    d = dataclasses.asdict(c)
    d["image_mean"], d["image_std"] = list(c.image_mean), list(c.image_std)
    return d


def ras_13b(**overrides: Any) -> RASConfig:
    """RAS-13B (spec 3.1, 6): Vicuna-13B v1.5, CLIP ViT-L/14-336 (layer -2), SigLIP
    so400m/384 (post-LN last layer; its attention-pooling head dropped: only features are
    used), DINOv2-L/518, ConvNeXt-XXL trunk at 1024 (open_clip ``convnext_xxlarge``, stride 32).
    With ``decoding="ar"`` the vocabulary grows to 32001 (``[SEG]`` = 32000).
    ``dtype`` / ``remat_policy`` / ``scan`` overrides apply to the LLM and every tower."""
    exec_kw = {k: overrides.pop(k) for k in ("dtype", "remat_policy", "scan")
               if k in overrides}
    # AR: [SEG] is a new vocabulary row (32000) appended to Vicuna's 32000
    vocab = 32001 if overrides.get("decoding") == "ar" else 32000
    cfg = RASConfig(
        llm=llama_lib.llama_config("vicuna-13b-v1.5", vocab_size=vocab, **exec_kw),
        encoders={
            "clip": vit_lib.vit_config("clip-vit-large-patch14-336", **exec_kw),
            "siglip": vit_lib.vit_config("siglip-so400m-patch14-384", use_head=False,
                                         **exec_kw),
            "dinov2": vit_lib.vit_config("dinov2-large", **exec_kw),
            "convnext": convnext_lib.convnext_config("convnext_xxlarge", **exec_kw),
        },
        image_sizes={"convnext": 1024},
        seg_token_id=32000,
    )
    return cfg.replace(**overrides) if overrides else cfg


def ras_tiny(**overrides: Any) -> RASConfig:
    """A tiny RAS for tests and CPU runs: a 2-layer LLaMA (vocab 256, d 64) and four tiny towers
    at inputs 32 (CLIP, 4x4), 40 (SigLIP, 5x5), 36 (DINOv2, 4x4 with a dropped 4-px strip) and
    64 (ConvNeXt, 2x2); 2D position map on an 8x8 grid."""
    exec_kw = {k: overrides.pop(k) for k in ("dtype", "remat_policy", "scan")
               if k in overrides}
    vit_kw = dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                  patch_size=8, **exec_kw)
    cfg = RASConfig(
        llm=llama_lib.llama_config("tiny", **exec_kw),
        encoders={
            "clip": ViTConfig(family="clip", image_size=32, select_layer=-2, **vit_kw),
            "siglip": ViTConfig(family="siglip", image_size=40, hidden_act="gelu_pytorch_tanh",
                                use_head=False, layer_norm_eps=1e-6,
                                image_mean=vit_lib.HALF, image_std=vit_lib.HALF, **vit_kw),
            "dinov2": ViTConfig(family="dinov2", image_size=36, hidden_act="gelu",
                                layer_norm_eps=1e-6, image_mean=vit_lib.IMAGENET_MEAN,
                                image_std=vit_lib.IMAGENET_STD, **vit_kw),
            "convnext": convnext_lib.convnext_config("tiny_test", **exec_kw),
        },
        image_sizes={"convnext": 64},
        pe2d_grid=8,
        pe2d_dim=16,
        seg_token_id=250,
        eos_token_id=2,
    )
    return cfg.replace(**overrides) if overrides else cfg


PRESETS = {"ras_13b": ras_13b, "ras_tiny": ras_tiny}


def ras_config(name: str = "ras_13b", **overrides: Any) -> RASConfig:
    """A preset (``ras_13b``, ``ras_tiny``) with overrides (``dtype``, ``remat_policy``,
    ``scan`` go to the LLM and the towers; other keys are RASConfig fields)."""
    if name not in PRESETS:
        raise ValueError(f"unknown RAS preset {name!r}; one of {sorted(PRESETS)}")
    return PRESETS[name](**overrides)


# ------------------------------------------------------------------------------------------
# Geometry: area weights and the 2D position map (numpy constants, static shapes)


def cell_edges(size: int, grid: int, cell: float) -> np.ndarray:
    """(grid + 1,) edges in canvas pixels of ``grid`` cells of ``cell`` pixels from 0, the
    last edge moved to ``size`` (covers a strip the encoder drops, or clips an overhang)."""
    edges = np.arange(grid + 1, dtype=np.float64) * float(cell)
    edges[-1] = float(size)
    if np.any(np.diff(edges) <= 0):
        raise ValueError(f"degenerate cells: size {size}, grid {grid}, cell {cell}")
    return edges


@functools.lru_cache(maxsize=64)
def overlap_matrix(size: int, grid: int, cell: float | None = None) -> np.ndarray:
    """(grid, size) float32: fraction of cell ``u`` (1-D) covered by canvas pixel ``p``
    (pixel ``p`` spans ``[p, p + 1)``; cells as :func:`cell_edges`, ``cell`` defaulting to
    ``size / grid``). Row sums are 1; any pixel lies in at least one cell."""
    cell = size / grid if cell is None else cell
    e = cell_edges(size, grid, cell)
    p = np.arange(size, dtype=np.float64)
    lo = np.maximum(p[None, :], e[:-1, None])
    hi = np.minimum(p[None, :] + 1, e[1:, None])
    ov = np.clip(hi - lo, 0.0, None) / np.diff(e)[:, None]
    return ov.astype(np.float32)


def area_weights(masks: Array, grid_hw: tuple[int, int],
                 cell_hw: tuple[float, float] | None = None) -> Array:
    """Exact fraction of each grid cell covered by each mask (spec 3.3 ``A_e``).

    ``masks`` (..., H, W) binary (any dtype; > 0 is inside) at canvas resolution; returns
    (..., h, w) float32 computed as ``R_h m R_w^T`` with :func:`overlap_matrix` (separable,
    any sizes). ``cell_hw``: cell size in canvas pixels (default: the grid tiles the canvas).
    """
    hh, ww = masks.shape[-2:]
    gh, gw = grid_hw
    ch, cw = (None, None) if cell_hw is None else cell_hw
    rh = jnp.asarray(overlap_matrix(int(hh), int(gh), ch))
    rw = jnp.asarray(overlap_matrix(int(ww), int(gw), cw))
    m = (masks > 0).astype(jnp.float32)
    hp = jax.lax.Precision.HIGHEST
    t = jnp.einsum("up,...pq->...uq", rh, m, precision=hp)
    return jnp.einsum("...uq,vq->...uv", t, rw, precision=hp)


def pool_features(weights: Array, features: Array, eps: float = 1e-6) -> Array:
    """``f = sum_u A(u) F(u) / (sum_u A(u) + eps)``: ``weights`` (B, N, h, w), ``features``
    (B, h, w, D) -> (B, N, D) float32."""
    f = features.astype(jnp.float32)
    num = jnp.einsum("bnhw,bhwd->bnd", weights, f, precision=jax.lax.Precision.HIGHEST)
    den = jnp.sum(weights, axis=(-2, -1))[..., None] + eps
    return num / den


@functools.lru_cache(maxsize=8)
def sine_position_map(grid: int, dim: int = 128, temperature: float = 1e4) -> np.ndarray:
    """DETR-style 2D sine map (grid, grid, 2 * dim) float32: channels ``[y | x]``, each
    interleaving ``sin`` (even) / ``cos`` (odd) of ``coord / temperature ** (2 (i // 2) /
    dim)`` with cell-centre coordinates ``(i + 0.5) / grid * 2 pi``."""
    if dim % 2:
        raise ValueError(f"pe2d dim {dim} must be even")
    coord = (np.arange(grid, dtype=np.float64) + 0.5) / grid * 2 * np.pi
    dim_t = temperature ** (2 * (np.arange(dim) // 2) / dim)
    pos = coord[:, None] / dim_t[None, :]
    pos = np.stack([np.sin(pos[:, 0::2]), np.cos(pos[:, 1::2])], axis=2).reshape(grid, dim)
    y = np.broadcast_to(pos[:, None, :], (grid, grid, dim))
    x = np.broadcast_to(pos[None, :, :], (grid, grid, dim))
    return np.concatenate([y, x], axis=-1).astype(np.float32)


# ------------------------------------------------------------------------------------------
# Modules


class MLP2(nn.Module):
    """LLaVA ``mlp2x_gelu``: ``fc2(gelu(fc1(x)))`` (exact GELU), kernels ``(embed, mlp)`` and
    ``(mlp, embed)``."""

    hidden: int
    out: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        h = dense(self.hidden, ("embed", "mlp"), dtype=self.dtype, name="fc1")(
            x.astype(self.dtype))
        h = gelu_exact(h)
        h = nn.with_logical_constraint(h, ("act_batch", "act_len", "act_mlp"))
        return dense(self.out, ("mlp", "embed"), dtype=self.dtype, name="fc2")(h)


class NARHead(nn.Module):
    """Binary selection classifier on (B, N, d) states -> (B, N) float32 logits."""

    kind: str
    d: int
    hidden: int
    prior: float

    @nn.compact
    def __call__(self, h: Array) -> Array:
        bias = -math.log((1 - self.prior) / self.prior)
        # RetinaNet-like spread of initial logits independent of the width
        w_init = nn.initializers.normal(0.01 * math.sqrt(256 / self.d))
        h = h.astype(jnp.float32)
        if self.kind == "mlp":
            h = gelu_exact(dense(self.hidden, ("embed", "mlp"), name="fc1")(h))
            w_init = nn.initializers.normal(0.01 * math.sqrt(256 / self.hidden))
            axes = ("mlp", None)
        else:
            axes = ("embed", None)
        out = nn.Dense(1, kernel_init=nn.with_logical_partitioning(w_init, axes),
                       bias_init=nn.with_logical_partitioning(
                           nn.initializers.constant(bias), (None,)),
                       name="out")(h)
        return out[..., 0]


class RAS(nn.Module):
    """The RAS model. See the module docstring and :meth:`__call__`."""

    config: RASConfig

    def setup(self):
        c = self.config
        for name, tc in c.encoders:
            tower = (vit_lib.vision_tower(tc) if isinstance(tc, ViTConfig) else ConvNeXt(tc))
            setattr(self, name, tower)
        dt = c.compute_dtype
        self.mask_projector = MLP2(c.d, c.d, dt)
        if c.image_tokens:
            self.image_projector = MLP2(c.d, c.d, dt)
        pre_init = nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed",))
        self.mask_pool_pre = self.param("mask_pool_pre", pre_init, (c.d,), jnp.float32)
        self.mask_ref_pre = self.param("mask_ref_pre", pre_init, (c.d,), jnp.float32)
        self.llm = Llama(c.llm)
        if c.decoding == "nar":
            self.head = NARHead(c.head, c.d, c.head_hidden, c.head_prior)
        else:
            self.seg_proj = dense(c.d, ("embed", "mlp"), dtype=jnp.float32)

    # -- encoders ------------------------------------------------------------------------------
    def encode(self, pixels: Mapping[str, Array] | None = None,
               features: Mapping[str, Array] | None = None) -> dict[str, Array]:
        """Feature maps (B, h, w, D) of every encoder: ``features[name]`` when given (checked
        against the grid), else the tower run on ``pixels[name]`` (B, Z, Z, 3) under
        ``stop_gradient``. What to cache offline for training with frozen towers."""
        c = self.config
        pixels, features = dict(pixels or {}), dict(features or {})
        unknown = sorted((set(pixels) | set(features)) - set(c.encoder_names))
        if unknown:
            raise ValueError(f"pixels/features for unknown encoders {unknown}; "
                             f"encoders are {c.encoder_names}")
        out = {}
        for name in c.encoder_names:
            gh, gw = c.grid(name)
            dim = c.feature_dim(name)
            if name in features:
                f = jnp.asarray(features[name])
                if f.ndim != 4 or f.shape[1:] != (gh, gw, dim):
                    raise ValueError(f"features[{name!r}] shape {f.shape}: expected "
                                     f"(B, {gh}, {gw}, {dim})")
            elif name in pixels:
                x = jnp.asarray(pixels[name])
                z = c.input_size(name)
                if x.ndim != 4 or x.shape[1:3] != (z, z):
                    raise ValueError(f"pixels[{name!r}] shape {x.shape}: expected "
                                     f"(B, {z}, {z}, 3)")
                _, aux = getattr(self, name)(x)
                f = aux["features"]
            else:
                raise ValueError(f"encoder {name!r} needs pixels[{name!r}] or "
                                 f"features[{name!r}]")
            out[name] = jax.lax.stop_gradient(f)
        return out

    # -- mask tokenizer ------------------------------------------------------------------------
    def pooled(self, masks: Array, features: Mapping[str, Array]) -> Array:
        """(B, N, H, W) canvas masks -> (B, N, D_in) float32: per-encoder area-weighted pooling
        (+ LayerNorm without affine), concatenated, plus the pooled 2D position map."""
        c = self.config
        hh, ww = masks.shape[-2:]
        parts = []
        for name in c.encoder_names:
            z, s = c.input_size(name), c.stride(name)
            a = area_weights(masks, c.grid(name), (s * hh / z, s * ww / z))
            f = pool_features(a, features[name], c.pool_eps)
            if c.encoder_norm:
                f = _layer_norm_no_affine(f, c.encoder_norm_eps)
            parts.append(f)
        if c.use_pe2d:
            g = c.pe2d_grid
            pe = jnp.asarray(sine_position_map(g, c.pe2d_dim, c.pe2d_temperature))
            a = area_weights(masks, (g, g))
            parts.append(pool_features(a, pe[None], c.pool_eps))
        return jnp.concatenate(parts, axis=-1)

    def mask_tokens(self, masks: Array, features: Mapping[str, Array]) -> Array:
        """(B, N, H, W) masks -> (B, N, d) mask tokens ``t(m)`` (compute dtype)."""
        return self.mask_projector(self.pooled(masks, features))

    def image_tokens(self, features: Mapping[str, Array]) -> Array:
        """Global visual tokens (B, h * w, d) from the image encoder's patch features."""
        f = features[self.config.image_encoder]
        b, h, w, dim = f.shape
        return self.image_projector(f.reshape(b, h * w, dim))

    # -- splicing ------------------------------------------------------------------------------
    def splice(self, input_ids: Array, slot_index: Array, image_tokens: Array | None,
               cand_tokens: Array, ref_tokens: Array | None) -> Array:
        """Input embeddings (B, L, d): ``llm.embed`` for ids >= 0, a gather from
        ``[image tokens | candidates | references | <mask-pool-pre> | <mask-ref-pre>]`` at the
        sentinel slots (``slot_index`` picks the row within its kind, clipped into range)."""
        dt = self.config.compute_dtype
        ids = jnp.asarray(input_ids, jnp.int32)
        slot = jnp.asarray(slot_index, jnp.int32)
        b = ids.shape[0]
        d = self.config.d

        def rows(x):
            return jnp.zeros((b, 1, d), dt) if x is None else x.astype(dt)

        pool_pre = jnp.broadcast_to(self.mask_pool_pre.astype(dt), (b, 1, d))
        ref_pre = jnp.broadcast_to(self.mask_ref_pre.astype(dt), (b, 1, d))
        parts = [(IMAGE_TOKEN, rows(image_tokens)), (CAND_TOKEN, rows(cand_tokens)),
                 (REF_TOKEN, rows(ref_tokens)), (POOL_PRE, pool_pre), (REF_PRE, ref_pre)]
        idx = jnp.zeros_like(ids)
        offset = 0
        for sentinel, table in parts:
            n = table.shape[1]
            idx = jnp.where(ids == sentinel, offset + jnp.clip(slot, 0, n - 1), idx)
            offset += n
        table = jnp.concatenate([t for _, t in parts], axis=1)
        gathered = jnp.take_along_axis(table, idx[..., None], axis=1)
        text = self.llm.embed(jnp.maximum(ids, 0))
        is_slot = (ids <= IMAGE_TOKEN) & (ids >= REF_PRE)
        out = jnp.where(is_slot[..., None], gathered, text)
        return nn.with_logical_constraint(out, llama_lib.BATCH_LEN_EMBED)

    def embed_inputs(self, input_ids, slot_index, pool_masks, ref_masks=None, pixels=None,
                     features=None) -> tuple[Array, Array]:
        """``(input embeddings (B, L, d), candidate tokens (B, P, d))``."""
        c = self.config
        feats = self.encode(pixels, features)
        p = pool_masks.shape[1]
        masks = jnp.asarray(pool_masks) > 0
        if ref_masks is not None:
            masks = jnp.concatenate([masks, jnp.asarray(ref_masks) > 0], axis=1)
        toks = self.mask_tokens(masks, feats)
        cand, refs = toks[:, :p], (None if ref_masks is None else toks[:, p:])
        img = self.image_tokens(feats) if c.image_tokens else None
        return self.splice(input_ids, slot_index, img, cand, refs), cand

    # -- heads ---------------------------------------------------------------------------------
    def lm_logits(self, hidden: Array) -> Array:
        """The LLM's vocabulary logits (float32) for final normed states (..., d) (a gather of
        states first, so only the positions needed are projected)."""
        c = self.config.llm
        if self.is_initializing():
            return jnp.zeros((*hidden.shape[:-1], c.vocab_size), jnp.float32)
        p = self.llm.variables["params"]
        dt = c.compute_dtype
        if c.tie_word_embeddings:
            w = nn.unbox(p["embed_tokens"]["embedding"]).T
        else:
            w = nn.unbox(p["lm_head"]["kernel"])
        return jnp.einsum("...d,dv->...v", hidden.astype(dt), w.astype(dt),
                          preferred_element_type=jnp.float32)

    def seg_scores(self, hidden: Array, cand_tokens: Array,
                   pool_valid: Array | None = None) -> Array:
        """AR: ``<seg_proj(h_k), t(c_i)> * scale`` -> (B, K, P) float32; padded candidates
        (``pool_valid`` 0) get :data:`MASKED_SCORE`."""
        c = self.config
        scale = c.d ** -0.5 if c.ar_score_scale is None else c.ar_score_scale
        q = self.seg_proj(hidden.astype(jnp.float32))
        s = jnp.einsum("bkd,bpd->bkp", q, cand_tokens.astype(jnp.float32),
                       precision=jax.lax.Precision.HIGHEST) * scale
        if pool_valid is not None:
            s = jnp.where(jnp.asarray(pool_valid).astype(bool)[:, None, :], s, MASKED_SCORE)
        return s

    # -- forward -------------------------------------------------------------------------------
    def __call__(
        self,
        input_ids: Array,
        slot_index: Array,
        attention_mask: Array,
        cand_pos: Array | None = None,
        *,
        pool_masks: Array,
        ref_masks: Array | None = None,
        pixels: Mapping[str, Array] | None = None,
        features: Mapping[str, Array] | None = None,
        pool_valid: Array | None = None,
        ar_pos: Array | None = None,
        mode: str | None = None,
        output_hidden: bool = False,
        deterministic: bool = True,
    ) -> tuple[Array, dict[str, Any]]:
        """One forward pass.

        Inputs: ``input_ids``, ``slot_index``, ``attention_mask`` (B, L) from the layout
        builder; ``pool_masks`` (B, P, H, W) and ``ref_masks`` (B, R, H, W) canvas masks;
        ``pixels`` / ``features`` dicts by encoder name; ``pool_valid`` (B, P).

        ``mode`` (default ``config.decoding``):

        - ``"nar"``: ``cand_pos`` (B, P) second-copy candidate positions -> logits (B, P)
          float32 (one per candidate; padded entries are meaningless, mask them with
          ``pool_valid``). No vocabulary logits are computed.
        - ``"lm"`` (stage-1 captioning): the LM logits (B, L, V) float32.
        - ``"ar"`` (teacher forcing, ``decoding="ar"``): ``ar_pos`` (B, K + 1) positions whose
          next token is predicted (the state before each ``[SEG]`` and before the EOS) ->
          scores (B, K, P) of the first K against the candidate tokens; ``aux["lm_logits"]``
          (B, K + 1, V) float32 at all K + 1 (the [SEG] vs EOS decision).
        - ``"ar_decode"`` (``decoding="ar"``): greedy cached decoding of the prompt
          (``input_ids`` end with ``" ASSISTANT:"``, right padded) for ``K = ar_pos.shape[1] -
          1`` steps, inside one ``apply`` (what an eval step can call); returns the dict of
          :func:`ar_generate` (``selected``, ``choices``, ``scores``, ``decision``,
          ``num_segs``), equal to it. At init it creates the parameters of ``"ar"``.

        ``aux``: ``hidden_states`` (B, L, d) float32 with ``output_hidden``. ``deterministic``
        is accepted for the trainer (RAS has no dropout).
        """
        del deterministic
        c = self.config
        mode = c.decoding if mode is None else mode
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; one of {MODES}")
        if mode in ("ar", "ar_decode") and c.decoding != "ar":
            raise ValueError(f"mode {mode!r} needs config.decoding == 'ar' (the seg projection)")
        if mode == "ar_decode" and ar_pos is None:
            raise ValueError("mode 'ar_decode' needs ar_pos (its shape gives the step count)")
        embeds, cand = self.embed_inputs(input_ids, slot_index, pool_masks, ref_masks, pixels,
                                         features)
        if mode == "ar_decode" and not self.is_initializing():
            k = int(jnp.shape(ar_pos)[1]) - 1
            return self._ar_decode(embeds, cand, attention_mask, pool_valid, k), {}
        if mode == "ar_decode":
            mode = "ar"
        logits, llm_aux = self.llm(inputs_embeds=embeds, attention_mask=attention_mask,
                                   return_logits=(mode == "lm"))
        hidden = llm_aux["hidden_states"]
        aux: dict[str, Any] = {}
        if output_hidden:
            aux["hidden_states"] = hidden
        if self.is_initializing():  # create every parameter of the configured decoding
            if c.decoding == "nar":
                self.head(hidden[:, :1])
            else:
                self.seg_scores(hidden[:, :1], cand)
        if mode == "lm":
            return logits, aux
        if mode == "nar":
            if cand_pos is None:
                raise ValueError("mode 'nar' needs cand_pos")
            h = _gather(hidden, cand_pos)
            return self.head(h), aux
        if ar_pos is None:
            raise ValueError("mode 'ar' needs ar_pos")
        h = _gather(hidden, ar_pos)
        aux["lm_logits"] = self.lm_logits(h)
        return self.seg_scores(h[:, :-1], cand, pool_valid), aux

    def _ar_decode(self, embeds: Array, cand: Array, attention_mask: Array,
                   pool_valid: Array | None, max_segs: int) -> dict[str, Array]:
        """``mode="ar_decode"``: :func:`ar_generate`'s loop inside one ``apply`` (unrolled
        over ``max_segs`` steps: Linen modules cannot run under a raw ``lax.scan``)."""
        c = self.config
        seg, eos = c.seg_token_id, c.eos_token_id
        b, t = embeds.shape[:2]
        p = cand.shape[1]
        if max_segs < 1:
            raise ValueError(f"ar_decode needs at least one step, got {max_segs}")
        mask = jnp.asarray(attention_mask).astype(bool)
        cache = llama_lib.init_cache(c.llm, b, t + max_segs)
        _, aux = self.llm(inputs_embeds=embeds, attention_mask=mask,
                          positions=llama_lib.positions_from_mask(mask), cache=cache,
                          return_logits=False)
        h = aux["hidden_states"][jnp.arange(b), llama_lib.last_token_index(mask)]
        cache, pos = aux["cache"], jnp.sum(mask.astype(jnp.int32), axis=1)
        valid = (jnp.ones((b, p), bool) if pool_valid is None
                 else jnp.asarray(pool_valid).astype(bool))

        def decide(h):
            logits, scores = self.ar_decide(h, cand, valid)
            return jnp.stack([logits[:, seg], logits[:, eos]], axis=-1), scores

        done = jnp.zeros((b,), bool)
        choices, all_scores, decisions = [], [], []
        for _ in range(max_segs):
            decision, scores = decide(h)
            emit = (decision[:, 0] > decision[:, 1]) & ~done
            choices.append(jnp.where(emit, jnp.argmax(scores, axis=-1).astype(jnp.int32), -1))
            all_scores.append(scores)
            decisions.append(decision)
            h, cache = self.ar_step(jnp.full((b, 1), seg, jnp.int32), pos[:, None], cache)
            pos, done = pos + 1, done | ~emit
        decisions.append(decide(h)[0])
        ch = jnp.stack(choices, axis=1)
        sel = jnp.zeros((b, p), bool)
        sel = sel.at[jnp.arange(b)[:, None], jnp.maximum(ch, 0)].max(ch >= 0)
        return {"selected": sel, "choices": ch, "scores": jnp.stack(all_scores, axis=1),
                "decision": jnp.stack(decisions, axis=1),
                "num_segs": jnp.sum(ch >= 0, axis=1).astype(jnp.int32)}

    # -- AR decoding pieces (see ar_generate) ----------------------------------------------------
    def ar_prefill(self, input_ids, slot_index, attention_mask, *, pool_masks, ref_masks=None,
                   pixels=None, features=None, cache_length: int):
        """Run the prompt (right padded) into a fresh KV cache of ``cache_length`` slots.
        Returns ``(cache, hidden (B, d) at each row's last real token, candidate tokens,
        next position (B,))``."""
        embeds, cand = self.embed_inputs(input_ids, slot_index, pool_masks, ref_masks, pixels,
                                         features)
        b = embeds.shape[0]
        cache = llama_lib.init_cache(self.config.llm, b, cache_length)
        mask = jnp.asarray(attention_mask).astype(bool)
        _, aux = self.llm(inputs_embeds=embeds, attention_mask=mask,
                          positions=llama_lib.positions_from_mask(mask), cache=cache,
                          return_logits=False)
        last = llama_lib.last_token_index(mask)
        h = aux["hidden_states"][jnp.arange(b), last]
        return aux["cache"], h, cand, jnp.sum(mask.astype(jnp.int32), axis=1)

    def ar_step(self, token_ids: Array, positions: Array, cache: Mapping[str, Array]):
        """Feed one token per row (B, 1) at ``positions`` (B, 1): ``(hidden (B, d), cache)``."""
        b = token_ids.shape[0]
        _, aux = self.llm(token_ids, jnp.ones((b, 1), bool), positions, cache=cache,
                          return_logits=False)
        return aux["hidden_states"][:, 0], aux["cache"]

    def ar_decide(self, hidden: Array, cand_tokens: Array, pool_valid: Array | None = None):
        """For states (B, d): ``(lm logits (B, V), seg scores (B, P))``."""
        h = hidden[:, None]
        return self.lm_logits(h)[:, 0], self.seg_scores(h, cand_tokens, pool_valid)[:, 0]


def _layer_norm_no_affine(x: Array, eps: float) -> Array:
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps)


def _gather(hidden: Array, pos: Array) -> Array:
    """hidden (B, L, d), pos (B, K) -> (B, K, d) (positions clipped into range)."""
    pos = jnp.clip(jnp.asarray(pos, jnp.int32), 0, hidden.shape[1] - 1)
    return jnp.take_along_axis(hidden, pos[..., None], axis=1)


# ------------------------------------------------------------------------------------------
# AR decoding


def ar_generate(model: RAS, variables: Mapping[str, Any], inputs: Mapping[str, Any], *,
                max_segs: int) -> dict[str, Array]:
    """Greedy AR decoding with the KV cache (the baseline of spec 5.6).

    ``inputs``: the prompt ending with ``" ASSISTANT:"`` (right padded) as model inputs
    (``input_ids``, ``slot_index``, ``attention_mask``, ``pool_masks``, optional
    ``ref_masks``, ``pixels`` / ``features``, ``pool_valid``). Each step decides ``[SEG]``
    vs EOS by the larger of the two LM logits (the decision is restricted to these two
    tokens); a ``[SEG]`` is scored against the candidates (its emitting state, as in
    training), its argmax candidate selected, and the ``[SEG]`` token fed back. Stops at EOS
    or after ``max_segs`` [SEG]s. Returns ``selected`` (B, P) bool (the union of chosen
    candidates), ``choices`` (B, max_segs) int32 (-1 after the stop), ``scores``
    (B, max_segs, P), ``decision`` (B, max_segs + 1, 2) [SEG, EOS] logits (the last one after
    ``max_segs`` [SEG]s), ``num_segs`` (B,). Static shapes: the program always runs the
    prefill, ``max_segs`` one-token steps and ``max_segs + 1`` decisions; rows that stopped
    keep computing (discarded). The jitted program is cached per (model, max_segs).
    """
    if model.config.decoding != "ar":
        raise ValueError("ar_generate needs a model with config.decoding == 'ar'")
    if max_segs < 1:
        raise ValueError(f"max_segs must be >= 1, got {max_segs}")
    return _ar_fn(model, int(max_segs))(variables, dict(inputs))


@functools.lru_cache(maxsize=16)
def _ar_fn(model: RAS, max_segs: int):
    c = model.config
    seg, eos = c.seg_token_id, c.eos_token_id

    @jax.jit
    def run(variables, inputs):
        inputs = dict(inputs)
        pool_valid = inputs.pop("pool_valid", None)
        ids = inputs.pop("input_ids")
        slot = inputs.pop("slot_index")
        mask = inputs.pop("attention_mask")
        b, t = ids.shape
        cache, h, cand, pos = model.apply(variables, ids, slot, mask, **inputs,
                                          cache_length=t + max_segs, method=RAS.ar_prefill)
        p = cand.shape[1]
        valid = (jnp.ones((b, p), bool) if pool_valid is None
                 else jnp.asarray(pool_valid).astype(bool))

        def decide(h):
            logits, scores = model.apply(variables, h, cand, valid, method=RAS.ar_decide)
            return jnp.stack([logits[:, seg], logits[:, eos]], axis=-1), scores

        def step(carry, _):
            h, pos, cache, done = carry
            decision, scores = decide(h)
            emit = (decision[:, 0] > decision[:, 1]) & ~done
            choice = jnp.where(emit, jnp.argmax(scores, axis=-1).astype(jnp.int32), -1)
            tok = jnp.full((b, 1), seg, jnp.int32)
            h2, cache2 = model.apply(variables, tok, pos[:, None], cache, method=RAS.ar_step)
            return (h2, pos + 1, cache2, done | ~emit), (choice, scores, decision)

        done = jnp.zeros((b,), bool)
        (h, _, _, _), (choices, scores, decision) = jax.lax.scan(
            step, (h, pos, cache, done), None, length=max_segs)
        last, _ = decide(h)  # after max_segs [SEG]s: the EOS decision (the stop is forced)
        choices = choices.T
        sel = jnp.zeros((b, p), bool)
        sel = sel.at[jnp.arange(b)[:, None], jnp.maximum(choices, 0)].max(choices >= 0)
        decision = jnp.concatenate([jnp.swapaxes(decision, 0, 1), last[:, None]], axis=1)
        return {"selected": sel, "choices": choices, "scores": jnp.swapaxes(scores, 0, 1),
                "decision": decision,
                "num_segs": jnp.sum(choices >= 0, axis=1).astype(jnp.int32)}

    return run


# ------------------------------------------------------------------------------------------
# Hungarian matching (the AR loss's set matching; the loss itself lives in refjax.losses)


def hungarian_match(cost: Array, row_valid: Array | None = None,
                    col_valid: Array | None = None) -> tuple[Array, Array, Array]:
    """Minimum-cost matching of the valid rows to the valid columns of ``cost`` (K, N).

    ``optax.assignment.hungarian_algorithm`` on a copy where invalid entries are masked so
    they are never preferred: ``min(#valid rows, #valid cols)`` valid pairs are returned with
    the minimum total cost among valid pairs. Returns ``(rows, cols, pair_valid)``, each
    ``(min(K, N),)``: pair ``j`` is row ``rows[j]`` with column ``cols[j]``, meaningful where
    ``pair_valid[j]``. jit / vmap friendly (fixed shapes).
    """
    import optax

    cost = jnp.asarray(cost, jnp.float32)
    k, n = cost.shape
    rv = jnp.ones((k,), bool) if row_valid is None else jnp.asarray(row_valid).astype(bool)
    cv = jnp.ones((n,), bool) if col_valid is None else jnp.asarray(col_valid).astype(bool)
    both = rv[:, None] & cv[None, :]
    finite = jnp.where(both, cost, 0.0)
    span = jnp.max(finite) - jnp.min(finite)
    big = (span + 1.0) * (min(k, n) + 1)
    # valid pairs: cost; a valid row/col with an invalid partner: +big; invalid-invalid: 0
    masked = jnp.where(both, cost - jnp.min(finite), jnp.where(rv[:, None] | cv[None, :],
                                                               big, 0.0))
    rows, cols = optax.assignment.hungarian_algorithm(masked)
    return rows, cols, rv[rows] & cv[cols]


# ------------------------------------------------------------------------------------------
# Helpers: dummy inputs, init, parameter counts


def dummy_inputs(cfg: RASConfig, batch_size: int = 1, seq_len: int = 16, pool_max: int = 4,
                 refs_max: int = 1, canvas: int = 32, *, pixels: bool = True,
                 ar_k: int = 2) -> dict[str, Any]:
    """Zero inputs with every field (for ``init`` / ``eval_shape``); ``pixels=False`` gives
    ``features`` instead (then the towers' parameters are not created)."""
    b = batch_size
    out: dict[str, Any] = {
        "input_ids": jnp.zeros((b, seq_len), jnp.int32),
        "slot_index": jnp.zeros((b, seq_len), jnp.int32),
        "attention_mask": jnp.ones((b, seq_len), jnp.int32),
        "cand_pos": jnp.zeros((b, pool_max), jnp.int32),
        "pool_masks": jnp.zeros((b, pool_max, canvas, canvas), jnp.uint8),
        "ref_masks": (jnp.zeros((b, refs_max, canvas, canvas), jnp.uint8) if refs_max
                      else None),
        "pool_valid": jnp.ones((b, pool_max), jnp.int32),
    }
    if cfg.decoding == "ar":
        out["ar_pos"] = jnp.zeros((b, ar_k + 1), jnp.int32)
    if pixels:
        out["pixels"] = {n: jnp.zeros((b, cfg.input_size(n), cfg.input_size(n), 3),
                                      jnp.float32) for n in cfg.encoder_names}
    else:
        out["features"] = {n: jnp.zeros((b, *cfg.grid(n), cfg.feature_dim(n)), jnp.float32)
                           for n in cfg.encoder_names}
    return out


def init_fn(cfg: RASConfig, **dummy_kw: Any):
    """``rng -> variables`` of ``RAS(cfg)`` on :func:`dummy_inputs` (``dummy_kw`` passed on)."""
    inputs = dummy_inputs(cfg, **dummy_kw)
    model = RAS(cfg)

    def init(rng):
        kw = dict(inputs)
        return model.init(rng, kw.pop("input_ids"), kw.pop("slot_index"),
                          kw.pop("attention_mask"), kw.pop("cand_pos"), **kw)

    return init


def abstract_variables(cfg: RASConfig, **dummy_kw: Any) -> Any:
    """Boxed ``eval_shape`` of the variables (nothing allocated)."""
    return jax.eval_shape(init_fn(cfg, **dummy_kw), jax.random.key(0))


def param_count(tree: Any) -> int:
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(nn.unbox(tree))))


def param_counts(params: Any) -> dict[str, int]:
    """Parameters per top-level subtree."""
    params = nn.unbox(params)
    return {k: param_count(v) for k, v in params.items()}


def pixel_stats(cfg: RASConfig, name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` normalising encoder ``name``'s input: a ViT tower's own
    ``image_mean`` / ``image_std``; ConvNeXt-CLIP (no statistics in its config) OpenAI CLIP's
    (spec 3.1)."""
    c = cfg.encoder_configs[name]
    if isinstance(c, ViTConfig):
        return tuple(c.image_mean), tuple(c.image_std)
    return tuple(vit_lib.OPENAI_CLIP_MEAN), tuple(vit_lib.OPENAI_CLIP_STD)


def normalize_pixels(x: Array, mean: Any, std: Any) -> Array:
    """uint8 (or [0, 255] float) pixels (..., 3) -> ``(x / 255 - mean) / std`` float32, the
    one normalisation of the RAS task, its feature cache and its predictor."""
    x = jnp.asarray(x).astype(jnp.float32) / jnp.float32(255.0)
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def frozen_subtrees(cfg: RASConfig) -> tuple[str, ...]:
    """The encoder subtrees (always frozen, spec 7)."""
    return cfg.encoder_names


def expected_grid_features(cfg: RASConfig) -> dict[str, tuple[int, int, int]]:
    """``{name: (h, w, D)}`` of every encoder's feature map (for caching)."""
    return {n: (*cfg.grid(n), cfg.feature_dim(n)) for n in cfg.encoder_names}


__all__ = [
    "CAND_TOKEN", "IGNORE_INDEX", "IMAGE_TOKEN", "POOL_PRE", "REF_PRE", "REF_TOKEN",
    "SENTINELS", "RAS", "RASConfig", "abstract_variables", "ar_generate", "area_weights",
    "dummy_inputs", "frozen_subtrees", "hungarian_match", "init_fn", "normalize_pixels",
    "overlap_matrix", "param_count", "param_counts", "pixel_stats", "pool_features", "ras_13b",
    "ras_config", "ras_tiny", "sine_position_map",
]
