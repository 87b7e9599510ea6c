"""MRefM losses (refjax.losses.mrefm) against hand-worked values and a torch re-implementation of
the official code (OneRef ``utils/loss_utils.py::one_ref_loss``, BEiT-3 ``BertCaptioningLoss``,
``Visual_Target_Relation_Score_Generator``; spec/oneref.md 3)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from refjax.losses import mrefm as L
from refjax.losses.oneref import dice, patch_targets, sigmoid_focal
from tests.torch_util import require_torch

LOSS_CFG = dict(
    use_box_loss=False, use_box_mask_constraint=True, use_seg_loss=False, l1=1.0, giou=1.0,
    box_mask_focal=20.0, box_mask_dice=2.0, seg_focal=20.0, seg_dice=2.0, focal_alpha=0.25,
    focal_gamma=2.0, alternate=True, mim=1.0, mlm=1.0, vts=1.0, sts=1.0, use_vts=True,
    use_sts=True, label_smoothing=0.1, drop_worst_ratio=0.2, drop_worst_after=12000,
)


# ----------------------------------------------------------------------------- torch reference
def _torch_bert_captioning_loss(torch, logits, target, it, eps=0.1, ratio=0.2, after=12000):
    """BEiT-3 ``BertCaptioningLoss.forward`` (unilm beit3/utils.py), written out."""
    n_class = logits.size(1)
    one_hot = torch.zeros_like(logits).scatter(1, target.view(-1, 1), 1)
    one_hot = one_hot * (1 - eps) + (1 - one_hot) * eps / (n_class - 1)
    log_prb = torch.nn.LogSoftmax(dim=1)(logits)
    loss = torch.nn.KLDivLoss(reduction="none")(log_prb, one_hot).sum(1)
    if ratio > 0 and it > after:
        loss, _ = torch.topk(loss, k=int(loss.shape[0] * (1 - ratio)), largest=False)
    return loss.mean()


def _torch_vts_labels(torch, box, g):
    """``Visual_Target_Relation_Score_Generator.__call__`` with the 24x24 grid -> g x g."""
    h = w = g
    b = box * torch.tensor([w, h, w, h], dtype=torch.float32)
    b = b.numpy()
    b[2], b[3] = max(b[2], 1), max(b[3], 1)
    out = torch.rand(h, w, 4)
    for j in range(h):
        for i in range(w):
            out[j, i, :] = torch.tensor([(i - b[0]) / w, (j - b[1]) / h, 1 / b[2], 1 / b[3]],
                                        dtype=torch.float32)
    return out.reshape(h * w, 4).numpy()


# ----------------------------------------------------------------------------- MLM
def test_smoothed_kl_and_drop_worst_match_bert_captioning_loss():
    torch = require_torch()
    rng = np.random.default_rng(0)
    n, v = 13, 37
    logits = rng.standard_normal((n, v)).astype(np.float32) * 3
    target = rng.integers(0, v, n)
    per = np.asarray(L.smoothed_kl(jnp.asarray(logits), jnp.asarray(target), 0.1))
    # Per token, by hand: sum_v q log(q / p).
    q = np.full((n, v), 0.1 / (v - 1))
    q[np.arange(n), target] = 0.9
    logp = logits - np.log(np.exp(logits.astype(np.float64)).sum(-1, keepdims=True))
    np.testing.assert_allclose(per, (q * (np.log(q) - logp)).sum(-1), rtol=1e-5, atol=1e-5)
    # Padded to a static (2, 10) layout with 7 empty slots; before and after step 12000.
    slots = np.zeros(20, np.float32)
    slots[:n] = per
    valid = np.zeros(20, bool)
    valid[:n] = True
    lt, tt = torch.from_numpy(logits), torch.from_numpy(target)
    for it in (12000, 12001):
        want = float(_torch_bert_captioning_loss(torch, lt, tt, it))
        got = float(L.drop_worst_mean(jnp.asarray(slots.reshape(2, 10)),
                                      jnp.asarray(valid.reshape(2, 10)), 0.2,
                                      jnp.asarray(it > 12000)))
        assert abs(got - want) < 1e-5, (it, got, want)
    # int(13 * 0.8) = 10 kept after the threshold: the 3 largest dropped.
    kept = np.sort(per)[:10].mean()
    got = float(L.drop_worst_mean(jnp.asarray(slots), jnp.asarray(valid), 0.2, jnp.asarray(True)))
    assert abs(got - kept) < 1e-5 and abs(kept - per.mean()) > 1e-3


def test_drop_worst_count_is_pythons_int():
    # 90 * (1 - 0.3) = 62.99999999999999 in float64: Python keeps 62 (float32 would give 63).
    x = np.arange(100, dtype=np.float32)[::-1].copy()
    valid = np.arange(100) < 90  # the 90 largest values are the valid ones
    got = float(L.drop_worst_mean(jnp.asarray(x), jnp.asarray(valid), 0.3, jnp.asarray(True)))
    assert int(90 * (1 - 0.3)) == 62 and int(np.float32(90) * np.float32(0.7)) == 63
    assert got == pytest.approx(np.arange(10, 72).mean())
    # Nothing valid, or nothing kept: 0 (the reference's empty mean would be NaN).
    assert float(L.drop_worst_mean(jnp.asarray(x), jnp.zeros(100, bool), 0.2,
                                   jnp.asarray(True))) == 0.0
    assert float(L.drop_worst_mean(jnp.asarray(x[:1]), jnp.ones(1, bool), 0.2,
                                   jnp.asarray(True))) == 0.0


# ----------------------------------------------------------------------------- VTS, STS, MIM
def test_vts_labels_hand_worked_and_official_loop():
    torch = require_torch()
    # 4x4 grid; box cx=0.5 cy=0.25 w=0.25 h=0.0625 -> patch units cx=2, cy=1, w=1, h=max(.25,1)
    box = np.array([[0.5, 0.25, 0.25, 0.0625]], np.float32)
    lab = np.asarray(L.vts_labels(jnp.asarray(box), 16))[0]
    np.testing.assert_allclose(lab[0], [-0.5, -0.25, 1.0, 1.0])  # row 0, col 0
    np.testing.assert_allclose(lab[3], [0.25, -0.25, 1.0, 1.0])  # row 0, col 3: (3-2)/4
    np.testing.assert_allclose(lab[3 * 4 + 1], [-0.25, 0.5, 1.0, 1.0])  # row 3, col 1
    rng = np.random.default_rng(1)
    boxes = np.concatenate([rng.uniform(0.2, 0.8, (3, 2)), rng.uniform(0.01, 0.6, (3, 2))], 1)
    boxes = boxes.astype(np.float32)
    got = np.asarray(L.vts_labels(jnp.asarray(boxes), 36))
    for b in range(3):
        want = _torch_vts_labels(torch, torch.from_numpy(boxes[b].copy()), 6)
        np.testing.assert_allclose(got[b], want, rtol=1e-6, atol=1e-6)
    pred = rng.standard_normal((3, 36, 4)).astype(np.float32)
    want = torch.nn.functional.l1_loss(torch.from_numpy(pred), torch.from_numpy(got.copy()),
                                       reduction="none").sum(-1).mean()
    per = L.vts_per_sample(jnp.asarray(pred), jnp.asarray(boxes))
    assert abs(float(jnp.mean(per)) - float(want)) < 1e-5


def test_sts_double_softmax_as_official():
    torch = require_torch()
    rng = np.random.default_rng(2)
    raw = rng.standard_normal((3, 6)).astype(np.float32) * 2
    label = (rng.random((3, 6)) < 0.3).astype(np.float32)
    pred = np.asarray(jnp.exp(jnp.asarray(raw)) / jnp.exp(jnp.asarray(raw)).sum(-1, keepdims=True))
    # Official: pred = head(...).softmax(-1); KLDiv(batchmean)(log_softmax(pred), softmax(y))
    F = torch.nn.functional
    tpred = torch.from_numpy(raw).softmax(dim=-1)
    want = torch.nn.KLDivLoss(reduction="batchmean")(F.log_softmax(tpred, dim=-1),
                                                     F.softmax(torch.from_numpy(label), dim=-1))
    got = float(jnp.mean(L.sts_per_sample(jnp.asarray(pred), jnp.asarray(label))))
    assert abs(got - float(want)) < 1e-6
    # The double softmax matters: a single softmax gives another value.
    single = torch.nn.KLDivLoss(reduction="batchmean")(F.log_softmax(torch.from_numpy(raw), -1),
                                                       F.softmax(torch.from_numpy(label), -1))
    assert abs(got - float(single)) > 1e-2


def test_mim_per_sample_matches_cross_entropy_on_masked():
    torch = require_torch()
    rng = np.random.default_rng(3)
    logits = rng.standard_normal((2, 9, 11)).astype(np.float32)
    ids = rng.integers(0, 11, (2, 9))
    mask = rng.random((2, 9)) < 0.4
    mask[0, 0] = True
    r = L.mim_per_sample(jnp.asarray(logits), jnp.asarray(ids), jnp.asarray(mask))
    want = torch.nn.CrossEntropyLoss()(torch.from_numpy(logits[mask]), torch.from_numpy(ids[mask]))
    assert abs(float(r["ce"].sum() / r["count"].sum()) - float(want)) < 1e-5
    assert float(r["count"].sum()) == mask.sum()
    acc = (logits.argmax(-1) == ids)[mask].sum()
    assert float(r["correct"].sum()) == acc


# ----------------------------------------------------------------------------- total, alternation
def _fake(seed: int = 4, b: int = 3, g: int = 4, k: int = 7, lt: int = 8, kt: int = 3, v: int = 19):
    rng = np.random.default_rng(seed)
    p = g * g
    text_ids = rng.integers(3, v, (b, lt)).astype(np.int32)
    mlm_mask = np.zeros((b, lt), np.int32)
    for i in range(b):
        mlm_mask[i, rng.choice(np.arange(1, lt - 1), kt - (i == 0), replace=False)] = 1
    pos = np.argsort(mlm_mask == 0, axis=1, kind="stable")[:, :kt].astype(np.int32)
    outputs = {
        "box": jnp.asarray(rng.uniform(0.2, 0.8, (b, 4)).astype(np.float32)),
        "sim": jnp.asarray(rng.uniform(-1, 1, (b, p)).astype(np.float32)),
        "mim_logits": jnp.asarray(rng.standard_normal((b, p, k)).astype(np.float32)),
        "mim_ids": jnp.asarray(rng.integers(0, k, (b, p)).astype(np.int32)),
        "vts_pred": jnp.asarray(rng.standard_normal((b, p, 4)).astype(np.float32)),
        "mlm_logits": jnp.asarray(rng.standard_normal((b, kt, v)).astype(np.float32)),
        "mlm_positions": jnp.asarray(pos),
        "mlm_mask": jnp.asarray(np.take_along_axis(mlm_mask, pos, 1)),
        "sts_pred": jnp.asarray(rng.dirichlet(np.ones(lt - 2), b).astype(np.float32)),
    }
    box = np.concatenate([rng.uniform(0.3, 0.7, (b, 2)), rng.uniform(0.2, 0.5, (b, 2))], 1)
    mask = np.zeros((b, 16, 16), np.uint8)
    mask[:, 4:12, 2:9] = 1
    batch = {
        "text_ids": jnp.asarray(text_ids),
        "mim_mask": jnp.asarray(rng.random((b, p)) < 0.5),
        "box": jnp.asarray(box.astype(np.float32)),
        "mask": jnp.asarray(mask),
        "sts_label": jnp.asarray((rng.random((b, lt)) < 0.3).astype(np.float32)),
        "valid": jnp.ones((b,), jnp.int32),
    }
    return outputs, batch


def _terms(outputs, batch):
    """Every term by the reference formulas, in numpy/torch-free closed forms (float64)."""
    mim = L.mim_per_sample(outputs["mim_logits"], outputs["mim_ids"], batch["mim_mask"])
    labels = np.take_along_axis(np.asarray(batch["text_ids"]), np.asarray(outputs["mlm_positions"]),
                                1)
    kl = np.asarray(L.smoothed_kl(outputs["mlm_logits"], jnp.asarray(labels), 0.1))
    m = np.asarray(outputs["mlm_mask"]).astype(bool)
    target = patch_targets(batch["mask"], outputs["sim"].shape[1])
    lt = batch["sts_label"].shape[1]
    return {
        "mim": float(mim["ce"].sum() / mim["count"].sum()),
        "vts": float(L.vts_per_sample(outputs["vts_pred"], batch["box"]).mean()),
        "mlm": float(kl[m].mean()),
        "mlm_drop": float(np.sort(kl[m])[: int(m.sum() * 0.8)].mean()),
        "sts": float(L.sts_per_sample(outputs["sts_pred"], batch["sts_label"][:, 1 : lt - 1])
                     .mean()),
        "constraint": float(20 * sigmoid_focal(outputs["sim"], target).mean()
                            + 2 * dice(outputs["sim"], target).mean()),
    }


_JIT_LOSS = jax.jit(lambda o, b: L.mrefm_loss(o, b, LOSS_CFG))  # one compile: step is traced


@pytest.mark.parametrize("step", [0, 1, 12002, 12003])
def test_alternation_selects_terms(step):
    outputs, batch = _fake()
    t = _terms(outputs, batch)
    loss, m = _JIT_LOSS(outputs, {**batch, "step": jnp.int32(step)})
    mlm = t["mlm_drop"] if step > 12000 else t["mlm"]
    if step % 2 == 0:  # MIM step: MIM + VTS + constraint
        want = t["mim"] + t["vts"] + t["constraint"]
        assert float(m["mim_step"]) == 1.0 and float(m["loss_mlm"]) == 0.0
        assert float(m["loss_mlm_sts"]) == 0.0 and float(m["mlm_acc"]) == 0.0
        assert float(m["loss_mim"]) == pytest.approx(t["mim"], rel=1e-5)
    else:  # MLM step: MLM (drop-worst after 12000) + STS + constraint
        want = mlm + t["sts"] + t["constraint"]
        assert float(m["mim_step"]) == 0.0 and float(m["loss_mim"]) == 0.0
        assert float(m["loss_mim_vts"]) == 0.0
        assert float(m["loss_mlm"]) == pytest.approx(mlm, rel=1e-5)
    assert float(loss) == pytest.approx(want, rel=1e-5)
    assert float(m["loss"]) == float(loss)


def test_joint_step_and_switches():
    outputs, batch = _fake()
    t = _terms(outputs, batch)
    cfg = {**LOSS_CFG, "alternate": False}
    loss, m = L.mrefm_loss(outputs, {**batch, "step": jnp.int32(3)}, cfg)
    assert float(loss) == pytest.approx(t["mim"] + t["vts"] + t["mlm"] + t["sts"]
                                        + t["constraint"], rel=1e-5)
    assert float(m["mim_step"]) == 1.0
    # Released recipe: VTS / STS off; their outputs are not even read.
    cfg = {**LOSS_CFG, "use_vts": False, "use_sts": False}
    out = {k: v for k, v in outputs.items() if k not in ("vts_pred", "sts_pred")}
    loss, m = L.mrefm_loss(out, {**batch, "step": jnp.int32(0)}, cfg)
    assert "loss_mim_vts" not in m and "loss_mlm_sts" not in m
    assert float(loss) == pytest.approx(t["mim"] + t["constraint"], rel=1e-5)
    with pytest.raises(KeyError, match="drop_worst_after"):
        L.mrefm_loss(outputs, {**batch, "step": jnp.int32(0)},
                     {k: v for k, v in LOSS_CFG.items() if k != "drop_worst_after"})


def test_invalid_rows_do_not_count():
    outputs, batch = _fake()
    b2 = {**batch, "valid": jnp.asarray([1, 1, 0], jnp.int32), "step": jnp.int32(0)}
    loss_a, _ = _JIT_LOSS(outputs, b2)
    # Same as the first two rows alone.
    o2 = {k: v[:2] for k, v in outputs.items()}
    b3 = {k: v[:2] for k, v in batch.items()}
    loss_b, _ = _JIT_LOSS(o2, {**b3, "step": jnp.int32(0)})
    assert float(loss_a) == pytest.approx(float(loss_b), rel=1e-5)
    # Garbage in an invalid row (NaN-free by construction) changes nothing.
    o3 = {**outputs, "mim_logits": outputs["mim_logits"].at[2].set(50.0)}
    loss_c, _ = _JIT_LOSS(o3, b2)
    assert float(loss_c) == pytest.approx(float(loss_a), rel=1e-6)
