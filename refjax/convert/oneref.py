"""Official OneRef checkpoints (``BEiT3ForGrounding`` state_dict) <-> refjax ``OneRef`` variables.

A OneRef ``.pth`` is ``{'model': state_dict, 'optimizer', ...}`` (spec/oneref.md 1.5) with the
backbone under ``beit3.`` and the heads at the top level (spec 2.6). The backbone goes through
``refjax.convert.beit3``'s rules under a ``beit3`` prefix (the vision position table is
interpolated to the target grid as there); the heads through the key map documented in
``refjax.models.oneref``. BatchNorm running statistics form a second tree (``batch_stats``);
``bn{k}.num_batches_tracked`` is dropped on import and written as a 0-d int64 0 on export.
MRefM pre-training heads (``mim_head``, ``mim_vts_head``, ``mlm_head``, ``mlm_sts_head``) and
the optional mid-layer ``layer_norm`` are reported as ignored by ``from_torch``.

MRefM checkpoints (``rec|res_mrefm_pretrain_{base,large}_patch16_384.pth``: ``beit3.*`` + the
OneRef heads + the four MRefM heads) convert in full with ``from_torch_mrefm`` (for
``refjax.models.mrefm.MRefM``; the VQ-KD tokenizer is not in the file: it is the task's
``model.tokenizer_init``) and export back with ``to_torch_mrefm``; ``convert_mrefm`` /
``convert_mrefm_cli`` write the refjax checkpoint (meta ``model: "mrefm"``), and
``export_official_cli`` (``python -m refjax export --official``) writes a train workdir's
REC/RES or MRefM model as an official-layout state_dict.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from refjax.convert.beit3 import PREFIX, beit3_rules, interpolate_vision_positions
from refjax.convert.beit3 import to_torch as beit3_to_torch
from refjax.convert.common import (
    ConversionError,
    ConversionReport,
    Rule,
    flax_to_torch,
    linear_t,
    prefix_rules,
    torch_to_flax,
)
from refjax.models.beit3 import BEiT3Config
from refjax.models.oneref import OneRef

MREFM_HEADS = ("mim_head", "mim_vts_head", "mlm_head", "mlm_sts_head")

SEG_KEY = "seg_conv1.weight"
MREFM_PREFIXES = ("mim_head.", "mim_vts_head.", "mlm_head.", "mlm_sts_head.", "layer_norm.")
BN_STATS = (("running_mean", "mean"), ("running_var", "var"))


def head_rules(use_seg_head: bool) -> list[Rule]:
    """Rules for the head parameters (``params`` tree, top level)."""
    rules = [
        Rule("vision_head.weight", ("vision_head", "kernel"), linear_t, linear_t),
        Rule("language_head.weight", ("language_head", "kernel"), linear_t, linear_t),
        Rule("logit_scale", ("logit_scale",)),
    ]
    for name in ("visu_proj", "text_proj"):
        rules.append(Rule(f"{name}.weight", (name, "kernel"), linear_t, linear_t))
        rules.append(Rule(f"{name}.bias", (name, "bias")))
    for i in range(3):
        path = ("bbox_embed", f"layers_{i}")
        rules.append(Rule(f"bbox_embed.layers.{i}.weight", path + ("kernel",), linear_t, linear_t))
        rules.append(Rule(f"bbox_embed.layers.{i}.bias", path + ("bias",)))
    if use_seg_head:
        for k in (1, 2, 3):
            rules.append(Rule(f"seg_conv{k}.weight", (f"seg_conv{k}", "kernel")))  # (in,out,2,2)
            rules.append(Rule(f"bn{k}.weight", (f"bn{k}", "scale")))
            rules.append(Rule(f"bn{k}.bias", (f"bn{k}", "bias")))
    return rules


def batch_stats_rules(use_seg_head: bool) -> list[Rule]:
    """Rules for the BatchNorm running statistics (``batch_stats`` tree)."""
    if not use_seg_head:
        return []
    return [Rule(f"bn{k}.{t}", (f"bn{k}", f)) for k in (1, 2, 3) for t, f in BN_STATS]


def oneref_rules(cfg: BEiT3Config, use_seg_head: bool) -> list[Rule]:
    """All ``params`` rules: the prefixed BEiT-3 backbone plus the heads."""
    return prefix_rules(beit3_rules(cfg), PREFIX, ("beit3",)) + head_rules(use_seg_head)


def is_ignored(key: str) -> bool:
    """Known keys that have no refjax counterpart: MRefM heads and BN batch counters."""
    return key.startswith(MREFM_PREFIXES) or key.endswith(".num_batches_tracked")


def has_seg_head(state_dict: Mapping[str, Any]) -> bool:
    """A RES checkpoint (seg_conv/bn heads) rather than a REC-only one."""
    return SEG_KEY in state_dict


def variable_template(cfg: BEiT3Config, use_seg_head: bool) -> dict:
    """Unboxed variable shapes of ``OneRef(cfg, use_seg_head)`` (no computation)."""
    model = OneRef(cfg, use_seg_head=use_seg_head)
    shapes = jax.eval_shape(
        model.init,
        jax.random.key(0),
        jnp.zeros((1, 2), jnp.int32),
        jnp.zeros((1, 2), jnp.int32),
        jnp.zeros((1, cfg.img_size, cfg.img_size, cfg.in_chans), jnp.float32),
    )
    return nn.unbox(shapes)


def _convert(
    state_dict: Mapping[str, np.ndarray],
    cfg: BEiT3Config,
    seg: bool,
    rules: list[Rule],
    template: Mapping,
    is_known: Any,
    strict: bool,
) -> tuple[dict, ConversionReport]:
    """The shared core of ``from_torch`` / ``from_torch_mrefm``: interpolate the vision
    positions, apply ``rules`` (params) and the BN statistics rules, report ``is_known``
    keys as ignored."""
    if not any(k.startswith(PREFIX) for k in state_dict):
        raise ConversionError(f"not a OneRef state_dict: no '{PREFIX}*' backbone keys")
    sd = dict(state_dict)
    pos = PREFIX + "encoder.embed_positions.A.weight"
    if pos in sd:
        sd[pos] = interpolate_vision_positions(np.asarray(sd[pos]), cfg.grid)
    stat_rules = batch_stats_rules(seg)
    stat_keys = {r.torch_key for r in stat_rules}
    params, report = torch_to_flax(
        sd,
        rules,
        template["params"],
        scanned=cfg.scan,
        strict=strict,
        ignore=lambda k: k in stat_keys or is_known(k),
    )
    variables = {"params": params}
    if stat_rules:
        stats, stat_report = torch_to_flax(
            sd,
            stat_rules,
            template["batch_stats"],
            scanned=False,
            strict=strict,
            ignore=lambda k: True,
        )
        variables["batch_stats"] = stats
        report.converted += stat_report.converted
        report.missing += stat_report.missing
    report.ignored = sorted(k for k in sd if is_known(k))
    return variables, report


def from_torch(
    state_dict: Mapping[str, np.ndarray],
    cfg: BEiT3Config,
    use_seg_head: bool | None = None,
    *,
    strict: bool = True,
) -> tuple[dict, ConversionReport]:
    """OneRef state_dict -> ``{'params': ..., ['batch_stats': ...]}`` for ``OneRef(cfg, seg)``.

    ``use_seg_head=None`` detects it from the presence of ``seg_conv1.weight``. Missing keys are
    an error with ``strict`` (named); unknown keys are reported in ``report.unexpected``; a
    shape that does not fit raises ``ConversionError`` naming the torch key.
    """
    seg = has_seg_head(state_dict) if use_seg_head is None else use_seg_head
    return _convert(state_dict, cfg, seg, oneref_rules(cfg, seg), variable_template(cfg, seg),
                    is_ignored, strict)


def to_torch(variables: Mapping, cfg: BEiT3Config, use_seg_head: bool) -> dict[str, np.ndarray]:
    """refjax ``OneRef`` variables -> a ``BEiT3ForGrounding`` state_dict (numpy, ``beit3.``
    prefix on the backbone), loadable with ``strict=True``."""
    v = nn.unbox(variables)
    params = v["params"]
    seg = sorted(k for k in params if k.startswith("seg_"))
    want = [f"seg_conv{k}" for k in (1, 2, 3)] if use_seg_head else []
    widths = {params[k]["kernel"].shape[1] for k in seg if k.startswith("seg_conv")}
    if seg != want or widths - {cfg.dim}:
        raise ConversionError(
            f"the RES head was built with refjax-only options (seg_dim / seg_convs): layers "
            f"{seg}, widths {sorted(widths)}; OneRef has {want} at width {cfg.dim}"
        )
    sd = beit3_to_torch(params["beit3"], cfg, prefix=PREFIX)
    sd.update(flax_to_torch(params, head_rules(use_seg_head), scanned=False))
    if use_seg_head:
        if "batch_stats" not in v:
            raise ConversionError("use_seg_head=True but the variables have no 'batch_stats'")
        sd.update(flax_to_torch(v["batch_stats"], batch_stats_rules(True), scanned=False))
        for k in (1, 2, 3):
            sd[f"bn{k}.num_batches_tracked"] = np.array(0, np.int64)
    return sd


# ----------------------------------------------------------------------------- MRefM
@dataclasses.dataclass(frozen=True)
class _Codebook:
    """Stands in for a tokenizer config where only the codebook size matters (templates)."""

    codebook_size: int


def mrefm_head_rules() -> list[Rule]:
    """Rules of the four MRefM heads (spec 2.6; top level, no prefix)."""
    rules = []
    for name in ("mim_head", "mlm_head"):
        rules.append(Rule(f"{name}.weight", (name, "kernel"), linear_t, linear_t))
        rules.append(Rule(f"{name}.bias", (name, "bias")))
    for name in ("mim_vts_head", "mlm_sts_head"):
        for i in range(3):
            path = (name, f"layers_{i}")
            rules.append(Rule(f"{name}.layers.{i}.weight", path + ("kernel",), linear_t, linear_t))
            rules.append(Rule(f"{name}.layers.{i}.bias", path + ("bias",)))
    return rules


def mrefm_rules(cfg: BEiT3Config, use_seg_head: bool) -> list[Rule]:
    """All ``params`` rules of an MRefM checkpoint: OneRef's plus the MRefM heads."""
    return oneref_rules(cfg, use_seg_head) + mrefm_head_rules()


