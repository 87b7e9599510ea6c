"""VQ-KD tokenizer (spec/oneref.md 3.3, 8): parity with the OFFICIAL BEiT v2 code through a golden
written by tests/fixtures/make_vqkd_golden.py (no torch needed here), plus the converter, the
position interpolation and the preprocessing."""

import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from refjax.convert import vqkd as conv
from refjax.convert.common import ConversionError, load_params, load_state_dict
from refjax.models import vqkd as vq
from refjax.models.layers import resize_grid_bicubic
from refjax.models.vqkd import VQKD, interpolate_positions, preprocess, vqkd_config
from tests.fixtures.make_vqkd_golden import golden_images
from tests.torch_util import require_torch

TOL = 1e-5
FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
GOLDEN_ST = os.path.join(FIXTURES, "vqkd_golden.safetensors")
GOLDEN_NPZ = os.path.join(FIXTURES, "vqkd_golden.npz")
INPUTS = ("x384", "x224", "rect")


@functools.cache
def _golden():
    with np.load(GOLDEN_NPZ) as f:
        data = {k: f[k] for k in f.files}
    return data, golden_images(data), load_state_dict(GOLDEN_ST)


@functools.cache
def _converted(scan: bool = True):
    data, _, sd = _golden()
    cfg = conv.infer_config(sd, heads=int(data["heads"]), scan=scan)
    params, report = conv.from_torch(sd, cfg)
    return cfg, params, report


@functools.cache
def _apply(cfg):
    return jax.jit(lambda p, x: VQKD(cfg).apply({"params": p}, x))


def _run(cfg, params, x):
    ids, aux = _apply(cfg)(params, jnp.asarray(x))
    return np.asarray(ids), {k: np.asarray(aux[k]) for k in ("features", "embed")}


def _max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


# ----------------------------------------------------------------------------- converter
def test_golden_config_is_the_tiny_preset():
    cfg, _, _ = _converted()
    assert cfg == vqkd_config("tiny")
    assert (cfg.grid, cfg.num_positions) == (14, 197)


def test_report_names_used_and_ignored_keys():
    _, _, sd = _golden()
    _, _, report = _converted()
    assert not report.unexpected and not report.missing
    ignored = set(report.ignored)
    assert {k for k in sd if k.startswith(("decoder.", "decode_task_layer."))} <= ignored
    assert {
        "quantize.cluster_size",
        "quantize.embedding.cluster_size",
        "quantize.embedding.embed_avg",
        "quantize.embedding.initted",
        "scaling_layer.shift",
        "scaling_layer.scale",
    } <= ignored
    assert set(report.converted) | ignored == set(sd)
    assert "quantize.embedding.weight" in report.converted


@pytest.mark.parametrize(
    "name,scan", [("x384", True), ("x224", True), ("x224", False), ("rect", True)]
)
def test_matches_official_golden(name, scan):
    """ids identical and features / codes <= 1e-5 vs the official tokenizer."""
    data, images, _ = _golden()
    cfg, params, _ = _converted(scan)
    ids, aux = _run(cfg, params, images[name])
    assert ids.dtype == np.int32
    np.testing.assert_array_equal(ids, data[f"ids_{name}"])
    for key in ("features", "embed"):
        want = data[f"{key}_{name}"]
        assert aux[key].shape == want.shape
        err = _max_diff(aux[key], want)
        print(f"{name} scan={scan} {key}: max |diff| {err:.3g}")
        assert err <= TOL, f"{name} {key}: max |diff| {err:.3g} > {TOL}"


def test_export_roundtrip_equals_the_state_dict():
    _, _, sd = _golden()
    for scan in (True, False):
        cfg, params, report = _converted(scan)
        back = conv.to_torch(params, cfg)
        assert set(back) == set(sd) - set(report.ignored)
        for k, v in back.items():
            assert v.dtype == np.float32, k
            np.testing.assert_array_equal(v, sd[k].astype(np.float32), err_msg=k)


def test_shape_and_missing_key_errors_name_the_key():
    _, _, sd = _golden()
    cfg, _, _ = _converted()
    bad = dict(sd)
    bad["encoder.blocks.1.attn.q_bias"] = np.zeros(7, np.float32)
    with pytest.raises(ConversionError, match=r"encoder\.blocks\.1\.attn\.q_bias"):
        conv.from_torch(bad, cfg)
    bad = {k: v for k, v in sd.items() if k != "encode_task_layer.2.weight"}
    with pytest.raises(ConversionError, match=r"encode_task_layer\.2\.weight"):
        conv.from_torch(bad, cfg)
    extra = {**sd, "encoder.head.weight": np.zeros((3, 32), np.float32)}
    _, report = conv.from_torch(extra, cfg)
    assert report.unexpected == ["encoder.head.weight"]


