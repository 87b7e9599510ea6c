"""Fit the embedded MIM tokenizer (``refjax.models.patch_tokenizer``) by k-means on a dataset split.

``python -m refjax train-tokenizer --config configs/oneref/mrefm.py:tiny --out DIR [--set k=v]``
(``train_tokenizer_main``) runs :func:`run`:

1. the split's images, in a seeded random order, through the pipeline's eval letterbox
   (``refjax.data.transforms.eval_letterbox``: long side to ``config.data.image_size``, centred,
   zero pad) to the unnormalised canvas that MRefM's ``image_raw`` holds; whole images until
   ``max_patches`` patches;
2. their patch features (``patch_features``, the same jitted code the module runs);
3. k-means (:func:`kmeans`): k-means++ seeding on a random subsample of ``init_sample``
   patches, then Lloyd iterations over all of them, float32 distances and float64 means;
   a cluster left empty is re-seeded with the patch farthest from its centroid (the objective
   never increases); deterministic given the seed;
4. statistics (:func:`code_stats`): codebook usage, entropy / perplexity of the code
   distribution, quantisation error (mean squared distance and its fraction of the feature
   variance); with an eval split, the same on its images tokenized by the Linen module, and how
   predictable a patch's code is from its neighbours' codes (:func:`neighbour_predictability`);
5. a parameter checkpoint (``refjax.convert.common.save_params``) ``{"codebook": (K, D)}``
   with meta ``model="patch_kmeans"``, the tokenizer config, the dataset/split and the stats.
   ``refjax.train.state.load_initial`` loads it into a frozen subtree whose params are the
   module's (``{"codebook"}``); :func:`load_tokenizer` gives ``(PatchKMeansConfig, params)``.

Config keys read (``config.tokenizer``, see :func:`tokenizer_section`): ``split``,
``codebook_size``, ``patch_size``, ``feature``, ``cells``, ``grad_weight``, ``eps``,
``max_patches``, ``init_sample``, ``iters``, ``seed``; plus ``config.data`` (the dataset and
``image_size``) and ``config.model.patch_size`` when the config has a model (it must equal the
tokenizer's patch: the ids are the model's MIM labels, one per model patch).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # the module itself imports numpy only (config files import it)
    from refjax.models.patch_tokenizer import PatchKMeansConfig

log = logging.getLogger(__name__)

MODEL_NAME = "patch_kmeans"
ASSIGN_CHUNK = 8192


def tokenizer_section(**values: Any) -> dict[str, Any]:
    """Every ``config.tokenizer`` key this module reads, with the RefShapes defaults
    (``values`` override; unknown keys are errors). ``kind``/``checkpoint`` are for the task
    that loads the result (not read here)."""
    base = dict(
        kind=MODEL_NAME,  # patch_kmeans (this) | vqkd (a converted VQ-KD); not read here
        checkpoint=None,  # the frozen tokenizer checkpoint the MRefM task loads
        split="train",  # the split the codebook is fitted on
        codebook_size=1024,
        patch_size=16,  # must equal model.patch_size
        feature="color_grad",  # color_grad | pixels (refjax.models.patch_tokenizer)
        cells=4,  # color_grad: cells x cells colour/gradient cells a patch
        grad_weight=2.0,  # color_grad: weight of the gradient block against the colours
        eps=1e-6,  # pixels: variance epsilon of the per-patch normalisation
        max_patches=262144,  # patches fitted (whole images; 256k = all of RefShapes train)
        init_sample=16384,  # k-means++ seeding subsample
        iters=25,  # Lloyd iterations
        seed=0,
    )
    unknown = set(values) - set(base)
    if unknown:
        raise KeyError(f"unknown tokenizer keys {sorted(unknown)}")
    return {**base, **values}


def tokenizer_config(config: Any) -> PatchKMeansConfig:
    """The ``PatchKMeansConfig`` of ``config.tokenizer`` at the canvas ``config.data.image_size``
    (checked against ``config.model.patch_size`` when the config has a model)."""
    from refjax.models.patch_tokenizer import FEATURES, PatchKMeansConfig

    t = config.tokenizer
    if t.feature not in FEATURES:
        raise ValueError(f"tokenizer.feature={t.feature!r}: one of {FEATURES}")
    model = config.get("model") if hasattr(config, "get") else None
    if model is not None and "patch_size" in model and int(model.patch_size) != int(t.patch_size):
        raise ValueError(f"tokenizer.patch_size={t.patch_size} != model.patch_size="
                         f"{model.patch_size}: the tokenizer gives one MIM label per model patch")
    return PatchKMeansConfig(
        patch_size=int(t.patch_size),
        codebook_size=int(t.codebook_size),
        feature=str(t.feature),
        img_size=int(config.data.image_size),
        cells=int(t.cells),
        grad_weight=float(t.grad_weight),
        eps=float(t.eps),
    )


# ----------------------------------------------------------------------------- images
def letterbox_canvas(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 (size, size, 3): ``image`` through the pipeline's eval letterbox, unnormalised
    (the ``image_raw`` MRefM's tokenizer reads)."""
    from refjax.data.transforms import eval_letterbox

    h, w = image.shape[:2]
    ex = {
        "image": image,
        "mask": np.zeros((h, w), np.uint8),
        "ref_masks": np.zeros((0, h, w), np.uint8),
        "pool_masks": np.zeros((0, h, w), np.uint8),
        "box": np.zeros(4, np.float32),
        "num_targets": 0,
    }
    return eval_letterbox(ex, size)["image_raw"]


