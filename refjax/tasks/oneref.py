"""OneRef REC (box) and RES (mask) transfer tasks (spec/oneref.md 2 and 4).

Registered as ``rec`` and ``res``. The model is ``refjax.models.oneref.OneRef`` (BEiT-3 + the
referring heads), the loss ``refjax.losses.oneref.oneref_loss`` on ``config.loss``, the metrics
Acc@0.5 / mIoU / oIoU (``refjax.evaluate.metrics``) overall and per expression kind.

The box-mask constraint's target (spec 2.4): in REC the ground-truth *box* rasterised, as the
official loader builds it unless ``--enable_seg_mask``; in RES the object's segmentation mask.
``OneRefData.prepare`` replaces the example's mask by the rasterised box before augmentation for
REC, so crops and resizes treat it exactly like the image.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from refjax import boxes as bx
from refjax.data import transforms as tf
from refjax.data.errors import BadRecordError
from refjax.data.spec import DataTask
from refjax.data.transforms import KINDS
from refjax.evaluate.metrics import MetricAccumulator, oneref_batch_metrics, res_pred_mask
from refjax.losses.oneref import oneref_loss
from refjax.models.beit3 import VARIANTS, BEiT3Config, beit3_config
from refjax.models.oneref import OneRef
from refjax.tasks.base import Task, Variables

log = logging.getLogger(__name__)

_BACKBONE_FIELDS = ("dim", "depth", "heads", "mlp_dim", "vocab_size", "img_size", "patch_size",
                    "dtype", "scan", "remat_policy", "drop_path_rate", "attention_impl")


# ----------------------------------------------------------------------------- model
def backbone_config(model_cfg: Any) -> BEiT3Config:
    """The BEiT-3 config of ``config.model``: the variant plus every non-None field."""
    variant = model_cfg.variant
    if variant not in VARIANTS:
        raise ValueError(f"unknown model variant {variant!r}; one of {sorted(VARIANTS)}")
    overrides = {k: model_cfg[k] for k in _BACKBONE_FIELDS if model_cfg[k] is not None}
    return beit3_config(variant, **overrides)


def build_oneref(model_cfg: Any) -> OneRef:
    """``OneRef`` from ``config.model`` (``use_seg_head`` for RES)."""
    return OneRef(
        backbone_config(model_cfg),
        use_seg_head=bool(model_cfg.use_seg_head),
        sim_scale=float(model_cfg.sim_scale),
        seg_dim=model_cfg.seg_dim or None,
        seg_convs=int(model_cfg.seg_convs),
    )


def resolve_vocab_size(config: Any) -> None:
    """``model.vocab_size`` when unset: the dataset tokenizer's size for ``tiny``, else the
    BEiT-3 vocabulary of the variant."""
    if config.model.vocab_size is not None:
        return
    if config.model.variant == "tiny":
        from refjax.data.sources import tokenizer_file
        from refjax.data.tokenizers import BEIT3_FILE, load_beit3_tokenizer

        path = tokenizer_file(config.data, BEIT3_FILE)
        config.model.vocab_size = len(load_beit3_tokenizer(path))
    else:
        config.model.vocab_size = VARIANTS[config.model.variant].get("vocab_size", 64010)


# ----------------------------------------------------------------------------- data
def rasterize_box(box_xyxy: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 (H, W) mask of the pixels whose centres lie in the xyxy box: for integer corners
    (OneRef truncates boxes to int) columns x0..x1-1 and rows y0..y1-1, as pycocotools
    rasterises a bbox."""
    x0, y0, x1, y1 = (float(v) for v in box_xyxy)
    cols = (np.arange(width) + 0.5 >= x0) & (np.arange(width) + 0.5 < x1)
    rows = (np.arange(height) + 0.5 >= y0) & (np.arange(height) + 0.5 < y1)
    return (rows[:, None] & cols[None, :]).astype(np.uint8)


class OneRefData(DataTask):
    """rec/res rows: image, box, mask, text; expressions with a target and no reference masks.

    ``box_mask``: the example's ``mask`` is the rasterised GT box (REC), not the object mask.
    """

    def __init__(self, size: int, max_len: int, num_scales: int, box_mask: bool):
        super().__init__(size, max_len, num_scales)
        self.box_mask = bool(box_mask)

    def eligible(self, ex: dict) -> bool:
        return self.eligible_counts(ex["num_targets"], len(ex["ref_masks"]))

    def eligible_counts(self, num_targets: int, num_refs: int) -> bool:
        return num_targets > 0 and num_refs == 0

    def prepare(self, ex: dict) -> dict:
        if self.box_mask:
            h, w = ex["image"].shape[:2]
            ex = {**ex, "mask": rasterize_box(ex["box"], h, w)}
        return ex


