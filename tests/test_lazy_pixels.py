"""Lazy pixels in the pipeline: a scene read with ``lazy=True`` decodes its image and object masks
only where an example uses them, and the examples are the same as from an eagerly decoded scene."""

from __future__ import annotations

import copy
import dataclasses
import io

import numpy as np
import pytest
from PIL import Image

from refjax.data import sources
from refjax.data import stages as st
from refjax.data import transforms as tf
from refjax.data.errors import BadRecordError
from refjax.data.images import LazyImage, LazyMasks, decode_image, decode_mask, encode_png
from refjax.tasks.oneref import OneRefData
from refjax.tasks.ras import RASData, RASTaskData
from tests import data_fixtures
from tests.ras_task_util import small_config

refshapes_tiny_dir = data_fixtures.refshapes_tiny_dir


class EagerSource:
    """The same records through ``SceneSource.scene`` without ``lazy`` (the pre-lazy path)."""

    def __init__(self, source):
        self.source = source

    def __len__(self):
        return len(self.source)

    def scene(self, i, with_pool=True):
        return self.source.scene(i, with_pool=with_pool)


def _same(a, b, where):
    if st.is_sentinel(a) or st.is_sentinel(b):
        assert a == b, where
        return
    assert sorted(a) == sorted(b), where
    for k in a:
        if isinstance(a[k], np.ndarray):
            assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), (where, k)
        else:
            assert a[k] == b[k], (where, k)


@pytest.mark.parametrize("task", ["res", "rec", "ras"])
def test_lazy_examples_equal_eager_ones(refshapes_tiny_dir, task):  # noqa: F811
    src = sources.open_scenes("refshapes", "val", refshapes_tiny_dir, config="tiny")
    dt = {"res": OneRefData(64, 24, 7, box_mask=False), "rec": OneRefData(64, 24, 7, True),
          "ras": RASData(64, 24)}[task]
    lazy, eager = st.Expand(src, False, dt), st.Expand(EagerSource(src), False, dt)
    pairs = src.expression_index()
    dropped = 0
    for i, (rec, e) in enumerate(pairs):
        item = np.array([i, rec, e])
        a, b = lazy.map(item), eager.map(item)
        _same(a, b, (task, i))
        dropped += st.DROP in a
    # RefShapes has ORES expressions (reference masks) that OneRef does not use.
    assert (dropped > 0) == (task != "ras")


def test_only_the_used_masks_are_decoded(refshapes_tiny_dir):  # noqa: F811
    src = sources.open_scenes("refshapes", "val", refshapes_tiny_dir, config="tiny")
    for rec in range(5):
        scene, full = src.scene(rec, with_pool=False, lazy=True), src.scene(rec, with_pool=False)
        assert isinstance(scene["image"], LazyImage) and isinstance(scene["masks"], LazyMasks)
        assert scene["masks"].shape == full["masks"].shape
        e = next(j for j, x in enumerate(scene["expressions"]) if len(x["targets"]))
        x = scene["expressions"][e]
        ex = tf.expand(scene, e)
        assert sorted(scene["masks"]._cache) == sorted({*x["targets"].tolist(),
                                                        *x["refs"].tolist()})
        assert np.array_equal(ex["image"], full["image"])
        copied = np.array(scene["image"])
        assert copied.flags.writeable and not np.shares_memory(copied, ex["image"])
        assert np.array_equal(np.asarray(scene["masks"]), full["masks"])


