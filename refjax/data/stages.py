"""Grain stages of the refjax pipelines: picklable module-level Map/RandomMap classes.

Each stage wraps a pure function of ``refjax.data.transforms``; the per-task choices come from a
``refjax.data.spec.DataTask`` (no stage branches on a task name). Bad records: with
``skip_bad`` a ``BadRecordError`` becomes a *bad sentinel* (logged where it happens, which may be
a worker process) that later stages pass through; ``Finalize`` turns sentinels into blank rows
(``valid=0``; eval) or leaves them to ``SkipBadIterDataset`` (train), which drops them and adds
their number to the next example's ``_skipped`` field. Batches therefore carry the count to the
main process, whatever process the record was skipped in (see ``pipeline.PipelineIterator``).
"""

from __future__ import annotations

import threading
from typing import Any

import grain
import numpy as np
from absl import logging

from refjax import masking
from refjax.data import transforms as tf
from refjax.data.errors import BadRecordError
from refjax.data.sources import SceneSource
from refjax.data.spec import DataTask

BAD = "_bad"  # sentinel key: a skipped bad record
PAD = "_pad"  # sentinel key: an eval padding row
DROP = "_drop"  # sentinel key: an expression the task cannot use (not a bad record)
SKIPPED = "_skipped"  # per-row count of bad records skipped just before (or as) this row
_LOAD_LOCK = threading.Lock()


def is_sentinel(x: Any) -> bool:
    return isinstance(x, dict) and (BAD in x or PAD in x or DROP in x)


class _Guarded:
    """Runs ``_apply`` unless the element is a sentinel; turns BadRecordError into a sentinel."""

    skip_bad: bool = False

    def _run(self, x: Any, *args: Any) -> Any:
        if is_sentinel(x):
            return x
        try:
            return self._apply(x, *args)
        except BadRecordError as e:
            if not self.skip_bad:
                raise
            logging.warning("refjax pipeline: skipping bad record: %s", e)
            return {
                BAD: 1,
                "expr_index": int(x.get("expr_index", -1)) if isinstance(x, dict) else int(x[0]),
                "error": str(e),
            }

    def _apply(self, x: Any, *args: Any) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError


class Expand(_Guarded, grain.transforms.Map):
    """(expr_index, record, expression) -> ``transforms.expand`` example (then the task's
    ``prepare``), or a sentinel (PAD for padding rows, DROP when the task does not use it)."""

    def __init__(self, source: Any, skip_bad: bool, task: DataTask):
        self.source, self.skip_bad, self.task = source, skip_bad, task

    def map(self, item: Any) -> Any:
        i, rec, e = (int(v) for v in item)
        if rec < 0:
            return {PAD: 1, "expr_index": i}
        return self._run((i, rec, e))

    def _apply(self, item: tuple[int, int, int]) -> tf.Example:
        i, rec, e = item
        keep_pool = self.task.keep_pool
        if isinstance(self.source, SceneSource):
            # Pixels decoded only for a used expression, and only the masks it names.
            scene = self.source.scene(rec, with_pool=keep_pool, lazy=True)
            exprs = scene["expressions"]
            if 0 <= e < len(exprs):
                x = exprs[e]
                if self.task.eligible_counts(len(x["targets"]), len(x["refs"])) is False:
                    return {DROP: 1, "expr_index": i}
        else:
            scene_fn = getattr(self.source, "scene", None)
            scene = scene_fn(rec, with_pool=keep_pool) if scene_fn else self.source[rec]
        ex = tf.expand(scene, e)
        if not self.task.eligible(ex):
            return {DROP: 1, "expr_index": i}
        if not keep_pool:
            empty = np.zeros((0, *ex["mask"].shape), np.uint8)
            ex.update(pool_masks=empty, ref_masks=empty, pool_ioa=np.zeros(0, np.float32))
        ex = self.task.prepare(ex)
        ex["expr_index"] = i
        return ex


class EvalLetterbox(_Guarded, grain.transforms.Map):
    def __init__(self, size: int, skip_bad: bool, mean=tf.IMAGENET_MEAN, std=tf.IMAGENET_STD):
        self.size, self.skip_bad, self.mean, self.std = size, skip_bad, mean, std

    def map(self, x: Any) -> Any:
        return self._run(x)

    def _apply(self, x: tf.Example) -> tf.Example:
        return tf.eval_letterbox(x, self.size, self.mean, self.std)


