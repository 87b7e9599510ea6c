"""``python -m refjax convert MODEL IN OUT``: checkpoint conversion entry points by model name.

Each converter module owns its logic; this table only dispatches (the CLI parses, converters
convert). Every converter writes an Orbax parameter checkpoint with ``refjax_meta.json``
(``refjax.convert.common.save_params``) and prints a report of ignored and missing keys.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

MODELS = ("beit3", "oneref")


def convert_beit3(
    input_path: str,
    output: str,
    *,
    model: str = "beit3",
    img_size: int | None = None,
    heads: int | None = None,
    variant: str | None = None,
    scan: bool = True,
) -> str:
    """A torchscale BEiT-3 (``model="beit3"``) or an official OneRef checkpoint (``"oneref"``:
    BEiT-3 + heads [+ RES BatchNorm statistics]) -> ``output``. Returns a one-line summary."""
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
