"""refjax.data.pipeline on the tiny RefShapes: shapes, eval coverage, sharding, resume, bad records.

Keep module-level imports light: grain worker processes import this module to unpickle
``CorruptSource``.
"""

from __future__ import annotations

import grain
import numpy as np
import pytest

from refjax.data import pipeline as pl
from refjax.data.errors import BadRecordError
from refjax.data.sources import open_scenes
from tests import data_fixtures

refshapes_tiny_dir = data_fixtures.refshapes_tiny_dir  # the shared session fixture
SIZE, MAX_LEN = 64, 24


class CorruptSource:
    """A scene source whose records in ``bad`` have masks of the wrong size (picklable)."""

    def __init__(self, source, bad):
        self.source, self.bad = source, frozenset(bad)

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        scene = self.source[i]
        if i in self.bad:
            scene = dict(scene, masks=scene["masks"][:, :5])
        return scene

    def expression_index(self):
        return self.source.expression_index()

    def file(self, name):
        return self.source.file(name)


def _cfg(data_dir, task, **kw):
    return task, data_fixtures.data_config(data_dir, image_size=SIZE, max_text_len=MAX_LEN, **kw)


def data_task(name):
    """The DataTask of a task name at the test's sizes."""
    from refjax.tasks.mrefm import MRefMData
    from refjax.tasks.oneref import OneRefData
    from refjax.tasks.ras import RASData

    return {
        "rec": lambda: OneRefData(SIZE, MAX_LEN, 7, box_mask=True),
        "res": lambda: OneRefData(SIZE, MAX_LEN, 7, box_mask=False),
        "mrefm": lambda: MRefMData(SIZE, MAX_LEN, 6, patch=16),
        "ras": lambda: RASData(SIZE, MAX_LEN),
    }[name]()


def _pipe(cfg, split, train, pi=0, pc=1, source=None, seed=0):
    name, data = cfg
    return pl.make_pipeline(
        data, split, task=data_task(name), train=train, seed=seed, process_index=pi,
        process_count=pc, source=source,
    )


def _eligible(src, task):
    """Expression indices (into expression_index) a task evaluates, from decoded scenes."""
    out = []
    for i, (r, e) in enumerate(src.expression_index()):
        ex = src[int(r)]["expressions"][int(e)]
        if task == "ras" or (len(ex["targets"]) > 0 and len(ex["refs"]) == 0):
            out.append(i)
    return out


EXPECTED = {
    "image": ((SIZE, SIZE, 3), np.float32),
    "box": ((4,), np.float32),
    "mask": ((SIZE, SIZE), np.uint8),
    "text_ids": ((MAX_LEN,), np.int32),
    "text_padding": ((MAX_LEN,), np.int32),
    "kind": ((), np.int32),
    "valid": ((), np.int32),
    "expr_index": ((), np.int32),
    "letterbox": ((6,), np.float32),
}
EXTRA = {
    "rec": {},
    "res": {},
    "mrefm": {
        "image_raw": ((SIZE, SIZE, 3), np.uint8),
        "mim_mask": ((16,), np.bool_),
        "mlm_ids": ((MAX_LEN,), np.int32),
        "mlm_mask": ((MAX_LEN,), np.int32),
        "sts_label": ((MAX_LEN,), np.float32),
    },
    "ras": {
        "pool_masks": ((24, SIZE, SIZE), np.uint8),
        "pool_valid": ((24,), np.int32),
        "pool_labels": ((24,), np.int32),
        "ref_masks": ((4, SIZE, SIZE), np.uint8),
        "ref_valid": ((4,), np.int32),
        "num_targets": ((), np.int32),
    },
}


@pytest.mark.parametrize("task", ["rec", "res", "mrefm", "ras"])
def test_fixed_shape_batches(refshapes_tiny_dir, task):
    cfg = _cfg(refshapes_tiny_dir, task)
    spec = EXPECTED | EXTRA[task]
    with _pipe(cfg, "train", True) as it:
        batches = [next(it) for _ in range(3)]
    with _pipe(cfg, "val", False) as ev:
        batches.append(next(ev))
    for b in batches:
        assert set(b) == set(spec)
        for k, (shape, dtype) in spec.items():
            assert b[k].shape == (8, *shape) and b[k].dtype == dtype, k
    train = batches[0]
    assert np.all(train["valid"] == 1)
    assert np.all((train["box"] >= 0) & (train["box"] <= 1))
    if task == "mrefm":
        m = train["mlm_mask"] == 1
        assert np.all(m.sum(1) >= 1) and np.all(train["mlm_ids"][~m] == train["text_ids"][~m])
        assert np.all(train["mim_mask"].sum(1) >= 16 - int(16 * 0.65))
    if task == "ras":
        assert np.all(train["pool_labels"] <= train["pool_valid"])


