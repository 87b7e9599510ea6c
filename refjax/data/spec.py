"""What a task asks of the data pipeline: ``DataTask``, the seam between a task and the pipeline.

The pipeline (``refjax.data.pipeline``) is the same for every task: index -> expand -> geometric
transform -> tokenize -> the task's extra stages -> fixed-shape rows -> batches. A ``DataTask``
makes the per-task choices: which expressions are usable, which tokenizer, whether candidate
pools are decoded, the train augmentation, extra (random) stages such as MRefM masking, and the
fixed-shape row every example becomes (``blank`` / ``row``). Subclasses must be module-level
classes with picklable fields: they travel to grain worker processes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from refjax.data import transforms as tf

Example = dict[str, Any]


def pad_stack(masks: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``(n, H, W)`` uint8 masks (the first ``n`` of ``masks``, zero-padded) and a validity row."""
    out = np.zeros((n, *masks.shape[1:]), np.uint8)
    k = min(n, len(masks))
    out[:k] = masks[:k]
    valid = np.zeros(n, np.int32)
    valid[:k] = 1
    return out, valid


class DataTask:
    """The per-task half of a pipeline (module docstring). The defaults suit OneRef-style tasks.

    Attributes:
      size, max_len: canvas side in pixels and text length in tokens.
      tokenizer_file: the file of the dataset's tokenizer this task reads (``BEIT3_FILE`` /
        ``LLAMA_FILE`` in ``refjax.data.tokenizers``), unless ``data.tokenizer_path`` is set.
      keep_pool: decode candidate-pool and reference masks (only RAS uses them).
      augment: random train augmentation (else the eval letterbox in training too).
      num_scales: train RandomResize scales (``data.num_scales``).
    """

    tokenizer_file = "beit3.spm"
    keep_pool = False
    augment = True

    def __init__(self, size: int, max_len: int, num_scales: int = 7):
        self.size, self.max_len, self.num_scales = int(size), int(max_len), int(num_scales)

    # -- choices -------------------------------------------------------------------------
    def eligible(self, ex: Example) -> bool:
        """Whether the task uses this expression (others: dropped in train, ``valid=0`` in eval)."""
        return True

    def eligible_counts(self, num_targets: int, num_refs: int) -> bool | None:
        """``eligible`` decided from the expression's target and reference-mask counts alone,
        before any pixel is decoded (the pipeline then skips an unused example's image); None
        where only the whole example can decide. Must agree with ``eligible``."""
        return None

    def prepare(self, ex: Example) -> Example:
        """Hook on the original-pixel example before the geometric transform."""
        return ex

    def load_tokenizer(self, path: str) -> Any:
        from refjax.data.tokenizers import load_beit3_tokenizer

        return load_beit3_tokenizer(path)

    def tokenize(self, ex: Example, tokenizer: Any, truncate: bool) -> Example:
        return tf.tokenize(ex, tokenizer, self.max_len, truncate=truncate)

    def extra_stages(self, train: bool, tokenizer_path: str) -> Sequence[Any]:
        """Grain transforms applied after tokenization (``Map`` or ``RandomMap`` instances)."""
        return ()

    # -- rows ----------------------------------------------------------------------------
    def blank(self) -> dict[str, np.ndarray]:
        """A row of zeros with every field of the task (``valid`` = 0)."""
        s, n = self.size, self.max_len
        return {
            "image": np.zeros((s, s, 3), np.float32),
            "box": np.zeros(4, np.float32),
            "mask": np.zeros((s, s), np.uint8),
            "text_ids": np.zeros(n, np.int32),
            "text_padding": np.ones(n, np.int32),
            "kind": np.int32(0),
            "valid": np.int32(0),
            "expr_index": np.int32(-1),
            "letterbox": np.zeros(6, np.float32),
        }

    def row(self, ex: Example) -> dict[str, np.ndarray]:
        """The fixed-shape row of a transformed, tokenized example."""
        row = self.blank()
        row.update(
            image=ex["image"],
            box=tf.box_to_target(ex["box"], self.size),
            mask=ex["mask"],
            text_ids=ex["text_ids"],
            text_padding=ex["text_padding"],
            kind=np.int32(ex["kind"]),
            valid=np.int32(1),
            expr_index=np.int32(ex["expr_index"]),
            letterbox=ex["letterbox"],
        )
        return row

    def fields(self) -> Mapping[str, tuple[tuple[int, ...], np.dtype]]:
        """``{field: (shape, dtype)}`` of a row (for dummy batches and checks)."""
        return {k: (np.shape(v), np.asarray(v).dtype) for k, v in self.blank().items()}
