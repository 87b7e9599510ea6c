"""Hugging Face CLIP / SigLIP / DINOv2 vision towers <-> refjax ``refjax.models.vit`` params.

Reads what ``save_pretrained`` writes (``config.json`` + safetensors, through
``refjax.convert.hf``) or a ``(config_dict, state_dict)`` pair, in every layout met in practice:

- transformers 5 vision models: bare keys (``embeddings.*``, ``encoder.layers.N.*`` ...);
- hub two-tower checkpoints (``openai/clip-vit-large-patch14-336``,
  ``google/siglip-so400m-patch14-384``) and transformers 4 vision models: vision keys under
  ``vision_model.``; the text tower and the contrastive heads (``text_model.*``,
  ``logit_scale``, ``logit_bias``, ``text_projection``, ``visual_projection``) and the
  ``position_ids`` buffers of older files are reported as ignored;
- DINOv2 hub checkpoints (``facebook/dinov2-large``): the legacy attention names
  (``attention.attention.{query,key,value}``, ``attention.output.dense``) and the fused SwiGLU
  ``mlp.weights_in`` / ``mlp.weights_out`` are renamed / split as transformers 5 does on load;
  an image-classification wrapper's ``dinov2.`` prefix is stripped and ``classifier.*`` ignored.

Unknown keys are reported by name (never used), missing keys are an error (``strict``), a shape
that does not fit names the key. :func:`to_hf` exports the transformers 5 layout, which the HF
vision model loads with ``load_state_dict(strict=True)``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

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
    save_params,
    torch_to_flax,
)
from refjax.convert.hf import read_checkpoint, strip_prefixes, write_checkpoint
from refjax.models.vit import FAMILIES, ViTConfig, abstract_params

PREFIXES = {
    "clip": ("vision_model.",),
    "siglip": ("vision_model.",),
    "dinov2": ("dinov2.",),
    "dinov2_registers": ("dinov2_with_registers.",),
}
# known keys of the wider checkpoints that the vision tower does not use
IGNORED_PREFIXES = {
    "clip": ("text_model.", "logit_scale", "text_projection.", "visual_projection."),
    "siglip": ("text_model.", "logit_scale", "logit_bias"),
    "dinov2": ("classifier.",),
    "dinov2_registers": ("classifier.",),
}
_LEGACY_DINOV2 = (
    (".attention.attention.query.", ".attention.q_proj."),
    (".attention.attention.key.", ".attention.k_proj."),
    (".attention.attention.value.", ".attention.v_proj."),
    (".attention.output.dense.", ".attention.o_proj."),
    (".mlp.weights_out.", ".mlp.down_proj."),
)
PREPROCESSOR = "preprocessor_config.json"


def _ln_rules(torch_name: str, path: tuple[str, ...], layer: int | None = None) -> list[Rule]:
    return [Rule(f"{torch_name}.weight", path + ("scale",), layer=layer),
            Rule(f"{torch_name}.bias", path + ("bias",), layer=layer)]


def _dense_rules(torch_name: str, path: tuple[str, ...], layer: int | None = None,
                 bias: bool = True) -> list[Rule]:
    rules = [Rule(f"{torch_name}.weight", path + ("kernel",), linear_t, linear_t, layer)]
    if bias:
        rules.append(Rule(f"{torch_name}.bias", path + ("bias",), layer=layer))
    return rules


def _layer_rules(cfg: ViTConfig) -> list[Rule]:
    rules: list[Rule] = []
    for i in range(cfg.num_layers):
        base = ("encoder", "layers") if cfg.scan else ("encoder", f"layers_{i}")
        if cfg.is_dinov2:
            t = f"encoder.layer.{i}."
            rules += _ln_rules(t + "norm1", base + ("norm1",), i)
            for p in ("q_proj", "k_proj", "v_proj"):
                rules += _dense_rules(t + f"attention.{p}", base + ("attention", p), i,
                                      cfg.qkv_bias)
            rules += _dense_rules(t + "attention.o_proj", base + ("attention", "o_proj"), i)
            rules.append(Rule(t + "layer_scale1.lambda1", base + ("layer_scale1", "lambda1"),
                              layer=i))
            rules += _ln_rules(t + "norm2", base + ("norm2",), i)
            fcs = ("gate_proj", "up_proj", "down_proj") if cfg.use_swiglu_ffn else ("fc1", "fc2")
            for fc in fcs:
                rules += _dense_rules(t + f"mlp.{fc}", base + ("mlp", fc), i)
            rules.append(Rule(t + "layer_scale2.lambda1", base + ("layer_scale2", "lambda1"),
                              layer=i))
        else:
            t = f"encoder.layers.{i}."
            rules += _ln_rules(t + "layer_norm1", base + ("layer_norm1",), i)
            for p in ("q_proj", "k_proj", "v_proj", "out_proj"):
                rules += _dense_rules(t + f"self_attn.{p}", base + ("self_attn", p), i)
            rules += _ln_rules(t + "layer_norm2", base + ("layer_norm2",), i)
            for fc in ("fc1", "fc2"):
                rules += _dense_rules(t + f"mlp.{fc}", base + ("mlp", fc), i)
    return rules


def vit_rules(cfg: ViTConfig) -> list[Rule]:
    """The key map between the transformers 5 vision model's state_dict (no prefix) and our
    parameters for ``cfg`` (scanned or not)."""
    conv = dict(to_flax=conv_to_flax, to_torch=conv_to_torch)
    e = ("embeddings",)
    rules: list[Rule] = []
    if cfg.family == "clip":
        rules += [
            Rule("embeddings.class_embedding", e + ("class_embedding",)),
            Rule("embeddings.patch_embedding.weight", e + ("patch_embedding", "kernel"), **conv),
            Rule("embeddings.position_embedding.weight", e + ("position_embedding",)),
        ]
        rules += _ln_rules("pre_layrnorm", ("pre_layrnorm",))
        rules += _layer_rules(cfg)
        rules += _ln_rules("post_layernorm", ("post_layernorm",))
    elif cfg.family == "siglip":
        rules += [
            Rule("embeddings.patch_embedding.weight", e + ("patch_embedding", "kernel"), **conv),
            Rule("embeddings.patch_embedding.bias", e + ("patch_embedding", "bias")),
            Rule("embeddings.position_embedding.weight", e + ("position_embedding",)),
        ]
        rules += _layer_rules(cfg)
        rules += _ln_rules("post_layernorm", ("post_layernorm",))
        if cfg.use_head:
            h = ("head",)
            rules += [
                Rule("head.probe", h + ("probe",)),
                Rule("head.attention.in_proj_weight", h + ("attention", "in_proj_kernel"),
                     linear_t, linear_t),
                Rule("head.attention.in_proj_bias", h + ("attention", "in_proj_bias")),
            ]
            rules += _dense_rules("head.attention.out_proj", h + ("attention", "out_proj"))
            rules += _ln_rules("head.layernorm", h + ("layernorm",))
            rules += _dense_rules("head.mlp.fc1", h + ("mlp", "fc1"))
            rules += _dense_rules("head.mlp.fc2", h + ("mlp", "fc2"))
    else:
        rules.append(Rule("embeddings.cls_token", e + ("cls_token",)))
        if cfg.has_mask_token:
            rules.append(Rule("embeddings.mask_token", e + ("mask_token",)))
        if cfg.num_register_tokens:
            rules.append(Rule("embeddings.register_tokens", e + ("register_tokens",)))
        rules += [
            Rule("embeddings.position_embeddings", e + ("position_embeddings",)),
            Rule("embeddings.patch_embeddings.projection.weight",
                 e + ("patch_embeddings", "kernel"), **conv),
            Rule("embeddings.patch_embeddings.projection.bias",
                 e + ("patch_embeddings", "bias")),
        ]
        rules += _layer_rules(cfg)
        rules += _ln_rules("layernorm", ("layernorm",))
    return rules


def _is_ignored(family: str, key: str) -> bool:
    return key.endswith("position_ids") or key.startswith(IGNORED_PREFIXES[family])


def normalize_state_dict(
    state_dict: Mapping[str, Any], family: str
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Bring a checkpoint's keys to the transformers 5 vision-model layout: strip the wrapper
    prefix, rename legacy DINOv2 keys and split its fused SwiGLU input. Values become float32
    numpy. Returns ``(state_dict, {new key: original key})``."""
    sd = {k: np.asarray(v) for k, v in state_dict.items()}
    prefixes = PREFIXES[family]
    stripped = strip_prefixes(sd, prefixes)
    if len(stripped) != len(sd):
        dup = sorted(k for k in sd for p in prefixes if k.startswith(p) and k[len(p):] in sd)
        raise ConversionError(f"keys present both with and without the prefix: {dup}")
    origin = {}
    for k in sd:
        new = k
        for p in prefixes:
            if k.startswith(p):
                new = k[len(p):]
                break
        origin[new] = k
    out: dict[str, np.ndarray] = {}
    names: dict[str, str] = {}

    def put(key: str, value: np.ndarray, orig: str) -> None:
        if key in out:
            raise ConversionError(f"{orig}: maps to {key!r}, which the checkpoint also holds")
        out[key] = value
        names[key] = orig

    for k, v in stripped.items():
        orig = origin[k]
        if family in ("dinov2", "dinov2_registers"):
            if ".mlp.weights_in." in k:
                if v.shape[0] % 2:
                    raise ConversionError(f"{orig}: fused SwiGLU input of odd size {v.shape}")
                gate, up = np.split(v, 2, axis=0)
                put(k.replace(".mlp.weights_in.", ".mlp.gate_proj."), gate, orig)
                put(k.replace(".mlp.weights_in.", ".mlp.up_proj."), up, orig)
                continue
            for old, new in _LEGACY_DINOV2:
                k = k.replace(old, new)
        put(k, v, orig)
    out = {k: v.astype(np.float32) if v.dtype != np.float32 else v for k, v in out.items()}
    return out, names