@pytest.mark.parametrize("task", ["rec", "ras"])
def test_eval_covers_every_expression_once_over_processes(refshapes_tiny_dir, task):
    cfg = _cfg(refshapes_tiny_dir, task, eval_batch_size=10)
    seen, nb = [], []
    for pi in range(2):
        with _pipe(cfg, "val", False, pi, 2) as ev:
            batches = list(ev)
        assert len(batches) == ev.num_batches
        nb.append(len(batches))
        for b in batches:
            assert b["image"].shape[0] == 5
            seen += b["expr_index"][b["valid"] == 1].tolist()
            if task == "ras":  # no ineligible rows: invalid rows are padding
                assert np.all(b["expr_index"][b["valid"] == 0] == -1)
    assert nb[0] == nb[1]  # every process runs the same number of eval steps
    src = open_scenes("refshapes", "val", refshapes_tiny_dir, "tiny")
    assert sorted(seen) == _eligible(src, task)


def test_train_shards_disjoint_and_cover(refshapes_tiny_dir):
    cfg = _cfg(refshapes_tiny_dir, "ras", batch_size=12)
    src = open_scenes("refshapes", "val", refshapes_tiny_dir, "tiny")
    m = len(src.expression_index())
    shards = []
    for pi in range(2):
        with _pipe(cfg, "val", True, pi, 2, seed=7) as it:
            rows: list[int] = []
            while len(rows) < m // 2:
                rows += next(it)["expr_index"].tolist()
        shards.append(rows[: m // 2])  # the first epoch of this process
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == list(range(m))
    assert shards[0] != sorted(shards[0])  # shuffled


def test_bad_record_propagates_without_skip(refshapes_tiny_dir):
    src = CorruptSource(open_scenes("refshapes", "val", refshapes_tiny_dir, "tiny"), {0})
    with _pipe(_cfg(refshapes_tiny_dir, "rec"), "val", False, source=src) as ev:
        with pytest.raises(BadRecordError, match="refshapes-tiny-val-00000.*'masks'"):
            next(ev)


def test_skip_bad_records_counts_eval(refshapes_tiny_dir):
    base = open_scenes("refshapes", "val", refshapes_tiny_dir, "tiny")
    bad = {0, 3, 4}
    src = CorruptSource(base, bad)
    with _pipe(
        _cfg(refshapes_tiny_dir, "ras", skip_bad_records=True), "val", False, source=src
    ) as ev:
        batches = list(ev)
        count = ev.bad_record_count()
    pairs = base.expression_index()
    bad_rows = [i for i, (r, _) in enumerate(pairs) if r in bad]
    assert count == len(bad_rows) > 0
    seen = np.concatenate([b["expr_index"][b["valid"] == 1] for b in batches]).tolist()
    assert sorted(seen) == [i for i in range(len(pairs)) if i not in set(bad_rows)]


def test_skip_bad_records_counts_train(refshapes_tiny_dir):
    base = open_scenes("refshapes", "val", refshapes_tiny_dir, "tiny")
    bad = {1, 2, 7}
    cfg = _cfg(refshapes_tiny_dir, "ras", skip_bad_records=True)
    with _pipe(cfg, "val", True, source=CorruptSource(base, bad), seed=3) as it:
        got = [next(it) for _ in range(12)]  # more than one epoch
        count = it.bad_record_count()
    rows = np.concatenate([b["expr_index"] for b in got]).tolist()
    # The reference order: the same shuffled, repeated index; bad ones are dropped and counted.
    pairs = base.expression_index()
    order = grain.MapDataset.source(pl.ExpressionIndex(pairs)).seed(3).shuffle().repeat(None)
    expect, expect_bad, pos = [], 0, 0
    while len(expect) < len(rows):
        i, r, _ = order[pos]
        pos += 1
        if r in bad:
            expect_bad += 1
        else:
            expect.append(int(i))
    assert rows == expect and count == expect_bad > 0


def test_resume_with_workers_through_orbax(refshapes_tiny_dir, tmp_path):
    import orbax.checkpoint as ocp

    base = open_scenes("refshapes", "train", refshapes_tiny_dir, "tiny")
    src = CorruptSource(base, {0, 5, 9, 11, 20})
    cfg = _cfg(refshapes_tiny_dir, "mrefm", batch_size=4, num_workers=2, skip_bad_records=True)
    n, k = 7, 3
    opts = ocp.CheckpointManagerOptions(enable_async_checkpointing=False)
    with _pipe(cfg, "train", True, source=src) as it:
        head = [next(it) for _ in range(k)]
        count_k = it.bad_record_count()
        with ocp.CheckpointManager(tmp_path / "ckpt", options=opts) as mngr:
            mngr.save(k, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(it)))
            mngr.wait_until_finished()
        straight = head + [next(it) for _ in range(n - k)]
        count_n = it.bad_record_count()
    with _pipe(cfg, "train", True, source=src) as it2:
        with ocp.CheckpointManager(tmp_path / "ckpt", options=opts) as mngr:
            mngr.restore(
                k, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointRestore(it2))
            )
        assert it2.bad_record_count() == count_k
        resumed = [next(it2) for _ in range(n - k)]
        assert it2.bad_record_count() == count_n > 0
    for a, b in zip(straight[k:], resumed):
        assert set(a) == set(b)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_to_global(refshapes_tiny_dir):
    import jax

    from refjax.parallel import create_mesh, host_batch_to_global

    with _pipe(_cfg(refshapes_tiny_dir, "rec"), "val", False) as ev:
        batch = next(ev)
    g = host_batch_to_global(batch, create_mesh({"data": 8}))
    assert isinstance(g["image"], jax.Array) and g["image"].shape == batch["image"].shape
    assert len(g["image"].sharding.device_set) == 8
    np.testing.assert_array_equal(np.asarray(g["text_ids"]), batch["text_ids"])


