"""Hugging Face ``LlamaForCausalLM`` checkpoints <-> refjax ``Llama`` parameters.

Reads a ``save_pretrained`` directory (``config.json`` + ``model.safetensors`` or shards with
an index; ``pytorch_model.bin`` and its sharded index through torch) **tensor by tensor**: each
HF tensor is cast, transposed and written into its slot of a preallocated (layer-stacked)
float32 array, so a 13B conversion holds the output plus one tensor, never a second full copy.
Rotary ``inv_freq`` buffers (old checkpoints) are known and ignored; ``lm_head.weight`` is
required when the embeddings are untied and ignored when they are tied.

The key map is a :class:`refjax.convert.common.Rule` list (:func:`llama_rules`); export back is
``common.flax_to_torch`` over the same rules (:func:`to_hf`, :func:`export_hf`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np
from flax import linen as nn

from refjax.convert import hf
from refjax.convert.common import (
    ConversionError,
    ConversionReport,
    Rule,
    flax_to_torch,
    linear_t,
    load_params,
    save_params,
)
from refjax.models.llama import LlamaConfig, has_lora, merge_lora, param_template

TORCH_BIN_INDEX = "pytorch_model.bin.index.json"


def _qkv_to_flax(heads: int, head_dim: int) -> Callable[[np.ndarray], np.ndarray]:
    """torch (heads*head_dim, D) -> (D, heads, head_dim)."""
    return lambda w: np.ascontiguousarray(w.T).reshape(w.shape[1], heads, head_dim)


def _qkv_to_torch(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.reshape(x.shape[0], -1).T)


def _o_to_flax(heads: int, head_dim: int) -> Callable[[np.ndarray], np.ndarray]:
    """torch (D, heads*head_dim) -> (heads, head_dim, D)."""
    return lambda w: np.ascontiguousarray(w.T).reshape(heads, head_dim, w.shape[0])


def _o_to_torch(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.reshape(-1, x.shape[-1]).T)


def _bias_to_flax(heads: int, head_dim: int) -> Callable[[np.ndarray], np.ndarray]:
    return lambda b: b.reshape(heads, head_dim)


def _flatten(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.reshape(-1))


def llama_rules(cfg: LlamaConfig) -> list[Rule]:
    """The key map between an HF ``LlamaForCausalLM`` state_dict and ``Llama(cfg)`` params."""
    nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    subs: list[tuple[str, tuple[str, ...], Callable, Callable]] = []
    for name, heads in (("q_proj", nh), ("k_proj", nkv), ("v_proj", nkv)):
        subs.append((f"self_attn.{name}.weight", ("self_attn", name, "kernel"),
                     _qkv_to_flax(heads, hd), _qkv_to_torch))
        if cfg.attention_bias:
            subs.append((f"self_attn.{name}.bias", ("self_attn", name, "bias"),
                         _bias_to_flax(heads, hd), _flatten))
    subs.append(("self_attn.o_proj.weight", ("self_attn", "o_proj", "kernel"),
                 _o_to_flax(nh, hd), _o_to_torch))
    if cfg.attention_bias:
        subs.append(("self_attn.o_proj.bias", ("self_attn", "o_proj", "bias"),
                     lambda x: x, lambda x: x))
    for name in ("gate_proj", "up_proj", "down_proj"):
        subs.append((f"mlp.{name}.weight", ("mlp", name, "kernel"), linear_t, linear_t))
        if cfg.mlp_bias:
            subs.append((f"mlp.{name}.bias", ("mlp", name, "bias"), lambda x: x, lambda x: x))
    for name in ("input_layernorm", "post_attention_layernorm"):
        subs.append((f"{name}.weight", (name, "scale"), lambda x: x, lambda x: x))
    rules = [Rule("model.embed_tokens.weight", ("embed_tokens", "embedding"))]
    for i in range(cfg.num_hidden_layers):
        base = ("layers",) if cfg.scan else (f"layers_{i}",)
        for key, path, fwd, back in subs:
            rules.append(Rule(f"model.layers.{i}.{key}", base + path, fwd, back, i))
    rules.append(Rule("model.norm.weight", ("norm", "scale")))
    if not cfg.tie_word_embeddings:
        rules.append(Rule("lm_head.weight", ("lm_head", "kernel"), linear_t, linear_t))
    return rules


def is_ignored(key: str, cfg: LlamaConfig) -> bool:
    """Known keys left out on purpose: rotary buffers, and ``lm_head`` of a tied model."""
    return key.endswith("rotary_emb.inv_freq") or (
        cfg.tie_word_embeddings and key == "lm_head.weight")


def _torch_numpy(v: Any) -> np.ndarray:
    t = v.detach().cpu()
    if str(t.dtype) == "torch.bfloat16":
        t = t.float()
    return t.numpy()


def iter_hf_tensors(directory: str) -> Iterator[tuple[str, np.ndarray]]:
    """``(key, array)`` for every tensor of an HF directory, one tensor (safetensors) or one
    shard (``.bin``) in memory at a time. Arrays keep their stored dtype (bf16 via ml_dtypes;
    torch bf16 as float32)."""
    st_index = os.path.join(directory, hf.INDEX)
    st_single = os.path.join(directory, hf.SAFETENSORS)
    bin_index = os.path.join(directory, TORCH_BIN_INDEX)
    bin_single = os.path.join(directory, hf.TORCH_BIN)
    if os.path.isfile(st_index) or os.path.isfile(st_single):
        from safetensors import safe_open

        if os.path.isfile(st_index):
            with open(st_index, encoding="utf-8") as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        else:
            files = [hf.SAFETENSORS]
        for name in files:
            path = os.path.join(directory, name)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{directory}: shard {name} listed in the index is "
                                        "missing")
            with safe_open(path, framework="numpy") as f:
                for key in f.keys():
                    yield key, f.get_tensor(key)
        return
    if os.path.isfile(bin_index) or os.path.isfile(bin_single):
        try:
            import torch
        except ImportError as e:
            raise ImportError(f"{directory} holds pytorch_model.bin weights; reading them needs "
                              "torch (or convert them to safetensors)") from e
        if os.path.isfile(bin_index):
            with open(bin_index, encoding="utf-8") as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        else:
            files = [hf.TORCH_BIN]
        for name in files:
            sd = torch.load(os.path.join(directory, name), map_location="cpu",
                            weights_only=True, mmap=True)
            for key in list(sd):
                v = sd.pop(key)
                if hasattr(v, "shape"):
                    yield key, _torch_numpy(v)
            del sd
        return
    raise FileNotFoundError(f"{directory}: no {hf.SAFETENSORS}, {hf.INDEX}, {hf.TORCH_BIN} or "
                            f"{TORCH_BIN_INDEX} to read weights from")


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def _get(tree: Mapping, path: tuple[str, ...]) -> Any:
    for p in path:
        tree = tree[p]
    return tree


def from_tensors(
    tensors: Iterable[tuple[str, np.ndarray]] | Mapping[str, np.ndarray],
    cfg: LlamaConfig,
    *,
    strict: bool = True,
    dtype: Any = np.float32,
) -> tuple[dict, ConversionReport]:
    """HF tensors (a state_dict or a stream of ``(key, array)``) -> ``Llama(cfg)`` params.

    Each tensor is cast to ``dtype``, transformed by its :class:`Rule` and written into a
    preallocated array (layer-stacked when ``cfg.scan``). A shape mismatch or a duplicated key
    raises :class:`ConversionError` naming the key; unknown keys are reported in
    ``report.unexpected`` and ignored keys in ``report.ignored``; with ``strict`` any missing
    key (or missing layer) is an error, else its parameter is left out of the tree.
    """
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    rules = llama_rules(cfg)
    by_key = {r.torch_key: r for r in rules}
    template = param_template(cfg)
    report = ConversionReport()
    out: dict = {}
    buffers: dict[tuple[str, ...], np.ndarray] = {}
    seen: set[str] = set()
    for key, value in items:
        if key in seen:
            raise ConversionError(f"tensor {key!r} appears twice in the checkpoint")
        seen.add(key)
        rule = by_key.get(key)
        if rule is None:
            (report.ignored if is_ignored(key, cfg) else report.unexpected).append(key)
            continue
        target = _get(template, rule.path)
        stacked = rule.layer is not None and cfg.scan
        expected = tuple(target.shape[1:]) if stacked else tuple(target.shape)
        arr = rule.to_flax(np.asarray(value).astype(dtype, copy=False))
        if tuple(arr.shape) != expected:
            raise ConversionError(
                f"{key}: shape {tuple(np.shape(value))} does not fit parameter "
                f"{'/'.join(rule.path)} (expected {expected} after the transform, got "
                f"{tuple(arr.shape)})")
        if stacked:
            if rule.path not in buffers:
                buffers[rule.path] = np.empty(target.shape, dtype)
            buffers[rule.path][rule.layer] = arr
        else:
            _set(out, rule.path, np.ascontiguousarray(arr))
        report.converted.append(key)
        del arr, value
    report.missing = [r.torch_key for r in rules if r.torch_key not in seen]
    if report.missing and strict:
        raise ConversionError(f"missing keys in checkpoint: {report.missing}")
    incomplete = {r.path for r in rules if r.torch_key not in seen and r.layer is not None}
    for path, buf in buffers.items():
        if path not in incomplete:
            _set(out, path, buf)
    report.unexpected.sort()
    return out, report


def from_hf(
    directory: str, *, strict: bool = True, dtype: Any = np.float32, **overrides: Any
) -> tuple[dict, LlamaConfig, ConversionReport]:
    """An HF ``LlamaForCausalLM`` directory -> ``(params, LlamaConfig, report)``.

    ``overrides`` set :class:`LlamaConfig` fields (``scan``, ``dtype`` (compute),
    ``remat_policy``...); ``dtype`` here is the numpy dtype of the returned parameters.
    """
    config = hf.read_config(directory)
    mt = config.get("model_type")
    if mt not in (None, "llama"):
        raise ConversionError(f"{directory}: model_type {mt!r} is not 'llama'")
    cfg = LlamaConfig.from_hf(config, **overrides)
    params, report = from_tensors(iter_hf_tensors(directory), cfg, strict=strict, dtype=dtype)
    return params, cfg, report


def to_hf(params: Mapping, cfg: LlamaConfig) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """refjax params -> ``(config.json dict, HF state_dict of numpy arrays)``; no
    ``lm_head.weight`` when the embeddings are tied (as ``save_pretrained`` writes it). LoRA
    adapters are merged into their kernels first (HF LLaMA has none)."""
    params = nn.unbox(params)
    if has_lora(params):
        params = merge_lora(params, cfg.lora_scale)
    sd = flax_to_torch(params, llama_rules(cfg), scanned=cfg.scan)
    return cfg.to_hf(), sd


def export_hf(params: Mapping, cfg: LlamaConfig, directory: str, *,
              dtype: Any = np.float32) -> None:
    """Write an HF checkpoint directory (``from_pretrained`` loads it) via
    ``refjax.convert.hf.write_checkpoint``; tensors cast to ``dtype``."""
    config, sd = to_hf(params, cfg)
    sd = {k: np.asarray(v).astype(dtype, copy=False) for k, v in sd.items()}
    config["torch_dtype"] = np.dtype(dtype).name
    hf.write_checkpoint(directory, config, sd)


def convert_cli(hf_dir: str, out_dir: str, *, scan: bool = True,
                strict: bool = True) -> ConversionReport:
    """``python -m refjax convert llama HF_DIR OUT``: an Orbax params checkpoint
    (``common.save_params``) whose metadata holds ``model``, ``config`` (the
    :class:`LlamaConfig` fields), ``hf_config`` and ``source``. Prints the report summary."""
    params, cfg, report = from_hf(hf_dir, strict=strict, scan=scan)
    print(report.summary())
    meta = {"model": "llama", "config": dataclasses.asdict(cfg),
            "hf_config": hf.read_config(hf_dir), "source": os.path.abspath(hf_dir)}
    save_params(out_dir, params, meta)
    print(f"wrote {out_dir} (LLaMA {cfg.num_hidden_layers} layers, d={cfg.hidden_size}, "
          f"heads={cfg.num_attention_heads}/{cfg.num_key_value_heads}, "
          f"vocab={cfg.vocab_size})")
    return report


def load_converted(path: str, **overrides: Any) -> tuple[dict, LlamaConfig]:
    """``(params, LlamaConfig)`` of a :func:`convert_cli` checkpoint (``overrides`` set
    execution fields such as ``dtype`` or ``remat_policy``; ``scan`` must match the file)."""
    params, meta = load_params(path)
    if meta.get("model") != "llama":
        raise ConversionError(f"{path} is not a LLaMA checkpoint (model={meta.get('model')!r})")
    cfg = LlamaConfig(**{**meta["config"], **overrides})
    return params, cfg
