"""RAS mask-group selection (spec/ras.md): the data half.

``RASData`` keeps every expression (targets, groups, no-target, reference masks), decodes the
candidate pool and the reference masks, and labels each candidate by the IoA rule (spec 8.4:
positive iff IoA >= 0.5 against the union of targets). No train augmentation: the pool labels
are defined on the whole image.
"""

from __future__ import annotations

import numpy as np

from refjax.data.schema import POSITIVE_IOA
from refjax.data.spec import DataTask, pad_stack


class RASData(DataTask):
    """Rows with ``pool_masks`` (P, S, S), ``pool_valid``, ``pool_labels``, ``ref_masks``
    (R, S, S), ``ref_valid`` and ``num_targets``."""

    keep_pool = True
    augment = False

    def __init__(self, size: int, max_len: int, pool_max: int = 24, refs_max: int = 4):
        super().__init__(size, max_len)
        self.pool_max, self.refs_max = int(pool_max), int(refs_max)

    def blank(self) -> dict[str, np.ndarray]:
        row = super().blank()
        s = self.size
        row.update(
            pool_masks=np.zeros((self.pool_max, s, s), np.uint8),
            pool_valid=np.zeros(self.pool_max, np.int32),
            pool_labels=np.zeros(self.pool_max, np.int32),
            ref_masks=np.zeros((self.refs_max, s, s), np.uint8),
            ref_valid=np.zeros(self.refs_max, np.int32),
            num_targets=np.int32(0),
        )
        return row

    def row(self, ex: dict) -> dict[str, np.ndarray]:
        row = super().row(ex)
        row["pool_masks"], row["pool_valid"] = pad_stack(ex["pool_masks"], self.pool_max)
        labels = (ex["pool_ioa"][: self.pool_max] >= POSITIVE_IOA).astype(np.int32)
        row["pool_labels"][: len(labels)] = labels
        row["ref_masks"], row["ref_valid"] = pad_stack(ex["ref_masks"], self.refs_max)
        row["num_targets"] = np.int32(ex["num_targets"])
        return row
