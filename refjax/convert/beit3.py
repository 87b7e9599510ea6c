"""Official BEiT-3 checkpoints (torchscale layout) <-> refjax ``BEiT3`` parameters.

Accepts ``{'model': state_dict}`` with the ``beit3.`` prefix (unilm / OneRef .pth), or a bare
torchscale ``BEiT3`` state_dict; ``.pth`` through torch, ``.safetensors`` without torch.
The vision position table is interpolated to the target grid as unilm's
``load_model_and_may_interpolate``: the 3 leading rows (2 fairseq rows + cls) kept, the patch
rows resampled with PyTorch bicubic semantics (A = -0.75, align_corners=False).
"""

from __future__ import annotations

import math
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
    torch_to_flax,
)
from refjax.models.beit3 import BEiT3, BEiT3Config
from refjax.models.layers import resize_grid_bicubic

PREFIX = "beit3."


def _layer_rules(cfg: BEiT3Config) -> list[Rule]:
    """Per-layer rules: (torch suffix, Flax sub-path, is a Linear weight) for each layer."""
    subs: list[tuple[str, tuple[str, ...], bool]] = []
    for m in ("A", "B"):
        for p in ("q_proj", "k_proj", "v_proj", "out_proj"):
            subs.append((f"self_attn.{p}.{m}.weight", ("self_attn", p, m, "kernel"), True))
            subs.append((f"self_attn.{p}.{m}.bias", ("self_attn", p, m, "bias"), False))
        for ln in ("self_attn.inner_attn_ln", "self_attn_layer_norm", "final_layer_norm"):
            path = tuple(ln.split(".")) + (m,)
            subs.append((f"{ln}.{m}.weight", path + ("scale",), False))
            subs.append((f"{ln}.{m}.bias", path + ("bias",), False))
        for fc in ("fc1", "fc2"):
            subs.append((f"ffn.{m}.{fc}.weight", ("ffn", m, fc, "kernel"), True))
            subs.append((f"ffn.{m}.{fc}.bias", ("ffn", m, fc, "bias"), False))
        subs.append((f"ffn.{m}.ffn_layernorm.weight", ("ffn", m, "ffn_layernorm", "scale"), False))
        subs.append((f"ffn.{m}.ffn_layernorm.bias", ("ffn", m, "ffn_layernorm", "bias"), False))
    rules = []
    for i in range(cfg.depth):
        base = ("encoder", "layers") if cfg.scan else ("encoder", f"layers_{i}")
        for torch_sub, path_sub, is_linear in subs:
            t = linear_t if is_linear else (lambda x: x)
            rules.append(Rule(f"encoder.layers.{i}.{torch_sub}", base + path_sub, t, t, i))
    return rules


def beit3_rules(cfg: BEiT3Config) -> list[Rule]:
    """The key map between a torchscale ``BEiT3`` state_dict (no prefix) and our params."""
    rules = [
        Rule("text_embed.weight", ("text_embed", "embedding")),
        Rule("vision_embed.mask_token", ("vision_embed", "mask_token")),
        Rule("vision_embed.cls_token", ("vision_embed", "cls_token")),
        Rule("vision_embed.proj.weight", ("vision_embed", "proj", "kernel"),
             conv_to_flax, conv_to_torch),
        Rule("vision_embed.proj.bias", ("vision_embed", "proj", "bias")),
        Rule("encoder.embed_positions.A.weight", ("embed_positions", "A")),
        Rule("encoder.embed_positions.B.weight", ("embed_positions", "B")),
    ]
    rules += _layer_rules(cfg)
    for m in ("A", "B"):
        rules.append(Rule(f"encoder.layer_norm.{m}.weight", ("encoder", "layer_norm", m, "scale")))
        rules.append(Rule(f"encoder.layer_norm.{m}.bias", ("encoder", "layer_norm", m, "bias")))
    return rules


