"""Shared tiny-RAS fixtures for the RAS tests: a layout template, random variables from an
eval_shape tree, batches built through the real layout builder, the jitted NAR forward."""

import functools
import itertools

import jax
import numpy as np
from flax import linen as nn

from refjax.data import ras_layout as rl
from refjax.models import ras
from refjax.models.ras import RAS

PH = 99
V1 = rl.Template("v1", prefix=(1, 10, 11, 12), newline=(13,), assistant=(14, 15), eos=2, pad=0,
                 ref_placeholder=PH)
S = 45  # canvas side: no encoder grid divides it
POOL_MAX, REFS_MAX, MAX_LEN = 5, 2, 56


def random_variables(abstract, seed: int = 0):
    """Random float32 values for an eval_shape tree: norm scales ~1 + 0.1 noise, others
    ~0.05 noise (a real check, unlike a constant init)."""
    rng = np.random.default_rng(seed)
    flat = jax.tree_util.tree_flatten_with_path(nn.unbox(abstract))[0]
    leaves = []
    for path, s in flat:
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        x = rng.standard_normal(s.shape).astype(np.float32)
        is_scale = name.endswith("scale") or "norm" in name and name.endswith("weight")
        leaves.append(1.0 + 0.1 * x if is_scale else 0.05 * x)
    return jax.tree.unflatten(jax.tree.structure(nn.unbox(abstract)), leaves)


@functools.lru_cache(maxsize=4)
def setup(decoding: str = "nar"):
    cfg = ras.ras_tiny(decoding=decoding)
    abstract = ras.abstract_variables(cfg, batch_size=2, seq_len=MAX_LEN, pool_max=POOL_MAX,
                                      refs_max=REFS_MAX, canvas=S)
    return cfg, RAS(cfg), random_variables(abstract)


def layout_cfg(cfg, decoding="nar"):
    return rl.LayoutConfig(max_len=MAX_LEN, pool_max=POOL_MAX, refs_max=REFS_MAX,
                           num_image_tokens=cfg.num_image_tokens, decoding=decoding, seg_max=3,
                           seg_token_id=cfg.seg_token_id)


def masks(rng, b, n):
    m = np.zeros((b, n, S, S), np.uint8)
    for i, j in itertools.product(range(b), range(n)):
        y0, x0 = rng.integers(0, S - 8, 2)
        h, w = rng.integers(2, 20, 2)
        m[i, j, y0:y0 + h, x0:x0 + w] = 1
    return m


def features(cfg, rng, b=2):
    return {n: rng.standard_normal((b, *cfg.grid(n), cfg.feature_dim(n))).astype(np.float32)
            for n in cfg.encoder_names}


def batch(cfg, queries, ncands, nrefs, seed=0, decoding="nar", **kw):
    rng = np.random.default_rng(seed)
    rows = [rl.build_layout(f"r{i}", q, n, r, V1, layout_cfg(cfg, decoding), **kw)
            for i, (q, n, r) in enumerate(zip(queries, ncands, nrefs))]
    b = rl.stack(rows)
    b["pool_masks"] = masks(rng, len(rows), POOL_MAX)
    b["ref_masks"] = masks(rng, len(rows), REFS_MAX)
    b["features"] = features(cfg, rng, len(rows))
    return b


@functools.lru_cache(maxsize=4)
def nar_fn():
    _, model, _ = setup("nar")

    @jax.jit
    def fwd(v, b):
        return model.apply(v, b["input_ids"], b["slot_index"], b["attention_mask"],
                           b["cand_pos"], pool_masks=b["pool_masks"], ref_masks=b["ref_masks"],
                           features=b["features"], output_hidden=True)

    return fwd


def nar_inputs(b):
    keys = ("input_ids", "slot_index", "attention_mask", "cand_pos", "pool_masks", "ref_masks",
            "features")
    return {k: b[k] for k in keys}
