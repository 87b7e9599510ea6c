"""RAS model (refjax.models.ras) on tiny configs: area-weighted mask pooling, the 2D position
map, splicing, NAR selection (one logit per candidate, padding-proof, causal), precomputed
features == towers, config round trips. RAS-13B only through eval_shape (parameter count).
The AR baseline and Hungarian matching: tests/test_ras_ar.py; sharding: test_ras_sharding.py."""

import functools
import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from refjax.data import ras_layout as rl
from refjax.models import ras
from refjax.models.ras import CAND_TOKEN, IMAGE_TOKEN, POOL_PRE, RAS, REF_PRE, REF_TOKEN
from tests import ras_util as U

# ---------------------------------------------------------------------------------------------
# Pooling geometry


def _brute_area(mask, edges_h, edges_w):
    """Covered fraction of each cell by exact rectangle intersection, pixel by pixel."""
    out = np.zeros((len(edges_h) - 1, len(edges_w) - 1))
    for u, v in itertools.product(range(out.shape[0]), range(out.shape[1])):
        y0, y1, x0, x1 = edges_h[u], edges_h[u + 1], edges_w[v], edges_w[v + 1]
        area = 0.0
        for p, q in zip(*np.nonzero(mask)):
            oy = max(0.0, min(p + 1, y1) - max(p, y0))
            ox = max(0.0, min(q + 1, x1) - max(q, x0))
            area += oy * ox
        out[u, v] = area / ((y1 - y0) * (x1 - x0))
    return out


@pytest.mark.parametrize("size,grid,cell", [(45, 4, 10.0), (48, 5, None), (40, 5, None),
                                            (13, 6, None), (45, 37, 45 * 14 / 518)])
def test_overlap_matrix_partitions_cells_and_pixels(size, grid, cell):
    m = ras.overlap_matrix(size, grid, cell)
    e = ras.cell_edges(size, grid, size / grid if cell is None else cell)
    np.testing.assert_allclose(m.sum(axis=1), 1.0, atol=1e-6)  # each cell fully covered
    lengths = np.diff(e)
    np.testing.assert_allclose((m * lengths[:, None]).sum(axis=0), 1.0, atol=1e-5)  # each pixel
    assert e[0] == 0 and e[-1] == size


def test_area_weights_match_brute_force_on_non_divisible_grids():
    rng = np.random.default_rng(1)
    mask = (rng.random((23, 17)) > 0.6).astype(np.uint8)
    for grid, cell in (((5, 3), None), ((4, 4), (5.0, 4.0))):
        a = np.asarray(ras.area_weights(jnp.asarray(mask), grid, cell))
        ch, cw = (23 / grid[0], 17 / grid[1]) if cell is None else cell
        ref = _brute_area(mask, ras.cell_edges(23, grid[0], ch), ras.cell_edges(17, grid[1], cw))
        np.testing.assert_allclose(a, ref, atol=1e-6)
        print(f"area weights vs brute force, grid {grid}: max diff {np.abs(a - ref).max():.2e}")


@pytest.mark.parametrize("size,grid", [(40, 5), (48, 5), (45, 4)])
def test_mask_of_one_cell_returns_that_cells_feature(size, grid):
    rng = np.random.default_rng(2)
    feats = rng.standard_normal((1, grid, grid, 7)).astype(np.float32)
    e = ras.cell_edges(size, grid, size / grid)
    u, v = 2, 3 % grid
    mask = np.zeros((1, 1, size, size), np.uint8)
    y0, y1 = int(np.ceil(e[u])), int(np.floor(e[u + 1]))
    x0, x1 = int(np.ceil(e[v])), int(np.floor(e[v + 1]))
    mask[0, 0, y0:y1, x0:x1] = 1  # every pixel inside cell (u, v) (all of it when divisible)
    a = ras.area_weights(jnp.asarray(mask), (grid, grid))
    assert np.count_nonzero(np.asarray(a)) == 1
    f = np.asarray(ras.pool_features(a, jnp.asarray(feats)))[0, 0]
    np.testing.assert_allclose(f, feats[0, u, v], rtol=1e-5, atol=1e-6)
    if size % grid == 0:
        assert float(a[0, 0, u, v]) == 1.0


