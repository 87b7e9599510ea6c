"""The RAS data task (refjax.tasks.ras.RASTaskData): LLaVA expand2square geometry for the
canvas masks and every tower's pixels, the sequence with candidates / references in place,
training shuffles (evaluation keeps the order), IoA labels, padded pools, exact
original-resolution scoring terms (atoms, oracle), stage-1 caption rows, the pipeline's batches
on the tiny RefShapes, and the bad-input errors (each names the record and the field; skipped
and counted in skip mode)."""

import itertools

import numpy as np
import pytest
from PIL import Image

from refjax.boxes import Expand2Square
from refjax.data import pipeline as pl
from refjax.data import transforms as tf
from refjax.data.errors import BadRecordError
from refjax.data.sources import open_scenes, tokenizer_file
from refjax.data.tokenizers import LLAMA_FILE, load_llama_tokenizer
from refjax.evaluate.gres import atom_terms, gres_per_sample, oracle_per_sample
from refjax.models.ras import CAND_TOKEN, IGNORE_INDEX, POOL_PRE, REF_PRE, REF_TOKEN
from refjax.models.vit import OPENAI_CLIP_MEAN
from refjax.tasks import get_task
from tests import ras_task_util as U
from tests.data_fixtures import refshapes_tiny_dir  # noqa: F401


@pytest.fixture(scope="module")
def cfg(refshapes_tiny_dir):  # noqa: F811
    return U.small_config(refshapes_tiny_dir)


@pytest.fixture(scope="module")
def tok(cfg):
    return load_llama_tokenizer(tokenizer_file(cfg.data, LLAMA_FILE), add_bos_token=False)


def _ex(scene, e):
    return tf.expand(scene, e)


def test_expand2square_rows_and_layout(cfg, tok):
    sc = U.scene(h=30, w=44)
    ex = _ex(sc, 2)  # the hybrid expression: one reference (object 1), target object 0
    row, data, x = U.example_row(cfg, tok, ex)
    geo = Expand2Square(44, 30, 32)
    assert (geo.left, geo.top) == (0, 7)
    n = len(sc["pool_masks"])
    # masks: zero-padded to the centred square, then PIL-nearest to the 32 px canvas
    np.testing.assert_array_equal(row["pool_masks"][:n], geo.forward_mask(sc["pool_masks"]))
    assert not row["pool_masks"][n:].any()
    np.testing.assert_array_equal(row["pool_valid"], [1] * n + [0] * (24 - n))
    np.testing.assert_array_equal(row["ref_masks"][0], geo.forward_mask(sc["masks"][1]))
    np.testing.assert_array_equal(row["ref_valid"], [1, 0])
    np.testing.assert_array_equal(row["mask"], geo.forward_mask(sc["masks"][0]))
    np.testing.assert_array_equal(row["letterbox"], [44, 30, 32, 32, 0, 7])
    # pixels: the image on a (44, 44) square filled with int(255 * CLIP mean), bicubic to Z
    fill = [int(255 * m) for m in OPENAI_CLIP_MEAN]
    square = np.empty((44, 44, 3), np.uint8)
    square[:] = fill
    square[7:37] = sc["image"]
    want = np.asarray(Image.fromarray(square).resize((32, 32), Image.BICUBIC))
    for name in ("clip", "siglip", "dinov2", "convnext"):
        np.testing.assert_array_equal(row[f"pixels_{name}"], want)
    assert row["pixels_clip"][0].mean(0).round().tolist() == fill  # the pad colour
    # labels by the IoA rule
    np.testing.assert_array_equal(row["pool_labels"][:n], sc["pool_ioa"][2] >= 0.5)
    # sequence: both candidate copies, in stored order in eval; the reference inline
    ids, slot, length = row["input_ids"], row["slot_index"], int(row["length"])
    cands = np.flatnonzero(ids == CAND_TOKEN)
    assert list(slot[cands]) == list(range(n)) * 2
    assert (ids[cands - 1] == POOL_PRE).all()
    for i in range(n):
        assert ids[row["cand_pos"][i]] == CAND_TOKEN and slot[row["cand_pos"][i]] == i
        assert row["cand_pos"][i] > cands[n - 1]  # the second copy
    refs = np.flatnonzero(ids == REF_TOKEN)
    assert len(refs) == 1 and slot[refs[0]] == 0 and ids[refs[0] - 1] == REF_PRE
    assert row["attention_mask"].sum() == length and (row["labels"] == IGNORE_INDEX).all()
    # the query: "the shape left of" + [ref] (lower-cased RefShapes tokenizer)
    q = tok.decode([int(t) for t in ids[cands[n - 1] + 1: refs[0] - 1] if t >= 0])
    assert "shape left of" in q


