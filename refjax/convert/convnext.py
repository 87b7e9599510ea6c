"""ConvNeXt checkpoints <-> refjax ``ConvNeXt`` parameters.

Two key layouts:

- **hf**: a transformers ``ConvNextModel`` directory (``config.json`` + safetensors), keys
  ``embeddings.{patch_embeddings, layernorm}``, ``encoder.stages.N.downsampling_layer.{0,1}``,
  ``encoder.stages.N.layers.M.{dwconv, layernorm, pwconv1, pwconv2, layer_scale_parameter}``,
  ``layernorm`` (``convnext.`` prefix of ``ConvNextForImageClassification`` accepted).
- **timm**: timm ``convnext_*`` keys ``stem.{0,1}``, ``stages.N.downsample.{0,1}``,
  ``stages.N.blocks.M.{conv_dw, norm, mlp.fc1, mlp.fc2, gamma}``, ``head.norm``; open_clip
  checkpoints (``visual.trunk.`` prefix, e.g. laion/CLIP-convnext_xxlarge-*) and the original
  facebookresearch layout (``downsample_layers``, ``dwconv``, ``pwconv``, ``norm``; renamed as
  timm's ``checkpoint_filter_fn`` does) are accepted too. Classifier / CLIP projection / text
  tower keys are reported as ignored.

timm LayerNorm eps is not stored in checkpoints: ``convnext_xxlarge`` (RAS's open_clip trunk)
uses 1e-5, other timm ConvNeXts timm's default 1e-6; :func:`infer_timm_config` picks by shape.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from refjax.convert.common import (
    ConversionError,
    ConversionReport,
    Rule,
    conv_to_flax,
    conv_to_torch,
    flax_to_torch,
    linear_t,
    load_state_dict,
    save_params,
    torch_to_flax,
)
from refjax.convert.hf import read_checkpoint, strip_prefixes, write_checkpoint
from refjax.models.convnext import PRESETS, ConvNeXtConfig, param_template

LAYOUTS = ("hf", "timm")
OPEN_CLIP_PREFIX = "visual.trunk."
HF_PREFIXES = ("convnext.",)

# Per-block tensors: (hf suffix, timm suffix, flax sub-path, kind).
_CONV, _LINEAR, _PLAIN = "conv", "linear", "plain"
_BLOCK = [
    ("dwconv.weight", "conv_dw.weight", ("conv_dw", "kernel"), _CONV),
    ("dwconv.bias", "conv_dw.bias", ("conv_dw", "bias"), _PLAIN),
    ("layernorm.weight", "norm.weight", ("norm", "scale"), _PLAIN),
    ("layernorm.bias", "norm.bias", ("norm", "bias"), _PLAIN),
    ("pwconv1.weight", "mlp.fc1.weight", ("fc1", "kernel"), _LINEAR),
    ("pwconv1.bias", "mlp.fc1.bias", ("fc1", "bias"), _PLAIN),
    ("pwconv2.weight", "mlp.fc2.weight", ("fc2", "kernel"), _LINEAR),
    ("pwconv2.bias", "mlp.fc2.bias", ("fc2", "bias"), _PLAIN),
    ("layer_scale_parameter", "gamma", ("gamma",), _PLAIN),
]
# Non-block tensors: (hf key, timm key, flax path, kind); "{i}" is the stage index.
_STEM = [
    ("embeddings.patch_embeddings.weight", "stem.0.weight", ("stem_conv", "kernel"), _CONV),
    ("embeddings.patch_embeddings.bias", "stem.0.bias", ("stem_conv", "bias"), _PLAIN),
    ("embeddings.layernorm.weight", "stem.1.weight", ("stem_norm", "scale"), _PLAIN),
    ("embeddings.layernorm.bias", "stem.1.bias", ("stem_norm", "bias"), _PLAIN),
]
_DOWN = [
    ("encoder.stages.{i}.downsampling_layer.0.weight", "stages.{i}.downsample.0.weight",
     ("downsample_norm", "scale"), _PLAIN),
    ("encoder.stages.{i}.downsampling_layer.0.bias", "stages.{i}.downsample.0.bias",
     ("downsample_norm", "bias"), _PLAIN),
    ("encoder.stages.{i}.downsampling_layer.1.weight", "stages.{i}.downsample.1.weight",
     ("downsample_conv", "kernel"), _CONV),
    ("encoder.stages.{i}.downsampling_layer.1.bias", "stages.{i}.downsample.1.bias",
     ("downsample_conv", "bias"), _PLAIN),
]
_HEAD = [
    ("layernorm.weight", "head.norm.weight", ("head_norm", "scale"), _PLAIN),
    ("layernorm.bias", "head.norm.bias", ("head_norm", "bias"), _PLAIN),
]
_TRANSFORMS: dict[str, tuple[Callable, Callable]] = {
    _CONV: (conv_to_flax, conv_to_torch),
    _LINEAR: (linear_t, linear_t),
    _PLAIN: (lambda x: x, lambda x: x),
}


def convnext_rules(cfg: ConvNeXtConfig, layout: str = "hf") -> list[Rule]:
    """The key map between a ``layout`` (``hf`` | ``timm``) state_dict and ``ConvNeXt(cfg)``."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown ConvNeXt layout {layout!r}; one of {LAYOUTS}")
    col = 0 if layout == "hf" else 1

    def rule(entry, path_prefix=(), layer=None, **fmt):
        key = entry[col].format(**fmt)
        to_flax, to_torch = _TRANSFORMS[entry[3]]
        return Rule(key, tuple(path_prefix) + entry[2], to_flax, to_torch, layer)

    rules = [rule(e) for e in _STEM]
    for i, depth in enumerate(cfg.depths):
        stage = (f"stages_{i}",)
        if i > 0:
            rules += [rule(e, stage, i=i) for e in _DOWN]
        for j in range(depth):
            base = stage + (("blocks",) if cfg.scan else (f"blocks_{j}",))
            prefix = (f"encoder.stages.{i}.layers.{j}." if layout == "hf"
                      else f"stages.{i}.blocks.{j}.")
            for e in _BLOCK:
                if e[1] == "gamma" and not cfg.has_layer_scale:
                    continue
                to_flax, to_torch = _TRANSFORMS[e[3]]
                rules.append(Rule(prefix + e[col], base + e[2], to_flax, to_torch, j))
    if cfg.final_norm:
        rules += [rule(e) for e in _HEAD]
    return rules


