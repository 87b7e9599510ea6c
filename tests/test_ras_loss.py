"""RAS losses (refjax.losses.ras) on hand-checked cases: the weighted BCE of spec 5.4, the AR
baseline's Hungarian-matched CE + [SEG]/EOS decision CE of spec 5.6 (invariant to the order of
the [SEG] predictions and of the candidates), and the stage-1 caption CE."""

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from refjax.losses import ras as L
from refjax.models.ras import IGNORE_INDEX, MASKED_SCORE

CFG = {"pos_weight": 5.0, "ar_match": 1.0, "ar_stop": 1.0, "lm": 1.0}
AR_LOSS = jax.jit(functools.partial(L.ar_loss, cfg=CFG))


def sp(x: float) -> float:
    """softplus, by hand: log(1 + e^x)."""
    return math.log(1.0 + math.exp(x))


def test_weighted_bce_hand_case():
    logits = np.array([[2.0, -1.0, 0.5, 3.0], [0.0, 1.0, -2.0, 0.3], [4.0, 4.0, 4.0, 4.0]],
                      np.float32)
    labels = np.array([[1, 0, 0, 1], [0, 1, -1, 0], [1, 1, 0, 0]], np.int32)  # -1: ignored
    pool_valid = np.array([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1]], np.int32)
    valid = np.array([1, 1, 0], np.int32)  # row 2 is padding
    batch = {"pool_labels": labels, "pool_valid": pool_valid, "valid": valid}
    loss, m = L.nar_loss({"logits": logits}, batch, CFG)
    # BCE(s, 1) = softplus(-s), BCE(s, 0) = softplus(s); positives x5; 6 counted candidates:
    # row 0: c0 (+, 2), c1 (-, -1), c2 (-, 0.5); c3 padded. row 1: c0, c1 (+, 1), c3; c2 ignored
    terms = [5 * sp(-2.0), sp(-1.0), sp(0.5), sp(0.0), 5 * sp(-1.0), sp(0.3)]
    expected = sum(terms) / 6  # = 5.0357895892 / 6
    assert expected == pytest.approx(0.8392982649, abs=1e-9)
    assert float(loss) == pytest.approx(expected, abs=1e-6)
    assert float(m["bce"]) == float(loss)
    # normalised by the number of candidates, not by the weights
    assert float(loss) != pytest.approx(sum(terms) / (6 + 4 * 2), abs=1e-3)
    # correct-side fraction (wrong: r0c2 at 0.5, r1c3 at 0.3) and positive fraction
    assert float(m["cand_acc"]) == pytest.approx(4 / 6)
    assert float(m["pos_frac"]) == pytest.approx(2 / 6)
    # float32 and stable for large logits (log-sigmoid form)
    big = L.weighted_bce(jnp.array([[80.0, -80.0]]), jnp.array([[0.0, 1.0]]),
                         jnp.ones((1, 2)), 5.0)
    assert big.dtype == jnp.float32 and float(big) == pytest.approx((80 + 5 * 80) / 2, rel=1e-6)


def _ar_case():
    scores = np.array([[[2.0, 0.0, 1.0, MASKED_SCORE],
                        [0.5, 0.0, 3.0, MASKED_SCORE],
                        [7.0, -3.0, 1.0, MASKED_SCORE]]], np.float32)  # seg 2: not valid
    decision = np.array([[[1.0, 0.0], [0.2, 0.7], [-0.5, 0.5], [9.0, -9.0]]], np.float32)
    batch = {
        "valid": np.array([1], np.int32),
        "pool_valid": np.array([[1, 1, 1, 0]], np.int32),
        "pool_labels": np.array([[1, 0, 1, 0]], np.int32),
        "seg_valid": np.array([[1, 1, 0]], np.int32),
        "ar_valid": np.array([[1, 1, 1, 0]], np.int32),
    }
    return scores, decision, batch