def test_convert_cli_writes_params_and_meta(tmp_path):
    _, _, sd = _golden()
    out = str(tmp_path / "vqkd")
    cfg, report = conv.convert_cli(GOLDEN_ST, out, variant="tiny")
    assert cfg == _converted()[0]
    params, meta = load_params(out)
    assert meta["model"] == "vqkd" and meta["config"]["heads"] == 4
    assert meta["ignored"] == report.ignored
    want = _converted()[1]
    jax.tree.map(np.testing.assert_array_equal, params, want)
    _, cfg2 = conv.load_converted(out, dtype="bfloat16")
    assert cfg2 == cfg.replace(dtype="bfloat16")
    with pytest.raises(ConversionError, match="variant 'base'"):
        conv.convert_cli(GOLDEN_ST, str(tmp_path / "other"), variant="base")


# ----------------------------------------------------------------------------- the traps
def test_position_scale_24_1_over_14_is_not_size_24(monkeypatch):
    """The official interpolation uses scale_factor 24.1/14; resizing to size 24 changes the
    table and the ids, so the golden test catches it."""
    data, images, _ = _golden()
    cfg, params, _ = _converted()
    pos = np.asarray(params["encoder"]["pos_embed"])
    scaled = interpolate_positions(pos, (24, 24))
    np.testing.assert_allclose(
        np.asarray(interpolate_positions(jnp.asarray(pos), (24, 24))), scaled, atol=1e-6
    )
    assert vq.position_scale((24, 24), 196) == (24.1 / 14, 24.1 / 14)
    patches = pos[0, 1:].reshape(14, 14, -1)
    sized = np.concatenate([pos[:, :1], resize_grid_bicubic(patches, (24, 24)).reshape(1, 576, -1)],
                           axis=1)
    assert scaled.shape == sized.shape == (1, 577, cfg.dim)
    assert _max_diff(scaled, sized) > 0.05
    np.testing.assert_array_equal(scaled[:, 0], pos[:, 0])  # the cls row is kept

    def size_based(table, grid_hw):
        n = table.shape[1] - 1
        g0 = int(np.sqrt(n))
        if grid_hw[0] * grid_hw[1] == n:
            return table
        p = resize_grid_bicubic(table[0, 1:].reshape(g0, g0, -1), grid_hw)
        return jnp.concatenate([table[:, :1], p.reshape(1, -1, table.shape[-1])], axis=1)

    monkeypatch.setattr(vq, "interpolate_positions", size_based)
    fresh = jax.jit(lambda p, x: VQKD(cfg).apply({"params": p}, x))  # traced with the mutation
    ids, aux = fresh(params, jnp.asarray(images["x384"]))
    ids, aux = np.asarray(ids), {k: np.asarray(v) for k, v in aux.items() if k != "grid"}
    wrong = int((ids != data["ids_x384"]).sum())
    print(f"size-24 resizing: {wrong} of {ids.size} ids differ, features max |diff| "
          f"{_max_diff(aux['features'], data['features_x384']):.3g}")
    assert wrong > 0
    assert _max_diff(aux["features"], data["features_x384"]) > 100 * TOL


def test_codebook_is_used_as_stored():
    """Re-normalising the codebook, or taking the largest dot product, changes the ids."""
    data, images, _ = _golden()
    cfg, params, _ = _converted()
    _, aux = _run(cfg, params, images["x384"])
    z = jnp.asarray(aux["embed"])
    e = jnp.asarray(params["quantize"]["embedding"])
    norms = np.linalg.norm(np.asarray(e), axis=-1)
    assert norms.max() - norms.min() > 0.1  # the golden codebook is not unit-norm
    ids = np.asarray(jnp.argmin(vq.codebook_distances(z, e), -1))
    np.testing.assert_array_equal(ids, data["ids_x384"])
    renorm = np.asarray(jnp.argmin(vq.codebook_distances(z, vq.l2n(e)), -1))
    dot = np.asarray(jnp.argmax(jnp.einsum("bnc,kc->bnk", z, e), -1))
    assert (renorm != data["ids_x384"]).sum() > 0
    assert (dot != data["ids_x384"]).sum() > 0


def test_preprocess_pads_to_minus_one_and_scales_per_batch():
    data, images, _ = _golden()
    x = images["x384"]
    r, c = int(data["pad_rows"]), int(data["pad_cols"])
    y = np.asarray(preprocess(x))
    assert np.all(y[1, r:] == -1.0) and np.all(y[1, :, c:] == -1.0)
    # XLA turns "/ 127.5" into "* (1 / 127.5)": within 1 ulp of the official division
    want = x * np.float32(255.0) / np.float32(127.5) - np.float32(1)
    np.testing.assert_allclose(y, want, rtol=0, atol=2.5e-7)
    assert y.min() >= -1.0 and y.max() <= 1.0
    # images already in [0, 255] are not rescaled
    x255 = np.round(x * 255.0).astype(np.float32)
    np.testing.assert_allclose(np.asarray(preprocess(x255)), y, atol=1e-5)
    # the test is over the whole batch: one image above 1 keeps the [0, 1] one unscaled
    mixed = np.asarray(preprocess(np.stack([x[0], x255[1]])))
    np.testing.assert_allclose(mixed[0], x[0] / 127.5 - 1.0, atol=1e-6)


