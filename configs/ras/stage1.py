"""RAS stage 1, mask-projector pretraining on captions (spec/ras.md 7):
``get_config("tiny|13b[,llm=frozen|trained,encoders=...,data=...]")``.

Candidate mask tokens only (no global visual tokens), the ``plain`` template, next-token loss on
the scene caption (one example per scene). Trainable: the mask projector and the two prefixes
(13b; tiny also trains its from-scratch LLM). Keys and recipes: ``configs/ras/__init__.py``.

    python -m refjax train --config configs/ras/stage1.py:tiny --workdir runs/ras_s1
"""

from __future__ import annotations

import ml_collections

from configs.ras import compile_args, make_config

COMPILE_ARGS = compile_args(1)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return make_config(1, arg)
