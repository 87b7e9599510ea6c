"""refjax.masking: OneRef referring-aware image masking and referring MLM text masking."""

import numpy as np
import pytest

from refjax import masking


def test_image_mask_counts_match_oneref():
    rng = np.random.default_rng(0)
    # Outside the region: 202 of 576 masked on the whole grid; the region gets its own ratio.
    box = np.array([0.5, 0.5, 0.25, 0.25])  # patch units: 12 +- 3 -> [9, 15) expanded to [8, 16)
    assert masking.box_region(box, 24) == (8, 16, 8, 16)
    m = masking.referring_image_mask(box, 24, rng).reshape(24, 24)
    region = m[8:16, 8:16]
    assert region.sum() == 64 - int(64 * 0.25)  # 48
    # No region: exactly 576 - int(576 * 0.65) = 202.
    m0 = masking.referring_image_mask(np.array([0.5, 0.5, 0.0, 0.0]), 24, rng, margin=0)
    assert m0.sum() == 202 and m0.dtype == bool and m0.shape == (576,)


def test_image_mask_region_truncation_and_clip():
    # cx=0.02*24=0.48, w=0.04*24=0.96 -> x1=int(0)=0, x2=int(0.96)=0 -> expanded [0, 1) clipped
    assert masking.box_region(np.array([0.02, 0.98, 0.04, 0.04]), 24) == (22, 24, 0, 1)
    assert masking.box_region(np.array([0.5, 0.5, 1.0, 1.0]), 8) == (0, 8, 0, 8)


def test_image_mask_deterministic_and_random():
    box = np.array([0.3, 0.6, 0.2, 0.3])
    a = masking.referring_image_mask(box, 8, np.random.default_rng(5))
    b = masking.referring_image_mask(box, 8, np.random.default_rng(5))
    c = masking.referring_image_mask(box, 8, np.random.default_rng(6))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("n_tok,expected", [(2, 1), (3, 1), (5, 2), (10, 4), (64, 25)])
def test_num_text_masked(n_tok, expected):
    assert masking.num_text_masked(n_tok, 0.4) == expected


def test_text_mask_priority_bos_eos_and_mix():
    ids = np.array([0, 10, 11, 12, 13, 14, 15, 2, 1, 1], np.int32)
    n_tok = 8
    counts = np.zeros(10)
    replaced = {"mask": 0, "keep": 0, "random": 0}
    for seed in range(400):
        out, m = masking.text_mask(
            ids, n_tok, np.random.default_rng(seed), mask_id=99, priority=[4]
        )
        assert m.sum() == masking.num_text_masked(n_tok, 0.4) == 3
        assert m[4] == 1 and m[0] == 0 and m[n_tok:].sum() == 0  # priority first; BOS/pads never
        np.testing.assert_array_equal(out[m == 0], ids[m == 0])
        counts += m
        for p in np.nonzero(m)[0]:
            key = "mask" if out[p] == 99 else "keep" if out[p] == ids[p] else "random"
            replaced[key] += 1
            assert key != "random" or 3 <= out[p] <= 99
    assert counts[n_tok - 1] > 0  # EOS is maskable
    total = sum(replaced.values())
    assert 0.75 < replaced["mask"] / total < 0.85
    assert 0.05 < replaced["keep"] / total < 0.16 and replaced["random"] > 0


def test_text_mask_priority_capped_by_budget():
    ids = np.arange(6, dtype=np.int32)
    out, m = masking.text_mask(ids, 6, np.random.default_rng(0), mask_id=50, priority=[2, 3, 4, 0])
    assert m.sum() == 2 and m[2] == 1 and m[3] == 1  # budget int(5*0.4+0.5)=2, in order


# ----------------------------------------------------------------------------- MRefM statistics
@pytest.mark.parametrize("grid", [8, 24])
def test_referring_mask_counts_generalise_to_the_grid(grid):
    n = grid * grid
    outside = n - int(n * 0.65)  # 202 of 576; 23 of 64
    assert outside == {8: 23, 24: 202}[grid]
    rng = np.random.default_rng(1)
    box = np.array([0.4, 0.55, 0.3, 0.2])
    y1, y2, x1, x2 = masking.box_region(box, grid)
    lr = (y2 - y1) * (x2 - x1)
    assert masking.region_size(box, grid) == lr
    counts = []
    for _ in range(400):
        m = masking.referring_image_mask(box, grid, rng).reshape(grid, grid)
        assert m[y1:y2, x1:x2].sum() == lr - int(lr * (1 - 0.75))  # exact inside the region
        assert m.sum() - m[y1:y2, x1:x2].sum() <= outside
        counts.append(m.sum())
    # The overall count: the whole-grid draw survives outside the region with prob 1 - L_r/n.
    expected = masking.expected_referring_count(box, grid)
    assert expected == pytest.approx(outside * (1 - lr / n) + lr - int(lr * 0.25))
    sem = np.std(counts) / np.sqrt(len(counts))
    assert abs(np.mean(counts) - expected) < 4 * sem + 1e-9


def test_mvlm_random_mask_same_count_no_region():
    grid, box = 24, np.array([0.3, 0.3, 0.2, 0.25])
    y1, y2, x1, x2 = masking.box_region(box, grid)
    rng_a, rng_b = np.random.default_rng(3), np.random.default_rng(3)
    inside_ref, inside_rand, counts = [], [], []
    for _ in range(300):
        ref = masking.referring_image_mask(box, grid, rng_a).reshape(grid, grid)
        rand = masking.random_image_mask(box, grid, rng_b).reshape(grid, grid)
        counts.append(rand.sum())
        inside_ref.append(ref[y1:y2, x1:x2].mean())
        inside_rand.append(rand[y1:y2, x1:x2].mean())
    expected = masking.expected_referring_count(box, grid)
    sem = np.std(counts) / np.sqrt(len(counts))
    assert abs(np.mean(counts) - expected) < 4 * sem  # same overall ratio alpha
    alpha = expected / grid**2
    assert np.mean(inside_ref) == pytest.approx(0.75, abs=0.01)
    assert abs(np.mean(inside_rand) - alpha) < 0.03  # no preference for the box region
    assert np.mean(inside_rand) < 0.6


def test_mrefm_stage_random_masking_ignores_priority():
    from refjax.data.stages import MRefMMask

    ids = np.array([0, 10, 11, 12, 13, 14, 15, 16, 17, 2, 1, 1], np.int32)
    ex = {"box": np.array([8.0, 8.0, 40.0, 40.0], np.float32), "text_ids": ids, "n_tok": 10,
          "mlm_priority": [3]}
    hits = {False: 0, True: 0}
    for flag in (False, True):
        stage = MRefMMask(64, 16, mask_id=99, random_masking=flag)
        for seed in range(100):
            out = stage.random_map(dict(ex), np.random.default_rng(seed))
            assert out["mlm_mask"].sum() == masking.num_text_masked(10, 0.4)
            assert out["mim_mask"].shape == (16,)
            hits[flag] += int(out["mlm_mask"][3])
    assert hits[False] == 100 and hits[True] < 80  # priority first only without random masking