def interpolate_vision_positions(table: np.ndarray, grid: int) -> np.ndarray:
    """Resample a (3 + g*g, D) vision position table to ``grid`` x ``grid`` patches."""
    n = table.shape[0] - 3
    g = int(round(math.sqrt(n)))
    if g * g != n:
        raise ConversionError(
            f"encoder.embed_positions.A.weight: {table.shape[0]} rows is not 3 + a square"
        )
    if g == grid:
        return table
    patches = table[3:].reshape(g, g, -1)
    resized = resize_grid_bicubic(patches.astype(np.float32), (grid, grid))
    return np.concatenate([table[:3], resized.reshape(grid * grid, -1)], axis=0).astype(
        table.dtype
    )


def strip_prefix(state_dict: Mapping[str, np.ndarray]) -> tuple[dict, list[str]]:
    """Keys under ``beit3.`` with the prefix removed (bare dicts pass through) + the others."""
    if any(k.startswith(PREFIX) for k in state_dict):
        inner = {k[len(PREFIX):]: v for k, v in state_dict.items() if k.startswith(PREFIX)}
        others = sorted(k for k in state_dict if not k.startswith(PREFIX))
        return inner, others
    return dict(state_dict), []


def infer_config(state_dict: Mapping[str, np.ndarray], **overrides: Any) -> BEiT3Config:
    """Encoder shape from a (prefix-stripped) state_dict; heads assume head_dim 64."""
    sd = state_dict
    try:
        vocab, dim = sd["text_embed.weight"].shape
        patch = sd["vision_embed.proj.weight"].shape[-1]
        mlp = sd["encoder.layers.0.ffn.A.fc1.weight"].shape[0]
        rows = sd["encoder.embed_positions.A.weight"].shape[0]
        max_pos = sd["encoder.embed_positions.B.weight"].shape[0]
    except KeyError as e:
        raise ConversionError(f"not a BEiT-3 state_dict: missing {e.args[0]}") from e
    depth = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers."))
    grid = int(round(math.sqrt(rows - 3)))
    kw = dict(dim=dim, depth=depth, heads=max(1, dim // 64), mlp_dim=mlp, vocab_size=vocab,
              patch_size=patch, img_size=grid * patch, max_source_positions=max_pos)
    kw.update(overrides)
    return BEiT3Config(**kw)


def param_template(cfg: BEiT3Config) -> dict:
    """Unboxed parameter shapes of ``BEiT3(cfg)`` (no computation)."""
    p = cfg.patch_size
    shapes = jax.eval_shape(
        BEiT3(cfg).init,
        jax.random.key(0),
        jnp.zeros((1, 2), jnp.int32),
        None,
        jnp.zeros((1, p, p, cfg.in_chans), jnp.float32),
    )
    return nn.unbox(shapes)["params"]


def from_torch(
    state_dict: Mapping[str, np.ndarray], cfg: BEiT3Config, *, strict: bool = True
) -> tuple[dict, ConversionReport]:
    """BEiT-3 state_dict (prefixed or bare) -> refjax params for ``cfg``, plus the report.

    The vision position table is interpolated to ``cfg.grid``; non-``beit3.`` keys of a
    wrapper checkpoint are reported as unexpected (a converter for the wrapper uses them).
    """
    inner, others = strip_prefix(state_dict)
    key = "encoder.embed_positions.A.weight"
    if key in inner:
        inner[key] = interpolate_vision_positions(np.asarray(inner[key]), cfg.grid)
    params, report = torch_to_flax(
        inner, beit3_rules(cfg), param_template(cfg), scanned=cfg.scan, strict=strict
    )
    report.unexpected = sorted(report.unexpected + others)
    return params, report


def to_torch(params: Mapping, cfg: BEiT3Config, prefix: str = "") -> dict[str, np.ndarray]:
    """refjax params -> torchscale ``BEiT3`` state_dict (numpy), keys optionally prefixed."""
    sd = flax_to_torch(nn.unbox(params), beit3_rules(cfg), scanned=cfg.scan)
    return {prefix + k: v for k, v in sd.items()}
