"""The embedded k-means MIM tokenizer: features and ids against numpy references, k-means
(objective, determinism, empty clusters), the checkpoint in the frozen slot, and the
``train-tokenizer`` entry point on the tiny RefShapes."""

from __future__ import annotations

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from refjax import tokenizer_fit as tkf
from refjax.models.patch_tokenizer import PatchKMeansConfig, PatchKMeansTokenizer
from tests.data_fixtures import refshapes_tiny_dir  # noqa: F401


# ----------------------------------------------------------------------------- references
def ref_features(img: np.ndarray, cfg: PatchKMeansConfig) -> np.ndarray:
    """float64 features of one (H, W, 3) image in [0, 1], patch by patch (row-major)."""
    p = cfg.patch_size
    out = []
    for y in range(0, img.shape[0], p):
        for x in range(0, img.shape[1], p):
            patch = img[y : y + p, x : x + p].astype(np.float64)
            if cfg.feature == "pixels":
                v = patch.reshape(-1)
                out.append((v - v.mean()) / np.sqrt(v.var() + cfg.eps))
                continue
            luma = patch @ np.array([0.299, 0.587, 0.114])
            gx = np.zeros((p, p))
            gy = np.zeros((p, p))
            gx[:, :-1] = np.abs(luma[:, 1:] - luma[:, :-1])
            gx[:, -1] = gx[:, -2]
            gy[:-1] = np.abs(luma[1:] - luma[:-1])
            gy[-1] = gy[-2]
            k = p // cfg.cells
            colors, grads = [], []
            for cy in range(cfg.cells):
                for cx in range(cfg.cells):
                    cell = (slice(cy * k, cy * k + k), slice(cx * k, cx * k + k))
                    colors += list(patch[cell].mean(axis=(0, 1)))
                    grads += [gx[cell].mean(), gy[cell].mean()]
            out.append(np.array(colors + [cfg.grad_weight * g for g in grads]))
    return np.stack(out)


