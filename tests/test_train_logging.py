"""refjax.train.logging: JSONL + TensorBoard writer and the progress bar."""

import io
import os

import jax.numpy as jnp
import numpy as np
import pytest

from refjax.train import logging as rlog


def test_metric_writer_jsonl_and_events(tmp_path):
    with rlog.MetricWriter(tmp_path) as w:
        w.write(1, {"loss": jnp.float32(0.5), "acc": np.float64(0.25), "lr": 1e-3})
        w.write(2, {"loss": 0.25, "split": "val", "bad": float("nan")})
        # Flushed after each write: readable while the writer is still open.
        assert len(rlog.read_jsonl(tmp_path / "metrics.jsonl")) == 2
        with pytest.raises(TypeError, match="not a scalar"):
            w.write(3, {"vec": np.ones(3)})
    recs = rlog.read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2]
    assert recs[0]["loss"] == 0.5 and recs[0]["acc"] == 0.25 and recs[0]["lr"] == 1e-3
    assert recs[1]["split"] == "val" and recs[1]["bad"] == "nan"
    assert all(isinstance(r["time"], float) and r["time"] > 1e9 for r in recs)
    events = [n for n in os.listdir(tmp_path) if n.startswith("events.out.tfevents")]
    assert events and os.path.getsize(tmp_path / events[0]) > 0


def test_progress_bar_reports_loss_and_throughput():
    out = io.StringIO()
    with rlog.ProgressBar(10, file=out, mininterval=0) as bar:
        bar.update(2, loss=jnp.float32(1.5), examples=64)
        bar.update(4, loss=1.25, examples=64)
        assert bar.step == 4 and bar.examples_per_sec > 0
        bar._bar.refresh()
    text = out.getvalue()
    assert "4/10" in text and "loss=1.25" in text and "ex/s=" in text
