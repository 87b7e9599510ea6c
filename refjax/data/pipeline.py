"""Deterministic, resumable grain pipelines; the per-task choices come from a ``DataTask``.

``make_pipeline(config.data, split, task=...)`` builds (spec/jax-stack.md 6.3, big_vision style)::

    MapDataset.source(ExpressionIndex)          # (expr_index, record, expression) triples
      .seed(seed) .shuffle() .repeat()          # train only
      [process_index::process_count]            # per-process shard (eval: padded first)
      .map(Expand) .random_map(Augment) | .map(EvalLetterbox) .map(Tokenize)
      [task.extra_stages(...)] .map(Finalize)   # e.g. MRefM masking; the task's fixed-shape row
      train: .to_iter_dataset() -> SkipBadIterDataset -> .batch(B, drop_remainder=True)
      eval:  .batch(B) (full batches: the index is padded with valid=0 rows) .to_iter_dataset()
      [.mp_prefetch(MultiprocessingOptions(num_workers))]
    -> PipelineIterator (a grain DatasetIterator: get_state/set_state, Orbax CheckpointSave)

Randomness comes only from the seed and the element index (grain's per-element RandomMap rng),
so the stream is independent of worker count and resumes exactly. The seed must be the same
in every process (shards are slices of one shuffled order).

Eval: every eligible expression appears exactly once over all processes; the index is padded
to a multiple of ``process_count * batch`` so that every process yields the same number of full
batches (padding rows have ``valid=0``, ``expr_index=-1``).

Every key of ``config.data`` that a pipeline reads must be present (the config files are the one
source of values): dataset, data_dir, dataset_config, batch_size, eval_batch_size, num_workers,
read_threads, prefetch_buffer, skip_bad_records, truncate_text, tokenizer_path, image_mean,
image_std, next_timeout_s.

Bad records (``data.skip_bad_records``): False, the ``BadRecordError`` propagates; True, the
record is logged where it fails (possibly in a worker) and dropped (train) or kept as a
``valid=0`` row (eval), and counted. The count travels in each row's ``_skipped`` field to the
main process, where ``PipelineIterator`` sums and removes it: ``bad_record_count()``, also part of
the iterator state. Expressions the task cannot use (``DataTask.eligible``; OneRef: no target, or
reference masks) are dropped in train and are ``valid=0`` rows in eval, without being counted as
bad.
"""

from __future__ import annotations

import math
import queue
import threading
from typing import Any

import grain
import numpy as np
from absl import logging

from refjax.data import stages as st
from refjax.data.errors import BadRecordError  # noqa: F401  (re-exported for callers)
from refjax.data.spec import DataTask


class DataStallError(RuntimeError):
    """No batch came out of the pipeline within ``next_timeout_s`` (a hung read, a stuck worker)."""


class ExpressionIndex:
    """Random-access view: i -> int64 (i, record, expression); rows past the end are padding."""

    def __init__(self, pairs: np.ndarray, length: int | None = None):
        self.pairs = np.asarray(pairs, np.int64).reshape(-1, 2)
        self.length = len(self.pairs) if length is None else length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> np.ndarray:
        i = int(i)
        if i < len(self.pairs):
            return np.array([i, *self.pairs[i]], np.int64)
        return np.array([i, -1, -1], np.int64)


class SkipBadIterDataset(grain.IterDataset):
    """Drops bad/ineligible sentinels; adds the number of bad ones to the next row's ``_skipped``.

    Its state is the parent's: it never holds elements between ``next`` calls.
    """

    def __iter__(self) -> _SkipBadIterator:
        return _SkipBadIterator(self._parent.__iter__())


class _SkipBadIterator(grain.DatasetIterator):
    def __next__(self) -> Any:
        n = 0
        while True:
            x = next(self._parent)
            if st.is_sentinel(x):
                n += int(st.BAD in x)
                continue
            x[st.SKIPPED] = np.int32(x[st.SKIPPED] + n)
            return x

    def get_state(self) -> dict:
        return self._parent.get_state()

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state)


