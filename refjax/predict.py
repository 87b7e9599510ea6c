"""Inference API: a box (and a mask for RES models) from an image and a referring expression.

```python
from refjax.predict import Predictor
p = Predictor.from_workdir("runs/demo")
pred = p.predict(image_uint8_hwc, "the small red circle")  # box_xyxy, mask, score
p.draw(image_uint8_hwc, pred, "the small red circle").save("pred.png")
```

Preprocessing is the data pipeline's eval path (``transforms.expand`` -> ``eval_letterbox`` ->
``tokenize``), so a prediction sees exactly what evaluation sees; outputs are mapped back to
original pixels through the same ``Letterbox``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from PIL import Image

from refjax import boxes as bx
from refjax.data import transforms as tf
from refjax.data.errors import BadRecordError
from refjax.data.pipeline import cfg_get
from refjax.evaluate import draw as drawing
from refjax.evaluate.metrics import res_pred_mask

Prediction = dict[str, Any]


def letterbox_of(row: np.ndarray, size: int) -> bx.Letterbox:
    """The ``Letterbox`` of an example's ``letterbox`` row ``[orig_w, orig_h, new_w, new_h,
    left, top]`` (as written by ``transforms.eval_letterbox``)."""
    ow, oh, nw, nh, left, top = (int(v) for v in np.asarray(row))
    return bx.Letterbox(ow, oh, size, size / max(ow, oh), nw, nh, left, top)


def canvas_box_to_original(box_cxcywh: np.ndarray, lb: bx.Letterbox) -> np.ndarray:
    """Model box (cxcywh normalised to the canvas) -> original-pixel xyxy, clipped to the image.

    The box is clamped to the canvas as the evaluation does, then mapped through
    ``lb.inverse_boxes`` in float64.
    """
    canvas = np.clip(bx.cxcywh_to_xyxy(np.asarray(box_cxcywh, np.float64)), 0.0, 1.0) * lb.size
    return np.asarray(bx.clip_boxes(lb.inverse_boxes(canvas), lb.orig_w, lb.orig_h))


def tokenizer_path(config: Any) -> str:
    """``config.data.tokenizer_path``, else the dataset's own ``beit3.spm``."""
    path = cfg_get(config, "tokenizer_path")
    if path is None:
        from refjax.data.sources import dataset_dir
        from refjax.data.tokenizers import BEIT3_FILE

        ds = dataset_dir(
            cfg_get(config, "dataset"),
            cfg_get(config, "data_dir"),
            cfg_get(config, "dataset_config"),
        )
        path = f"{ds}/{BEIT3_FILE}"
    return str(path)


class Predictor:
    """A OneRef model, its variables and config (``config.data``: image_size, max_text_len,
    image_mean/std) plus a BEiT-3 tokenizer; jitted forward, host-side pre/post-processing."""

    def __init__(self, model: nn.Module, variables: Mapping, config: Any, tokenizer: Any):
        self.model = model
        self.variables = nn.unbox(variables)
        self.config = config
        self.tokenizer = tokenizer
        self.size = int(cfg_get(config, "image_size"))
        self.max_len = int(cfg_get(config, "max_text_len"))
        self.mean = tuple(cfg_get(config, "image_mean") or tf.IMAGENET_MEAN)
        self.std = tuple(cfg_get(config, "image_std") or tf.IMAGENET_STD)
        self._forward = jax.jit(self._apply)

    @classmethod
    def from_workdir(cls, workdir: str, step: int | None = None) -> Predictor:
        """The model of a training run (latest checkpoint, or ``step``)."""
        from refjax.data.tokenizers import load_beit3_tokenizer
        from refjax.train.trainer import load_for_inference

        model, variables, config = load_for_inference(workdir, step=step)
        return cls(model, variables, config, load_beit3_tokenizer(tokenizer_path(config)))

    def _apply(self, variables, ids, pad, image) -> dict[str, jax.Array]:
        out, _ = self.model.apply(variables, ids, pad, image)
        res = {"box": out["box"], "score": jnp.max(out["sim"], axis=-1)}
        if "seg_logits" in out:
            res["mask"] = res_pred_mask(out["seg_logits"], (self.size, self.size))
        return res

    def prepare(self, image: np.ndarray, text: str, record_id: str = "input") -> tf.Example:
        """The eval example of (image, text): letterboxed, normalised, tokenized."""
        if not isinstance(text, str) or not text.strip():
            raise BadRecordError(record_id, "text", f"empty text {text!r}")
        if not isinstance(image, np.ndarray):
            raise BadRecordError(record_id, "image", f"expected a numpy array, got {type(image)}")
        scene = {
            "image_id": record_id,
            "image": image,
            "expressions": [{"id": 0, "text": text, "targets": []}],
        }
        ex = tf.expand(scene, 0)
        ex = tf.eval_letterbox(ex, self.size, self.mean, self.std)
        return tf.tokenize(ex, self.tokenizer, self.max_len)

    def predict_batch(self, images: Sequence[np.ndarray], texts: Sequence[str]) -> list[Prediction]:
        """``predict`` for several (image, text) pairs in one forward pass."""
        if len(images) != len(texts) or not images:
            raise ValueError(f"need equally many images and texts, got {len(images)}, {len(texts)}")
        exs = [self.prepare(im, t, f"input[{i}]") for i, (im, t) in enumerate(zip(images, texts))]
        out = self._forward(
            self.variables,
            jnp.asarray(np.stack([e["text_ids"] for e in exs])),
            jnp.asarray(np.stack([e["text_padding"] for e in exs])),
            jnp.asarray(np.stack([e["image"] for e in exs])),
        )
        out = jax.device_get(out)
        preds = []
        for i, ex in enumerate(exs):
            lb = letterbox_of(ex["letterbox"], self.size)
            mask = out.get("mask")
            preds.append(
                {
                    "box_xyxy": canvas_box_to_original(out["box"][i], lb).astype(np.float32),
                    "box_cxcywh_canvas": np.asarray(out["box"][i], np.float32),
                    "mask": None if mask is None else lb.inverse_mask(np.asarray(mask[i], bool)),
                    "score": float(out["score"][i]),
                }
            )
        return preds

    def predict(self, image: np.ndarray, text: str) -> Prediction:
        """Box and mask for one uint8 (H, W, 3) image and a referring expression.

        Returns ``box_xyxy`` float32 (4,) in original pixels, ``mask`` bool (H, W) (None for
        REC-only models), ``score`` = the largest text-patch cosine similarity (in [-1, 1],
        a relative, uncalibrated confidence) and ``box_cxcywh_canvas`` (the raw model box).
        Empty text or a bad image raise ``BadRecordError`` naming the field.
        """
        return self.predict_batch([image], [text])[0]

    @staticmethod
    def draw(image: np.ndarray, prediction: Mapping[str, Any], text: str = "") -> Image.Image:
        """``image`` (same size) with the predicted box, the translucent mask and the text."""
        img = drawing.overlay(image, box=prediction.get("box_xyxy"), mask=prediction.get("mask"))
        return drawing.caption(img, text) if text else img