# ----------------------------------------------------------------------------- model
def test_base_preset_shapes_and_logical_axes():
    cfg = vqkd_config("base")
    variables = jax.eval_shape(VQKD(cfg).init, jax.random.key(0), jnp.zeros((1, 384, 384, 3)))
    boxed = jax.tree.leaves(variables, is_leaf=lambda v: isinstance(v, nn.LogicallyPartitioned))
    assert all(isinstance(v, nn.LogicallyPartitioned) for v in boxed)
    assert all(len(v.names) == v.value.ndim for v in boxed)
    p = nn.unbox(variables)["params"]
    assert p["encoder"]["pos_embed"].shape == (1, 197, 768)
    assert p["encoder"]["blocks"]["attn"]["qkv"]["kernel"].shape == (12, 768, 3, 768)
    assert p["quantize"]["embedding"].shape == (8192, 32)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(p))
    d, L = 768, 12  # official tensors: ViT-B/16 without k bias and head, task layer, codebook
    block = 3 * d * d + 2 * d + d * d + d + 4 * d + 2 * 4 * d * d + 4 * d + d
    enc = 768 * 3 * 16 * 16 + d + d + 197 * d + L * block + 2 * d
    assert vq.param_count(variables) == enc + (d * d + d + d * 32 + 32) + 8192 * 32
    ids, aux = jax.eval_shape(lambda v, x: VQKD(cfg).apply(v, x), variables,
                              jnp.zeros((2, 384, 384, 3)))
    assert ids.shape == (2, 576) and ids.dtype == jnp.int32
    assert aux["features"].shape == (2, 576, 768) and aux["embed"].shape == (2, 576, 32)


def test_bfloat16_compute_keeps_float32_params_and_outputs():
    cfg = vqkd_config("tiny", dtype="bfloat16")
    x = jnp.zeros((1, 96, 80, 3))
    variables = jax.eval_shape(VQKD(cfg).init, jax.random.key(0), x)
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(nn.unbox(variables)))
    ids, aux = jax.eval_shape(lambda v: VQKD(cfg).apply(v, x), variables)
    assert ids.shape == (1, 30) and ids.dtype == jnp.int32
    assert aux["features"].dtype == aux["embed"].dtype == jnp.float32


# ----------------------------------------------------------------------------- torch check
@pytest.mark.parametrize("grid", [(24, 24), (6, 5), (30, 17)])
def test_position_interpolation_matches_torch_scale_factor(grid):
    """Our table equals ``F.interpolate(scale_factor=((gh+0.1)/14, (gw+0.1)/14), 'bicubic')``
    (the official ``interpolate_pos_encoding``), and differs from ``size=(gh, gw)``."""
    torch = require_torch()
    rng = np.random.default_rng(0)
    pos = rng.standard_normal((1, 197, 8)).astype(np.float32)
    sh, sw = vq.position_scale(grid, 196)
    t = torch.from_numpy(pos[0, 1:].reshape(1, 14, 14, 8)).permute(0, 3, 1, 2)
    want = torch.nn.functional.interpolate(t, scale_factor=(sh, sw), mode="bicubic")
    by_size = torch.nn.functional.interpolate(t, size=grid, mode="bicubic", align_corners=False)
    want = want.permute(0, 2, 3, 1).reshape(1, -1, 8).numpy()
    got = np.asarray(interpolate_positions(jnp.asarray(pos), grid))
    assert got.shape == (1, 1 + grid[0] * grid[1], 8)
    err = _max_diff(got[:, 1:], want)
    print(f"grid {grid}: max |diff| vs torch scale_factor {err:.3g}")
    assert err <= TOL
    assert _max_diff(want, by_size.permute(0, 2, 3, 1).reshape(1, -1, 8).numpy()) > 1e-2


def test_pth_release_layout_converts_like_the_safetensors(tmp_path):
    """The release format: a torch ``.pth`` holding ``{'model': state_dict}`` (half tensors
    read as float32)."""
    torch = require_torch()
    _, _, sd = _golden()
    path = str(tmp_path / "vqkd.pth")
    torch.save({"model": {k: torch.from_numpy(np.array(v)) for k, v in sd.items()}}, path)
    cfg, params, _ = _converted()
    got, report = conv.from_torch(load_state_dict(path), cfg)
    assert not report.unexpected and not report.missing
    jax.tree.map(np.testing.assert_array_equal, got, params)
