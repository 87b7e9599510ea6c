"""Assemble one RAS parameter checkpoint from Hugging Face directories (spec/ras.md 7, stage 0).

``assemble(llm_dir, clip_dir, siglip_dir, dinov2_dir, convnext_dir, ...)`` converts each part
with the existing converters and writes one Orbax params checkpoint
(``refjax.convert.common.save_params``) whose ``refjax_meta.json`` holds ``model: "ras"`` and
``config`` (``RASConfig.to_dict``), so a RAS config starts from it (:func:`load_assembled`).

The LLM directory may be:

- a plain ``LlamaForCausalLM`` (Vicuna): the image projector is initialised randomly;
- an original LLaVA-1.5 checkpoint (``model_type`` ``llava`` / ``llava_llama``): LLaMA keys
  (``model.*``, ``lm_head.weight``) beside ``model.mm_projector.{0,2}.{weight,bias}`` (the
  image projector) and, in some files, ``model.vision_tower.vision_tower.vision_model.*`` (the
  CLIP tower, which then replaces ``clip_dir``'s weights; ``clip_dir`` still gives its config);
- a ``llava-hf`` checkpoint (``LlavaForConditionalGeneration``): ``language_model.model.*``,
  ``language_model.lm_head.weight``, ``multi_modal_projector.linear_{1,2}.*``,
  ``vision_tower.*`` (also the transformers 5 in-memory names ``model.language_model.*`` ...);
  the LLaMA config is its ``text_config``.

The LLaMA keys are filtered from the stream before ``refjax.convert.llama.from_tensors`` (which
knows no ``mm_*`` keys), tensor by tensor. New parts (mask projector, NAR head or AR seg
projection, and the image projector when absent) take their random init (``seed``); the two
prefixes ``<mask-pool-pre>`` / ``<mask-ref-pre>`` start at the mean of the LLM input
embeddings (spec 5.1). The result is checked leaf by leaf against ``RAS(cfg)``'s
``eval_shape`` tree. SigLIP's attention-pooling head is dropped (RAS uses only features).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from refjax.convert import convnext as convnext_conv
from refjax.convert import hf
from refjax.convert import llama as llama_conv
from refjax.convert import vit as vit_conv
from refjax.convert.common import (
    ConversionError,
    ConversionReport,
    linear_t,
    load_params,
    save_params,
)
from refjax.models.llama import LlamaConfig
from refjax.models.ras import MLP2, NARHead, RASConfig, abstract_variables

LLAVA_MODEL_TYPES = ("llava", "llava_llama")

# (prefix, part, replacement) - first match wins
_KEY_MAP: tuple[tuple[str, str, str], ...] = (
    ("model.mm_projector.0.", "projector", "fc1."),
    ("model.mm_projector.2.", "projector", "fc2."),
    ("model.vision_tower.vision_tower.", "clip", ""),
    ("multi_modal_projector.linear_1.", "projector", "fc1."),
    ("multi_modal_projector.linear_2.", "projector", "fc2."),
    ("model.multi_modal_projector.linear_1.", "projector", "fc1."),
    ("model.multi_modal_projector.linear_2.", "projector", "fc2."),
    ("vision_tower.", "clip", ""),
    ("model.vision_tower.", "clip", ""),
    ("language_model.model.", "llm", "model."),
    ("language_model.lm_head.", "llm", "lm_head."),
    ("model.language_model.", "llm", "model."),
)


def classify_key(key: str) -> tuple[str, str]:
    """``(part, key in the part's own layout)``: part ``llm``, ``projector`` or ``clip``."""
    for prefix, part, repl in _KEY_MAP:
        if key.startswith(prefix):
            return part, repl + key[len(prefix):]
    return "llm", key


@dataclasses.dataclass
class AssemblyReport:
    """Per-part conversion reports and what was initialised instead of converted."""

    parts: dict[str, ConversionReport] = dataclasses.field(default_factory=dict)
    initialised: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)

    def summary(self) -> str:
        lines = [f"{k}: {r.summary()}" for k, r in self.parts.items()]
        if self.initialised:
            lines.append(f"initialised (not in any checkpoint): {self.initialised}")
        lines += self.notes
        return "\n".join(lines)