class Augment(_Guarded, grain.transforms.RandomMap):
    def __init__(
        self,
        size: int,
        skip_bad: bool,
        num_scales: int = 7,
        mean=tf.IMAGENET_MEAN,
        std=tf.IMAGENET_STD,
    ):
        self.size, self.skip_bad, self.num_scales = size, skip_bad, num_scales
        self.mean, self.std = mean, std

    def random_map(self, x: Any, rng: np.random.Generator) -> Any:
        return self._run(x, rng)

    def _apply(self, x: tf.Example, rng: np.random.Generator) -> tf.Example:
        return tf.augment(
            x, self.size, rng, num_scales=self.num_scales, mean=self.mean, std=self.std
        )


class Tokenize(_Guarded, grain.transforms.Map):
    """The task's tokenization; the tokenizer is loaded lazily in each process (not pickled)."""

    def __init__(self, tokenizer_path: str, truncate: bool, skip_bad: bool, task: DataTask):
        self.tokenizer_path, self.truncate, self.skip_bad = tokenizer_path, truncate, skip_bad
        self.task = task
        self._tok: Any = None

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_tok"} | {"_tok": None}

    @property
    def tokenizer(self) -> Any:
        if self._tok is None:
            with _LOAD_LOCK:  # grain read threads: transformers' lazy imports are not thread-safe
                if self._tok is None:
                    self._tok = self.task.load_tokenizer(self.tokenizer_path)
        return self._tok

    def map(self, x: Any) -> Any:
        return self._run(x)

    def _apply(self, x: tf.Example) -> tf.Example:
        return self.task.tokenize(x, self.tokenizer, self.truncate)


class MRefMMask(_Guarded, grain.transforms.RandomMap):
    """Referring-aware image mask and text mask (``refjax.masking``) of every example.

    ``random_masking`` (the MVLM baseline): patch-random image masking with the referring
    masking's count (``masking.random_image_mask``) and text masking without the
    subject/object priority."""

    def __init__(
        self,
        size: int,
        patch: int,
        mask_id: int,
        mask_ratio: float = 0.35,
        dynamic_ratio: float = 0.75,
        text_mask_prob: float = 0.4,
        random_masking: bool = False,
    ):
        self.size, self.patch, self.mask_id = size, patch, mask_id
        self.mask_ratio, self.dynamic_ratio, self.text_mask_prob = (
            mask_ratio,
            dynamic_ratio,
            text_mask_prob,
        )
        self.random_masking = bool(random_masking)

    def random_map(self, x: Any, rng: np.random.Generator) -> Any:
        return self._run(x, rng)

    def _apply(self, x: tf.Example, rng: np.random.Generator) -> tf.Example:
        box = tf.box_to_target(x["box"], self.size)
        out = dict(x)
        image_mask = (
            masking.random_image_mask if self.random_masking else masking.referring_image_mask
        )
        out["mim_mask"] = image_mask(
            box,
            self.size // self.patch,
            rng,
            mask_ratio=self.mask_ratio,
            dynamic_ratio=self.dynamic_ratio,
        )
        out["mlm_ids"], out["mlm_mask"] = masking.text_mask(
            x["text_ids"],
            x["n_tok"],
            rng,
            mask_id=self.mask_id,
            priority=() if self.random_masking else x["mlm_priority"],
            mask_prob=self.text_mask_prob,
        )
        return out


class Finalize(grain.transforms.Map):
    """The task's fixed-shape row; sentinels become blank rows (``valid=0``; a bad record
    counts 1 in ``_skipped``) unless ``keep_bad``, where BAD/DROP sentinels are passed on."""

    def __init__(self, task: DataTask, keep_bad: bool):
        self.task, self.keep_bad = task, keep_bad

    def map(self, x: Any) -> Any:
        if is_sentinel(x):
            if self.keep_bad and (BAD in x or DROP in x):
                return x
            row = self.task.blank()
            row["expr_index"] = np.int32(-1 if PAD in x else x["expr_index"])
            row[SKIPPED] = np.int32(1 if BAD in x else 0)
            return row
        row = self.task.row(x)
        row[SKIPPED] = np.int32(0)
        return row