def test_training_shuffles_candidates(cfg, tok):
    sc = U.scene()
    ex = _ex(sc, 1)
    n = len(sc["pool_masks"])
    orders = set()
    for seed in range(6):
        row, _, _ = U.example_row(cfg, tok, ex, train=True, rng=np.random.default_rng(seed))
        ids, slot = row["input_ids"], row["slot_index"]
        first = slot[np.flatnonzero(ids == CAND_TOKEN)][:n]
        assert sorted(first.tolist()) == list(range(n))
        orders.add(tuple(first.tolist()))
        for i in range(n):  # cand_pos still names candidate i
            assert slot[row["cand_pos"][i]] == i and ids[row["cand_pos"][i]] == CAND_TOKEN
        assert not row["atom_area"].any()  # training rows carry no scoring terms
    assert len(orders) > 1


def test_exact_original_resolution_terms(cfg, tok):
    sc = U.scene(h=30, w=44, seed=3)
    inexact_canvas = 0
    for e, targets in ((1, [1, 2]), (3, [])):
        row, _, _ = U.example_row(cfg, tok, _ex(sc, e))
        pool = sc["pool_masks"].astype(bool)
        gt = (np.any(sc["masks"][targets], axis=0) if targets
              else np.zeros(pool.shape[1:], bool))
        assert row["atom_exact"] == 1 and row["gt_area"] == gt.sum()
        n = len(pool)
        for bits in itertools.product([0, 1], repeat=n):
            sel = np.zeros(24, bool)
            sel[:n] = bits
            t = atom_terms(sel, row["atom_members"], row["atom_area"], row["atom_gt"],
                           row["gt_area"])
            union = pool[np.array(bits, bool)].any(axis=0) if any(bits) else np.zeros_like(gt)
            direct = gres_per_sample(union, gt)
            assert (int(t["inter"]), int(t["union"]), int(t["pred_area"])) == (
                int(direct["inter"]), int(direct["union"]), int(union.sum())), bits
            # the canvas prediction mapped back is not the same thing
            geo = Expand2Square(44, 30, 32)
            back = geo.inverse_mask(np.any(row["pool_masks"][:n][np.array(bits, bool)], 0)
                                    if any(bits) else np.zeros((32, 32), bool))
            inexact_canvas += int(gres_per_sample(back, gt)["inter"] != direct["inter"])
        o = oracle_per_sample(pool, gt)
        assert (row["oracle_inter"], row["oracle_union"]) == (o["oracle_inter"],
                                                               o["oracle_union"])
    assert inexact_canvas > 0


def test_pipeline_batches(cfg, refshapes_tiny_dir):  # noqa: F811
    task = get_task("ras")
    data = task.data_task(cfg)
    with pl.make_pipeline(cfg.data, "train", task=data, train=True, seed=0) as it:
        train = next(it)
    with pl.make_pipeline(cfg.data, "val", task=data, train=False, seed=0) as it:
        val = [b for b in it]
    blank = data.blank()
    for b in [train, *val]:
        assert set(b) == set(blank)
        for k, v in blank.items():
            assert b[k].shape == (8, *np.shape(v)) and b[k].dtype == np.asarray(v).dtype, k
    assert (train["valid"] == 1).all() and not train["atom_area"].any()
    assert (train["pool_labels"] <= train["pool_valid"]).all()
    rows = np.concatenate([b["valid"] for b in val]) == 1
    exact = np.concatenate([b["atom_exact"] for b in val])
    assert rows.sum() == len(open_scenes("refshapes", "val", refshapes_tiny_dir,
                                         "tiny").expression_index())
    assert (exact[rows] == 1).all()
    # AR rows: one [SEG] per positive candidate (at most seg_max), then EOS
    ar = U.small_config(refshapes_tiny_dir, arg="tiny,data=tiny,decoding=ar")
    with pl.make_pipeline(ar.data, "train", task=task.data_task(ar), train=True,
                          seed=0) as it:
        b = next(it)
    pos = ((b["pool_labels"] == 1) & (b["pool_valid"] == 1)).sum(1)
    np.testing.assert_array_equal(b["seg_valid"].sum(1), np.minimum(pos, 8))
    np.testing.assert_array_equal(b["ar_valid"].sum(1), b["seg_valid"].sum(1) + 1)
    last = b["input_ids"][np.arange(8), b["length"] - 1]
    assert (last == 2).all()  # EOS closes the teacher-forced sequence