def _llm_config(config: Mapping[str, Any], llm_dir: str, **overrides: Any) -> LlamaConfig:
    mt = config.get("model_type")
    if mt == "llava" and "text_config" in config:
        return LlamaConfig.from_hf(config["text_config"], **overrides)
    if mt not in (None, "llama", *LLAVA_MODEL_TYPES):
        raise ConversionError(f"{llm_dir}: model_type {mt!r} is neither LLaMA nor LLaVA")
    return LlamaConfig.from_hf(config, **overrides)


def _split_llm_dir(llm_dir: str, cfg: LlamaConfig, strict: bool):
    """Stream the LLM directory once: LLaMA tensors go to ``from_tensors``; projector and CLIP
    tensors are collected (small)."""
    side: dict[str, dict[str, np.ndarray]] = {"projector": {}, "clip": {}}

    def llama_stream() -> Iterator[tuple[str, np.ndarray]]:
        for key, value in llama_conv.iter_hf_tensors(llm_dir):
            part, new = classify_key(key)
            if part == "llm":
                yield new, value
            else:
                side[part][new] = np.asarray(value, np.float32)

    params, report = llama_conv.from_tensors(llama_stream(), cfg, strict=strict)
    return params, report, side


def _projector_params(sd: Mapping[str, np.ndarray], d_in: int, d: int) -> tuple[dict, list]:
    want = {"fc1.weight": (d, d_in), "fc1.bias": (d,), "fc2.weight": (d, d), "fc2.bias": (d,)}
    missing = sorted(set(want) - set(sd))
    if missing:
        raise ConversionError(f"image projector keys missing: {missing}")
    for k, shape in want.items():
        if tuple(sd[k].shape) != shape:
            raise ConversionError(f"image projector {k}: shape {tuple(sd[k].shape)}, "
                                  f"expected {shape}")
    params = {"fc1": {"kernel": linear_t(sd["fc1.weight"]), "bias": sd["fc1.bias"]},
              "fc2": {"kernel": linear_t(sd["fc2.weight"]), "bias": sd["fc2.bias"]}}
    return params, sorted(set(sd) - set(want))


def extend_vocab(params: Mapping, cfg: LlamaConfig, vocab: int) -> dict:
    """LLaMA params with the vocabulary grown to ``vocab``: new embedding rows = the mean row,
    new ``lm_head`` columns (untied) = the mean column."""
    out = dict(params)
    emb = np.asarray(params["embed_tokens"]["embedding"])
    extra = vocab - emb.shape[0]
    if extra < 0:
        raise ValueError(f"cannot shrink the vocabulary {emb.shape[0]} -> {vocab}")
    out["embed_tokens"] = {"embedding": np.concatenate(
        [emb, np.repeat(emb.mean(0, keepdims=True), extra, 0)]).astype(emb.dtype)}
    if not cfg.tie_word_embeddings:
        k = np.asarray(params["lm_head"]["kernel"])
        out["lm_head"] = {"kernel": np.concatenate(
            [k, np.repeat(k.mean(1, keepdims=True), extra, 1)], axis=1).astype(k.dtype)}
    return out


def _init_small(cfg: RASConfig, seed: int) -> dict[str, Any]:
    """Random init of the new RAS parts (no LLM or tower computation)."""
    rng = jax.random.split(jax.random.key(seed), 4)
    d = cfg.d
    out = {"mask_projector": MLP2(d, d).init(rng[0], jnp.zeros((1, cfg.pooled_dim))),
           "image_projector": MLP2(d, d).init(
               rng[1], jnp.zeros((1, cfg.feature_dim(cfg.image_encoder))))
           if cfg.image_tokens else None}
    if cfg.decoding == "nar":
        out["head"] = NARHead(cfg.head, d, cfg.head_hidden, cfg.head_prior).init(
            rng[2], jnp.zeros((1, d)))
    else:
        out["seg_proj"] = nn.Dense(d).init(rng[2], jnp.zeros((1, d)))
    return {k: jax.tree.map(np.asarray, nn.unbox(v)["params"]) for k, v in out.items()
            if v is not None}


def _check_tree(params: Mapping, template: Mapping, prefix: str = "") -> None:
    missing = sorted(set(template) - set(params))
    extra = sorted(set(params) - set(template))
    if missing or extra:
        raise ConversionError(f"assembled RAS tree at {prefix or '/'}: missing {missing}, "
                              f"unexpected {extra}")
    for k, t in template.items():
        p = params[k]
        path = f"{prefix}/{k}"
        if isinstance(t, Mapping):
            if not isinstance(p, Mapping):
                raise ConversionError(f"{path}: expected a subtree")
            _check_tree(p, t, path)
        elif tuple(np.shape(p)) != tuple(t.shape):
            raise ConversionError(f"{path}: shape {tuple(np.shape(p))} != RAS parameter "
                                  f"{tuple(t.shape)}")


