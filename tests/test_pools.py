"""Candidate pools for RAS prediction: COCO-RLE JSON files, pool checks, the automatic pool."""

import json
import time
import warnings

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from refjax.boxes import mask_iou
from refjax.data import refshapes as rs
from refjax.data.errors import BadRecordError
from refjax.data.pools import auto_pool, check_pool, load_pool_json

H, W = 23, 31


def _masks(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.zeros((n, H, W), np.uint8)
    for i in range(n):
        y, x = rng.integers(0, H - 5), rng.integers(0, W - 5)
        out[i, y : y + rng.integers(2, 12), x : x + rng.integers(2, 15)] = 1
        out[i] |= (rng.random((H, W)) < 0.05).astype(np.uint8)  # ragged runs
    return out


def _rle(m: np.ndarray) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        r = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    return {"size": [int(v) for v in r["size"]], "counts": r["counts"].decode("ascii")}


def _write(tmp_path, data, name="pool.json"):
    p = tmp_path / name
    p.write_text(json.dumps(data))
    return p


@pytest.mark.parametrize("layout", ["sam", "bare", "annotations"])
def test_rle_json_round_trip(tmp_path, layout):
    masks = _masks(5)
    rles = [_rle(m) for m in masks]
    if layout == "sam":  # SamAutomaticMaskGenerator(output_mode="coco_rle") records
        data = [
            {
                "segmentation": r,
                "area": int(m.sum()),
                "bbox": [0, 0, 1, 1],
                "predicted_iou": 0.9,
                "point_coords": [[1.0, 2.0]],
                "stability_score": 0.95,
                "crop_box": [0, 0, W, H],
            }
            for r, m in zip(rles, masks)
        ]
    elif layout == "bare":
        data = rles
    else:
        data = {"annotations": [{"id": i, "segmentation": r} for i, r in enumerate(rles)]}
    out = load_pool_json(_write(tmp_path, data), H, W)
    assert out.dtype == np.uint8 and out.shape == (5, H, W)
    np.testing.assert_array_equal(out, masks)


def test_uncompressed_counts_are_read(tmp_path):
    m = _masks(1, seed=3)[0]
    flat = m.T.ravel()  # column-major runs, starting with zeros
    counts, cur, run = [], 0, 0
    for v in flat:
        if v == cur:
            run += 1
        else:
            counts.append(run)
            cur, run = v, 1
    counts.append(run)
    out = load_pool_json(_write(tmp_path, [{"size": [H, W], "counts": counts}]), H, W)
    np.testing.assert_array_equal(out[0], m)


def _error(path, h=H, w=W) -> BadRecordError:
    with pytest.raises(BadRecordError) as ei:
        load_pool_json(path, h, w)
    return ei.value


def test_json_errors_name_file_and_field(tmp_path):
    good = [_rle(m) for m in _masks(3)]
    # A mask of the wrong size (the pool of another image).
    wrong = [good[0], {"segmentation": _rle(np.zeros((H + 1, W), np.uint8))}]
    e = _error(_write(tmp_path, wrong, "wrong.json"))
    assert e.record_id.endswith("wrong.json") and e.field == "[1].segmentation"
    assert "wrong size" in str(e)
    # Counts that do not decode: a bad character, and counts that do not cover H*W.
    bad_char = [good[0], good[1], {"size": [H, W], "counts": "\x7f\x7f"}]
    e = _error(_write(tmp_path, bad_char, "badchar.json"))
    assert e.field == "[2]" and "does not decode" in str(e)
    short = {"annotations": [{"segmentation": {"size": [H, W], "counts": [3, 4]}}]}
    e = _error(_write(tmp_path, short, "short.json"))
    assert e.field == "annotations[0].segmentation" and "H*W" in str(e)
    # Empty pools.
    e = _error(_write(tmp_path, [], "empty.json"))
    assert e.record_id.endswith("empty.json") and e.field == "masks" and "empty" in str(e)
    e = _error(_write(tmp_path, {"annotations": []}, "empty2.json"))
    assert e.field == "annotations" and "empty" in str(e)
    # Not a pool at all / not JSON / no file.
    assert _error(_write(tmp_path, {"masks": good}, "obj.json")).field == "annotations"
    (tmp_path / "broken.json").write_text("[{")
    assert _error(tmp_path / "broken.json").field == "file"
    e = _error(tmp_path / "missing.json")
    assert e.field == "file" and "missing.json" in e.record_id


def test_check_pool():
    masks = _masks(4)
    out = check_pool(masks * 7, H, W, "img:1")  # values > 1 become 1
    np.testing.assert_array_equal(out, masks)
    out = check_pool(list(masks), H, W, "img:1")
    np.testing.assert_array_equal(out, masks)
    with pytest.raises(BadRecordError) as ei:
        check_pool([masks[0], np.zeros((H, W + 2))], H, W, "img:7")
    assert ei.value.record_id == "img:7" and ei.value.field == "pool_masks[1]"
    assert "image size" in str(ei.value)
    with pytest.raises(BadRecordError) as ei:
        check_pool(np.zeros((0, H, W), np.uint8), H, W, "img:8")
    assert ei.value.record_id == "img:8" and ei.value.field == "pool_masks"
    assert "empty" in str(ei.value)
    with pytest.raises(BadRecordError, match="pool_masks"):
        check_pool(np.zeros((H, W)), H, W, "img:9")  # one mask, not a stack


def _synthetic(seed: int, size: int = 96):
    """Coloured shapes (distinct saturated colours, pixel noise, soft rims) on a two-colour
    gradient with noise; returns the image and the object masks."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    t = (xx * np.cos(0.7) + yy * np.sin(0.7)) / (size * 1.5)
    c0, c1 = np.array([90.0, 120, 150]), np.array([170.0, 150, 110])
    img = c0 * (1 - t[..., None]) + c1 * t[..., None] + rng.normal(0, 2, (size, size, 1))
    colours = [(220, 40, 40), (40, 180, 60), (50, 70, 220), (240, 220, 40)]
    objs = []
    occupied = np.zeros((size, size), bool)
    for k, col in enumerate(colours):
        for _ in range(100):
            r = rng.integers(7, 15)
            cy, cx = rng.integers(r + 1, size - r - 1, 2)
            if k % 2:  # disc
                m = (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
            else:  # square
                m = (np.abs(yy - cy) <= r) & (np.abs(xx - cx) <= r)
            grown = m | np.roll(m, 2, 0) | np.roll(m, -2, 0) | np.roll(m, 2, 1) | np.roll(m, -2, 1)
            if not (grown & occupied).any():
                break
        occupied |= m
        # Solid colour with pixel noise, and a one-pixel anti-aliased rim (half object, half
        # background) just outside the object.
        rim = (np.roll(m, 1, 0) | np.roll(m, -1, 0) | np.roll(m, 1, 1) | np.roll(m, -1, 1)) & ~m
        img[rim] = 0.5 * img[rim] + 0.5 * np.asarray(col, np.float64)
        img[m] = np.asarray(col, np.float64) + rng.normal(0, 4, (int(m.sum()), 3))
        objs.append(m)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), np.stack(objs)


@pytest.mark.parametrize("seed", [0, 1])
def test_auto_pool_recovers_synthetic_objects(seed):
    image, objs = _synthetic(seed)
    t0 = time.perf_counter()
    pool = auto_pool(image, max_masks=24)
    took = time.perf_counter() - t0
    assert pool.dtype == np.uint8 and pool.shape[1:] == image.shape[:2]
    assert 1 <= len(pool) <= 24
    areas = pool.reshape(len(pool), -1).sum(1).astype(np.int64)
    assert np.all(np.diff(areas) <= 0)  # sorted by area, largest first
    best = [float(mask_iou(pool, o[None])[2].max()) for o in objs]
    print(f"seed {seed}: {len(pool)} masks, best IoU per object {np.round(best, 3)}, {took:.2f}s")
    assert min(best) > 0.8, best
    # Deduplicated: no two pool members with IoU > 0.9.
    for i in range(len(pool)):
        _, _, iou = mask_iou(pool[i + 1 :], pool[i][None])
        assert not np.any(iou > 0.9)


def test_auto_pool_on_refshapes_scenes_and_cap():
    cfg = rs.get_config("tiny")
    best = []
    for i in range(3):
        scene = rs.generate_scene(cfg, "val", i)
        pool = auto_pool(scene.image)
        best += [float(mask_iou(pool, m[None])[2].max()) for m in scene.masks]
    print(f"RefShapes val 0-2: {len(best)} objects, min best IoU {min(best):.3f}")
    assert np.mean(np.array(best) > 0.8) >= 0.9
    image, _ = _synthetic(0)
    assert len(auto_pool(image, max_masks=3)) == 3
    # Large images are segmented at work_size; masks come back at full resolution.
    big = np.repeat(np.repeat(image, 3, axis=0), 3, axis=1)
    pool = auto_pool(big, max_masks=8, work_size=128)
    assert pool.shape[1:] == big.shape[:2]
    # A uniform image still gives a (whole-image) pool.
    flat = auto_pool(np.full((20, 30, 3), 128, np.uint8))
    assert flat.shape == (1, 20, 30) and flat.all()
    with pytest.raises(ValueError, match="uint8"):
        auto_pool(np.zeros((8, 8), np.uint8))