def test_stage1_caption_rows(refshapes_tiny_dir):  # noqa: F811
    c = U.small_config(refshapes_tiny_dir, stage=1)
    data = get_task("ras").data_task(c)
    src = open_scenes("refshapes", "val", refshapes_tiny_dir, "tiny")
    tok = load_llama_tokenizer(tokenizer_file(c.data, LLAMA_FILE), add_bos_token=False)
    with pl.make_pipeline(c.data, "val", task=data, train=False, seed=0) as it:
        batches = list(it)
    rows = [(b, i) for b in batches for i in range(8) if b["valid"][i]]
    assert len(rows) == len(src)  # one example per scene
    assert "ref_masks" not in batches[0] and "atom_area" not in batches[0]
    captions = sorted(src[i]["caption"] for i in range(len(src)))
    got = []
    for b, i in rows:
        lab = b["labels"][i]
        ids = b["input_ids"][i]
        assert (ids[lab != IGNORE_INDEX] == lab[lab != IGNORE_INDEX]).all()
        assert (ids == -200).sum() == 0  # no global visual tokens
        got.append(tok.decode([int(t) for t in lab if t != IGNORE_INDEX]).strip())
    for g, want in zip(sorted(got), captions):
        assert g.replace(" ", "") == want.lower().replace(" ", "")[: len(g.replace(" ", ""))]


# ----------------------------------------------------------------------------- bad input
def _bad(fn, field, text, record="scene-0"):
    with pytest.raises(BadRecordError) as e:
        fn()
    assert e.value.field == field and e.value.record_id == record, (e.value.field, e.value)
    assert text in str(e.value)


def test_bad_inputs(cfg, tok):
    sc = U.scene()
    # a pool mask of the wrong size
    wrong = dict(sc, pool_masks=np.zeros((2, 30, 40), np.uint8))
    _bad(lambda: _ex(wrong, 0), "pool_masks", "!= image size")
    # an empty pool
    empty = dict(sc, pool_masks=np.zeros((0, 30, 44), np.uint8), pool_ioa=np.zeros((4, 0)))
    _bad(lambda: U.example_row(cfg, tok, _ex(empty, 0)), "pool_masks", "empty candidate pool")
    # a <mask-ref> placeholder without a reference mask, and the reverse
    no_ref = dict(sc, expressions=[dict(sc["expressions"][2], refs=[])])
    _bad(lambda: U.example_row(cfg, tok, _ex(no_ref, 0)), "ref_masks",
         "1 <mask-ref> placeholder(s) but 0 reference mask(s)")
    no_ph = dict(sc, expressions=[dict(sc["expressions"][0], refs=[1])])
    _bad(lambda: U.example_row(cfg, tok, _ex(no_ph, 0)), "ref_masks",
         "0 <mask-ref> placeholder(s) but 1 reference mask(s)")
    # more references than refs_max
    many = dict(sc, expressions=[dict(sc["expressions"][2], refs=[1, 2, 0],
                                      text="a <mask-ref> b <mask-ref> c <mask-ref>")])
    _bad(lambda: U.example_row(cfg, tok, _ex(many, 0)), "ref_masks", "at most refs_max=2")
    # a sequence longer than the LLM context (data.max_text_len)
    long_text = dict(sc, expressions=[dict(sc["expressions"][0], text="the red square " * 40)])
    _bad(lambda: U.example_row(cfg, tok, _ex(long_text, 0)), "text", "exceeds max_len=160")


