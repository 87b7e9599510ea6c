"""BEiT-3 encoder + OneRef heads against golden outputs of torchscale and the heads reference
(written by tests/fixtures/make_beit3_golden.py), converted with ``refjax.convert.oneref``:
value checks that need no torch, so they also run on Python 3.12."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from refjax.convert import oneref as conv
from refjax.convert.common import load_state_dict
from refjax.models.beit3 import BEiT3
from refjax.models.oneref import OneRef
from tests.fixtures.make_beit3_golden import MREFM_KEYS, golden_config

TOL = 1e-5
FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
GOLDEN_ST = os.path.join(FIXTURES, "beit3_oneref_golden.safetensors")
GOLDEN_NPZ = os.path.join(FIXTURES, "beit3_oneref_golden.npz")
HEAD_OUTPUTS = ("box", "sim", "seg_logits", "v_cls", "t_cls")


@functools.cache
def _golden():
    with np.load(GOLDEN_NPZ) as f:
        data = {k: f[k] for k in f.files}
    return data, load_state_dict(GOLDEN_ST)


@functools.cache
def _converted(scan: bool = True):
    _, sd = _golden()
    cfg = golden_config().replace(scan=scan)
    variables, report = conv.from_torch(sd, cfg)
    return cfg, variables, report


def _check(name: str, got, want) -> float:
    got = np.asarray(got)
    assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
    err = float(np.abs(got.astype(np.float64) - want).max())
    print(f"{name}: max |diff| {err:.3g}")
    assert err <= TOL, f"{name}: max |diff| {err:.3g} > {TOL}"
    return err


def test_report():
    _, sd = _golden()
    _, variables, report = _converted()
    assert not report.unexpected and not report.missing
    assert set(report.ignored) == set(MREFM_KEYS) | {
        f"bn{k}.num_batches_tracked" for k in (1, 2, 3)
    }
    assert set(report.converted) | set(report.ignored) == set(sd)
    assert "batch_stats" in variables


@pytest.mark.parametrize(
    "mode,scan",
    [("vision", True), ("text", True), ("joint", True), ("joint_mim", True),
     ("joint_mim", False)],
)
def test_encoder_out_matches_torchscale(mode, scan):
    data, _ = _golden()
    cfg, variables, _ = _converted(scan)
    params = {"params": variables["params"]["beit3"]}
    ids = jnp.asarray(data["text_ids"].astype(np.int32))
    pad = jnp.asarray(data["text_padding"])
    img = jnp.asarray(data["image"])
    model = BEiT3(cfg)
    if mode == "vision":
        fn = lambda p: model.apply(p, image=img)  # noqa: E731
    elif mode == "text":
        fn = lambda p: model.apply(p, text_ids=ids, text_padding=pad)  # noqa: E731
    else:
        mim = jnp.asarray(data["vision_mask"]) if mode == "joint_mim" else None
        fn = lambda p: model.apply(p, ids, pad, img, mim)  # noqa: E731
    out, aux = jax.jit(fn)(params)
    assert aux["multiway_split"] == {"vision": -1, "text": 0}.get(mode, cfg.grid**2 + 1)
    _check(f"encoder_out {mode} scan={scan}", out, data[f"encoder_out_{mode}"])


def test_heads_match_reference():
    data, _ = _golden()
    cfg, variables, _ = _converted()
    model = OneRef(cfg, use_seg_head=True)
    got, _ = jax.jit(model.apply)(
        variables,
        jnp.asarray(data["text_ids"].astype(np.int32)),
        jnp.asarray(data["text_padding"]),
        jnp.asarray(data["image"]),
    )
    for k in HEAD_OUTPUTS:
        _check(k, got[k], data[k])


def test_export_roundtrip_equals_the_golden_state_dict():
    _, sd = _golden()
    cfg, variables, _ = _converted()
    back = conv.to_torch(variables, cfg, use_seg_head=True)
    assert set(back) == set(sd) - set(MREFM_KEYS)
    for k, v in back.items():
        if k.endswith("num_batches_tracked"):
            continue  # exported as 0; the golden counted 5 steps
        np.testing.assert_array_equal(v, sd[k], err_msg=k)