def iter_canvases(
    source: Any, size: int, seed: int, max_images: int | None = None, progress: bool = True
) -> Iterator[np.ndarray]:
    """Letterboxed canvases of ``source``'s records (a ``SceneSource``) in the seeded order."""
    from tqdm.auto import tqdm

    order = np.random.default_rng(seed).permutation(len(source))
    if max_images is not None:
        order = order[:max_images]
    for i in tqdm(order, desc="tokenizer: images", unit="img", disable=not progress,
                  leave=False):
        scene = source.scene(int(i), with_pool=False)
        yield letterbox_canvas(scene["image"], size)


def _batches(images: Iterator[np.ndarray], batch: int) -> Iterator[np.ndarray]:
    buf: list[np.ndarray] = []
    for im in images:
        buf.append(im)
        if len(buf) == batch:
            yield np.stack(buf)
            buf = []
    if buf:
        yield np.stack(buf)


def extract_features(
    images: Iterator[np.ndarray], cfg: PatchKMeansConfig, batch: int = 64
) -> np.ndarray:
    """float32 (num_images, P, D) features of uint8 canvases (the module's feature code)."""
    import jax

    from refjax.models.patch_tokenizer import patch_features

    fn = jax.jit(lambda x: patch_features(x, cfg)[0])
    out = [np.asarray(fn(b)) for b in _batches(images, batch)]
    if not out:
        raise ValueError("no images to extract features from")
    return np.concatenate(out, axis=0)


# ----------------------------------------------------------------------------- k-means
def assign(
    x: np.ndarray, centroids: np.ndarray, chunk: int = ASSIGN_CHUNK
) -> tuple[np.ndarray, np.ndarray]:
    """(labels int32, squared distances float32) of the nearest centroid of each row of ``x``
    (``|x|^2 + |c|^2 - 2 x.c`` in float32, as the module; ties go to the lower index)."""
    x = np.asarray(x, np.float32)
    c = np.asarray(centroids, np.float32)
    c2 = np.sum(c * c, axis=1)
    labels = np.empty(len(x), np.int32)
    dist = np.empty(len(x), np.float32)
    for s in range(0, len(x), chunk):
        xs = x[s : s + chunk]
        d = np.sum(xs * xs, axis=1, keepdims=True) + c2[None] - 2.0 * (xs @ c.T)
        lab = np.argmin(d, axis=1)
        labels[s : s + chunk] = lab
        dist[s : s + chunk] = np.maximum(d[np.arange(len(xs)), lab], 0.0)
    return labels, dist