def assemble(
    llm_dir: str,
    clip_dir: str,
    siglip_dir: str | None = None,
    dinov2_dir: str | None = None,
    convnext_dir: str | None = None,
    convnext_layout: str = "hf",
    out_dir: str | None = None,
    *,
    convnext_size: int = 1024,
    convnext_eps: float | None = None,
    scan: bool = True,
    strict: bool = True,
    seed: int = 0,
    **config_overrides: Any,
) -> tuple[dict, RASConfig, AssemblyReport]:
    """Convert and assemble; returns ``(params, RASConfig, report)`` and, with ``out_dir``,
    writes the checkpoint there (meta ``model``, ``config``, ``sources``, ``report``).

    ``convnext_layout``: ``hf`` (a ``ConvNextModel`` directory) or ``timm`` (a timm / open_clip
    file or a directory holding one; ``convnext_eps`` overrides the inferred eps);
    ``convnext_size``: the ConvNeXt input side. ``config_overrides`` set RASConfig fields
    (``decoding``, ``image_tokens``, ``use_pe2d``, ``encoder_norm``, ``head`` ...).
    """
    report = AssemblyReport()
    llm_hf = hf.read_config(llm_dir)
    llm_cfg = _llm_config(llm_hf, llm_dir, scan=scan)
    llm_params, report.parts["llm"], side = _split_llm_dir(llm_dir, llm_cfg, strict)

    towers: dict[str, Any] = {}
    tower_params: dict[str, Any] = {}
    clip_hf = hf.read_config(clip_dir)
    if side["clip"]:
        p, c, r = vit_conv.from_hf((clip_hf, side["clip"]), "clip", strict=strict, scan=scan)
        report.notes.append(f"clip: weights from the LLaVA checkpoint {llm_dir} "
                            f"({len(side['clip'])} tensors); config from {clip_dir}")
    else:
        p, c, r = vit_conv.from_hf(clip_dir, "clip", strict=strict, scan=scan)
    towers["clip"], tower_params["clip"], report.parts["clip"] = c, p, r
    if siglip_dir is not None:
        p, c, r = vit_conv.from_hf(siglip_dir, "siglip", strict=strict, scan=scan,
                                   use_head=False)
        head = [k for k in r.unexpected if k.split(".")[0] == "head"
                or k.startswith("vision_model.head.")]
        r.unexpected = [k for k in r.unexpected if k not in head]
        r.ignored = sorted(r.ignored + head)
        towers["siglip"], tower_params["siglip"], report.parts["siglip"] = c, p, r
    if dinov2_dir is not None:
        p, c, r = vit_conv.from_hf(dinov2_dir, None, strict=strict, scan=scan)
        if not c.is_dinov2:
            raise ConversionError(f"{dinov2_dir}: not a DINOv2 checkpoint ({c.family})")
        towers["dinov2"], tower_params["dinov2"], report.parts["dinov2"] = c, p, r
    if convnext_dir is not None:
        if convnext_layout == "hf":
            p, c, r = convnext_conv.from_hf(convnext_dir, strict=strict, scan=scan)
        elif convnext_layout == "timm":
            from refjax.convert.common import load_state_dict

            sd = load_state_dict(convnext_conv._timm_file(convnext_dir))
            trunk, _ = convnext_conv.timm_trunk_state_dict(sd)
            c = convnext_conv.infer_timm_config(trunk, eps=convnext_eps, scan=scan)
            p, c, r = convnext_conv.from_timm(sd, c, strict=strict)
        else:
            raise ValueError(f"unknown convnext_layout {convnext_layout!r}; one of "
                             f"{convnext_conv.LAYOUTS}")
        towers["convnext"], tower_params["convnext"], report.parts["convnext"] = c, p, r

    hf_text = llm_hf.get("text_config", llm_hf) if llm_hf.get("model_type") == "llava" else llm_hf
    eos = hf_text.get("eos_token_id", llm_hf.get("eos_token_id"))
    if isinstance(eos, int):
        config_overrides.setdefault("eos_token_id", eos)
    if config_overrides.get("decoding") == "ar":
        seg = int(config_overrides.setdefault("seg_token_id", llm_cfg.vocab_size))
        if seg >= llm_cfg.vocab_size:
            llm_params = extend_vocab(llm_params, llm_cfg, seg + 1)
            report.notes.append(f"vocabulary {llm_cfg.vocab_size} -> {seg + 1}: [SEG] = {seg} "
                                f"(new rows: mean embedding / mean head column)")
            llm_cfg = llm_cfg.replace(vocab_size=seg + 1)
    cfg = RASConfig(llm=llm_cfg, encoders=towers,
                    image_sizes={"convnext": convnext_size} if "convnext" in towers else {},
                    **config_overrides)
    params: dict[str, Any] = dict(tower_params)
    params["llm"] = llm_params
    new = _init_small(cfg, seed)
    params["mask_projector"] = new["mask_projector"]
    report.initialised.append("mask_projector")
    for k in ("head", "seg_proj"):
        if k in new:
            params[k] = new[k]
            report.initialised.append(k)
    if cfg.image_tokens:
        if side["projector"]:
            proj, extra = _projector_params(side["projector"],
                                            cfg.feature_dim(cfg.image_encoder), cfg.d)
            params["image_projector"] = proj
            pr = ConversionReport(converted=sorted(side["projector"]), unexpected=extra)
            report.parts["image_projector"] = pr
        else:
            params["image_projector"] = new["image_projector"]
            report.initialised.append("image_projector")
    elif side["projector"]:
        report.notes.append("image_tokens=False: the LLaVA image projector is not used")
    emb = np.asarray(llm_params["embed_tokens"]["embedding"], np.float32)
    mean = emb.mean(axis=0).astype(np.float32)
    params["mask_pool_pre"] = mean.copy()
    params["mask_ref_pre"] = mean.copy()
    report.notes.append("mask_pool_pre / mask_ref_pre: mean of the LLM input embeddings")

    template = nn.unbox(abstract_variables(cfg))["params"]
    _check_tree(params, template)
    if out_dir is not None:
        meta = {
            "model": "ras",
            "config": cfg.to_dict(),
            "sources": {k: (os.path.abspath(v) if v else None) for k, v in (
                ("llm", llm_dir), ("clip", clip_dir), ("siglip", siglip_dir),
                ("dinov2", dinov2_dir), ("convnext", convnext_dir))},
            "convnext_layout": convnext_layout if convnext_dir else None,
            "report": report.summary(),
        }
        save_params(out_dir, params, meta)
    return params, cfg, report