def test_one_pixel_masks_always_pool_something():
    cfg = ras.ras_tiny()
    # DINOv2 tiny: input 36, patch 8 -> 4x4 grid covering 32/36 of the canvas; the strip beyond
    # belongs to the last cell
    z, s = cfg.input_size("dinov2"), cfg.stride("dinov2")
    cell = s * U.S / z
    rng = np.random.default_rng(3)
    feats = rng.standard_normal((1, 4, 4, 5)).astype(np.float32)
    for (py, px), (u, v) in (((0, 0), (0, 0)), ((44, 44), (3, 3)), ((21, 12), (2, 1))):
        mask = np.zeros((1, 1, U.S, U.S), np.uint8)
        mask[0, 0, py, px] = 1
        a = np.asarray(ras.area_weights(jnp.asarray(mask), (4, 4), (cell, cell)))
        assert a[0, 0, u, v] > 0 and np.count_nonzero(a) == 1
        f = np.asarray(ras.pool_features(jnp.asarray(a), jnp.asarray(feats)))[0, 0]
        np.testing.assert_allclose(f, feats[0, u, v], rtol=2e-3)
    assert (py, px) == (21, 12) and 44 >= 4 * cell  # the strip case was exercised


def test_ramp_feature_pools_to_the_mask_centroid():
    size, grid = 40, 5  # cells of 8 px
    e = ras.cell_edges(size, grid, 8.0)
    centre = (e[:-1] + e[1:]) / 2
    ramp = np.stack(np.meshgrid(centre, centre, indexing="ij"), -1)[None].astype(np.float32)
    masks = np.zeros((1, 3, size, size), np.uint8)
    masks[0, 0, 8:24, 16:40] = 1  # cell-aligned rectangle: exact centroid
    masks[0, 1, 0:8, 0:8] = 1
    masks[0, 1, 32:40, 32:40] = 1  # two cells: centroid in between
    masks[0, 2, 5:30, 11:22] = 1  # arbitrary rectangle: within half a cell
    a = ras.area_weights(jnp.asarray(masks), (grid, grid))
    f = np.asarray(ras.pool_features(a, jnp.asarray(ramp)))[0]
    np.testing.assert_allclose(f[0], [16.0, 28.0], atol=1e-4)
    np.testing.assert_allclose(f[1], [20.0, 20.0], atol=1e-4)
    assert np.all(np.abs(f[2] - [17.5, 16.5]) <= 4.0)
    print(f"ramp centroids: {f[0]}, {f[1]}, {f[2]} (true 17.5, 16.5)")


def test_sine_position_map_is_detr_style():
    pe = ras.sine_position_map(64, 128, 1e4)
    assert pe.shape == (64, 64, 256) and pe.dtype == np.float32
    y = (np.arange(64) + 0.5) / 64 * 2 * np.pi
    np.testing.assert_allclose(pe[:, 5, 0], np.sin(y), atol=1e-6)
    np.testing.assert_allclose(pe[:, 5, 1], np.cos(y), atol=1e-6)
    np.testing.assert_allclose(pe[7, :, 128], np.sin(y), atol=1e-6)
    np.testing.assert_allclose(pe[7, :, 131], np.cos(y / 1e4 ** (2 / 128)), atol=1e-6)
    assert ras.ras_13b().pooled_dim == 6528


# ---------------------------------------------------------------------------------------------
# Splicing and the NAR forward


def test_splice_round_trip():
    cfg, model, v = U.setup("nar")
    b = U.batch(cfg, [[20, U.PH, 21, U.PH], [22, 23]], [3, 5], [2, 0], order=None)
    rng = np.random.default_rng(4)
    d = cfg.d
    img = rng.standard_normal((2, cfg.num_image_tokens, d)).astype(np.float32)
    cand = rng.standard_normal((2, U.POOL_MAX, d)).astype(np.float32)
    refs = rng.standard_normal((2, U.REFS_MAX, d)).astype(np.float32)
    out = np.asarray(jax.jit(functools.partial(model.apply, method=RAS.splice))(
        v, b["input_ids"], b["slot_index"], img, cand, refs))
    p = v["params"]
    table = np.asarray(p["llm"]["embed_tokens"]["embedding"])
    for i in range(2):
        ids, slot = b["input_ids"][i], b["slot_index"][i]
        for t in range(U.MAX_LEN):
            tok, k = int(ids[t]), int(slot[t])
            if tok == IMAGE_TOKEN:
                want = img[i, k]
            elif tok == CAND_TOKEN:
                want = cand[i, k]
            elif tok == REF_TOKEN:
                want = refs[i, k]
            elif tok == POOL_PRE:
                want = p["mask_pool_pre"]
            elif tok == REF_PRE:
                want = p["mask_ref_pre"]
            else:
                want = table[tok]
            np.testing.assert_array_equal(out[i, t], want)
    assert (b["input_ids"] == IMAGE_TOKEN).sum() == 2 * cfg.num_image_tokens