# ----------------------------------------------------------------------------- metrics
class OneRefAccumulator:
    """``MetricAccumulator`` (Acc@0.5, mIoU, oIoU) over rows whose ``kind`` holds kind ids."""

    def __init__(self, acc: MetricAccumulator | None = None):
        self.acc = acc if acc is not None else MetricAccumulator(kinds=KINDS)

    def update(self, rows: Mapping[str, np.ndarray]) -> None:
        ids = np.asarray(rows["kind"]).astype(int)
        kinds = [KINDS[k] if 0 <= k < len(KINDS) else KINDS[0] for k in ids]
        self.acc.update({k: v for k, v in rows.items() if k != "kind"}, kinds=kinds)

    def allreduce(self) -> OneRefAccumulator:
        return OneRefAccumulator(self.acc.allreduce())

    def result(self) -> dict[str, float]:
        out = self.acc.result()
        return {k: v for k, v in out.items() if "/" not in k or not _empty_kind(out, k)}


def _empty_kind(result: Mapping[str, float], key: str) -> bool:
    kind = key.rsplit("/", 1)[0]
    return result.get(f"{kind}/count", 0) == 0


# ----------------------------------------------------------------------------- tasks
class _OneRefTask(Task):
    box_mask: bool = False
    mutable = ("batch_stats",)

    def resolve_config(self, config: Any) -> None:
        resolve_vocab_size(config)

    def check_tokenizer(self, config: Any) -> None:
        if config.model.variant != "tiny" or config.model.vocab_size is None:
            return  # the BEiT-3 vocabulary is the variant's, not the dataset's
        from refjax.data.sources import check_dataset_tokenizer
        from refjax.data.tokenizers import BEIT3_FILE, load_beit3_tokenizer

        check_dataset_tokenizer(config, BEIT3_FILE, lambda p: len(load_beit3_tokenizer(p)),
                                config.model.vocab_size)

    def build_model(self, config: Any) -> OneRef:
        return build_oneref(config.model)

    def data_task(self, config: Any) -> OneRefData:
        d = config.data
        return OneRefData(d.image_size, d.max_text_len, d.num_scales, self.box_mask)

    def model_inputs(self, batch: Mapping[str, Any], config: Any) -> dict[str, Any]:
        return {"text_ids": batch["text_ids"], "text_padding": batch["text_padding"],
                "image": batch["image"]}

    def loss(self, outputs: Any, aux: Any, batch: Any, config: Any):
        return oneref_loss(outputs, batch, config.loss)

    def eval_outputs(self, outputs: Any, aux: Any, batch: Any, config: Any):
        out = oneref_batch_metrics(outputs, batch)
        out["valid"] = batch["valid"]
        out["kind"] = batch["kind"]
        return {k: jnp.asarray(v) for k, v in out.items()}

    def make_accumulator(self, config: Any) -> OneRefAccumulator:
        return OneRefAccumulator()

    def map_init(self, loaded: Variables, meta: Mapping[str, Any], model: Variables) -> Variables:
        """A converted BEiT-3 checkpoint fills ``beit3``; a OneRef checkpoint or a train workdir
        (REC, RES or MRefM) every subtree the model has (MRefM heads are dropped, by name)."""
        params = loaded.get("params") or {}
        if "beit3" not in params and meta.get("model") == "beit3":
            loaded = {**loaded, "params": {"beit3": params}}
        elif "beit3" not in params:
            raise ValueError("init: the checkpoint holds neither a BEiT-3 backbone (`beit3`) nor "
                             f"a converted BEiT-3 model; top-level keys: {sorted(params)}")
        return super().map_init(loaded, meta, model)

    def make_predictor(self, model: nn.Module, variables: Variables, config: Any):
        from refjax.data.sources import tokenizer_file
        from refjax.data.tokenizers import BEIT3_FILE, load_beit3_tokenizer

        tok = load_beit3_tokenizer(tokenizer_file(config.data, BEIT3_FILE))
        return OneRefPredictor(model, variables, config, tok)


class RecTask(_OneRefTask):
    name = "rec"
    box_mask = True


class ResTask(_OneRefTask):
    name = "res"
    box_mask = False


# ----------------------------------------------------------------------------- inference
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


class OneRefPredictor:
    """A OneRef model, its variables and config plus a BEiT-3 tokenizer: jitted forward,
    host-side pre/post-processing through the eval pipeline's transforms (``expand`` ->
    ``eval_letterbox`` -> ``tokenize``), outputs mapped back through the same ``Letterbox``."""

    def __init__(self, model: nn.Module, variables: Mapping, config: Any, tokenizer: Any):
        self.model = model
        self.variables = nn.unbox(variables)
        self.config = config
        self.tokenizer = tokenizer
        self.size = int(config.data.image_size)
        self.max_len = int(config.data.max_text_len)
        self.mean = tuple(config.data.image_mean)
        self.std = tuple(config.data.image_std)
        self._forward = jax.jit(self._apply)

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
        REC-only models), ``score`` = the largest text-patch cosine similarity times
        ``model.sim_scale`` (in [-sim_scale, sim_scale]; a relative, uncalibrated confidence)
        and ``box_cxcywh_canvas`` (the raw model box). Empty text or a bad image raise
        ``BadRecordError`` naming the field.
        """
        return self.predict_batch([image], [text])[0]

    @staticmethod
    def draw(image: np.ndarray, prediction: Mapping[str, Any], text: str = ""):
        """``image`` (same size) with the predicted box, the translucent mask and the text."""
        from refjax.evaluate import draw as drawing

        img = drawing.overlay(image, box=prediction.get("box_xyxy"), mask=prediction.get("mask"))
        return drawing.caption(img, text) if text else img
