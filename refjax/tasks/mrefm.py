"""MRefM pretraining (Mask Referring Modeling, spec/oneref.md 3): the data half.

``MRefMData`` adds to the OneRef rows the unnormalised canvas image (the MIM tokenizer's input),
the referring-aware image mask and the subject/object-first text mask (``refjax.masking``), and
uses the rasterised GT box as the box-mask constraint's target, as the official loader does
without ``--enable_seg_mask``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from refjax.data import stages as st
from refjax.tasks.oneref import OneRefData


def mask_token_id(tokenizer_path: str) -> int:
    """The ``<mask>`` id of a BEiT-3-layout tokenizer (the last id when it has none)."""
    from refjax.data.tokenizers import load_beit3_tokenizer

    tok = load_beit3_tokenizer(tokenizer_path)
    return int(tok.mask_token_id if tok.mask_token_id is not None else len(tok) - 1)


class MRefMData(OneRefData):
    """OneRef rows plus ``image_raw``, ``mim_mask`` (grid*grid bool), ``mlm_ids``, ``mlm_mask``."""

    def __init__(
        self,
        size: int,
        max_len: int,
        num_scales: int,
        patch: int,
        mask_ratio: float = 0.35,
        dynamic_ratio: float = 0.75,
        text_mask_prob: float = 0.4,
    ):
        super().__init__(size, max_len, num_scales, box_mask=True)
        self.patch = int(patch)
        self.mask_ratio, self.dynamic_ratio = float(mask_ratio), float(dynamic_ratio)
        self.text_mask_prob = float(text_mask_prob)

    def extra_stages(self, train: bool, tokenizer_path: str) -> Sequence[Any]:
        return (st.MRefMMask(self.size, self.patch, mask_token_id(tokenizer_path),
                             self.mask_ratio, self.dynamic_ratio, self.text_mask_prob),)

    def blank(self) -> dict[str, np.ndarray]:
        row = super().blank()
        g, n = self.size // self.patch, self.max_len
        row.update(
            image_raw=np.zeros((self.size, self.size, 3), np.uint8),
            mim_mask=np.zeros(g * g, bool),
            mlm_ids=np.zeros(n, np.int32),
            mlm_mask=np.zeros(n, np.int32),
        )
        return row

    def row(self, ex: dict) -> dict[str, np.ndarray]:
        row = super().row(ex)
        row.update(image_raw=ex["image_raw"], mim_mask=ex["mim_mask"], mlm_ids=ex["mlm_ids"],
                   mlm_mask=ex["mlm_mask"])
        return row
