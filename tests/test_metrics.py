"""OneRef metrics (spec 4.4): Acc@0.5, mask IoU, mIoU/oIoU, accumulation and reduction."""

import jax.numpy as jnp
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from refjax.boxes import Letterbox, mask_iou
from refjax.evaluate.metrics import (
    MetricAccumulator,
    allreduce_sums,
    rec_per_sample,
    res_original_resolution,
    res_per_sample,
)
from tests.torch_util import require_torch


@pytest.mark.parametrize("xp", [np, jnp], ids=["numpy", "jax"])
def test_acc_hand_cases_clamping_and_boundary(xp):
    gt = xp.asarray([[0.1, 0.1, 0.2, 0.2]] * 2 + [[0.25, 0.25, 0.5, 0.5]] * 2, np.float32)
    pred = xp.asarray(
        [
            [0.1, 0.1, 0.2, 0.2],  # identical: IoU 1
            [0.1, 0.1, 0.36, 0.36],  # xyxy [-.08,-.08,.28,.28] -> clamped [0,0,.28,.28]: .04/.0784
            [0.125, 0.25, 0.25, 0.5],  # half of the GT: IoU exactly 0.5 -> correct
            [0.125, 0.25, 0.2499, 0.5],  # just below 0.5 -> wrong
        ],
        np.float32,
    )
    out = rec_per_sample(pred, gt)
    iou = np.asarray(out["box_iou"])
    np.testing.assert_allclose(iou[:2], [1.0, 0.04 / 0.0784], rtol=1e-5)
    assert iou[2] == 0.5 and iou[3] < 0.5
    np.testing.assert_array_equal(np.asarray(out["correct"]), [True, True, True, False])


def test_mask_iou_matches_pycocotools():
    rng = np.random.default_rng(0)
    pred = rng.random((5, 37, 29)) > 0.5
    gt = rng.random((5, 37, 29)) > 0.7
    enc = lambda m: mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    _, _, iou = mask_iou(pred, gt)
    for i in range(5):
        want = mask_utils.iou([enc(pred[i])], [enc(gt[i])], [0])[0, 0]
        assert iou[i] == pytest.approx(want, rel=1e-12)
    _, _, iou_j = mask_iou(jnp.asarray(pred), jnp.asarray(gt))
    np.testing.assert_allclose(np.asarray(iou_j), iou, rtol=1e-6)


def test_res_per_sample_matches_reference_eval():
    """``relu(sigmoid - .5)`` -> bilinear up -> ``bool`` -> I/U, as utils/eval_utils.py."""
    torch = require_torch()
    rng = np.random.default_rng(1)
    logits = rng.uniform(-1, 1, (3, 12, 12)).astype(np.float32)
    gt = (rng.random((3, 24, 24)) > 0.5).astype(np.uint8)
    t = torch.from_numpy(logits)[:, None]
    src = torch.nn.functional.interpolate(
        (t.sigmoid() - 0.5).relu(), size=(24, 24), mode="bilinear", align_corners=False
    )
    src = src.flatten(1).bool().float()
    tgt = torch.from_numpy(gt).flatten(1).float()
    inter = (src * tgt).sum(1)
    union = (src + tgt).sum(-1) - inter
    got = res_per_sample(jnp.asarray(logits), jnp.asarray(gt))
    np.testing.assert_array_equal(np.asarray(got["mask_inter"]), inter.numpy())
    np.testing.assert_array_equal(np.asarray(got["mask_union"]), union.numpy())
    np.testing.assert_allclose(np.asarray(got["mask_iou"]), (inter / union).numpy(), rtol=1e-6)


def _mask_metrics(pairs):
    """Per-sample metrics from (pred, gt) boolean masks plus all-correct boxes."""
    inter, union, iou = mask_iou(np.stack([p for p, _ in pairs]), np.stack([g for _, g in pairs]))
    n = len(pairs)
    return {"correct": np.ones(n, bool), "mask_inter": inter, "mask_union": union, "mask_iou": iou}