def kmeans_pp(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding (Arthur & Vassilvitskii 2007): (k, D) float32 rows of ``x``."""
    n = len(x)
    x = np.asarray(x, np.float32)
    idx = [int(rng.integers(n))]
    d = np.sum(np.square(x - x[idx[0]]), axis=1, dtype=np.float64)
    for _ in range(1, k):
        total = float(d.sum())
        if total <= 0.0:  # fewer distinct points than k: duplicates (re-seeded if left empty)
            j = int(rng.integers(n))
        else:
            j = int(np.searchsorted(np.cumsum(d), rng.random() * total, side="right"))
            j = min(j, n - 1)
        idx.append(j)
        d = np.minimum(d, np.sum(np.square(x - x[j]), axis=1, dtype=np.float64))
    return x[np.asarray(idx)].copy()


def _cluster_sums(x: np.ndarray, labels: np.ndarray, k: int, chunk: int) -> np.ndarray:
    """float64 (k, D) per-cluster sums of the rows of ``x`` (sorted chunks + reduceat)."""
    sums = np.zeros((k, x.shape[1]), np.float64)
    for s in range(0, len(x), chunk):
        lab = labels[s : s + chunk]
        order = np.argsort(lab, kind="stable")
        ls = lab[order]
        starts = np.flatnonzero(np.r_[True, ls[1:] != ls[:-1]])
        sums[ls[starts]] += np.add.reduceat(x[s : s + chunk][order].astype(np.float64), starts,
                                            axis=0)
    return sums


def kmeans(
    x: np.ndarray,
    k: int,
    iters: int,
    seed: int,
    *,
    init_sample: int | None = None,
    init: np.ndarray | None = None,
    progress: bool = True,
    chunk: int = ASSIGN_CHUNK,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """k-means of the rows of ``x`` (N, D): ``(centroids (k, D) float32, labels (N,) int32,
    squared distances (N,), history)``.

    k-means++ seeding on a seeded subsample of ``init_sample`` rows (all when None), then
    ``iters`` Lloyd iterations (``init``: given (k, D) starting centroids instead of the
    seeding). A cluster left empty by an assignment is re-seeded with the
    rows farthest from their centroids (one distinct row each), so no code is dead and the
    objective (mean squared distance) never increases. The labels and distances returned are
    those of the final centroids. ``history``: ``objective`` per assignment (iters + 1 values:
    the seeding's, then after each update), ``reseeded`` (empty clusters re-seeded per
    iteration) and ``seconds``.
    """
    from tqdm.auto import tqdm

    x = np.ascontiguousarray(x, np.float32)
    n = len(x)
    if n < k:
        raise ValueError(f"k-means needs at least k={k} points, got {n}")
    t0 = time.time()
    if init is not None:
        centroids = np.array(init, np.float32)
        if centroids.shape != (k, x.shape[1]):
            raise ValueError(f"init has shape {centroids.shape}, expected {(k, x.shape[1])}")
    else:
        rng = np.random.default_rng(seed)
        m = n if init_sample is None else min(n, int(init_sample))
        sample = np.sort(rng.choice(n, size=m, replace=False)) if m < n else np.arange(n)
        centroids = kmeans_pp(x[sample], k, rng)
    objective, reseeded = [], []
    bar = tqdm(range(iters), desc="tokenizer: k-means", unit="it", disable=not progress,
               leave=False)
    labels, dist = assign(x, centroids, chunk)
    for _ in bar:
        objective.append(float(dist.mean(dtype=np.float64)))
        bar.set_postfix(mse=f"{objective[-1]:.5g}")
        counts = np.bincount(labels, minlength=k)
        sums = _cluster_sums(x, labels, k, chunk)
        full = counts > 0
        new = centroids.copy()
        new[full] = (sums[full] / counts[full, None]).astype(np.float32)
        empty = np.flatnonzero(~full)
        if len(empty):
            far = np.argsort(-dist, kind="stable")[: len(empty)]
            new[empty] = x[far]
        reseeded.append(len(empty))
        centroids = new
        labels, dist = assign(x, centroids, chunk)
    objective.append(float(dist.mean(dtype=np.float64)))
    bar.close()
    history = {"objective": objective, "reseeded": reseeded, "seconds": time.time() - t0}
    return centroids, labels, dist, history


# ----------------------------------------------------------------------------- statistics
def code_stats(ids: np.ndarray, k: int) -> dict[str, float]:
    """Usage and spread of a code distribution: ``used`` codes (and ``usage`` = used / k),
    ``entropy_bits``, ``perplexity`` (2**entropy), ``max_fraction`` (the commonest code)."""
    counts = np.bincount(np.asarray(ids).reshape(-1), minlength=k).astype(np.float64)
    p = counts / max(counts.sum(), 1.0)
    nz = p[p > 0]
    h = float(-(nz * np.log2(nz)).sum())
    used = int((counts > 0).sum())
    return {"used": used, "usage": used / k, "entropy_bits": h, "perplexity": float(2.0**h),
            "max_fraction": float(p.max())}


def quantisation_stats(x: np.ndarray, dist: np.ndarray) -> dict[str, float]:
    """``mse`` (mean squared distance to the chosen code) and ``unexplained`` (mse over the
    features' total variance: 0 = perfect, 1 = no better than one code at the mean)."""
    x = np.asarray(x, np.float64).reshape(-1, np.shape(x)[-1])
    var = float(np.mean(np.sum(np.square(x - x.mean(axis=0)), axis=1)))
    mse = float(np.mean(dist, dtype=np.float64))
    return {"mse": mse, "unexplained": mse / var if var > 0 else 0.0}


_DIRS = ((-1, 0), (1, 0), (0, -1), (0, 1))  # up, down, left, right


def _neighbour_pairs(ids: np.ndarray, grid: tuple[int, int], d: tuple[int, int]):
    """(centre codes, neighbour codes) of every patch that has a neighbour in direction d."""
    gh, gw = grid
    g = np.asarray(ids).reshape(-1, gh, gw)
    dy, dx = d
    ys, xs = slice(max(0, -dy), gh - max(0, dy)), slice(max(0, -dx), gw - max(0, dx))
    yn, xn = slice(max(0, dy), gh + min(0, dy)), slice(max(0, dx), gw + min(0, dx))
    return g[:, ys, xs].reshape(-1), g[:, yn, xn].reshape(-1)


def neighbour_predictability(
    train_ids: np.ndarray, eval_ids: np.ndarray, grid: tuple[int, int], k: int,
    prior: float = 10.0, eval_mask: np.ndarray | None = None, chunk: int = 32,
) -> dict[str, float]:
    """How well a masked patch's code is predicted from its 4 neighbours' codes.

    Count models fitted on ``train_ids`` (images x patches), scored on ``eval_ids``:
    ``unigram_bits`` (cross-entropy of the code frequencies, add-0.5), ``neighbour_bits``
    (mean over the 4 directions of the cross-entropy of P(code | the neighbour's code),
    smoothed towards the unigram with ``prior`` pseudo-counts), ``unigram_acc`` (always the
    commonest code), ``copy_acc`` (the commonest code among the neighbours; ties to the lower
    id) and ``naive_bayes_acc`` (argmax of log P(c) + sum_d [log P(c | n_d) - log P(c)]).
    ``eval_mask`` (bool, like ``eval_ids``): score only these eval patches (their neighbours
    are all used).
    """
    gh, gw = grid
    uni = np.bincount(np.asarray(train_ids).reshape(-1), minlength=k) + 0.5
    uni = uni / uni.sum()
    log_uni = np.log2(uni)
    e_grid = np.asarray(eval_ids).reshape(-1, gh, gw)
    keep = (np.ones(e_grid.shape, bool) if eval_mask is None
            else np.asarray(eval_mask, bool).reshape(e_grid.shape))
    ev = e_grid[keep]
    out = {"unigram_bits": float(-log_uni[ev].mean()),
           "unigram_acc": float(np.mean(ev == np.argmax(uni)))}
    conds, bits = [], []
    for d in _DIRS:
        c, n = _neighbour_pairs(train_ids, grid, d)
        table = np.zeros((k, k), np.float64)
        np.add.at(table, (n, c), 1.0)
        cond = np.log2((table + prior * uni[None]) / (table.sum(1, keepdims=True) + prior))
        ce, ne = _neighbour_pairs(eval_ids, grid, d)
        ke, _ = _neighbour_pairs(keep, grid, d)  # flags of the centres, in the same order
        bits.append(float(-cond[ne, ce][ke].mean()))
        conds.append(cond)
    out["neighbour_bits"] = float(np.mean(bits))
    copy_hits = nb_hits = 0
    for s in range(0, len(e_grid), chunk):
        g, kg = e_grid[s : s + chunk], keep[s : s + chunk]
        score = np.broadcast_to(log_uni, (*g.shape, k)).copy()
        votes = np.zeros((*g.shape, k), np.int32)
        for d, cond in zip(_DIRS, conds, strict=True):
            dy, dx = d
            ys, xs = slice(max(0, -dy), gh - max(0, dy)), slice(max(0, -dx), gw - max(0, dx))
            nb = g[:, max(0, dy) : gh + min(0, dy), max(0, dx) : gw + min(0, dx)]
            score[:, ys, xs] += cond[nb] - log_uni
            v = votes[:, ys, xs]  # a view: the increments land in votes
            np.put_along_axis(v, nb[..., None], np.take_along_axis(v, nb[..., None], -1) + 1, -1)
        copy_hits += int(np.sum((np.argmax(votes, -1) == g) & kg))
        nb_hits += int(np.sum((np.argmax(score, -1) == g) & kg))
    out["copy_acc"] = copy_hits / ev.size
    out["naive_bayes_acc"] = nb_hits / ev.size
    return out


# ----------------------------------------------------------------------------- fit / save
def fit_patch_kmeans(
    config: Any,
    split: str | None = None,
    *,
    max_patches: int | None = None,
    iters: int | None = None,
    seed: int | None = None,
    init_sample: int | None = None,
    source: Any = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Fit the codebook on ``split`` of ``config.data``'s dataset (module docstring).

    Arguments left None come from ``config.tokenizer``. ``source``: a ``SceneSource``
    (default ``refjax.data.sources.open_split(config.data, split)``). Returns ``{"config":
    PatchKMeansConfig, "codebook": (K, D) float32, "ids": (images, P) int32 train codes,
    "features": (images, P, D), "stats": {...}, "fit": {...}}``.
    """
    from refjax.data.sources import open_split

    t = config.tokenizer
    cfg = tokenizer_config(config)
    split = str(t.split if split is None else split)
    max_patches = int(t.max_patches if max_patches is None else max_patches)
    iters = int(t.iters if iters is None else iters)
    seed = int(t.seed if seed is None else seed)
    init_sample = int(t.init_sample if init_sample is None else init_sample)
    source = source if source is not None else open_split(config.data, split)
    per_image = cfg.grid * cfg.grid
    n_images = min(len(source), max(1, max_patches // per_image))
    t0 = time.time()
    feats = extract_features(
        iter_canvases(source, cfg.img_size, seed, n_images, progress), cfg
    )
    t_feat = time.time() - t0
    x = feats.reshape(-1, cfg.feature_dim)
    log.info("tokenizer: %d patches of %d images (%s), D=%d, k=%d", len(x), n_images, split,
             cfg.feature_dim, cfg.codebook_size)
    codebook, labels, dist, hist = kmeans(
        x, cfg.codebook_size, iters, seed, init_sample=init_sample, progress=progress
    )
    stats = {
        split: {**code_stats(labels, cfg.codebook_size), **quantisation_stats(x, dist),
                "patches": int(len(x)), "images": int(n_images)},
        "objective_first": hist["objective"][0],
        "objective_last": hist["objective"][-1],
        "reseeded_total": int(sum(hist["reseeded"])),
        "feature_seconds": t_feat,
        "kmeans_seconds": hist["seconds"],
    }
    fit = {"split": split, "max_patches": max_patches, "iters": iters, "seed": seed,
           "init_sample": init_sample, "objective": hist["objective"],
           "reseeded": hist["reseeded"]}
    return {"config": cfg, "codebook": codebook, "ids": labels.reshape(n_images, per_image),
            "features": feats, "stats": stats, "fit": fit}


def tokenize_split(
    cfg: PatchKMeansConfig, codebook: np.ndarray, source: Any, seed: int = 0,
    max_images: int | None = None, batch: int = 64, progress: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run the Linen module on ``source``'s canvases: (ids (images, P), distances, features)."""
    import jax

    from refjax.models.patch_tokenizer import PatchKMeansTokenizer

    model = PatchKMeansTokenizer(cfg)
    params = {"codebook": np.asarray(codebook, np.float32)}
    fn = jax.jit(lambda im: model.apply({"params": params}, im / 255.0))
    ids, dist, feats = [], [], []
    for b in _batches(iter_canvases(source, cfg.img_size, seed, max_images, progress), batch):
        i, aux = fn(b.astype(np.float32))
        ids.append(np.asarray(i))
        dist.append(np.asarray(aux["distance"]))
        feats.append(np.asarray(aux["features"]))
    return np.concatenate(ids), np.concatenate(dist), np.concatenate(feats)


def save_tokenizer(path: str, result: dict[str, Any], config: Any = None) -> None:
    """Write ``result`` (of :func:`fit_patch_kmeans`) as a ``save_params`` checkpoint:
    params ``{"codebook"}``, meta ``model``/``config``/``dataset``/``split``/``stats``/``fit``."""
    from refjax.convert.common import save_params

    cfg: PatchKMeansConfig = result["config"]
    meta: dict[str, Any] = {"model": MODEL_NAME, "config": cfg.to_dict(),
                            "stats": result["stats"], "fit": result["fit"],
                            "split": result["fit"]["split"]}
    if config is not None:
        meta["dataset"] = str(config.data.dataset)
        meta["dataset_config"] = config.data.dataset_config
    save_params(path, {"codebook": np.asarray(result["codebook"], np.float32)}, meta)


def load_tokenizer(path: str) -> tuple[PatchKMeansConfig, dict[str, Any], dict[str, Any]]:
    """``(PatchKMeansConfig, params {"codebook"}, meta)`` of a :func:`save_tokenizer`
    checkpoint."""
    from refjax.convert.common import load_variables
    from refjax.models.patch_tokenizer import PatchKMeansConfig

    variables, meta = load_variables(path)
    if meta.get("model") != MODEL_NAME:
        raise ValueError(f"{path} holds model {meta.get('model')!r}, not {MODEL_NAME!r}")
    return PatchKMeansConfig(**meta["config"]), dict(variables["params"]), meta


def run(
    config_spec: str,
    out_dir: str,
    sets: Sequence[str] = (),
    *,
    eval_split: str | None = "val",
    eval_images: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """``train-tokenizer``: load the config (``--set`` overrides), fit, measure on
    ``eval_split`` (None: skip), save to ``out_dir`` (must not exist); returns the stats."""
    from refjax.data.sources import open_split
    from refjax.train.config import apply_overrides, load_config

    if os.path.exists(out_dir):
        raise FileExistsError(f"{out_dir} exists; remove it or choose another output")
    config = load_config(config_spec)
    apply_overrides(config, list(sets))
    t0 = time.time()
    result = fit_patch_kmeans(config, progress=progress)
    cfg = result["config"]
    stats = result["stats"]
    if eval_split:
        src = open_split(config.data, eval_split)
        ids, dist, feats = tokenize_split(cfg, result["codebook"], src, int(config.tokenizer.seed),
                                          eval_images, progress=progress)
        stats[eval_split] = {
            **code_stats(ids, cfg.codebook_size), **quantisation_stats(feats, dist),
            "patches": int(ids.size), "images": int(len(ids)),
            **neighbour_predictability(result["ids"], ids, (cfg.grid, cfg.grid),
                                       cfg.codebook_size),
        }
    stats["total_seconds"] = time.time() - t0
    save_tokenizer(out_dir, result, config)
    return {"out": os.path.abspath(out_dir), "config": cfg.to_dict(), "stats": stats}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``train-tokenizer`` arguments (for the ``python -m refjax`` subparser)."""
    p.add_argument("--config", required=True,
                   help="config file[:arg] with a tokenizer section, e.g. "
                        "configs/oneref/mrefm.py:tiny")
    p.add_argument("--out", required=True, help="output checkpoint directory (must not exist)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. tokenizer.codebook_size=512 (repeatable)")
    p.add_argument("--eval-split", default="val",
                   help="split to measure the codebook on ('' to skip) [val]")
    p.add_argument("--eval-images", type=int, default=None,
                   help="at most this many eval images [all]")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run_args(args: argparse.Namespace) -> int:
    """Run :func:`run` from parsed :func:`add_arguments` arguments; prints the stats (JSON)."""
    out = run(args.config, args.out, args.set, eval_split=args.eval_split or None,
              eval_images=args.eval_images, progress=not args.no_progress)
    print(json.dumps(out, indent=2, sort_keys=True, default=_json_default))
    return 0


def _json_default(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def train_tokenizer_main(argv: Sequence[str] | None = None) -> int:
    """``python -m refjax train-tokenizer ...`` as a standalone entry point."""
    p = argparse.ArgumentParser(prog="refjax train-tokenizer", description=__doc__.split("\n")[0])
    add_arguments(p)
    return run_args(p.parse_args(argv))