def nearest(feats: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    d = ((feats[:, None, :] - codebook[None].astype(np.float64)) ** 2).sum(-1)
    srt = np.sort(d, axis=1)
    assert np.all(srt[:, 1] - srt[:, 0] > 1e-3), "near tie: the test data is ill-posed"
    return np.argmin(d, axis=1)


@pytest.mark.parametrize("feature", ["pixels", "color_grad"])
def test_ids_equal_numpy_nearest_neighbour(feature):
    cfg = PatchKMeansConfig(patch_size=8, codebook_size=37, feature=feature, img_size=32,
                            cells=4, grad_weight=2.0)
    rng = np.random.default_rng(0)
    # smooth random images plus sharp blocks (edges) so features spread out; 32x48: any size
    img = rng.random((2, 32, 48, 3)).astype(np.float32) * 0.3
    img[:, 8:20, 4:30] += rng.random((2, 1, 1, 3)).astype(np.float32) * 0.7
    model = PatchKMeansTokenizer(cfg)
    variables = model.init(jax.random.key(0), jnp.asarray(img))
    boxed = variables["params"]["codebook"]
    assert isinstance(boxed, nn.LogicallyPartitioned) and boxed.names == ("vocab", None)
    params = nn.unbox(variables["params"])
    assert jax.tree.map(jnp.shape, params) == {"codebook": (37, cfg.feature_dim)}
    assert params["codebook"].dtype == jnp.float32
    # a codebook drawn from the features themselves (plus noise): a realistic, tie-free case
    feats_ref = np.stack([ref_features(im, cfg) for im in img])
    flat = feats_ref.reshape(-1, cfg.feature_dim)
    codebook = (flat[rng.choice(len(flat), 37, replace=False)]
                + rng.normal(0, 0.05, (37, cfg.feature_dim))).astype(np.float32)
    ids, aux = model.apply({"params": {"codebook": codebook}}, jnp.asarray(img))
    assert ids.shape == (2, 4 * 6) and ids.dtype == jnp.int32
    assert aux["grid"] == (4, 6)
    assert aux["features"].shape == (2, 24, cfg.feature_dim)
    err = float(np.abs(np.asarray(aux["features"]) - feats_ref).max())
    print(f"{feature}: max abs feature diff vs numpy {err:.2e}")
    assert err <= 1e-5
    want = np.stack([nearest(f, codebook) for f in feats_ref])
    np.testing.assert_array_equal(np.asarray(ids), want)
    assert len(np.unique(want)) > 5  # a real check, not one code everywhere
    np.testing.assert_array_equal(np.asarray(aux["quantized"]), codebook[want])
    # uint8 input is [0, 255]; numpy's distance of the chosen code
    u8 = (img.clip(0, 1) * 255).round().astype(np.uint8)
    ids8, _ = model.apply({"params": {"codebook": codebook}}, jnp.asarray(u8))
    ids01, _ = model.apply({"params": {"codebook": codebook}}, jnp.asarray(u8 / 255.0))
    np.testing.assert_array_equal(np.asarray(ids8), np.asarray(ids01))
    # the distance in the expanded form |f|^2 + |c|^2 - 2 f.c (float32, as VQ-KD) loses about
    # float32 eps x (|f|^2 + |c|^2) to cancellation: compare on that scale
    chosen = codebook[want].astype(np.float64)
    scale = (feats_ref**2).sum(-1) + (chosen**2).sum(-1)
    gap = np.abs(np.asarray(aux["distance"]) - ((feats_ref - chosen) ** 2).sum(-1))
    assert np.all(gap <= 1e-5 * scale), float((gap / scale).max())
    # ids come out of stop_gradient: no gradient flows into the codebook
    g = jax.grad(lambda c: model.apply({"params": {"codebook": c}}, img)[1]["quantized"].sum()
                 )(jnp.asarray(codebook))
    assert float(jnp.abs(g).max()) == 0.0
    with pytest.raises(ValueError, match="multiple of the patch"):
        model.apply({"params": {"codebook": codebook}}, jnp.zeros((1, 30, 32, 3)))


def test_config_checks():
    with pytest.raises(ValueError, match="unknown patch feature"):
        PatchKMeansConfig(feature="hog")
    with pytest.raises(ValueError, match="cells"):
        PatchKMeansConfig(patch_size=6, img_size=36, cells=4)
    assert PatchKMeansConfig(patch_size=16, feature="pixels").feature_dim == 768
    assert PatchKMeansConfig(patch_size=16, cells=4).feature_dim == 80


# ----------------------------------------------------------------------------- k-means
def blobs(seed: int = 0, n: int = 3000, d: int = 6, centers: int = 20) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = rng.normal(0, 3, (centers, d))
    return (c[rng.integers(centers, size=n)] + rng.normal(0, 1, (n, d))).astype(np.float32)


def objective(x: np.ndarray, c: np.ndarray) -> float:
    return float(((x[:, None].astype(np.float64) - c[None]) ** 2).sum(-1).min(1).mean())


def test_kmeans_decreases_objective_and_is_deterministic():
    x = blobs()
    c1, lab1, dist1, h1 = tkf.kmeans(x, 16, 10, seed=3, init_sample=500, progress=False)
    obj = h1["objective"]
    assert len(obj) == 11
    # Lloyd never increases the objective (up to float32 rounding of the distances)
    assert all(b <= a * (1 + 1e-6) for a, b in zip(obj, obj[1:], strict=False)), obj
    assert obj[-1] < 0.9 * obj[0]
    assert obj[-1] == pytest.approx(objective(x, c1), rel=1e-5)
    assert obj[-1] == pytest.approx(float(dist1.mean()), rel=1e-6)
    # labels are the nearest centroids of the returned codebook
    np.testing.assert_array_equal(lab1, np.argmin(((x[:, None] - c1[None]) ** 2).sum(-1), 1))
    c2, lab2, _, h2 = tkf.kmeans(x, 16, 10, seed=3, init_sample=500, progress=False)
    np.testing.assert_array_equal(c1, c2)
    np.testing.assert_array_equal(lab1, lab2)
    assert h1["objective"] == h2["objective"]
    c3, *_ = tkf.kmeans(x, 16, 10, seed=4, init_sample=500, progress=False)
    assert not np.array_equal(c1, c3)
    with pytest.raises(ValueError, match="at least k"):
        tkf.kmeans(x[:5], 16, 1, seed=0, progress=False)


def test_kmeans_reseeds_empty_clusters():
    x = blobs(1, n=800, d=3, centers=4)
    rng = np.random.default_rng(0)
    init = x[rng.choice(len(x), 6, replace=False)].copy()
    init[2] = 1e3  # far from every point: empty after the first assignment
    init[5] = -1e3
    labels0, dist0 = tkf.assign(x, init)
    assert not np.any(labels0 == 2) and not np.any(labels0 == 5)
    far = np.argsort(-dist0, kind="stable")[:2]
    c, labels, _, hist = tkf.kmeans(x, 6, 1, seed=0, init=init, progress=False)
    assert hist["reseeded"] == [2]
    np.testing.assert_array_equal(c[[2, 5]], x[far])  # the two farthest points
    assert hist["objective"][1] < hist["objective"][0]
    c, labels, _, hist = tkf.kmeans(x, 6, 8, seed=0, init=init, progress=False)
    assert np.bincount(labels, minlength=6).min() > 0  # every code is used
    assert sum(hist["reseeded"][1:]) == 0


def test_code_stats_and_predictability():
    st = tkf.code_stats(np.array([0, 0, 1, 3]), 4)
    assert st["used"] == 3 and st["usage"] == 0.75
    assert st["entropy_bits"] == pytest.approx(1.5)
    assert st["perplexity"] == pytest.approx(2**1.5)
    # vertical stripes: a code equals its up/down neighbours' code
    rng = np.random.default_rng(0)
    grid = np.repeat(rng.integers(0, 8, size=(200, 1, 4)), 4, axis=1)  # (images, 4, 4)
    ids = grid.reshape(200, 16)
    p = tkf.neighbour_predictability(ids[:150], ids[150:], (4, 4), 8)
    assert p["naive_bayes_acc"] == 1.0
    assert 0.5 < p["copy_acc"] < 1.0  # horizontal neighbours out-vote at the top/bottom rows
    assert p["neighbour_bits"] < p["unigram_bits"]  # 2 of the 4 directions are informative
    flat = np.repeat(rng.integers(0, 8, size=(200, 1)), 16, axis=1)  # one code an image
    assert tkf.neighbour_predictability(flat[:150], flat[150:], (4, 4), 8)["copy_acc"] == 1.0
    q = tkf.neighbour_predictability(ids[:150], rng.integers(0, 8, (50, 16)), (4, 4), 8)
    assert q["naive_bayes_acc"] < 0.5


# ----------------------------------------------------------------------------- checkpoint
def test_checkpoint_roundtrip_into_the_frozen_slot(tmp_path):
    from refjax.convert.common import load_variables
    from refjax.train.state import put_like

    cfg = PatchKMeansConfig(patch_size=8, codebook_size=12, feature="color_grad", img_size=16)
    codebook = np.random.default_rng(0).random((12, cfg.feature_dim)).astype(np.float32)
    result = {"config": cfg, "codebook": codebook,
              "stats": {"train": {"used": 12}}, "fit": {"split": "train", "seed": 0}}
    path = str(tmp_path / "tok")
    tkf.save_tokenizer(path, result)
    variables, meta = load_variables(path)
    assert meta["model"] == "patch_kmeans" and meta["split"] == "train"
    assert meta["config"] == cfg.to_dict()
    # what load_initial does with a frozen checkpoint: the params tree must equal the module's
    model = PatchKMeansTokenizer(cfg)
    images = jnp.asarray(np.random.default_rng(1).random((2, 16, 16, 3)), jnp.float32)
    template = nn.unbox(model.init(jax.random.key(0), images)["params"])
    tree = variables.get("frozen", {}).get("tokenizer") or variables["params"]
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    placed = put_like(tree, template, jax.tree.map(lambda _: sharding, template), "tokenizer")
    np.testing.assert_array_equal(np.asarray(placed["codebook"]), codebook)
    ids_loaded, _ = model.apply({"params": placed}, images)
    ids_mem, _ = model.apply({"params": {"codebook": codebook}}, images)
    np.testing.assert_array_equal(np.asarray(ids_loaded), np.asarray(ids_mem))
    cfg2, params2, _ = tkf.load_tokenizer(path)
    assert cfg2 == cfg and np.array_equal(params2["codebook"], codebook)
    with pytest.raises(FileExistsError):
        tkf.save_tokenizer(path, result)


# ----------------------------------------------------------------------------- end to end
CONFIG_FILE = '''
import ml_collections
from refjax.tokenizer_fit import tokenizer_section


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.model = dict(patch_size=16, img_size=64)
    c.data = dict(dataset="refshapes", dataset_config="tiny", data_dir={data_dir!r},
                  image_size=64)
    c.tokenizer = tokenizer_section(codebook_size=24, max_patches=100000, iters=4,
                                    init_sample=500)
    c.lock()
    return c
'''


def test_train_tokenizer_end_to_end_on_tiny_refshapes(refshapes_tiny_dir, tmp_path, capsys):  # noqa: F811
    from refjax.data import transforms
    from refjax.data.sources import open_scenes

    cfg_file = tmp_path / "tok_config.py"
    cfg_file.write_text(CONFIG_FILE.format(data_dir=refshapes_tiny_dir))
    out = str(tmp_path / "tokenizer")
    rc = tkf.train_tokenizer_main(["--config", str(cfg_file), "--out", out,
                                   "--set", "tokenizer.seed=1", "--no-progress"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    st = report["stats"]
    assert st["train"]["images"] == 40 and st["train"]["patches"] == 40 * 16
    assert st["objective_last"] < st["objective_first"]
    assert st["train"]["used"] == 24  # no dead code after re-seeding
    assert 0 < st["train"]["unexplained"] < 1
    assert st["val"]["images"] == 12 and 1 < st["val"]["perplexity"] <= 24
    assert {"naive_bayes_acc", "neighbour_bits", "unigram_bits"} <= set(st["val"])
    cfg, params, meta = tkf.load_tokenizer(out)
    assert (cfg.codebook_size, cfg.img_size, cfg.feature) == (24, 64, "color_grad")
    assert meta["dataset"] == "refshapes" and meta["fit"]["seed"] == 1
    assert params["codebook"].shape == (24, 80)
    # the fitted canvas is the pipeline's eval letterbox image_raw
    src = open_scenes("refshapes", "train", refshapes_tiny_dir, "tiny")
    scene = src.scene(0, with_pool=False)
    want = transforms.eval_letterbox(transforms.expand(scene, 0), 64)["image_raw"]
    np.testing.assert_array_equal(tkf.letterbox_canvas(scene["image"], 64), want)
    # the module reproduces the fit's assignment of the train patches (same seed -> same order)
    from refjax.models.patch_tokenizer import patch_features

    canv = np.stack(list(tkf.iter_canvases(src, 64, seed=1, progress=False)))
    feats = np.asarray(patch_features(canv, cfg)[0]).reshape(-1, 80)
    ids, _ = PatchKMeansTokenizer(cfg).apply({"params": params}, canv / 255.0)
    labels, _ = tkf.assign(feats, params["codebook"])
    assert np.mean(np.asarray(ids).reshape(-1) == labels) > 0.999
    with pytest.raises(FileExistsError):
        tkf.run(str(cfg_file), out)
    with pytest.raises(ValueError, match="model.patch_size"):
        tkf.run(str(cfg_file), str(tmp_path / "t2"), ["tokenizer.patch_size=8"])
