"""Shared pieces of the RAS task tests: a small config from ``configs/ras`` on the tiny RefShapes
fixture, a synthetic non-square scene, and the evaluation pipeline's steps on one example."""

from __future__ import annotations

import numpy as np

from refjax.data import transforms as tf
from refjax.tasks import get_task
from refjax.train.config import load_config
from refjax.train.trainer import resolve_config

SMALL_LLM = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256)
SIZES = dict(clip=32, siglip=32, dinov2=32, convnext=32)


def small_config(data_dir: str, stage: int = 2, arg: str = "tiny,data=tiny", **data):
    """``configs/ras/stage<N>.py:<arg>`` shrunk for tests: a 2-layer d=32 LLaMA, 32-px towers,
    a 32-px canvas, batch 8, resolved (vocabulary from the fixture's tokenizer)."""
    c = load_config(f"configs/ras/stage{stage}.py:{arg}")
    with c.unlocked():
        c.model.llm = dict(SMALL_LLM)
        c.model.image_sizes = dict(SIZES)
        c.model.pe2d_grid = 8
        c.data.update(dict(data_dir=data_dir, image_size=32, pool_max=24, refs_max=2, seg_max=8,
                           atoms_max=64, max_text_len=160 if stage > 1 else 96, batch_size=8,
                           eval_batch_size=8, next_timeout_s=0.0))
        c.data.update(data)
        c.optim.update(warmup_steps=0, schedule="constant")
    return resolve_config(c)


def scene(h: int = 30, w: int = 44, seed: int = 0, n_pool: int = 5) -> dict:
    """A decoded scene (the ``sources.decode_scene`` dict) with a non-square image, three
    objects, a pool (objects, a part, a union, a blob) and four expressions: attribute (one
    target), group (two), hybrid (a reference), no-target."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    masks = np.zeros((3, h, w), np.uint8)
    masks[0, 2:12, 3:15] = 1
    masks[1, 15:27, 20:31] = 1
    masks[2, 5:20, 33:42] = 1
    boxes = np.array([[3, 2, 15, 12], [20, 15, 31, 27], [33, 5, 42, 20]], np.float32)
    pool = [masks[0], masks[1], masks[2], masks[0] * 0, masks[1] | masks[2]]
    pool[3][2:7, 3:15] = 1  # a part of object 0
    blob = np.zeros((h, w), np.uint8)
    blob[20:29, 2:10] = 1
    pool = np.stack((pool + [blob])[:n_pool]).astype(np.uint8)
    exprs = [
        {"id": "e0", "text": "the red square", "kind": "attribute", "targets": [0], "refs": []},
        {"id": "e1", "text": "all blue shapes", "kind": "group", "targets": [1, 2], "refs": []},
        {"id": "e2", "text": "the shape left of <mask-ref>", "kind": "hybrid", "targets": [0],
         "refs": [1]},
        {"id": "e3", "text": "the purple star", "kind": "no-target", "targets": [], "refs": []},
    ]
    from refjax.boxes import mask_ioa

    ioa = np.stack([mask_ioa(pool, np.any(masks[e["targets"]], axis=0) if e["targets"]
                             else np.zeros((h, w), bool)) for e in exprs])
    return {"image_id": f"scene-{seed}", "image": img, "boxes": boxes, "masks": masks,
            "expressions": exprs, "pool_masks": pool, "pool_ioa": ioa, "caption": "a scene."}


def example_row(config, tokenizer, ex: dict, train: bool = False, rng=None):
    """An expanded example through the pipeline's steps (prepare -> letterbox -> tokenize ->
    layout -> row) of ``config``'s RAS data task; returns ``(row, data_task, laid_out)``."""
    data = get_task("ras").data_task(config)
    x = data.prepare(ex)
    x = tf.eval_letterbox(x, data.size, tuple(config.data.image_mean),
                          tuple(config.data.image_std))
    x = data.tokenize(x, tokenizer, False)
    x = data.layout(x, train, rng)
    x["expr_index"] = 0
    return data.row(x), data, x