# ---------------------------------------------------------------- config helpers


def config_from_hf(hf_config: Mapping[str, Any], **overrides: Any) -> ConvNeXtConfig:
    """``ConvNeXtConfig`` from a transformers ``ConvNextConfig`` dict (``config.json``)."""
    act = hf_config.get("hidden_act", "gelu")
    if act != "gelu":
        raise ConversionError(f"config.json: hidden_act {act!r} is not supported (only 'gelu')")
    try:
        depths, dims = hf_config["depths"], hf_config["hidden_sizes"]
    except KeyError as e:
        raise ConversionError(f"config.json: not a ConvNext config, missing {e.args[0]}") from e
    n = hf_config.get("num_stages", len(depths))
    if not (len(depths) == len(dims) == n):
        raise ConversionError(f"config.json: num_stages {n}, depths {depths}, hidden_sizes {dims}")
    kw = dict(
        depths=tuple(depths),
        dims=tuple(dims),
        in_chans=hf_config.get("num_channels", 3),
        patch_size=hf_config.get("patch_size", 4),
        layer_scale_init=hf_config.get("layer_scale_init_value", 1e-6),
        drop_path_rate=hf_config.get("drop_path_rate", 0.0),
        eps=1e-6,  # fixed in modeling_convnext for every LayerNorm but the final one
        final_eps=hf_config.get("layer_norm_eps", 1e-12),
        final_norm=True,
    )
    kw.update(overrides)
    return ConvNeXtConfig(**kw)


