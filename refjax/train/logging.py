"""Metric logging (JSONL + TensorBoard) and a tqdm progress bar; only process 0 writes."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np


def _is_writer() -> bool:
    return jax.process_index() == 0


def _scalar(value: Any) -> float | int | None:
    """A python number for scalar-like values, else None."""
    if isinstance(value, bool | int | float):
        return value
    if hasattr(value, "shape") and np.size(value) == 1:
        return np.asarray(value).reshape(()).item()
    return None


class MetricWriter:
    """Writes ``{"step", "time", **metrics}`` lines to ``<logdir>/metrics.jsonl`` and scalars to
    TensorBoard event files in ``logdir``, flushing after every write. A no-op on processes > 0.
    """

    def __init__(
        self,
        logdir: str | os.PathLike,
        *,
        filename: str = "metrics.jsonl",
        tensorboard: bool = True,
    ):
        self.logdir = os.fspath(logdir)
        self.active = _is_writer()
        self._jsonl = None
        self._tb = None
        if not self.active:
            return
        os.makedirs(self.logdir, exist_ok=True)
        self.path = os.path.join(self.logdir, filename)
        self._jsonl = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(logdir=self.logdir)

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Log scalar metrics (python or array scalars; strings go to JSONL only) at ``step``."""
        if not self.active:
            return
        now = time.time()
        record: dict[str, Any] = {"step": int(step), "time": now}
        for key, value in metrics.items():
            num = _scalar(value)
            if num is None:
                if not isinstance(value, str):
                    raise TypeError(f"metric {key!r} is not a scalar: {type(value).__name__}")
                record[key] = value
                continue
            # JSON has no NaN/Inf: write them as strings so the line stays valid JSON.
            record[key] = num if math.isfinite(num) else str(num)
            if self._tb is not None:
                self._tb.add_scalar(key, num, global_step=int(step), walltime=now)
        assert self._jsonl is not None
        self._jsonl.write(json.dumps(record) + "\n")
        self.flush()

    def flush(self) -> None:
        if self._jsonl is not None:
            self._jsonl.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of a metrics JSONL file."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


class ProgressBar:
    """tqdm bar showing step/total, the latest loss and examples/s (disabled on processes > 0)."""

    def __init__(self, total: int, *, initial: int = 0, desc: str = "train", **tqdm_kw: Any):
        from tqdm.auto import tqdm

        self.step = initial
        disable = bool(tqdm_kw.pop("disable", False)) or not _is_writer()
        self._bar = tqdm(
            total=total, initial=initial, desc=desc, dynamic_ncols=True, disable=disable, **tqdm_kw
        )
        self._last = time.perf_counter()
        self.examples_per_sec: float | None = None

    def update(self, step: int, *, loss: Any = None, examples: int | None = None) -> None:
        """Advance to ``step``; ``examples`` is how many examples the steps since the last call
        consumed (for examples/s)."""
        now = time.perf_counter()
        if examples is not None and now > self._last:
            self.examples_per_sec = examples / (now - self._last)
        self._last = now
        postfix: dict[str, str] = {}
        if loss is not None:
            postfix["loss"] = f"{float(np.asarray(loss)):.4g}"
        if self.examples_per_sec is not None:
            postfix["ex/s"] = f"{self.examples_per_sec:.1f}"
        if postfix:
            self._bar.set_postfix(postfix, refresh=False)
        self._bar.update(step - self.step)
        self.step = step

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