def test_feature_cache_miss_is_a_bad_record(cfg, tok, tmp_path):
    import json

    from refjax.tasks.ras import model_config

    d = tmp_path / "feats"
    d.mkdir()
    m = model_config(cfg)
    meta = {"version": 1, "dtype": "float32", "count": 0,
            "encoders": {n: {"shape": [*m.grid(n), m.feature_dim(n)], "input_size": 32}
                         for n in m.encoder_names}}
    (d / "meta.json").write_text(json.dumps(meta))
    (d / "ids.json").write_text("[]")
    with cfg.unlocked():
        c2 = cfg.copy_and_resolve_references()
    with c2.unlocked():
        c2.data.features_dir = str(d)
    _bad(lambda: U.example_row(c2, tok, _ex(U.scene(), 0)), "features", "not in the feature")


class _EmptyPoolSource:
    """Records in ``bad`` lose their candidate pool."""

    def __init__(self, source, bad):
        self.source, self.bad = source, set(bad)

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        sc = self.source[i]
        if i in self.bad:
            sc = dict(sc, pool_masks=sc["pool_masks"][:0],
                      pool_ioa=np.zeros((len(sc["expressions"]), 0), np.float32))
        return sc

    def expression_index(self):
        return self.source.expression_index()

    def file(self, name):
        return self.source.file(name)


def test_skip_mode_counts_bad_records(refshapes_tiny_dir):  # noqa: F811
    c = U.small_config(refshapes_tiny_dir, skip_bad_records=True)
    base = open_scenes("refshapes", "val", refshapes_tiny_dir, "tiny")
    src = _EmptyPoolSource(base, {0, 2})
    with pl.make_pipeline(c.data, "val", task=get_task("ras").data_task(c), train=False, seed=0,
                          source=src) as it:
        batches = list(it)
        count = it.bad_record_count()
    pairs = base.expression_index()
    bad_rows = [i for i, (r, _) in enumerate(pairs) if r in (0, 2)]
    assert count == len(bad_rows) > 0
    seen = np.concatenate([b["expr_index"][b["valid"] == 1] for b in batches]).tolist()
    assert sorted(seen) == [i for i in range(len(pairs)) if i not in set(bad_rows)]


def _abstract_tree(task, c):
    import jax
    from flax import linen as nn

    from refjax.train.state import _init_variables

    model = task.build_model(c)  # (also what map_init reads the config from)
    v = jax.eval_shape(lambda k: _init_variables(task, model, c, k, task.dummy_batch(c, 1)),
                       jax.random.key(0))
    return nn.unbox(v)


def test_map_init_from_a_previous_stage(refshapes_tiny_dir):  # noqa: F811
    """Stage 2 (AR, all towers) from a stage-1 workdir (caption, CLIP only): the LLM's
    vocabulary grows by the [SEG] row (mean-initialised), parts the previous stage lacks or
    that do not fit keep their initialisation, the frozen towers come along."""
    import jax

    task = get_task("ras")
    s1 = U.small_config(refshapes_tiny_dir, stage=1, arg="tiny,data=tiny,encoders=clip")
    s2 = U.small_config(refshapes_tiny_dir, arg="tiny,data=tiny,decoding=ar")
    prev = _abstract_tree(task, s1)
    rng = np.random.default_rng(0)
    loaded = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), prev)
    target = _abstract_tree(task, s2)  # build_model(s2) last: map_init reads s2
    model = {"params": {**target["params"], **target["frozen"]}, "batch_stats": {}}
    out = task.map_init(loaded, {}, model)["params"]
    assert set(loaded["frozen"]) == {"clip", "head"}  # stage 1 froze its (unused) head
    v = s1.model.vocab_size
    emb = out["llm"]["embed_tokens"]["embedding"]
    assert emb.shape[0] == v + 1 == model["params"]["llm"]["embed_tokens"]["embedding"].shape[0]
    np.testing.assert_array_equal(emb[:v], loaded["params"]["llm"]["embed_tokens"]["embedding"])
    np.testing.assert_allclose(emb[v], emb[:v].mean(0), rtol=1e-6)
    np.testing.assert_array_equal(out["clip"]["embeddings"]["patch_embedding"]["kernel"],
                                  loaded["frozen"]["clip"]["embeddings"]["patch_embedding"]
                                  ["kernel"])
    np.testing.assert_array_equal(out["mask_pool_pre"], loaded["params"]["mask_pool_pre"])
    # the mask projector read 1 tower (+ no PE) in stage 1: other input width, not loaded
    assert "mask_projector" not in out and "image_projector" not in out
    assert "head" not in out and "siglip" not in out
