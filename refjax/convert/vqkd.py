"""Official BEiT v2 VQ-KD checkpoints <-> refjax ``VQKD`` (tokenizer) parameters.

Reads ``vqkd_encoder_base_decoder_3x768x12_clip-*.pth`` (``{'model': state_dict}``, through
``load_state_dict``) or a ``.safetensors`` state dict. Used: ``encoder.*``,
``encode_task_layer.{0,2}.*`` and the codebook ``quantize.embedding.weight`` (as stored, not
re-normalised). Reported as ignored by name: the decoder, ``decode_task_layer``, the teacher /
scaling / loss modules (the official tokenizer loader drops those three too) and the quantizer's
EMA state (``quantize.cluster_size``, ``quantize.embedding.{cluster_size, embed_avg,
initted}``). Half-precision tensors are read as float32. The position table keeps its
pretraining size (the model interpolates on the fly, as the official forward).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from refjax.convert.common import (
    ConversionError,
    ConversionReport,
    Rule,
    conv_to_flax,
    conv_to_torch,
    flax_to_torch,
    linear_t,
    load_params,
    load_state_dict,
    save_params,
    torch_to_flax,
)
from refjax.models.vqkd import VQKD, VQKDConfig

IGNORED_PREFIXES = (
    "decoder.",
    "decode_task_layer.",
    "teacher",
    "scaling",
    "loss",
    "quantize.cluster_size",
    "quantize.embedding.cluster_size",
    "quantize.embedding.embed_avg",
    "quantize.embedding.initted",
)
CODEBOOK = "quantize.embedding.weight"


def _qkv_to_flax(w: np.ndarray) -> np.ndarray:
    """torch ``attn.qkv.weight`` (3D, D) -> kernel (D, 3, D)."""
    return np.ascontiguousarray(w.T.reshape(w.shape[1], 3, w.shape[0] // 3))


def _qkv_to_torch(k: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(k.reshape(k.shape[0], -1).T)


def vqkd_rules(cfg: VQKDConfig) -> list[Rule]:
    """The key map between the official VQ-KD state_dict and our ``VQKD`` params."""
    enc = ("encoder",)
    rules = [
        Rule("encoder.cls_token", enc + ("cls_token",)),
        Rule("encoder.pos_embed", enc + ("pos_embed",)),
        Rule("encoder.patch_embed.proj.weight", enc + ("patch_embed", "proj", "kernel"),
             conv_to_flax, conv_to_torch),
        Rule("encoder.patch_embed.proj.bias", enc + ("patch_embed", "proj", "bias")),
    ]
    ident = lambda x: x  # noqa: E731
    subs: list[tuple[str, tuple[str, ...], Any, Any]] = [
        ("attn.qkv.weight", ("attn", "qkv", "kernel"), _qkv_to_flax, _qkv_to_torch),
        ("attn.q_bias", ("attn", "q_bias"), ident, ident),
        ("attn.v_bias", ("attn", "v_bias"), ident, ident),
        ("attn.proj.weight", ("attn", "proj", "kernel"), linear_t, linear_t),
        ("attn.proj.bias", ("attn", "proj", "bias"), ident, ident),
    ]
    for ln in ("norm1", "norm2"):
        subs.append((f"{ln}.weight", (ln, "scale"), ident, ident))
        subs.append((f"{ln}.bias", (ln, "bias"), ident, ident))
    for fc in ("fc1", "fc2"):
        subs.append((f"mlp.{fc}.weight", ("mlp", fc, "kernel"), linear_t, linear_t))
        subs.append((f"mlp.{fc}.bias", ("mlp", fc, "bias"), ident, ident))
    for i in range(cfg.depth):
        base = enc + (("blocks",) if cfg.scan else (f"blocks_{i}",))
        for torch_sub, path_sub, fwd, back in subs:
            rules.append(Rule(f"encoder.blocks.{i}.{torch_sub}", base + path_sub, fwd, back, i))
    rules += [
        Rule("encoder.fc_norm.weight", enc + ("fc_norm", "scale")),
        Rule("encoder.fc_norm.bias", enc + ("fc_norm", "bias")),
    ]
    for i in (0, 2):
        path = ("encode_task_layer", f"layers_{i}")
        rules.append(Rule(f"encode_task_layer.{i}.weight", path + ("kernel",), linear_t, linear_t))
        rules.append(Rule(f"encode_task_layer.{i}.bias", path + ("bias",)))
    rules.append(Rule(CODEBOOK, ("quantize", "embedding")))
    return rules


def is_ignored(key: str) -> bool:
    """Known keys that the tokenizer does not use (decoder, teacher, quantizer EMA state)."""
    return key.startswith(IGNORED_PREFIXES)


def infer_config(state_dict: Mapping[str, np.ndarray], **overrides: Any) -> VQKDConfig:
    """Tokenizer shape from the state_dict; ``heads`` is not stored (default: dim // 64)."""
    sd = state_dict
    try:
        dim = sd["encoder.cls_token"].shape[-1]
        patch = sd["encoder.patch_embed.proj.weight"].shape[-1]
        in_chans = sd["encoder.patch_embed.proj.weight"].shape[1]
        rows = sd["encoder.pos_embed"].shape[1]
        mlp = sd["encoder.blocks.0.mlp.fc1.weight"].shape[0]
        codebook_size, code_dim = sd[CODEBOOK].shape
    except KeyError as e:
        raise ConversionError(f"not a VQ-KD state_dict: missing {e.args[0]}") from e
    depth = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.blocks."))
    grid = math.isqrt(rows - 1)
    if grid * grid != rows - 1:
        raise ConversionError(f"encoder.pos_embed: {rows} rows is not 1 + a square")
    kw = dict(dim=dim, depth=depth, heads=max(1, dim // 64), mlp_dim=mlp, patch_size=patch,
              img_size=grid * patch, in_chans=in_chans, codebook_size=codebook_size,
              code_dim=code_dim)
    kw.update(overrides)
    return VQKDConfig(**kw)


def param_template(cfg: VQKDConfig) -> dict:
    """Unboxed parameter shapes of ``VQKD(cfg)`` (no computation)."""
    p = cfg.patch_size
    shapes = jax.eval_shape(
        VQKD(cfg).init, jax.random.key(0), jnp.zeros((1, p, p, cfg.in_chans), jnp.float32)
    )
    return nn.unbox(shapes)["params"]


def _as_float32(v: Any) -> np.ndarray:
    v = np.asarray(v)
    return v.astype(np.float32) if np.issubdtype(v.dtype, np.floating) else v


def from_torch(
    state_dict: Mapping[str, np.ndarray], cfg: VQKDConfig, *, strict: bool = True
) -> tuple[dict, ConversionReport]:
    """Official VQ-KD state_dict -> ``VQKD(cfg)`` params, plus the report.

    Missing keys are an error with ``strict`` (named); the decoder / teacher / EMA keys go to
    ``report.ignored``, anything else unknown to ``report.unexpected``; a shape that does not
    fit raises ``ConversionError`` naming the torch key.
    """
    sd = {k: _as_float32(v) for k, v in state_dict.items()}
    params, report = torch_to_flax(
        sd, vqkd_rules(cfg), param_template(cfg), scanned=cfg.scan, strict=strict,
        ignore=is_ignored,
    )
    report.ignored = sorted(k for k in sd if is_ignored(k))
    return params, report


def to_torch(params: Mapping, cfg: VQKDConfig) -> dict[str, np.ndarray]:
    """refjax params -> the tokenizer part of the official state_dict (numpy).

    The decoder and EMA buffers are not part of the tokenizer; loading this into the official
    ``VQKD`` needs ``strict=False`` (and ``quantize.embedding.initted = 1``, or its first
    forward re-initialises the codebook by k-means)."""
    return flax_to_torch(nn.unbox(params), vqkd_rules(cfg), scanned=cfg.scan)


def convert_cli(
    in_path: str, out_dir: str, *, heads: int | None = None, variant: str | None = None,
    scan: bool = True,
) -> tuple[VQKDConfig, ConversionReport]:
    """Convert an official checkpoint (``.pth`` / ``.safetensors``) to an Orbax params
    checkpoint at ``out_dir`` with ``refjax_meta.json`` (model ``vqkd`` + the config).

    ``variant`` (``base``/``tiny``/``small``) sets ``heads`` and checks the other sizes.
    """
    from refjax.models.vqkd import VARIANTS

    sd = load_state_dict(in_path)
    shape = infer_config(sd, heads=1, scan=scan)  # sizes only; heads is not stored
    if variant is not None:
        if variant not in VARIANTS:
            raise ValueError(f"unknown VQ-KD variant {variant!r}; one of {sorted(VARIANTS)}")
        want = {k: v for k, v in VARIANTS[variant].items() if k != "heads"}
        got = {k: getattr(shape, k) for k in want}
        if got != want:
            raise ConversionError(f"checkpoint has {got}, variant {variant!r} has {want}")
        heads = VARIANTS[variant]["heads"] if heads is None else heads
    cfg = infer_config(sd, scan=scan, **({} if heads is None else {"heads": heads}))
    params, report = from_torch(sd, cfg, strict=True)
    print(report.summary())
    meta = {"model": "vqkd", "config": dataclasses.asdict(cfg),
            "source": os.path.abspath(in_path), "ignored": report.ignored,
            "unexpected": report.unexpected}
    save_params(out_dir, params, meta)
    print(f"wrote {out_dir} (VQ-KD dim={cfg.dim} depth={cfg.depth} heads={cfg.heads} "
          f"codebook={cfg.codebook_size}x{cfg.code_dim})")
    return cfg, report


def load_converted(path: str, **overrides: Any) -> tuple[dict, VQKDConfig]:
    """``(params, VQKDConfig)`` of a :func:`convert_cli` checkpoint; ``overrides`` set
    execution fields (``dtype``, ``attention_impl``; ``scan`` must match the file)."""
    params, meta = load_params(path)
    if meta.get("model") != "vqkd":
        raise ConversionError(f"{path} is not a VQ-KD checkpoint (model={meta.get('model')!r})")
    return params, VQKDConfig(**{**meta["config"], **overrides})
