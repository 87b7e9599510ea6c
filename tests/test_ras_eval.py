"""The RAS eval path: NAR selection (threshold, RES argmax fallback), the task's eval outputs
and accumulator equal the GRES metrics of the original-resolution masks computed directly, and
the in-model AR decoding (``mode="ar_decode"``, what an eval step can call) equals
``refjax.models.ras.ar_generate``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from refjax.data import transforms as tf
from refjax.data.sources import tokenizer_file
from refjax.data.tokenizers import LLAMA_FILE, load_llama_tokenizer
from refjax.evaluate.gres import GresAccumulator, selected_union
from refjax.models import ras as ras_lib
from refjax.tasks import get_task
from refjax.tasks.ras import RASAccumulator, select_candidates
from tests import ras_task_util as T
from tests import ras_util as U
from tests.data_fixtures import refshapes_tiny_dir  # noqa: F401


def test_select_candidates_threshold_and_fallback():
    logits = jnp.array([[0.3, -2.0, 1.0, 5.0], [-1.0, -0.5, -3.0, 9.0]])
    valid = jnp.array([[1, 1, 1, 0], [1, 1, 1, 0]])
    sel = np.asarray(select_candidates(logits, valid, 0.5, False))
    np.testing.assert_array_equal(sel, [[1, 0, 1, 0], [0, 0, 0, 0]])  # padded 5.0 / 9.0 out
    sel = np.asarray(select_candidates(logits, valid, 0.7, True))  # sigmoid(0.3) < 0.7
    np.testing.assert_array_equal(sel, [[0, 0, 1, 0], [0, 1, 0, 0]])  # row 1: the argmax


def test_eval_outputs_equal_direct_original_resolution_metrics(refshapes_tiny_dir):  # noqa: F811
    c = T.small_config(refshapes_tiny_dir)
    tok = load_llama_tokenizer(tokenizer_file(c.data, LLAMA_FILE), add_bos_token=False)
    task = get_task("ras")
    rows, direct = [], GresAccumulator()
    rng = np.random.default_rng(0)
    for seed, (h, w) in enumerate([(30, 44), (52, 44), (40, 60)]):
        sc = T.scene(h=h, w=w, seed=seed)
        for e in range(4):
            ex = tf.expand(sc, e)
            row, _, _ = T.example_row(c, tok, ex)
            logits = rng.normal(0.0, 2.0, 24).astype(np.float32)
            rows.append((row, logits))
            n = len(sc["pool_masks"])
            sel = np.asarray(select_candidates(logits[None], row["pool_valid"][None], 0.5,
                                               False))[0, :n]
            pred = selected_union(sc["pool_masks"], sel)
            direct.update({"pred_mask": pred[None], "gt_mask": ex["mask"][None],
                           "num_targets": np.array([ex["num_targets"]]),
                           "kind": np.array([ex["kind"]]),
                           "has_ref": np.array([len(ex["ref_masks"]) > 0]),
                           "pool_masks": sc["pool_masks"][None], "valid": np.ones(1)})
    batch = {k: np.stack([r[k] for r, _ in rows]) for k in rows[0][0]}
    logits = np.stack([lg for _, lg in rows])
    out = task.eval_outputs(jnp.asarray(logits), {}, batch, c)
    acc = RASAccumulator()
    acc.update({k: np.asarray(v) for k, v in out.items()})
    got, want = acc.result(), direct.result()
    assert got["count"] == 12 and got["inexact_rows"] == 0
    for k, v in want.items():
        assert got[k] == pytest.approx(v, abs=1e-12), k
    assert {"giou", "ciou", "n_acc", "t_acc", "oracle_ciou", "with_ref/giou"} <= set(got)
    print({k: round(got[k], 4) for k in ("giou", "ciou", "n_acc", "t_acc", "oracle_ciou")})


def test_in_model_ar_decoding_equals_ar_generate():
    cfg, model, v = U.setup("ar")
    seg, eos = cfg.seg_token_id, cfg.eos_token_id
    p = jax.tree.map(np.array, v)
    kernel = p["params"]["llm"]["lm_head"]["kernel"]  # [SEG] close to EOS: a mixed decode
    kernel[:, seg] = kernel[:, eos] + 0.05 * np.random.default_rng(11).standard_normal(cfg.d)
    prompt = U.batch(cfg, [[20, U.PH, 21], [22, 23]], [4, 3], [1, 0], decoding="ar")
    pv = np.zeros((2, U.POOL_MAX), np.int32)
    pv[0, :4], pv[1, :3] = 1, 1
    inputs = {k: prompt[k] for k in ("input_ids", "slot_index", "attention_mask",
                                     "pool_masks", "ref_masks", "features")}
    ref = ras_lib.ar_generate(model, p, {**inputs, "pool_valid": pv}, max_segs=3)
    ar_pos = np.zeros((2, 4), np.int32)  # its shape gives the step count (3)
    out, _ = jax.jit(lambda v, a: model.apply(v, a["input_ids"], a["slot_index"],
                                              a["attention_mask"], pool_masks=a["pool_masks"],
                                              ref_masks=a["ref_masks"], features=a["features"],
                                              pool_valid=a["pool_valid"], ar_pos=a["ar_pos"],
                                              mode="ar_decode"))(
        p, {**inputs, "pool_valid": pv, "ar_pos": ar_pos})
    for k in ("choices", "selected", "num_segs"):
        np.testing.assert_array_equal(np.asarray(out[k]), np.asarray(ref[k]), err_msg=k)
    for k in ("scores", "decision"):
        np.testing.assert_allclose(np.asarray(out[k]), np.asarray(ref[k]), atol=1e-5)
    assert 0 < int(np.asarray(out["num_segs"]).sum()) < 6  # a mixed decode