def has_mrefm_heads(state_dict: Mapping[str, Any]) -> bool:
    """An MRefM pre-training checkpoint (it has ``mim_head.weight``)."""
    return "mim_head.weight" in state_dict


def is_ignored_mrefm(key: str) -> bool:
    """Known keys an MRefM model leaves out: the mid-layer ``layer_norm`` and BN counters."""
    return key.startswith("layer_norm.") or key.endswith(".num_batches_tracked")


def mrefm_template(cfg: BEiT3Config, codebook_size: int, use_seg_head: bool) -> dict:
    """Unboxed variable shapes of ``MRefM`` without the tokenizer (no computation)."""
    from refjax.models.mrefm import MRefM

    model = MRefM(cfg, tokenizer_kind="vqkd", tokenizer_config=_Codebook(int(codebook_size)),
                  use_seg_head=use_seg_head)
    shapes = jax.eval_shape(
        model.init,
        jax.random.key(0),
        jnp.zeros((1, 4), jnp.int32),
        jnp.zeros((1, 4), jnp.int32),
        jnp.zeros((1, cfg.img_size, cfg.img_size, cfg.in_chans), jnp.float32),
    )
    return nn.unbox(shapes)


def from_torch_mrefm(
    state_dict: Mapping[str, np.ndarray],
    cfg: BEiT3Config,
    use_seg_head: bool | None = None,
    *,
    strict: bool = True,
) -> tuple[dict, ConversionReport]:
    """Official MRefM state_dict -> ``{'params': ..., ['batch_stats']}`` for ``MRefM`` (every
    subtree but ``tokenizer``). The codebook size is read from ``mim_head.weight``; the text
    vocabulary must equal ``cfg.vocab_size`` (``mlm_head``). Errors and reports as
    ``from_torch``."""
    if not has_mrefm_heads(state_dict):
        raise ConversionError("not an MRefM state_dict: no 'mim_head.weight' (a OneRef REC/RES "
                              "checkpoint converts with from_torch)")
    seg = has_seg_head(state_dict) if use_seg_head is None else use_seg_head
    codebook = int(np.shape(state_dict["mim_head.weight"])[0])
    template = mrefm_template(cfg, codebook, seg)
    return _convert(state_dict, cfg, seg, mrefm_rules(cfg, seg), template, is_ignored_mrefm,
                    strict)