def _template(cfg: ViTConfig) -> dict:
    return nn.unbox(abstract_params(cfg))


def _read_norm(directory: str) -> dict[str, tuple[float, ...]]:
    path = os.path.join(directory, PREPROCESSOR)
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        pre = json.load(f)
    out = {}
    for k in ("image_mean", "image_std"):
        if isinstance(pre.get(k), (list, tuple)):
            out[k] = tuple(float(x) for x in pre[k])
    return out


def from_hf(
    source: str | tuple[Mapping[str, Any], Mapping[str, Any]],
    family: str | None = None,
    *,
    strict: bool = True,
    **overrides: Any,
) -> tuple[dict, ViTConfig, ConversionReport]:
    """HF checkpoint -> ``(params, config, report)``.

    ``source`` is a checkpoint directory (``config.json`` + safetensors; a
    ``preprocessor_config.json`` beside them sets ``image_mean`` / ``image_std``) or a
    ``(config_dict, state_dict)`` pair. ``family`` (``clip``, ``siglip``, ``dinov2``,
    ``dinov2_registers``) defaults to the config's ``model_type`` and is checked against it;
    ``overrides`` set config fields (``scan``, ``dtype``, ``remat_policy``, ``select_layer`` ...).
    ``params`` is the unboxed tree of numpy float32 arrays.
    """
    if isinstance(source, (str, os.PathLike)):
        config_dict, state_dict = read_checkpoint(os.fspath(source))
        overrides = {**_read_norm(os.fspath(source)), **overrides}
    else:
        config_dict, state_dict = source
    cfg = ViTConfig.from_hf(config_dict, family, **overrides)
    sd, names = normalize_state_dict(state_dict, cfg.family)
    params, report = torch_to_flax(
        sd, vit_rules(cfg), _template(cfg), scanned=cfg.scan, strict=strict,
        ignore=lambda k: _is_ignored(cfg.family, k),
    )
    report.unexpected = sorted(names.get(k, k) for k in report.unexpected)
    report.ignored = sorted(names[k] for k in sd if _is_ignored(cfg.family, k))
    report.converted = [names.get(k, k) for k in report.converted]
    return params, cfg, report