def test_nar_one_logit_per_candidate_and_padding_cannot_change_it():
    cfg, _, v = U.setup("nar")
    fwd = U.nar_fn()
    b = U.batch(cfg, [[20, U.PH, 21], [22, 23, 24]], [3, 5], [1, 0])
    logits, aux = fwd(v, U.nar_inputs(b))
    assert logits.shape == (2, U.POOL_MAX) and logits.dtype == jnp.float32
    assert np.isfinite(np.asarray(logits)).all()
    assert len(set(np.round(np.asarray(logits[1]), 6))) == 5  # distinct per candidate
    # garbage in the padded candidates' and references' masks changes nothing
    b2 = dict(b)
    b2["pool_masks"] = b["pool_masks"].copy()
    b2["pool_masks"][0, 3:] = 1
    b2["ref_masks"] = b["ref_masks"].copy()
    b2["ref_masks"][0, 1:] = 1
    b2["ref_masks"][1] = 1
    logits2, _ = fwd(v, U.nar_inputs(b2))
    np.testing.assert_array_equal(np.asarray(logits2[0, :3]), np.asarray(logits[0, :3]))
    np.testing.assert_array_equal(np.asarray(logits2[1]), np.asarray(logits[1]))
    # ... and a valid candidate's mask does change the logits
    b3 = dict(b)
    b3["pool_masks"] = b["pool_masks"].copy()
    b3["pool_masks"][0, 1] = 0
    b3["pool_masks"][0, 1, :10, :10] = 1
    logits3, _ = fwd(v, U.nar_inputs(b3))
    assert np.abs(np.asarray(logits3[0, :3]) - np.asarray(logits[0, :3])).max() > 1e-6
    # a row's result does not depend on the other rows of the batch
    b4 = U.batch(cfg, [[20, U.PH, 21], [30]], [3, 1], [1, 0])
    for k in ("pool_masks", "ref_masks"):
        b4[k] = b4[k].copy()
        b4[k][0] = b[k][0]
    b4["features"] = {n: np.concatenate([b["features"][n][:1], f[1:]])
                      for n, f in b4["features"].items()}
    logits4, _ = fwd(v, U.nar_inputs(b4))
    np.testing.assert_allclose(np.asarray(logits4[0, :3]), np.asarray(logits[0, :3]),
                               atol=1e-6)


def test_causality_query_changes_second_copy_not_first():
    cfg, _, v = U.setup("nar")
    fwd = U.nar_fn()
    b = U.batch(cfg, [[20, U.PH, 21], [22, 23, 24]], [4, 4], [1, 0])
    b2 = U.batch(cfg, [[20, U.PH, 40], [22, 41, 24]], [4, 4], [1, 0])  # same seed: same masks
    logits, aux = fwd(v, U.nar_inputs(b))
    logits2, aux2 = fwd(v, U.nar_inputs(b2))
    h, h2 = np.asarray(aux["hidden_states"]), np.asarray(aux2["hidden_states"])
    for i in range(2):
        ids = b["input_ids"][i]
        q0 = int(np.flatnonzero(ids != b2["input_ids"][i])[0])
        first = np.flatnonzero(ids == CAND_TOKEN)[:4]
        assert first.max() < q0
        np.testing.assert_array_equal(h[i, :q0], h2[i, :q0])  # image, first copy, prefix
        diff = np.abs(np.asarray(logits[i, :4]) - np.asarray(logits2[i, :4]))
        assert (diff > 1e-7).all(), diff
        print(f"row {i}: query edit moves second-copy logits by {diff.min():.2e}..{diff.max():.2e}")


def test_precomputed_features_equal_towers():
    cfg, model, v = U.setup("nar")
    b = U.batch(cfg, [[20, U.PH, 21], [22, 23]], [3, 4], [1, 0])
    rng = np.random.default_rng(5)
    pixels = {n: rng.standard_normal((2, cfg.input_size(n), cfg.input_size(n), 3))
              .astype(np.float32) for n in cfg.encoder_names}
    args = (b["input_ids"], b["slot_index"], b["attention_mask"], b["cand_pos"])
    kw = dict(pool_masks=b["pool_masks"], ref_masks=b["ref_masks"])

    @jax.jit
    def both(v, pixels):
        feats = model.apply(v, pixels=pixels, method=RAS.encode)
        a, _ = model.apply(v, *args, pixels=pixels, **kw)
        f, _ = model.apply(v, *args, features=feats, **kw)
        return a, f, feats

    a, f, feats = both(v, pixels)
    for n in cfg.encoder_names:
        assert feats[n].shape == (2, *cfg.grid(n), cfg.feature_dim(n))
    np.testing.assert_allclose(np.asarray(a), np.asarray(f), atol=1e-6)
    assert np.abs(np.asarray(a)).max() > 0
    print(f"pixels vs precomputed features: max diff {np.abs(np.asarray(a - f)).max():.2e}")
    with pytest.raises(ValueError, match="expected"):
        model.apply(v, *args, features={**b["features"], "siglip": feats["clip"]}, **kw)
    with pytest.raises(ValueError, match="needs pixels"):
        model.apply(v, *args, features={"clip": feats["clip"]}, **kw)