def to_torch_mrefm(
    variables: Mapping, cfg: BEiT3Config, use_seg_head: bool = False
) -> dict[str, np.ndarray]:
    """refjax ``MRefM`` variables -> the official MRefM state_dict (OneRef's keys plus the four
    MRefM heads), loadable into ``BEiT3ForGrounding(--enable_mrefm)`` with ``strict=True``.
    The ``tokenizer`` subtree is not part of it."""
    params = nn.unbox(variables)["params"]
    missing = [h for h in MREFM_HEADS if h not in params]
    if missing:
        raise ConversionError(f"not MRefM variables: no {missing} (a OneRef model exports with "
                              "to_torch)")
    sd = to_torch(variables, cfg, use_seg_head)
    sd.update(flax_to_torch(params, mrefm_head_rules(), scanned=False))
    return sd


def convert_mrefm(
    state_dict: Mapping[str, np.ndarray], cfg: BEiT3Config, output: str, *, source: str = ""
) -> str:
    """Convert an official MRefM state_dict for ``cfg`` and write it to ``output`` (Orbax params
    + ``refjax_meta.json`` with ``model: "mrefm"``, ``config``, ``codebook_size``,
    ``use_seg_head``). Returns a summary line. The wiring for ``python -m refjax convert
    oneref IN OUT --mrefm``: in ``convert_beit3``, after ``cfg`` is built, call this instead of
    ``from_torch``."""
    from refjax.convert.common import save_params

    variables, report = from_torch_mrefm(state_dict, cfg, strict=True)
    print(report.summary())
    codebook = int(np.shape(state_dict["mim_head.weight"])[0])
    meta = {"model": "mrefm", "config": dataclasses.asdict(cfg), "codebook_size": codebook,
            "use_seg_head": "batch_stats" in variables,
            "source": os.path.abspath(source) if source else ""}
    save_params(output, variables["params"], meta, batch_stats=variables.get("batch_stats"))
    return (f"wrote {output} (MRefM, BEiT-3 dim={cfg.dim} depth={cfg.depth} img={cfg.img_size}, "
            f"codebook {codebook}, vocab {cfg.vocab_size})")


