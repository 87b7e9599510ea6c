"""Evaluation reports: the per-kind table and the prediction grid."""

import numpy as np
import pytest

from refjax.evaluate import draw
from refjax.evaluate.metrics import MetricAccumulator
from refjax.evaluate.report import per_kind_table, prediction_grid, split_kinds


def _result() -> dict:
    acc = MetricAccumulator(kinds=["attribute", "spatial"])
    m = {
        "correct": np.array([1, 0, 1, 1]),
        "mask_iou": np.array([0.5, 0.25, 1.0, 0.75]),
        "mask_inter": np.array([1.0, 1.0, 4.0, 3.0]),
        "mask_union": np.array([2.0, 4.0, 4.0, 4.0]),
    }
    acc.update(m, kinds=["attribute", "attribute", "spatial", "spatial"])
    return acc.result()


def test_split_kinds():
    rows = split_kinds(_result())
    assert rows["overall"]["acc@0.5"] == pytest.approx(0.75)
    assert rows["attribute"] == pytest.approx(
        {"count": 2, "acc@0.5": 0.5, "miou": 0.375, "oiou": 2 / 6}
    )


def test_per_kind_table():
    table = per_kind_table({"val": _result(), "testA": {"count": 3.0, "acc@0.5": 1 / 3}})
    lines = table.splitlines()
    assert lines[0].split() == ["split", "kind", "count", "Acc@0.5", "mIoU", "oIoU"]
    rows = {tuple(line.split()[:2]): line.split()[2:] for line in lines[2:]}
    assert rows[("val", "overall")] == ["4", "75.00%", "62.50%", "64.29%"]
    assert rows[("val", "attribute")] == ["2", "50.00%", "37.50%", "33.33%"]
    assert rows[("testA", "overall")] == ["3", "33.33%", "-", "-"]
    assert list(rows)[:2] == [("val", "overall"), ("val", "attribute")]
    flat = per_kind_table(_result())
    assert flat.splitlines()[2].split()[:2] == ["all", "overall"]


def test_prediction_grid():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (64, 96, 3), dtype=np.uint8) for _ in range(5)]
    mask = np.zeros((64, 96), bool)
    mask[10:30, 20:50] = True
    preds = [{"box_xyxy": np.array([20, 10, 50, 30.0]), "mask": mask}] * 4 + [
        {"box_xyxy": np.array([0, 0, 96, 64.0]), "mask": None}
    ]
    gts = [{"box_xyxy": np.array([22, 12, 48, 28.0]), "mask": mask}] * 5
    texts = ["the small red circle left of a very long description of the blue box"] * 5
    grid = prediction_grid(images, preds, gts, texts, cols=4, cell=128)
    assert grid.mode == "RGB"
    assert grid.width == 4 + 4 * (128 + 4)  # 4 columns of 128-px cells
    assert grid.height > 2 * 128  # 2 rows, each with a caption strip
    arr = np.asarray(grid)
    assert (arr == draw.PRED_COLOR).all(-1).any() and (arr == draw.GT_COLOR).all(-1).any()
    with pytest.raises(ValueError, match="equally many"):
        prediction_grid(images, preds[:2], gts, texts)


def test_overlay_and_contour():
    img = np.zeros((10, 12, 3), np.uint8)
    m = np.zeros((10, 12), bool)
    m[2:6, 3:8] = True
    c = draw.contour(m)
    assert c.sum() == 2 * 5 + 2 * 2 and not c[3:5, 4:7].any()
    out = np.asarray(draw.overlay(img, mask=m, gt_mask=m))
    assert (out[c] == draw.GT_COLOR).all() and (out[3, 4] > 0).any() and (out[0, 0] == 0).all()
    with pytest.raises(ValueError, match="mask"):
        draw.overlay(img, mask=np.zeros((3, 3), bool))


def test_table_accepts_the_trainer_format():
    flat = _result()
    nested = {
        "overall": {k: v for k, v in flat.items() if "/" not in k},
        "per_kind": {"spatial": {"count": 2.0, "acc@0.5": 1.0, "miou": 0.875, "oiou": 7 / 8}},
    }
    assert split_kinds(nested)["spatial"]["acc@0.5"] == 1.0
    lines = per_kind_table({"val": nested}).splitlines()[2:]
    assert [line.split()[1] for line in lines] == ["overall", "spatial"]
    assert lines[1].split()[2:] == ["2", "100.00%", "87.50%", "87.50%"]