def config_to_hf(cfg: ConvNeXtConfig) -> dict[str, Any]:
    """A transformers ``ConvNextConfig`` dict for ``cfg``; errors where HF cannot express it."""
    if cfg.eps != 1e-6 or not cfg.final_norm or cfg.kernel_size != 7 or cfg.mlp_ratio != 4:
        raise ConversionError(
            "HF ConvNextModel needs eps 1e-6 in all but the final LayerNorm, a final LayerNorm, "
            f"kernel 7 and mlp ratio 4; got eps={cfg.eps}, final_norm={cfg.final_norm}, "
            f"kernel_size={cfg.kernel_size}, mlp_ratio={cfg.mlp_ratio} (use layout='timm')"
        )
    return {
        "model_type": "convnext",
        "architectures": ["ConvNextModel"],
        "num_channels": cfg.in_chans,
        "patch_size": cfg.patch_size,
        "num_stages": len(cfg.depths),
        "hidden_sizes": list(cfg.dims),
        "depths": list(cfg.depths),
        "hidden_act": "gelu",
        "layer_norm_eps": cfg.head_eps,
        "layer_scale_init_value": cfg.layer_scale_init if cfg.has_layer_scale else 0.0,
        "drop_path_rate": cfg.drop_path_rate,
    }


_FB_BLOCK = re.compile(r"^stages\.(\d+)\.(\d+)\.")
_FB_DOWN = re.compile(r"^downsample_layers\.(\d+)\.(\d+)\.")


def _fb_to_timm(key: str) -> str:
    """One facebookresearch ConvNeXt key in timm naming (as timm's checkpoint_filter_fn)."""
    key = key.replace("downsample_layers.0.", "stem.")
    key = _FB_BLOCK.sub(r"stages.\1.blocks.\2.", key)
    key = _FB_DOWN.sub(r"stages.\1.downsample.\2.", key)
    key = key.replace("dwconv", "conv_dw").replace("pwconv", "mlp.fc")
    if key.startswith("head."):
        key = "head.fc." + key[len("head."):]
    elif key.startswith("norm."):
        key = "head." + key
    return key


def timm_trunk_state_dict(
    state_dict: Mapping[str, np.ndarray],
) -> tuple[dict[str, np.ndarray], list[str]]:
    """A timm-layout trunk state_dict from timm, open_clip or facebookresearch checkpoints.

    Returns ``(trunk, others)``: ``others`` are the keys outside the trunk (open_clip's
    ``visual.head.*`` projection and text tower), reported as ignored by :func:`from_timm`.
    """
    sd = dict(state_dict)
    if any(k.startswith(OPEN_CLIP_PREFIX) for k in sd):
        n = len(OPEN_CLIP_PREFIX)
        trunk = {k[n:]: v for k, v in sd.items() if k.startswith(OPEN_CLIP_PREFIX)}
        return trunk, sorted(k for k in sd if not k.startswith(OPEN_CLIP_PREFIX))
    if "stem.0.weight" not in sd and "downsample_layers.0.0.weight" in sd:
        return {_fb_to_timm(k): v for k, v in sd.items()}, []
    return sd, []


def _is_timm_head_extra(key: str) -> bool:
    """timm classifier tensors that are not part of the trunk (``head.fc``, ``head.pre_logits``)."""
    return key.startswith(("head.fc.", "head.pre_logits."))