def load_assembled(path: str, **overrides: Any) -> tuple[dict, RASConfig]:
    """``(params, RASConfig)`` of an :func:`assemble` checkpoint (``overrides``: RASConfig
    fields)."""
    params, meta = load_params(path)
    if meta.get("model") != "ras":
        raise ConversionError(f"{path} is not a RAS checkpoint (model={meta.get('model')!r})")
    return params, RASConfig.from_dict(meta["config"], **overrides)


def convert_cli(llm: str, clip: str, out: str, *, siglip: str | None = None,
                dinov2: str | None = None, convnext: str | None = None,
                convnext_layout: str = "hf", convnext_size: int = 1024,
                convnext_eps: float | None = None, decoding: str = "nar",
                image_tokens: bool = True, scan: bool = True, strict: bool = True,
                seed: int = 0) -> AssemblyReport:
    """``python -m refjax convert ras --llm DIR --clip DIR [--siglip DIR --dinov2 DIR
    --convnext DIR --convnext-layout hf|timm] OUT``: prints the per-part reports and writes
    the checkpoint."""
    _, cfg, report = assemble(llm, clip, siglip, dinov2, convnext, convnext_layout, out,
                              convnext_size=convnext_size, convnext_eps=convnext_eps,
                              scan=scan, strict=strict, seed=seed, decoding=decoding,
                              image_tokens=image_tokens)
    print(report.summary())
    print(f"wrote {out} (RAS: LLM {cfg.llm.num_hidden_layers} layers d={cfg.d}, encoders "
          f"{list(cfg.encoder_names)}, D_in={cfg.pooled_dim}, decoding={cfg.decoding})")
    return report


__all__ = ["AssemblyReport", "assemble", "classify_key", "convert_cli", "extend_vocab",
           "load_assembled"]
