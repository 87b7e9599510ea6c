"""Letterbox geometry with non-integer scales, against values worked out by hand.

Each expected value is derived in the comments from OneRef's rules: resize the long side to
``size`` with ``new = round(orig * size / long_side)`` (Python ``round``), pad with offsets
``round((size - new) / 2 - 0.1)``, map boxes with the *actual* ratios ``new / orig`` per axis,
and map masks back by nearest sampling at pixel centres, ``src = floor((i + 0.5) * new / orig)``.
A dropped ``+ 0.5``, ``int`` for ``round``, a missing ``- 0.1``, the nominal ratio for the
actual one, or a swapped axis changes at least one literal below.
"""

from __future__ import annotations

import numpy as np
import pytest

from refjax.boxes import Letterbox

SIZE = 64


def coded_canvas() -> np.ndarray:
    """canvas[y, x] = 1000 * y + x, so a resampled pixel tells where it was read from."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    return (1000 * yy + xx).astype(np.int32)


# ------------------------------------------------------------- landscape 96 x 31 (W x H)
# r = 64 / 96 = 2/3.  new_w = round(96 * 2/3) = round(64.0) = 64;
# new_h = round(31 * 2/3) = round(20.667) = 21      (int() would give 20).
# left = round((64 - 64) / 2 - 0.1) = round(-0.1) = 0;
# top  = round((64 - 21) / 2 - 0.1) = round(21.4) = 21   (without - 0.1: round(21.5) = 22,
#        and with new_h = 20: round(21.9) = 22).
LAND = Letterbox.centered(96, 31, SIZE)


def test_landscape_letterbox_fields():
    assert (LAND.new_w, LAND.new_h, LAND.left, LAND.top) == (64, 21, 0, 21)
    assert LAND.scale == pytest.approx(2 / 3)


def test_landscape_boxes():
    # sx = 64 / 96 = 2/3, sy = 21 / 31 (the actual ratio, not r = 2/3).
    # x: 12 * 2/3 = 8.0;  60 * 2/3 = 40.0
    # y: 3.1 * 21 / 31 = 65.1 / 31 = 2.1 -> + 21 = 23.1;  24.8 * 21 / 31 = 520.8 / 31 = 16.8
    #    -> + 21 = 37.8   (with sy = 2/3 it would be 23.0667 and 37.5333)
    box = np.array([12.0, 3.1, 60.0, 24.8])
    out = LAND.forward_boxes(box)
    np.testing.assert_allclose(out, [8.0, 23.1, 40.0, 37.8], rtol=0, atol=1e-9)
    np.testing.assert_allclose(LAND.inverse_boxes(out), box, rtol=0, atol=1e-9)
    # a canvas box back to the original: x (16 - 0) * 3/2 = 24, y (31.5 - 21) * 31/21 = 15.5
    np.testing.assert_allclose(
        LAND.inverse_boxes(np.array([16.0, 31.5, 48.0, 42.0])), [24.0, 15.5, 72.0, 31.0],
        rtol=0, atol=1e-9,
    )


def test_landscape_inverse_mask():
    # Rows: src = floor((i + 0.5) * 21 / 31), canvas row = 21 + src.
    #   i=0: 0.339 -> 0;  i=1: 1.016 -> 1  (without +0.5: 0.677 -> 0);  i=2: 1.694 -> 1
    #   (rounding instead of floor: 2);  i=3: 2.371 -> 2;  i=4: 3.048 -> 3;  i=5: 3.726 -> 3;
    #   ... i=30: 20.661 -> 20 (the last content row, canvas row 41).
    ys = [0, 1, 1, 2, 3, 3, 4, 5, 5, 6, 7, 7, 8, 9, 9, 10, 11, 11, 12, 13, 13, 14, 15, 15, 16,
          17, 17, 18, 19, 19, 20]
    # Columns: src = floor((j + 0.5) * 64 / 96) = floor((2j + 1) / 3): j = 3k -> 2k,
    #   j = 3k + 1 -> 2k + 1 (exactly (6k + 3) / 3), j = 3k + 2 -> 2k + 1 (2k + 1.667).
    #   Without +0.5, j = 1 would read column 0.
    xs = [2 * (j // 3) + (j % 3 > 0) for j in range(96)]
    assert xs[:9] == [0, 1, 1, 2, 3, 3, 4, 5, 5] and xs[-1] == 63
    out = LAND.inverse_mask(coded_canvas())
    assert out.shape == (31, 96) and out.dtype == np.int32
    np.testing.assert_array_equal(out[:, 0], [1000 * (21 + y) for y in ys])
    np.testing.assert_array_equal(out[0], [21000 + x for x in xs])
    np.testing.assert_array_equal(out, 1000 * (21 + np.array(ys))[:, None] + np.array(xs))


# --------------------------------------------------------------- portrait 37 x 100 (W x H)
# r = 64 / 100 = 0.64.  new_w = round(37 * 0.64) = round(23.68) = 24  (int() would give 23);
# new_h = 64.  left = round((64 - 24) / 2 - 0.1) = round(19.9) = 20  (int() would give 19);
# top = round(-0.1) = 0.
PORT = Letterbox.centered(37, 100, SIZE)


def test_portrait_letterbox_fields_and_boxes():
    assert (PORT.new_w, PORT.new_h, PORT.left, PORT.top) == (24, 64, 20, 0)
    # sx = 24 / 37 (actual; the nominal 0.64 would give x1 = 23.2), sy = 64 / 100 = 0.64.
    # x1 = 5 * 24 / 37 + 20 = 120 / 37 + 20 = 23.243243...;  x2 = 720 / 37 + 20 = 39.459459...
    # y1 = 10 * 0.64 = 6.4;  y2 = 90 * 0.64 = 57.6
    out = PORT.forward_boxes(np.array([5.0, 10.0, 30.0, 90.0]))
    np.testing.assert_allclose(
        out, [20 + 120 / 37, 6.4, 20 + 720 / 37, 57.6], rtol=0, atol=1e-9
    )
    assert out[0] == pytest.approx(23.243243, abs=1e-6)
    assert out[2] == pytest.approx(39.459459, abs=1e-6)


def test_portrait_inverse_mask():
    # Columns: src = floor((j + 0.5) * 24 / 37), canvas column = 20 + src.
    #   j=0: 0.324 -> 0;  j=1: 0.973 -> 0;  j=2: 1.622 -> 1;  j=3: 2.270 -> 2  (without +0.5:
    #   1.946 -> 1);  j=4: 2.919 -> 2;  j=5: 3.568 -> 3;  ... j=36: 23.676 -> 23.
    xs = [0, 0, 1, 2, 2, 3, 4, 4, 5, 6, 6, 7, 8, 8, 9, 10, 10, 11, 12, 12, 13, 13, 14, 15, 15,
          16, 17, 17, 18, 19, 19, 20, 21, 21, 22, 23, 23]
    # Rows: src = floor((i + 0.5) * 0.64): i=0: 0.32 -> 0;  i=1: 0.96 -> 0;  i=2: 1.6 -> 1;
    #   i=3: 2.24 -> 2;  i=15: 9.92 -> 9;  i=16: 10.56 -> 10;  i=99: 63.68 -> 63.
    ys_some = {0: 0, 1: 0, 2: 1, 3: 2, 15: 9, 16: 10, 99: 63}
    out = PORT.inverse_mask(coded_canvas())
    assert out.shape == (100, 37)
    np.testing.assert_array_equal(out[0], [20 + x for x in xs])
    for i, y in ys_some.items():
        assert out[i, 0] == 1000 * y + 20, i


def test_portrait_inverse_mask_of_a_bool_mask_keeps_dtype_and_batch():
    # Canvas columns 20..43 hold the image; mark canvas columns 21 and 22 (content columns
    # 1 and 2). Original columns reading content column 1: j=2 only; column 2: j=3, 4.
    canvas = np.zeros((2, SIZE, SIZE), bool)
    canvas[1, :, 21:23] = True
    out = PORT.inverse_mask(canvas)
    assert out.shape == (2, 100, 37) and out.dtype == bool
    assert not out[0].any()
    assert np.flatnonzero(out[1].any(axis=0)).tolist() == [2, 3, 4]
    assert out[1, :, 2:5].all()


# -------------------------------------------------------------- upscale 40 x 25 (W x H)
# r = 64 / 40 = 1.6.  new_w = 64, new_h = round(25 * 1.6) = 40; left = 0;
# top = round((64 - 40) / 2 - 0.1) = round(11.9) = 12.
UP = Letterbox.centered(40, 25, SIZE)


def test_upscale_letterbox():
    assert (UP.new_w, UP.new_h, UP.left, UP.top) == (64, 40, 0, 12)
    # x: 2.5 * 1.6 = 4.0, 37.5 * 1.6 = 60.0;  y: 1 * 1.6 + 12 = 13.6, 24 * 1.6 + 12 = 50.4
    np.testing.assert_allclose(
        UP.forward_boxes(np.array([2.5, 1.0, 37.5, 24.0])), [4.0, 13.6, 60.0, 50.4],
        rtol=0, atol=1e-9,
    )
    # Rows: src = floor((i + 0.5) * 1.6): i=0: 0.8 -> 0;  i=1: 2.4 -> 2  (without +0.5:
    #   1.6 -> 1);  i=2: 4.0 -> 4;  i=3: 5.6 -> 5;  i=4: 7.2 -> 7;  i=24: 39.2 -> 39.
    out = UP.inverse_mask(coded_canvas())
    assert out.shape == (25, 40)
    assert out[:5, 0].tolist() == [12000, 14000, 16000, 17000, 19000]
    assert out[24, 0] == 1000 * (12 + 39)
    # Columns the same way (40 -> 64 is also x1.6): j = 0..4 -> 0, 2, 4, 5, 7; j = 39 -> 63.
    assert out[0, :5].tolist() == [12000, 12002, 12004, 12005, 12007]
    assert out[0, 39] == 12000 + 63