def infer_timm_config(
    state_dict: Mapping[str, np.ndarray], eps: float | None = None, **overrides: Any
) -> ConvNeXtConfig:
    """Trunk shape from a timm-layout state_dict (see :func:`timm_trunk_state_dict`).

    ``eps`` (not stored in checkpoints) defaults to 1e-5 for the ``convnext_xxlarge`` shape
    (timm passes ``norm_eps=1e-5`` there) and to timm's LayerNorm default 1e-6 otherwise.
    """
    sd = state_dict
    if "stem.0.weight" not in sd:
        raise ConversionError("not a timm ConvNeXt state_dict: missing stem.0.weight")
    dims0, in_chans, patch, _ = sd["stem.0.weight"].shape
    depths, dims = [], []
    i = 0
    while f"stages.{i}.blocks.0.conv_dw.weight" in sd:
        blocks = {int(m.group(1)) for k in sd
                  if (m := re.match(rf"stages\.{i}\.blocks\.(\d+)\.", k))}
        depths.append(max(blocks) + 1)
        dims.append(int(sd[f"stages.{i}.blocks.0.conv_dw.weight"].shape[0]))
        i += 1
    if not depths or dims[0] != dims0:
        raise ConversionError(f"timm ConvNeXt state_dict without stages (stem dim {dims0})")
    kernel = int(sd["stages.0.blocks.0.conv_dw.weight"].shape[-1])
    mlp = int(sd["stages.0.blocks.0.mlp.fc1.weight"].shape[0]) // dims[0]
    if eps is None:
        xxl = PRESETS["convnext_xxlarge"]
        eps = 1e-5 if (tuple(depths), tuple(dims)) == (xxl["depths"], xxl["dims"]) else 1e-6
    kw = dict(depths=tuple(depths), dims=tuple(dims), in_chans=int(in_chans),
              patch_size=int(patch), kernel_size=kernel, mlp_ratio=mlp, eps=eps, final_eps=eps,
              layer_scale_init=1e-6 if "stages.0.blocks.0.gamma" in sd else None,
              final_norm="head.norm.weight" in sd)
    kw.update(overrides)
    return ConvNeXtConfig(**kw)


# ---------------------------------------------------------------- conversions


def _convert(sd: Mapping[str, np.ndarray], cfg: ConvNeXtConfig, layout: str, strict: bool,
             ignore: Callable[[str], bool]) -> tuple[dict, ConversionReport]:
    sd = {k: np.asarray(v, np.float32) if np.asarray(v).dtype != np.float32 else v
          for k, v in sd.items()}
    params, report = torch_to_flax(sd, convnext_rules(cfg, layout), param_template(cfg),
                                   scanned=cfg.scan, strict=strict, ignore=ignore)
    report.ignored = sorted(k for k in sd if ignore(k))
    return params, report


def from_hf(
    source: str | Mapping[str, np.ndarray],
    cfg: ConvNeXtConfig | None = None,
    *,
    strict: bool = True,
    **overrides: Any,
) -> tuple[dict, ConvNeXtConfig, ConversionReport]:
    """HF ``ConvNextModel`` directory (or a state_dict plus ``cfg``) -> ``(params, cfg,
    report)``. ``overrides`` (e.g. ``scan=False``, ``dtype``) apply to the config read from
    ``config.json``; ``convnext.`` prefixed keys (``ConvNextForImageClassification``) are
    accepted and its ``classifier.*`` reported as ignored."""
    if isinstance(source, str):
        hf_cfg, sd = read_checkpoint(source)
        cfg = cfg if cfg is not None else config_from_hf(hf_cfg)
    else:
        sd = dict(source)
        if cfg is None:
            raise ValueError("from_hf(state_dict) needs cfg")
    if overrides:
        cfg = cfg.replace(**overrides)
    sd = strip_prefixes(sd, HF_PREFIXES)
    params, report = _convert(sd, cfg, "hf", strict, lambda k: k.startswith("classifier."))
    return params, cfg, report


def to_hf(params: Mapping, cfg: ConvNeXtConfig, out_dir: str | None = None) -> dict:
    """refjax params -> HF ``ConvNextModel`` state_dict (numpy); with ``out_dir`` also written
    as a ``from_pretrained``-loadable directory (``config.json`` + safetensors)."""
    import flax.linen as nn

    hf_cfg = config_to_hf(cfg)
    sd = flax_to_torch(nn.unbox(params), convnext_rules(cfg, "hf"), scanned=cfg.scan)
    if out_dir is not None:
        write_checkpoint(out_dir, hf_cfg, sd)
    return sd