def test_miou_vs_oiou_hand_case():
    a_pred, a_gt = np.zeros((4, 4), bool), np.zeros((4, 4), bool)
    a_pred[0, :2] = True  # I = 1, U = 2 -> .5
    a_gt[0, 1] = True
    b_pred, b_gt = np.zeros((4, 4), bool), np.zeros((4, 4), bool)
    b_pred[:3, :3] = True  # I = 9, U = 10 -> .9
    b_gt[:3, :3] = True
    b_gt[3, 0] = True
    res = MetricAccumulator().update(_mask_metrics([(a_pred, a_gt), (b_pred, b_gt)])).result()
    assert res["miou"] == pytest.approx(0.7)
    assert res["oiou"] == pytest.approx(10 / 12)
    assert res["acc@0.5"] == 1.0 and res["count"] == 2


def _random_batch(rng, n):
    return {
        "correct": rng.random(n) > 0.4,
        "mask_inter": rng.integers(0, 50, n).astype(np.float64),
        "mask_union": rng.integers(50, 100, n).astype(np.float64),
        "mask_iou": rng.random(n),
    }


def test_per_kind_breakdown_and_valid():
    m = {"correct": np.array([1, 0, 1, 1], bool)}
    acc = MetricAccumulator(kinds=["c"])
    acc.update(m, kinds=["a", "b", "a", "b"], valid=np.array([1, 1, 1, 0]))
    res = acc.result()
    assert res["count"] == 3 and res["acc@0.5"] == pytest.approx(2 / 3)
    assert res["a/acc@0.5"] == 1.0 and res["a/count"] == 2
    assert res["b/acc@0.5"] == 0.0 and res["b/count"] == 1
    assert res["c/count"] == 0 and "c/acc@0.5" not in res
    assert "miou" not in res


def test_merge_equals_single_pass():
    rng = np.random.default_rng(3)
    batches = [(_random_batch(rng, 6), list(rng.choice(["x", "y", "z"], 6))) for _ in range(4)]
    single = MetricAccumulator()
    for m, k in batches:
        single.update(m, kinds=k)
    left, right = MetricAccumulator(), MetricAccumulator()
    for i, (m, k) in enumerate(batches):
        (left if i % 2 else right).update(m, kinds=k)
    merged = left.merge(right).result()
    want = single.result()
    assert merged.keys() == want.keys()
    for key in want:
        assert merged[key] == pytest.approx(want[key], rel=1e-12), key


def test_allreduce_single_process_keeps_float64_sums():
    tree = {"a": np.float64(1e10 + 0.3), "b": np.array([1.0, 2.5]), "c": np.float64(7)}
    out = allreduce_sums(tree)
    assert out["a"] == pytest.approx(1e10 + 0.3, rel=1e-15, abs=1e-4)
    np.testing.assert_array_equal(out["b"], [1.0, 2.5])
    acc = MetricAccumulator().update(
        _random_batch(np.random.default_rng(4), 5), kinds=list("aabbc")
    )
    assert acc.allreduce().result() == pytest.approx(acc.result(), rel=1e-12)


def test_letterbox_inverse_mask_and_original_resolution_iou():
    lb = Letterbox.centered(orig_w=8, orig_h=4, size=16)  # scale 2, content rows 4..12
    assert (lb.new_w, lb.new_h, lb.left, lb.top) == (16, 8, 0, 4)
    canvas = np.zeros((16, 16), bool)
    canvas[4:12, 0:8] = True  # left half of the content
    canvas[0:4, :] = True  # padding is dropped
    orig = lb.inverse_mask(canvas)
    want = np.zeros((4, 8), bool)
    want[:, :4] = True
    np.testing.assert_array_equal(orig, want)
    gt = np.zeros((4, 8), bool)
    gt[:, 2:6] = True  # I = 8, U = 24
    assert res_original_resolution(canvas, lb, gt) == pytest.approx((8.0, 24.0, 1 / 3))
