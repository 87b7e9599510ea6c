"""OneRef losses (spec 2.4): hand-computed cases, padded rows, switches, torch parity."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict

from refjax.losses.oneref import dice, oneref_loss, patch_targets, sigmoid_focal
from tests.torch_util import require_torch

OFF = {"use_box_loss": False, "use_box_mask_constraint": False, "use_seg_loss": False}


def loss_cfg(**kw) -> ConfigDict:
    """The OneRef loss section of ``configs/oneref/rec_res.py`` (every key) with overrides."""
    from refjax.train.config import load_config

    cfg = load_config("configs/oneref/rec_res.py:tiny").loss
    cfg.update(kw)
    return cfg


BOX_ONLY = loss_cfg(**(OFF | {"use_box_loss": True}))


def _sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_l1_and_giou_hand_cases():
    # sample 0: pred xyxy [0,0,.5,.5] vs gt [0,0,1,1]: IoU .25, hull = union -> GIoU .25
    # sample 1: disjoint [0,0,.2,.2] vs [.4,.4,.6,.6]: union .08, hull .36 -> GIoU -(.28/.36)
    pred = jnp.array([[0.25, 0.25, 0.5, 0.5], [0.1, 0.1, 0.2, 0.2]])
    gt = jnp.array([[0.5, 0.5, 1.0, 1.0], [0.5, 0.5, 0.2, 0.2]])
    loss, m = oneref_loss({"box": pred}, {"box": gt}, BOX_ONLY)
    l1 = ((0.25 + 0.25 + 0.5 + 0.5) + (0.4 + 0.4 + 0 + 0)) / 2
    giou = ((1 - 0.25) + (1 + 0.28 / 0.36)) / 2
    assert float(m["loss_l1"]) == pytest.approx(l1, abs=1e-6)
    assert float(m["loss_giou"]) == pytest.approx(giou, abs=1e-6)
    assert float(loss) == pytest.approx(l1 + giou, abs=1e-6)
    assert set(m) == {"loss", "loss_l1", "loss_giou"}


def test_focal_and_dice_hand_cases():
    logits = jnp.array([[0.0, 0.0, 2.0, -1.0]])
    target = jnp.array([[1.0, 0.0, 1.0, 0.0]])
    ln2 = math.log(2)
    p2, pm1 = _sig(2.0), _sig(-1.0)
    per_elem = [
        0.25 * ln2 * 0.5**2,  # t=1, p=.5
        0.75 * ln2 * 0.5**2,  # t=0, p=.5
        0.25 * -math.log(p2) * (1 - p2) ** 2,  # t=1
        0.75 * -math.log(1 - pm1) * pm1**2,  # t=0
    ]
    assert float(sigmoid_focal(logits, target)[0]) == pytest.approx(sum(per_elem) / 4, rel=1e-6)
    sig = [0.5, 0.5, p2, pm1]
    want = 1 - (2 * (0.5 + p2) + 1) / (sum(sig) + 2 + 1)
    assert float(dice(logits, target)[0]) == pytest.approx(want, rel=1e-6)
    # all-zero logits, 1 of 4 positives: 1 - (2*.5 + 1) / (2 + 1 + 1) = .5
    assert float(dice(jnp.zeros((1, 4)), jnp.array([[1.0, 0, 0, 0]]))[0]) == pytest.approx(0.5)


def test_patch_targets_take_the_top_left_pixel():
    mask = np.zeros((1, 8, 8), np.uint8)
    mask[0, 4, 4] = 1  # top-left pixel of patch (1, 1) with p = 4
    mask[0, 1, 5] = 1  # inside patch (0, 1) but not its top-left pixel
    got = np.asarray(patch_targets(jnp.asarray(mask), 4))
    np.testing.assert_array_equal(got, [[0, 0, 0, 1]])


def test_patch_targets_match_torch_nearest():
    torch = require_torch()
    mask = (np.random.default_rng(0).random((2, 48, 48)) > 0.5).astype(np.float32)
    want = (
        torch.nn.functional.interpolate(torch.from_numpy(mask)[:, None], (3, 3), mode="nearest")[
            :, 0
        ]
        > 0.5
    )
    got = patch_targets(jnp.asarray(mask), 9)
    np.testing.assert_array_equal(np.asarray(got), want.flatten(1).float().numpy())


def _random_case(b: int, seed: int = 0, grid: int = 4, canvas: int = 32):
    rng = np.random.default_rng(seed)
    outputs = {
        "box": jnp.asarray(rng.uniform(0.2, 0.8, (b, 4)), jnp.float32),
        "sim": jnp.asarray(rng.uniform(-1, 1, (b, grid * grid)), jnp.float32),
        "seg_logits": jnp.asarray(rng.uniform(-1, 1, (b, canvas // 2, canvas // 2)), jnp.float32),
    }
    batch = {
        "box": jnp.asarray(rng.uniform(0.2, 0.8, (b, 4)), jnp.float32),
        "mask": jnp.asarray(rng.random((b, canvas, canvas)) > 0.6, jnp.uint8),
    }
    return outputs, batch


ALL_ON = loss_cfg(use_box_loss=True, use_box_mask_constraint=True, use_seg_loss=True)


def test_padded_rows_change_nothing():
    outputs, batch = _random_case(3)
    real_out = {k: v[:2] for k, v in outputs.items()}
    real_batch = {k: v[:2] for k, v in batch.items()}
    padded_batch = dict(batch, valid=jnp.array([1.0, 1.0, 0.0]))
    padded_batch["box"] = padded_batch["box"].at[2].set(0.0)  # degenerate garbage row
    loss_fn = jax.jit(jax.value_and_grad(lambda o, b: oneref_loss(o, b, ALL_ON), has_aux=True))
    (l_real, m_real), g_real = loss_fn(real_out, real_batch)
    (l_pad, m_pad), g_pad = loss_fn(outputs, padded_batch)
    assert float(l_pad) == pytest.approx(float(l_real), rel=1e-6)
    for k in m_real:
        assert float(m_pad[k]) == pytest.approx(float(m_real[k]), rel=1e-6), k
    for k in g_real:
        np.testing.assert_allclose(g_pad[k][:2], g_real[k], rtol=1e-5, atol=1e-8)
        assert np.all(np.asarray(g_pad[k][2]) == 0), k


def test_switches_and_weights():
    outputs, batch = _random_case(2, seed=1)
    _, m = oneref_loss(outputs, batch, ALL_ON)
    assert set(m) == {
        "loss",
        "loss_l1",
        "loss_giou",
        "loss_box_mask_focal",
        "loss_box_mask_dice",
        "loss_seg_focal",
        "loss_seg_dice",
    }
    want = (
        m["loss_l1"]
        + m["loss_giou"]
        + 20 * m["loss_box_mask_focal"]
        + 2 * m["loss_box_mask_dice"]
        + 20 * m["loss_seg_focal"]
        + 2 * m["loss_seg_dice"]
    )
    assert float(m["loss"]) == pytest.approx(float(want), rel=1e-6)
    cfg = loss_cfg(**(OFF | {"use_seg_loss": True, "seg_dice": 5.0}))
    loss, m2 = oneref_loss(outputs, batch, cfg)
    assert set(m2) == {"loss", "loss_seg_focal", "loss_seg_dice"}
    want = 20 * m["loss_seg_focal"] + 5 * m["loss_seg_dice"]
    assert float(loss) == pytest.approx(float(want), rel=1e-6)
    with pytest.raises(KeyError, match="lacks '"):  # no silent default for a missing key
        oneref_loss({"box": outputs["box"]}, batch, {"use_box_loss": True})


def test_full_loss_matches_torch_reference():
    """The reference ``one_ref_loss`` (spec 2.4) rewritten in torch, with all terms on."""
    torch = require_torch()
    F = torch.nn.functional
    outputs, batch = _random_case(3, seed=2)
    t = {k: torch.from_numpy(np.array(v, np.float32)) for k, v in outputs.items()}
    t_box = {k: torch.from_numpy(np.array(v, np.float32)) for k, v in batch.items()}
    nb = 3

    def xyxy(b):
        cx, cy, w, h = b.unbind(-1)
        return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)

    def giou(a, b):
        area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])
        lt, rb = torch.max(a[:, :2], b[:, :2]), torch.min(a[:, 2:], b[:, 2:])
        inter = (rb - lt).clamp(min=0).prod(-1)
        union = area(a) + area(b) - inter
        hull = (torch.max(a[:, 2:], b[:, 2:]) - torch.min(a[:, :2], b[:, :2])).clamp(min=0)
        hull = hull.prod(-1)
        return inter / union - (hull - union) / hull

    def focal(x, y):
        p = x.sigmoid()
        ce = F.binary_cross_entropy_with_logits(x, y, reduction="none")
        p_t = p * y + (1 - p) * (1 - y)
        loss = (0.25 * y + 0.75 * (1 - y)) * ce * (1 - p_t) ** 2
        return loss.mean(1).sum() / nb

    def dice_t(x, y):
        p = x.sigmoid().flatten(1)
        return (1 - (2 * (p * y).sum(1) + 1) / (p.sum(-1) + y.sum(-1) + 1)).sum() / nb

    mask = t_box["mask"][:, None]
    obj = F.interpolate(mask, (4, 4), mode="nearest")[:, 0].flatten(1) > 0.5
    seg = F.interpolate(
        t["seg_logits"][:, None], size=mask.shape[-2:], mode="bilinear", align_corners=False
    ).flatten(1)
    want = {
        "loss_l1": F.l1_loss(t["box"], t_box["box"], reduction="none").sum() / nb,
        "loss_giou": (1 - giou(xyxy(t["box"]), xyxy(t_box["box"]))).sum() / nb,
        "loss_box_mask_focal": focal(t["sim"], obj.float()),
        "loss_box_mask_dice": dice_t(t["sim"], obj.float()),
        "loss_seg_focal": focal(seg, mask.flatten(1)),
        "loss_seg_dice": dice_t(seg, mask.flatten(1)),
    }
    _, got = oneref_loss(outputs, batch, ALL_ON)
    for k, v in want.items():
        assert float(got[k]) == pytest.approx(float(v), rel=1e-5, abs=1e-6), k
