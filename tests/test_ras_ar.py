"""RAS AR baseline (spec 5.6): cached greedy [SEG] decoding equals the teacher-forced
(uncached) forward, the emission rule, padded candidates never chosen; Hungarian matching
(optax) equals scipy's linear_sum_assignment on the valid sub-matrix."""

import jax
import numpy as np
import pytest

from refjax.models import ras
from tests import ras_util as U

# ---------------------------------------------------------------------------------------------
# AR baseline and Hungarian matching


def test_ar_cached_decoding_equals_teacher_forcing():
    cfg, model, v = U.setup("ar")
    seg, eos = cfg.seg_token_id, cfg.eos_token_id
    # make [SEG] win at the first steps and lose later for row 0 (a mixed, real decode)
    p = jax.tree.map(np.array, v)
    kernel = p["params"]["llm"]["lm_head"]["kernel"]
    kernel[:, seg] = kernel[:, eos] + 0.05 * np.random.default_rng(11).standard_normal(cfg.d)
    queries, ncands, nrefs = [[20, U.PH, 21], [22, 23]], [4, 3], [1, 0]
    prompt = U.batch(cfg, queries, ncands, nrefs, decoding="ar")
    pv = np.zeros((2, U.POOL_MAX), np.int32)
    pv[0, :4], pv[1, :3] = 1, 1
    inputs = {k: prompt[k] for k in ("input_ids", "slot_index", "attention_mask",
                                     "pool_masks", "ref_masks", "features")}
    out = ras.ar_generate(model, p, {**inputs, "pool_valid": pv}, max_segs=3)
    choices, dec = np.asarray(out["choices"]), np.asarray(out["decision"])
    print("AR choices", choices.tolist(), "num_segs", np.asarray(out["num_segs"]).tolist())
    # the emission rule: [SEG] while its logit beats EOS, then stop
    for i in range(2):
        emit = dec[i, :3, 0] > dec[i, :3, 1]
        k = int(np.argmin(emit)) if not emit.all() else 3
        assert int(out["num_segs"][i]) == k
        assert (choices[i, :k] >= 0).all() and (choices[i, k:] == -1).all()
        np.testing.assert_array_equal(choices[i, :k],
                                      np.argmax(np.asarray(out["scores"][i, :k]), -1))
        sel = np.zeros(U.POOL_MAX, bool)
        sel[choices[i, :k]] = True
        np.testing.assert_array_equal(np.asarray(out["selected"][i]), sel)
        assert choices[i].max() < ncands[i]  # padded candidates are never chosen
    assert 0 < int(np.asarray(out["num_segs"]).sum()) < 6  # both branches of the rule taken
    # uncached: the teacher-forced sequence with 3 [SEG] gives the same scores and decisions
    tf = U.batch(cfg, queries, ncands, nrefs, decoding="ar", num_targets=3)
    scores, aux = jax.jit(lambda v, b: model.apply(
        v, b["input_ids"], b["slot_index"], b["attention_mask"], pool_masks=b["pool_masks"],
        ref_masks=b["ref_masks"], features=b["features"], pool_valid=pv, ar_pos=b["ar_pos"]))(
        p, tf)
    assert scores.shape == (2, 3, U.POOL_MAX) and aux["lm_logits"].shape == (2, 4, 256)
    np.testing.assert_allclose(np.asarray(out["scores"]), np.asarray(scores), atol=1e-5)
    assert dec.shape == (2, 4, 2)
    lm = np.asarray(aux["lm_logits"])[..., [seg, eos]]
    np.testing.assert_allclose(dec, lm, atol=1e-5)
    print(f"cached vs uncached: scores {np.abs(np.asarray(out['scores']) - scores).max():.2e}, "
          f"decisions {np.abs(dec - lm).max():.2e}")
    assert (np.asarray(scores)[0, :, 4] == ras.MASKED_SCORE).all()


@pytest.mark.parametrize("k,n", [(4, 6), (5, 3)])
def test_hungarian_match_equals_scipy(k, n):
    from scipy.optimize import linear_sum_assignment

    rng = np.random.default_rng(7)
    trials = 24
    costs = rng.standard_normal((trials, k, n)).astype(np.float32) * 3
    rv = rng.random((trials, k)) > 0.3
    cv = rng.random((trials, n)) > 0.3
    rv[0], cv[0] = True, True
    rows, cols, ok = jax.jit(jax.vmap(ras.hungarian_match))(costs, rv, cv)
    rows, cols, ok = map(np.asarray, (rows, cols, ok))
    for t in range(trials):
        ri, ci = np.flatnonzero(rv[t]), np.flatnonzero(cv[t])
        sub = costs[t][np.ix_(ri, ci)]
        r, c = linear_sum_assignment(sub)
        ref = sub[r, c].sum() if len(r) else 0.0
        m = ok[t]
        assert m.sum() == min(len(ri), len(ci))
        assert rv[t][rows[t][m]].all() and cv[t][cols[t][m]].all()
        assert len(set(rows[t][m])) == len(set(cols[t][m])) == m.sum()
        np.testing.assert_allclose(costs[t][rows[t][m], cols[t][m]].sum(), ref, rtol=1e-5,
                                   atol=1e-5)