def from_timm(
    state_dict: str | Mapping[str, np.ndarray],
    cfg: ConvNeXtConfig | None = None,
    *,
    strict: bool = True,
    eps: float | None = None,
) -> tuple[dict, ConvNeXtConfig, ConversionReport]:
    """timm / open_clip / facebookresearch ConvNeXt state_dict (or a ``.safetensors``,
    ``.pth``, open_clip ``.bin`` path) -> ``(params, cfg, report)``.

    Without ``cfg`` the shape is inferred (:func:`infer_timm_config`, ``eps`` as there).
    Keys outside the trunk (``head.fc``, open_clip ``visual.head``, text tower) are reported in
    ``report.ignored``; anything else unknown in ``report.unexpected``.
    """
    if isinstance(state_dict, str):
        state_dict = load_state_dict(state_dict)
    trunk, others = timm_trunk_state_dict(state_dict)
    if cfg is None:
        cfg = infer_timm_config(trunk, eps=eps)
    params, report = _convert(trunk, cfg, "timm", strict, _is_timm_head_extra)
    report.ignored = sorted(report.ignored + others)
    return params, cfg, report


def to_timm(params: Mapping, cfg: ConvNeXtConfig, prefix: str = "") -> dict[str, np.ndarray]:
    """refjax params -> timm ``convnext_*`` trunk state_dict (numpy); ``prefix`` e.g.
    ``"visual.trunk."`` for the open_clip layout."""
    import flax.linen as nn

    sd = flax_to_torch(nn.unbox(params), convnext_rules(cfg, "timm"), scanned=cfg.scan)
    return {prefix + k: v for k, v in sd.items()}


_TIMM_FILES = ("open_clip_model.safetensors", "model.safetensors",
               "open_clip_pytorch_model.bin", "pytorch_model.bin")


def _timm_file(path: str) -> str:
    if not os.path.isdir(path):
        return path
    for name in _TIMM_FILES:
        if os.path.isfile(os.path.join(path, name)):
            return os.path.join(path, name)
    raise FileNotFoundError(f"{path}: none of {_TIMM_FILES}")


def convert_cli(
    src: str,
    out_dir: str,
    layout: str = "hf",
    *,
    eps: float | None = None,
    scan: bool = True,
    strict: bool = True,
) -> ConversionReport:
    """Convert ``src`` and write an Orbax params checkpoint to ``out_dir`` (meta: config).

    ``layout="hf"``: ``src`` is a ``ConvNextModel`` directory. ``layout="timm"``: ``src`` is a
    ``.safetensors`` / ``.pth`` / open_clip ``.bin`` file, or a directory holding one of
    ``open_clip_model.safetensors``, ``model.safetensors``, ``open_clip_pytorch_model.bin``,
    ``pytorch_model.bin``; ``eps`` overrides the inferred LayerNorm eps. Meta: ``model``
    (``convnext``), ``layout``, ``config`` (``ConvNeXtConfig.to_dict``, read back with
    ``ConvNeXtConfig.from_dict``), ``source``. Prints and returns the report.
    """
    if layout == "hf":
        if eps is not None:
            raise ValueError("eps is fixed by HF ConvNextModel; only layout='timm' takes eps")
        params, cfg, report = from_hf(src, strict=strict, scan=scan)
    elif layout == "timm":
        src = _timm_file(src)
        sd = load_state_dict(src)
        trunk, _ = timm_trunk_state_dict(sd)
        cfg = infer_timm_config(trunk, eps=eps, scan=scan)
        params, cfg, report = from_timm(sd, cfg, strict=strict)
    else:
        raise ValueError(f"unknown ConvNeXt layout {layout!r}; one of {LAYOUTS}")
    print(report.summary())
    meta = {"model": "convnext", "layout": layout, "config": cfg.to_dict(),
            "source": os.path.abspath(src)}
    save_params(out_dir, params, meta)
    return report
