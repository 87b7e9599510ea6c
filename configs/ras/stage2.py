"""RAS stage 2, mask-group instruction tuning (spec/ras.md 7):
``get_config("tiny|13b[,decoding=nar|ar,encoders=clip|all|all+pe,data=...]")``.

LLM, projectors, prefixes and head trained, towers frozen; weighted BCE (NAR) or the AR
baseline's loss. Keys and recipes: ``configs/ras/__init__.py``.

    python -m refjax train --config configs/ras/stage2.py:tiny --workdir runs/ras_s2 \
        --set init=runs/ras_s1
"""

from __future__ import annotations

import ml_collections

from configs.ras import compile_args, make_config

COMPILE_ARGS = compile_args(2)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return make_config(2, arg)