def to_hf(params: Mapping, cfg: ViTConfig) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """refjax params -> ``(config_dict, state_dict)`` of the transformers 5 vision model
    (``CLIPVisionModel``, ``SiglipVisionModel``, ``Dinov2Model``, ``Dinov2WithRegistersModel``),
    keys without prefix, numpy float32."""
    sd = flax_to_torch(nn.unbox(params), vit_rules(cfg), scanned=cfg.scan)
    sd = {k: np.asarray(v, np.float32) for k, v in sd.items()}
    return cfg.to_hf(), sd


def save_hf(directory: str, params: Mapping, cfg: ViTConfig) -> None:
    """Write ``to_hf``'s result as a checkpoint directory ``from_pretrained`` reads."""
    config_dict, sd = to_hf(params, cfg)
    write_checkpoint(directory, config_dict, sd)


def convert_cli(family: str | None, hf_dir: str, out_dir: str, *, scan: bool = True,
                **overrides: Any) -> ConversionReport:
    """``python -m refjax convert {clip,siglip,dinov2,dinov2_registers} HF_DIR OUT``: an Orbax
    params checkpoint (``save_params``) whose ``refjax_meta.json`` holds ``model``
    (``vit-<family>``), ``family``, ``config`` (the ViTConfig fields) and ``source``. Strict:
    a missing key stops the conversion. Prints and returns the report."""
    if family is not None and family not in FAMILIES:
        raise ValueError(f"unknown ViT family {family!r}; one of {FAMILIES}")
    params, cfg, report = from_hf(hf_dir, family, scan=scan, strict=True, **overrides)
    meta = {"model": f"vit-{cfg.family}", "family": cfg.family,
            "config": dataclasses.asdict(cfg), "source": os.path.abspath(hf_dir)}
    print(report.summary())
    save_params(out_dir, params, meta)
    print(f"wrote {out_dir} ({cfg.family} hidden={cfg.hidden_size} layers={cfg.num_layers} "
          f"image={cfg.image_size}/{cfg.patch_size})")
    return report


def load_converted(path: str) -> tuple[dict, ViTConfig]:
    """Restore a :func:`convert_cli` checkpoint: ``(params, config)``."""
    params, meta = load_params(path)
    if "config" not in meta or "family" not in meta:
        raise ConversionError(f"{path}: not a converted ViT tower (meta has no family/config)")
    c = dict(meta["config"])
    for k in ("image_mean", "image_std"):
        c[k] = tuple(c[k])
    return params, ViTConfig(**c)