class _FailAt(grain.transforms.Map):
    """On element ``at``: sleep for a minute (a hung read) or kill the worker process (as an
    OOM kill or a segfault would)."""

    def __init__(self, at: int, how: str):
        self.at, self.how = at, how

    def map(self, x):
        if int(x) == self.at:
            import os
            import time

            time.sleep(60) if self.how == "hang" else os._exit(3)
        return {"x": np.asarray(x), "_skipped": np.zeros((), np.int32)}


def test_stalled_pipeline_raises_instead_of_hanging():
    it = pl.PipelineIterator(
        iter(grain.MapDataset.range(8).map(_FailAt(2, "hang")).to_iter_dataset()), timeout_s=1.0,
        name="toy",
    )
    assert [int(next(it)["x"]) for _ in range(2)] == [0, 1]
    with pytest.raises(pl.DataStallError, match="toy pipeline: no batch within 1 s"):
        next(it)
    with pytest.raises(pl.DataStallError, match="stalled earlier"):
        next(it)
    it.close()


def test_dead_worker_process_raises_instead_of_hanging():
    """grain reports a worker killed mid-stream; the error crosses the fetch thread intact."""
    ds = grain.MapDataset.range(64).map(_FailAt(5, "die")).to_iter_dataset()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=1))
    it = pl.PipelineIterator(iter(ds), timeout_s=60.0, name="toy")
    with pytest.raises(RuntimeError, match="terminated unexpectedly with exit code 3"):
        for _ in range(64):
            next(it)


def test_timeout_passes_batches_and_errors_through(refshapes_tiny_dir):
    cfg = _cfg(refshapes_tiny_dir, "rec", next_timeout_s=60.0)
    plain = _pipe(_cfg(refshapes_tiny_dir, "rec"), "val", False)
    with _pipe(cfg, "val", False) as timed:
        assert timed.timeout_s == 60.0
        for a, b in zip(plain, timed):
            np.testing.assert_array_equal(a["text_ids"], b["text_ids"])
    ds = grain.MapDataset.range(1).map(lambda x: x // 0).to_iter_dataset()
    bad = pl.PipelineIterator(iter(ds), timeout_s=5.0)
    with pytest.raises(ZeroDivisionError):  # an error inside the pipeline reaches the caller
        next(bad)