class PipelineIterator(grain.DatasetIterator):
    """Main-process end of the pipeline: strips ``_skipped`` into ``bad_record_count()``.

    With ``timeout_s > 0`` each batch is fetched on one daemon thread and a batch that takes
    longer raises ``DataStallError`` instead of waiting forever: grain itself reports a worker
    process killed mid-stream, but not a read that hangs or a worker that never delivers (e.g.
    one that fails while starting), where the trainer would otherwise wait with no message.
    """

    def __init__(
        self,
        parent: grain.DatasetIterator,
        num_batches: int | None = None,
        timeout_s: float = 0.0,
        name: str = "data",
    ):
        super().__init__(parent)
        self._bad = 0
        self.num_batches = num_batches  # eval: batches this process yields; train: None
        self.timeout_s, self.name = float(timeout_s), name
        self._requests: queue.Queue = queue.Queue()
        self._results: queue.Queue = queue.Queue()
        self._fetcher: threading.Thread | None = None
        self._stalled = False

    def _fetch_loop(self) -> None:
        while self._requests.get() is not None:
            try:
                self._results.put((True, next(self._parent)))
            except BaseException as e:  # noqa: BLE001  (re-raised in the caller's thread)
                self._results.put((False, e))

    def _next_parent(self) -> dict[str, np.ndarray]:
        if self.timeout_s <= 0:
            return next(self._parent)
        if self._stalled:
            raise DataStallError(f"{self.name} pipeline stalled earlier; rebuild it")
        if self._fetcher is None:
            self._fetcher = threading.Thread(target=self._fetch_loop, daemon=True,
                                             name=f"refjax-{self.name}-fetch")
            self._fetcher.start()
        self._requests.put(True)
        try:
            ok, value = self._results.get(timeout=self.timeout_s)
        except queue.Empty:
            self._stalled = True
            raise DataStallError(
                f"{self.name} pipeline: no batch within {self.timeout_s:g} s "
                "(data.next_timeout_s); a read is hung or a worker is stuck or failed to start"
            ) from None
        if not ok:
            raise value
        return value

    def close(self) -> None:
        if self._fetcher is not None and not self._stalled:
            self._requests.put(None)
            self._fetcher.join(timeout=5.0)
        self._fetcher = None
        super().close()

    def __enter__(self) -> PipelineIterator:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __next__(self) -> dict[str, np.ndarray]:
        batch = self._next_parent()
        n = int(np.sum(batch.pop(st.SKIPPED)))
        if n:
            self._bad += n
            logging.warning("refjax pipeline: %d bad records skipped so far", self._bad)
        return batch

    def bad_record_count(self) -> int:
        return self._bad

    def get_state(self) -> dict:
        return {"pipeline": self._parent.get_state(), "bad_record_count": self._bad}

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state["pipeline"])
        self._bad = int(state["bad_record_count"])


def _mark_absl_flags_parsed() -> None:
    """grain's worker processes read absl flags; a library caller (a notebook) never parses them."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def make_pipeline(
    data_cfg: Any,
    split: str,
    *,
    task: DataTask,
    train: bool,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
    source: Any = None,
) -> PipelineIterator:
    """The batch iterator of ``task`` on ``split`` for this process (module docstring).

    ``data_cfg`` is ``config.data``. ``source``: a scene source (``[i]`` -> decoded scene dict,
    ``expression_index()``); default ``sources.open_split(data_cfg, split)``. Process
    index/count default to jax's. Batch sizes in the config are global.
    """
    from refjax.data.sources import open_split

    if process_index is None or process_count is None:
        import jax

        process_index, process_count = jax.process_index(), jax.process_count()
    source = source if source is not None else open_split(data_cfg, split)
    skip = bool(data_cfg.skip_bad_records)
    gbs = int((data_cfg.batch_size if train else data_cfg.eval_batch_size) or data_cfg.batch_size)
    if gbs % process_count:
        raise ValueError(f"batch size {gbs} is not divisible by {process_count} processes")
    bs = gbs // process_count
    size = task.size
    mean, std = tuple(data_cfg.image_mean), tuple(data_cfg.image_std)
    if data_cfg.tokenizer_path:
        tok_path = str(data_cfg.tokenizer_path)
    elif hasattr(source, "file"):
        tok_path = source.file(task.tokenizer_file)
    else:
        raise ValueError("data.tokenizer_path is not set and the source stores no tokenizer")

    pairs = np.asarray(source.expression_index(), np.int64).reshape(-1, 2)
    if train:
        index = ExpressionIndex(pairs)
        ds = grain.MapDataset.source(index).seed(seed).shuffle().repeat(None)
    else:
        padded = math.ceil(len(pairs) / gbs) * gbs
        ds = grain.MapDataset.source(ExpressionIndex(pairs, padded)).seed(seed)
    ds = ds[process_index::process_count]

    ds = ds.map(st.Expand(source, skip, task))
    if train and task.augment:
        ds = ds.random_map(st.Augment(size, skip, task.num_scales, mean, std))
    else:
        ds = ds.map(st.EvalLetterbox(size, skip, mean, std))
    ds = ds.map(st.Tokenize(tok_path, bool(data_cfg.truncate_text), skip, task))
    for stage in task.extra_stages(train, tok_path):
        random = isinstance(stage, grain.transforms.RandomMap)
        ds = ds.random_map(stage) if random else ds.map(stage)
    ds = ds.map(st.Finalize(task, keep_bad=train))

    read = grain.ReadOptions(
        num_threads=int(data_cfg.read_threads),
        prefetch_buffer_size=int(data_cfg.prefetch_buffer),
    )
    num_batches = None
    if train:
        it_ds = SkipBadIterDataset(ds.to_iter_dataset(read)).batch(bs, drop_remainder=True)
    else:
        num_batches = len(ds) // bs
        it_ds = ds.batch(bs, drop_remainder=False).to_iter_dataset(read)
    workers = int(data_cfg.num_workers)
    if workers > 0:
        _mark_absl_flags_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    timeout = float(data_cfg.next_timeout_s or 0.0)
    name = f"{split} {'train' if train else 'eval'}"
    return PipelineIterator(iter(it_ds), num_batches, timeout, name)