def convert_mrefm_cli(
    input_path: str,
    output: str,
    *,
    img_size: int | None = None,
    heads: int | None = None,
    scan: bool = True,
) -> str:
    """``.pth`` / ``.safetensors`` MRefM checkpoint -> ``output`` (``convert_mrefm``), with the
    BEiT-3 shape inferred from the file (``img_size`` interpolates the vision positions,
    ``heads`` defaults to dim / 64)."""
    from refjax.convert import beit3 as conv
    from refjax.convert.common import load_state_dict

    sd = load_state_dict(input_path)
    inner, _ = conv.strip_prefix(sd)
    overrides: dict[str, Any] = {"scan": scan}
    if img_size:
        overrides["img_size"] = img_size
    if heads:
        overrides["heads"] = heads
    cfg = conv.infer_config(inner, **overrides)
    return convert_mrefm(sd, cfg, output, source=input_path)


def export_official_cli(workdir: str, output: str, step: int | None = None) -> str:
    """Write a OneRef train workdir's model (best, else latest checkpoint, or ``step``) as an
    official-layout state_dict: a REC/RES run as ``BEiT3ForGrounding`` keys, an MRefM run with
    the four MRefM heads as well (its k-means/VQ-KD tokenizer is not part of it).
    ``{'model': state_dict}`` via ``torch.save`` for ``.pth``, else a flat ``.safetensors``.
    Returns a summary line. ``python -m refjax export --workdir W --out X.pth --official``."""
    from refjax.convert.common import save_safetensors
    from refjax.tasks.oneref import backbone_config
    from refjax.train.trainer import load_for_inference

    if os.path.exists(output):
        raise FileExistsError(f"{output} exists; remove it or choose another output")
    if not output.endswith((".pth", ".safetensors")):
        raise ConversionError(f"official export writes .pth or .safetensors, not {output!r}")
    task, _, variables, config = load_for_inference(workdir, step)
    if task.name not in ("rec", "res", "mrefm"):
        raise ConversionError(f"{workdir} is a {task.name!r} run; the official OneRef layout "
                              "holds rec, res and mrefm runs")
    cfg = backbone_config(config.model)
    host = jax.device_get(variables)
    host = {"params": host["params"], "batch_stats": host.get("batch_stats")}
    seg = bool(config.model.use_seg_head)
    if task.name == "mrefm":
        sd, kind = to_torch_mrefm(host, cfg, seg), "MRefM"
    else:
        sd, kind = to_torch(host, cfg, seg), "OneRef " + ("REC+RES" if seg else "REC")
    if output.endswith(".pth"):
        import torch

        torch.save({"model": {k: torch.from_numpy(np.array(v)) for k, v in sd.items()}}, output)
    else:
        save_safetensors(output, sd)
    return f"wrote {output} ({len(sd)} tensors, {kind} official layout)"