def test_ar_loss_hand_case():
    scores, decision, batch = _ar_case()
    loss, m = AR_LOSS({"scores": scores, "decision": decision}, batch)
    lse0 = math.log(math.e ** 2 + 1 + math.e)  # log-sum-exp of seg 0 over the 3 candidates
    lse1 = math.log(math.e ** 0.5 + 1 + math.e ** 3)
    ce = {(0, 0): lse0 - 2.0, (0, 2): lse0 - 1.0, (1, 0): lse1 - 0.5, (1, 2): lse1 - 3.0}
    # targets {0, 2}: the matching seg0 -> c0, seg1 -> c2 costs less than the swap
    best = min(ce[0, 0] + ce[1, 2], ce[0, 2] + ce[1, 0])
    assert best == pytest.approx(ce[0, 0] + ce[1, 2])
    match = best / 2
    # decisions: [SEG] at k = 0, 1; EOS at k = 2 (after the 2 [SEG]s); k = 3 padding
    stop = (sp(-1.0) + sp(0.5) + sp(-1.0)) / 3
    assert float(m["ar_match"]) == pytest.approx(match, abs=1e-5)
    assert float(m["ar_stop"]) == pytest.approx(stop, abs=1e-5)
    assert float(loss) == pytest.approx(match + stop, abs=1e-5)
    assert float(m["matched"]) == 2 and float(m["stop_acc"]) == pytest.approx(2 / 3)
    print(f"AR hand case: match {match:.6f} stop {stop:.6f}")


def test_ar_loss_is_invariant_to_seg_and_candidate_order():
    scores, decision, batch = _ar_case()
    ref, _ = AR_LOSS({"scores": scores, "decision": decision}, batch)
    # permuting the valid [SEG] predictions (rows) gives the same loss: the set is matched
    swapped = scores.copy()
    swapped[0, [0, 1]] = scores[0, [1, 0]]
    got, _ = AR_LOSS({"scores": swapped, "decision": decision}, batch)
    assert float(got) == pytest.approx(float(ref), abs=1e-6)
    # permuting the candidates (scores, labels, validity together) gives the same loss
    for perm in itertools.permutations(range(4)):
        p = list(perm)
        b2 = dict(batch, pool_valid=batch["pool_valid"][:, p],
                  pool_labels=batch["pool_labels"][:, p])
        got, _ = AR_LOSS({"scores": scores[:, :, p], "decision": decision}, b2)
        assert float(got) == pytest.approx(float(ref), abs=1e-6), perm
    # a different target set changes it (the check is not vacuous)
    b3 = dict(batch, pool_labels=np.array([[0, 1, 1, 0]], np.int32))
    other, _ = AR_LOSS({"scores": scores, "decision": decision}, b3)
    assert abs(float(other) - float(ref)) > 0.1


def test_lm_loss_hand_case():
    logits = np.array([[[0.0, 1.0, 2.0], [1.0, 1.0, 1.0], [3.0, 0.0, 0.0], [5.0, 5.0, 5.0]]],
                      np.float32)
    labels = np.array([[IGNORE_INDEX, 1, 2, IGNORE_INDEX]], np.int32)
    loss, m = L.lm_loss({"lm_logits": logits}, {"labels": labels, "valid": np.ones(1)}, CFG)
    # position 0 predicts labels[1] = 1, position 1 predicts labels[2] = 2
    ce0 = math.log(1 + math.e + math.e ** 2) - 1.0
    ce1 = math.log(3.0)
    assert float(loss) == pytest.approx((ce0 + ce1) / 2, abs=1e-6)
    sums = L.lm_sums(logits, labels)
    assert float(sums["lm_tokens"][0]) == 2 and float(sums["lm_nll"][0]) == pytest.approx(
        ce0 + ce1, abs=1e-5)
    assert float(m["token_acc"]) == pytest.approx(0.0)  # argmax 2 != 1; ties pick 0 != 2