def test_lazy_scene_errors_name_record_and_field(refshapes_tiny_dir):  # noqa: F811
    src = sources.open_scenes("refshapes", "val", refshapes_tiny_dir, config="tiny")
    raw = src.raw[0]
    rid = raw["image/id"].decode()
    assert isinstance(raw["image"], bytes) and isinstance(raw["objects"]["mask"][0], bytes)

    rec = copy.deepcopy(raw)
    rec["objects"]["mask"] = [encode_png(np.ones((5, 7), np.uint8)),
                              *rec["objects"]["mask"][1:]]
    scene = sources.decode_scene(rec, lazy=True)  # reading the record does not decode it
    np.asarray(scene["masks"][1])  # another mask is fine
    with pytest.raises(BadRecordError) as err:
        scene["masks"][0]
    assert (err.value.record_id, err.value.field) == (rid, "objects/mask[0]")
    with pytest.raises(BadRecordError):
        sources.decode_scene(rec)  # the eager read checks every mask at once

    rec = copy.deepcopy(raw)
    rec["image"] = b"not a png"
    scene = sources.decode_scene(rec, lazy=True)
    with pytest.raises(BadRecordError) as err:
        tf.expand(scene, 0)
    assert (err.value.record_id, err.value.field) == (rid, "image")

    rec = copy.deepcopy(raw)
    rec["image/height"] = int(rec["image/height"]) + 1
    with pytest.raises(BadRecordError) as err:
        np.asarray(sources.decode_scene(rec, with_pool=False, lazy=True)["image"])
    assert err.value.field == "image/height"


def test_unused_expression_skips_its_pixels(refshapes_tiny_dir):  # noqa: F811
    """An expression the task does not use is dropped before its image is decoded: a record
    with a broken image still raises for a used expression, not for an unused one."""
    src = sources.open_scenes("refshapes", "val", refshapes_tiny_dir, config="tiny")

    class BrokenImage:
        def __init__(self, source):
            self.source = source

        def __len__(self):
            return len(self.source)

        def __getitem__(self, i):
            return dict(self.source[i], image=b"not a png")

    dt = OneRefData(64, 24, 7, box_mask=False)
    for rec in range(len(src)):
        exprs = src.scene(rec, with_pool=False)["expressions"]
        used = [dt.eligible_counts(len(x["targets"]), len(x["refs"])) for x in exprs]
        if any(used) and not all(used):
            break
    else:
        pytest.fail("no record of the tiny val split mixes used and unused expressions")
    src.raw = BrokenImage(src.raw)
    stage = st.Expand(src, False, dt)
    for e, use in enumerate(used):
        if use:
            with pytest.raises(BadRecordError, match="image"):
                stage.map(np.array([0, rec, e]))
        else:
            assert st.DROP in stage.map(np.array([0, rec, e]))


def test_eligible_counts_agree_with_eligible(refshapes_tiny_dir):  # noqa: F811
    src = sources.open_scenes("refshapes", "val", refshapes_tiny_dir, config="tiny")
    spec = small_config(refshapes_tiny_dir, stage=2)
    from refjax.tasks import get_task

    base = get_task(spec.task).data_spec(spec)
    tasks = [OneRefData(64, 24, 7, box_mask=False)] + [
        RASTaskData(dataclasses.replace(base, select=s)) for s in ("ores", "res", "gres")]
    seen = set()
    for rec in range(len(src)):
        scene = src.scene(rec, with_pool=True)
        for e, x in enumerate(scene["expressions"]):
            ex = tf.expand(scene, e)
            for t in tasks:
                pre = t.eligible_counts(len(x["targets"]), len(x["refs"]))
                assert pre == t.eligible(ex), (rec, e, type(t).__name__)
                seen.add(pre)
    assert seen == {True, False}


@pytest.mark.parametrize("mode", ["L", "1", "RGB", "P"])
def test_decode_mask_matches_decode_image(mode):
    rng = np.random.default_rng(0)
    a = (rng.random((9, 11)) > 0.5).astype(np.uint8) * 255
    im = Image.fromarray(a, "L")
    if mode == "P":  # a palette whose index 1 has a zero red channel: the first channel decides
        im = Image.fromarray((a > 0).astype(np.uint8), "P")
        im.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    elif mode != "L":
        im = im.convert(mode)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    data = buf.getvalue()
    want = (decode_image(data)[..., 0] > 0).astype(np.uint8)
    got = decode_mask(data)
    assert got.dtype == np.uint8 and np.array_equal(got, want)
    if mode != "P":
        assert np.array_equal(got, (a > 0).astype(np.uint8))
    with pytest.raises(BadRecordError, match="unreadable mask"):
        decode_mask(b"junk", "r1", "objects/mask[2]")
