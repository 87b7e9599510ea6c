"""RAS stage 3, task fine-tuning (spec/ras.md 7):
``get_config("tiny|13b[,task=ores|res|gres,decoding=nar|ar,encoders=...,data=...]")``.

As stage 2 on the task's data: ORES (all expressions, MaskGroups-HQ), RES (single-target,
RefCOCO; argmax fallback at eval), GRES (no reference masks, gRefCOCO). Keys and recipes:
``configs/ras/__init__.py``.

    python -m refjax train --config configs/ras/stage3.py:tiny,task=ores --workdir runs/ras_s3 \
        --set init=runs/ras_s2
"""

from __future__ import annotations

import ml_collections

from configs.ras import compile_args, make_config

COMPILE_ARGS = compile_args(3)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return make_config(3, arg)
