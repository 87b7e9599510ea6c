"""``python -m refjax convert MODEL IN OUT``: checkpoint conversion entry points by model name.

Each converter module owns its logic; this table only dispatches (the CLI parses, converters
convert). Every converter writes an Orbax parameter checkpoint with ``refjax_meta.json``
(``refjax.convert.common.save_params``) and prints a report of ignored and missing keys.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

MODELS = ("beit3", "oneref", "vqkd", "clip", "siglip", "dinov2", "dinov2_registers", "convnext",
          "llama")


def convert_beit3(
    input_path: str,
    output: str,
    *,
    model: str = "beit3",
    img_size: int | None = None,
    heads: int | None = None,
    variant: str | None = None,
    scan: bool = True,
    mrefm: bool = False,
) -> str:
    """A torchscale BEiT-3 (``model="beit3"``) or an official OneRef checkpoint (``"oneref"``:
    BEiT-3 + heads [+ RES BatchNorm statistics]; ``mrefm=True``: an MRefM pretraining checkpoint
    with the mim/mlm heads) -> ``output``. Returns a one-line summary."""
    from refjax.convert import beit3 as conv
    from refjax.convert.common import load_state_dict, save_params
    from refjax.models.beit3 import VARIANTS

    if model not in MODELS:
        raise ValueError(f"unknown model {model!r} for convert_beit3 (supported: {MODELS})")
    sd = load_state_dict(input_path)
    inner, _ = conv.strip_prefix(sd)
    overrides: dict[str, Any] = {"scan": scan}
    if img_size:
        overrides["img_size"] = img_size
    if variant:
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; one of {sorted(VARIANTS)}")
        overrides["heads"] = VARIANTS[variant]["heads"]
    if heads:
        overrides["heads"] = heads
    cfg = conv.infer_config(inner, **overrides)
    if variant:
        want = {k: VARIANTS[variant][k] for k in ("dim", "depth", "mlp_dim")}
        got = {k: getattr(cfg, k) for k in want}
        if got != want:
            raise ValueError(f"checkpoint has {got}, variant {variant!r} has {want}")
    meta = {"model": model, "config": dataclasses.asdict(cfg),
            "source": os.path.abspath(input_path)}
    if model == "oneref" and mrefm:
        from refjax.convert import oneref

        return oneref.convert_mrefm(sd, cfg, output, source=os.path.abspath(input_path))
    if model == "oneref":
        from refjax.convert import oneref

        variables, report = oneref.from_torch(sd, cfg, strict=True)
        meta["use_seg_head"] = "batch_stats" in variables
        print(report.summary())
        save_params(output, variables["params"], meta, batch_stats=variables.get("batch_stats"))
        head = "REC+RES" if meta["use_seg_head"] else "REC"
        return (f"wrote {output} (OneRef {head}, BEiT-3 dim={cfg.dim} depth={cfg.depth} "
                f"img={cfg.img_size})")
    params, report = conv.from_torch(sd, cfg, strict=True)
    print(report.summary())
    save_params(output, params, meta)
    return f"wrote {output} (BEiT-3 dim={cfg.dim} depth={cfg.depth} img={cfg.img_size})"


def convert(model: str, input_path: str, output: str, **options: Any) -> str:
    """Convert ``input_path`` (a file or a Hugging Face directory) of ``model`` to ``output``.

    Options by model: beit3/oneref ``img_size``, ``heads``, ``variant``, ``scan`` (oneref
    ``mrefm``: an MRefM pretraining checkpoint); vqkd
    ``heads``, ``variant``, ``scan``; clip/siglip/dinov2/dinov2_registers ``scan``; convnext
    ``layout`` ("hf" | "timm"), ``eps``, ``scan``; llama ``scan``. Returns a summary line.
    """
    scan = bool(options.get("scan", True))
    if model in ("beit3", "oneref"):
        return convert_beit3(input_path, output, model=model, img_size=options.get("img_size"),
                             heads=options.get("heads"), variant=options.get("variant"),
                             scan=scan, mrefm=bool(options.get("mrefm")))
    if model == "vqkd":
        from refjax.convert import vqkd

        cfg, _ = vqkd.convert_cli(input_path, output, heads=options.get("heads"),
                                  variant=options.get("variant"), scan=scan)
        return f"wrote {output} (VQ-KD dim={cfg.dim} depth={cfg.depth} codes={cfg.codebook_size})"
    if model in ("clip", "siglip", "dinov2", "dinov2_registers"):
        from refjax.convert import vit

        vit.convert_cli(model, input_path, output, scan=scan)
        return f"wrote {output} ({model} vision tower)"
    if model == "convnext":
        from refjax.convert import convnext

        convnext.convert_cli(input_path, output, options.get("layout") or "hf",
                             eps=options.get("eps"), scan=scan)
        return f"wrote {output} (ConvNeXt, {options.get('layout') or 'hf'} layout)"
    if model == "llama":
        from refjax.convert import llama

        llama.convert_cli(input_path, output, scan=scan)
        return f"wrote {output} (LLaMA)"
    raise ValueError(f"unknown model {model!r} for convert (supported: {MODELS})")