def test_param_tree_and_logical_axes():
    cfg, _, v = U.setup("nar")
    assert set(v["params"]) == {*cfg.encoder_names, "llm", "mask_projector", "image_projector",
                                "mask_pool_pre", "mask_ref_pre", "head"}
    assert v["params"]["mask_projector"]["fc1"]["kernel"].shape == (cfg.pooled_dim, cfg.d)
    assert cfg.pooled_dim == 32 * 3 + 32 + 32  # towers + 2 x 16 position channels
    abstract = ras.abstract_variables(cfg, pixels=False)
    assert not set(cfg.encoder_names) & set(abstract["params"])  # features: no tower params
    allowed = {"embed", "mlp", "heads", "kv", "vocab", "layers", "patch", "conv_in", "norm",
               None}
    boxes = jax.tree.leaves(abstract, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert boxes and all(isinstance(x, nn.LogicallyPartitioned) for x in boxes)
    assert all(set(x.names) <= allowed for x in boxes)
    head = nn.unbox(ras.NARHead("linear", 64, 16, 0.05).init(jax.random.key(0),
                                                             jnp.ones((1, 3, 64))))["params"]
    np.testing.assert_allclose(float(head["out"]["bias"][0]), -np.log(0.95 / 0.05), rtol=1e-6)


def test_config_round_trip_and_validation():
    for cfg in (ras.ras_tiny(), ras.ras_13b(decoding="ar"), ras.ras_tiny(image_tokens=False)):
        assert ras.RASConfig.from_dict(cfg.to_dict()) == cfg
    json.dumps(ras.ras_13b().to_dict())
    with pytest.raises(ValueError, match="image_sizes"):
        ras.RASConfig(llm=ras.ras_tiny().llm,
                      encoders={"convnext": ras.ras_tiny().encoder_configs["convnext"]},
                      image_tokens=False)
    with pytest.raises(ValueError, match="reserved"):
        ras.RASConfig(llm=ras.ras_tiny().llm,
                      encoders={"llm": ras.ras_tiny().encoder_configs["clip"]})
    with pytest.raises(ValueError, match="vocabulary"):
        ras.ras_tiny(decoding="ar", seg_token_id=300)


def test_ras_13b_parameter_count():
    cfg = ras.ras_13b()
    counts = ras.param_counts(ras.abstract_variables(cfg, seq_len=8, pool_max=2,
                                                     canvas=16)["params"])
    total = sum(counts.values())
    print("RAS-13B parameters:", {k: f"{v:,}" for k, v in counts.items()}, f"total {total:,}")
    d = 5120
    assert counts["llm"] == 13_015_864_320
    assert counts["clip"] == 303_507_456
    assert counts["siglip"] == 428_225_600 - 15_238_352  # pooling head dropped
    assert counts["dinov2"] == 304_368_640
    assert counts["convnext"] == 843_398_016
    assert counts["mask_projector"] == 6528 * d + d + d * d + d
    assert counts["image_projector"] == 1024 * d + d + d * d + d
    assert counts["mask_pool_pre"] == counts["mask_ref_pre"] == d
    assert counts["head"] == d + 1
    assert total == 14_971_256_561


def test_stage1_caption_mode_returns_causal_lm_logits():
    cfg, model, v = U.setup("nar")
    lc = rl.LayoutConfig(max_len=U.MAX_LEN, pool_max=U.POOL_MAX)
    plain = rl.Template("plain", prefix=(1,), newline=(13,))
    rows = [rl.build_layout("c0", (), 4, 0, plain, lc, caption_ids=[40, 41, 42, 43]),
            rl.build_layout("c1", (), 2, 0, plain, lc, caption_ids=[44, 45])]
    b = rl.stack(rows)
    rng = np.random.default_rng(8)
    pm = U.masks(rng, 2, U.POOL_MAX)
    feats = U.features(cfg, rng)

    @jax.jit
    def lm(v, ids):
        return model.apply(v, ids, b["slot_index"], b["attention_mask"], pool_masks=pm,
                           features=feats, mode="lm")[0]

    logits = np.asarray(lm(v, b["input_ids"]))
    assert logits.shape == (2, U.MAX_LEN, cfg.llm.vocab_size) and logits.dtype == np.float32
    assert (b["input_ids"] != IMAGE_TOKEN).all()  # stage 1: no global visual tokens
    ids2 = b["input_ids"].copy()
    t = int(np.flatnonzero(b["labels"][0] == 42)[0])
    ids2[0, t] = 50
    logits2 = np.asarray(lm(v, ids2))
    np.testing.assert_array_equal(logits2[0, :t], logits[0, :t])
    assert np.abs(logits2[0, t:int(b["length"][0])] - logits[0, t:int(b["length"][0])]).min(
        axis=-1).max() > 0
    np.testing.assert_array_equal(logits2[1], logits[1])
