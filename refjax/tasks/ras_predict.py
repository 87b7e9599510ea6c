"""RAS mask-group prediction for users (spec/ras.md 5.5): image + text (+ reference masks) +
a candidate pool -> the selected group.

```python
from refjax.predict import Predictor
p = Predictor.from_workdir("runs/ras_stage3")             # a RASPredictor
pred = p.predict(image, "all shapes left of <mask-ref>", ref_masks=[ref], pool="auto")
p.draw(image, pred, "all shapes left of <mask-ref>").save("group.png")
```

``pool``: an ``(N, H, W)`` array, the path of a COCO-RLE JSON file (what a SAM
``SamAutomaticMaskGenerator(output_mode="coco_rle")`` run writes; ``refjax.data.pools.
load_pool_json``), or ``"auto"``: a class-agnostic pool from scikit-image
(``refjax.data.pools.auto_pool``), a stand-in for a fresh machine; real use wants SAM masks.
Pools larger than the model's ``data.pool_max`` keep their first ``pool_max`` masks (SAM
writes them best first; ``dropped`` says how many were left out).

The example goes through the evaluation pipeline's own steps (``RASTaskData.prepare`` ->
letterbox -> ``tokenize`` -> ``layout``), so ``expand2square``, the tokenisation and the
sequence are those of training. NAR: candidates with ``sigmoid(logit) > eval.threshold``
(``eval.argmax_fallback``: the best one when none passes). AR: greedy ``[SEG]`` decoding
(``refjax.models.ras.ar_generate``, at most ``data.seg_max`` steps); a candidate's score is the
largest softmax probability a ``[SEG]`` gave it. The returned masks are the caller's own pool
masks at the original resolution (no resampling).

Bad input raises ``BadRecordError`` naming the record and the field: an image that is not uint8
(H, W, 3) (``image``), empty text (``text``), a pool mask of the wrong size (``pool[i]``, or
the JSON's ``[i].segmentation``), an empty pool (``pool``, ``masks``/``annotations``), a
reference mask of the wrong size (``ref_masks[i]``), a ``<mask-ref>`` count that differs from
the reference masks or more references than ``data.refs_max`` (``ref_masks``), a sequence
longer than the model's ``data.max_text_len`` (``text``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from refjax.data import transforms as tf
from refjax.data.errors import BadRecordError
from refjax.data.pools import auto_pool, check_pool, load_pool_json
from refjax.models import ras as ras_lib
from refjax.tasks.ras import RASTask, RASTaskData, model_config, model_inputs, select_candidates

Prediction = dict[str, Any]
# distinct colours (Tableau 10), one per selected mask
PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))
REF_COLOR = (255, 255, 255)


def read_mask(path: str, height: int, width: int) -> np.ndarray:
    """A binary mask image (any mode; > 0 is inside) as bool (H, W); ``BadRecordError``
    naming the file when it cannot be read or has another size."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            m = np.asarray(im.convert("L")) > 0
    except (OSError, UnidentifiedImageError) as e:
        raise BadRecordError(str(path), "mask", f"cannot read the mask image ({e})") from e
    if m.shape != (int(height), int(width)):
        raise BadRecordError(str(path), "mask", f"mask of size {m.shape} != image size "
                             f"{(int(height), int(width))} (HxW)")
    return m


class RASPredictor:
    """A RAS model, its variables and config plus its tokenizer (module docstring)."""

    def __init__(self, model: ras_lib.RAS, variables: Mapping[str, Any], config: Any,
                 tokenizer: Any, data: RASTaskData):
        self.model = model
        self.cfg = model.config
        self.variables = nn.unbox(variables)
        self.config = config
        self.tokenizer = tokenizer
        self.data = data
        self.pool_max = data.spec.pool_max
        self.threshold = float(config.eval.threshold)
        self.argmax_fallback = bool(config.eval.argmax_fallback)
        self._nar = jax.jit(self._nar_logits)

    @classmethod
    def create(cls, model: ras_lib.RAS, variables: Mapping[str, Any], config: Any
               ) -> RASPredictor:
        """From a restored run (``Task.make_predictor``): pixel inputs always; a run trained
        on cached features gets the towers that computed them (``<features_dir>/towers``)."""
        from refjax.data.ras_features import FeatureStore
        from refjax.data.sources import tokenizer_file
        from refjax.data.tokenizers import LLAMA_FILE

        task = RASTask()
        spec = dataclasses.replace(task.data_spec(config), features_dir=None,
                                   skip_bad=False)
        data = RASTaskData(spec)
        tok = data.load_tokenizer(tokenizer_file(config.data, LLAMA_FILE))
        variables = dict(nn.unbox(variables))
        params = dict(variables["params"])
        cfg = model_config(config)
        missing = [n for n in cfg.encoder_names if n not in params]
        if missing:
            if not config.data.features_dir:
                raise ValueError(f"the variables lack the towers {missing}")
            params.update(FeatureStore(str(config.data.features_dir)).tower_params(missing))
        variables["params"] = params
        return cls(model, variables, config, tok, data)

    # -- pieces ----------------------------------------------------------------------------
    def _nar_logits(self, variables: Any, batch: Mapping[str, Any]) -> jax.Array:
        kw = model_inputs(batch, self.config, self.cfg, features=False, train=False)
        logits, _ = self.model.apply(variables, **kw)
        return logits

    def pool_masks(self, image: np.ndarray, pool: Any, record_id: str = "input"
                   ) -> np.ndarray:
        """The candidate pool of ``image`` as uint8 (N, H, W) (module docstring)."""
        h, w = image.shape[:2]
        if isinstance(pool, str) and pool == "auto":
            return auto_pool(image, max_masks=self.pool_max)
        if isinstance(pool, (str, os.PathLike)):
            return load_pool_json(pool, h, w)
        return check_pool(pool, h, w, record_id, "pool")

    def prepare(self, image: np.ndarray, text: str, ref_masks: Sequence[np.ndarray] = (),
                pool: Any = "auto", record_id: str = "input") -> tuple[dict, np.ndarray, int]:
        """``(row, pool (N, H, W) uint8 as used, masks dropped past pool_max)``."""
        img = np.asarray(image) if isinstance(image, np.ndarray) else image
        if (not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 3
                or img.shape[2] != 3 or img.size == 0):
            raise BadRecordError(record_id, "image", "expected a uint8 (H, W, 3) array, got "
                                 f"{getattr(img, 'dtype', type(img))} "
                                 f"{getattr(img, 'shape', '')}")
        if not isinstance(text, str) or not text.strip():
            raise BadRecordError(record_id, "text", f"empty text {text!r}")
        h, w = img.shape[:2]
        masks = self.pool_masks(img, pool, record_id)
        dropped = max(0, len(masks) - self.pool_max)
        masks = masks[: self.pool_max]
        refs = []
        for i, m in enumerate(ref_masks):
            m = np.asarray(m)
            if m.shape != (h, w):
                raise BadRecordError(record_id, f"ref_masks[{i}]", f"mask of size {m.shape} "
                                     f"!= image size {(h, w)} (HxW)")
            refs.append(m > 0)
        ex = {
            "record_id": record_id, "expr_id": "0", "image": img,
            "box": np.zeros(4, np.float32), "mask": np.zeros((h, w), np.uint8),
            "text": text, "raw": text, "kind": 0, "num_targets": 0,
            "ref_masks": (np.stack(refs).astype(np.uint8) if refs
                          else np.zeros((0, h, w), np.uint8)),
            "pool_masks": masks.astype(np.uint8), "pool_ioa": np.zeros(len(masks), np.float32),
            "subject_span": np.array([-1, -1], np.int32),
            "object_span": np.array([-1, -1], np.int32),
        }
        d = self.data
        ex = d.prepare(ex)
        ex = tf.eval_letterbox(ex, d.size, tuple(self.config.data.image_mean),
                               tuple(self.config.data.image_std))
        ex = d.tokenize(ex, self.tokenizer, False)
        ex = d.layout(ex, train=False, eval_terms=False)
        ex["expr_index"] = 0
        return d.row(ex), masks, dropped

    # -- prediction ------------------------------------------------------------------------
    def predict(self, image: np.ndarray, text: str, ref_masks: Sequence[np.ndarray] = (),
                pool: Any = "auto", *, record_id: str = "input") -> Prediction:
        """The selected group for one uint8 (H, W, 3) image and a prompt.

        ``text`` holds one ``<mask-ref>`` per reference mask (in order); ``ref_masks`` are
        (H, W) masks (> 0 inside); ``pool`` as in the module docstring. Returns ``masks``
        (K, H, W) bool (the selected pool masks, original resolution), ``indices`` (K,) into
        the pool, ``scores`` (K,) (NAR: sigmoid probabilities; AR: the [SEG] softmax
        probability), ``all_scores`` (N,), ``union`` (H, W) bool, ``pool`` (N, H, W) bool,
        ``ref_masks``, ``dropped`` and ``text``. An empty group means "no target".
        """
        row, masks, dropped = self.prepare(image, text, ref_masks, pool, record_id)
        batch = {k: jnp.asarray(v)[None] for k, v in row.items()}
        n = len(masks)
        if self.cfg.decoding == "nar":
            logits = self._nar(self.variables, batch)
            sel = np.asarray(select_candidates(logits, batch["pool_valid"], self.threshold,
                                               self.argmax_fallback))[0, :n]
            scores = np.asarray(jax.nn.sigmoid(logits), np.float32)[0, :n]
        else:
            kw = model_inputs(batch, self.config, self.cfg, features=False, train=False)
            inputs = {k: kw[k] for k in ("input_ids", "slot_index", "attention_mask",
                                         "pool_masks", "pool_valid", "pixels")}
            if "ref_masks" in kw:
                inputs["ref_masks"] = kw["ref_masks"]
            out = ras_lib.ar_generate(self.model, self.variables, inputs,
                                      max_segs=int(self.data.spec.seg_max))
            choices = np.asarray(out["choices"])[0]
            probs = np.asarray(jax.nn.softmax(out["scores"], axis=-1), np.float32)[0]
            scores = np.zeros(n, np.float32)
            for k, c in enumerate(choices):
                if c >= 0:
                    scores[c] = max(scores[c], probs[k, c])
            sel = np.asarray(out["selected"])[0, :n]
        idx = np.flatnonzero(sel)
        pool_b = masks.astype(bool)
        return {
            "masks": pool_b[idx],
            "indices": idx.astype(np.int64),
            "scores": scores[idx],
            "all_scores": scores,
            "union": (pool_b[idx].any(axis=0) if len(idx)
                      else np.zeros(pool_b.shape[1:], bool)),
            "pool": pool_b,
            "ref_masks": [np.asarray(m) > 0 for m in ref_masks],
            "dropped": int(dropped),
            "text": text,
        }

    @staticmethod
    def draw(image: np.ndarray, prediction: Mapping[str, Any], text: str = ""):
        """``image`` with each selected mask blended in its own colour (``PALETTE``), the
        reference masks' contours in white, and the text in a strip below (a PIL image)."""
        from refjax.evaluate import draw as drawing

        img = drawing.overlay(image)
        for j, m in enumerate(prediction["masks"]):
            img = drawing.overlay(img, mask=m, color=PALETTE[j % len(PALETTE)])
        for ref in prediction.get("ref_masks", ()):
            img = drawing.overlay(img, gt_mask=ref, gt_color=REF_COLOR)
        label = text or str(prediction.get("text", ""))
        k = len(prediction["masks"])
        label = f"{label}  [{k} mask{'s' if k != 1 else ''}]" if label else f"[{k} masks]"
        return drawing.caption(img, label, below=True)

    @staticmethod
    def summary(prediction: Mapping[str, Any]) -> str:
        """One line per selected mask (index, score, pixels) and the union's size."""
        lines = [f"selected {len(prediction['indices'])} of {len(prediction['all_scores'])} "
                 f"candidates" + (f" ({prediction['dropped']} dropped past pool_max)"
                                  if prediction["dropped"] else "")]
        for i, s, m in zip(prediction["indices"], prediction["scores"], prediction["masks"]):
            lines.append(f"  candidate {int(i)}: score {float(s):.3f}, {int(m.sum())} pixels")
        u = prediction["union"]
        lines.append(f"union: {int(u.sum())} of {u.size} pixels")
        return "\n".join(lines)


def run_cli(predictor: RASPredictor, image: np.ndarray, text: str,
            ref_mask_paths: Sequence[str] = (), pool: str = "auto",
            out: str | None = None) -> Prediction:
    """What ``python -m refjax predict --workdir W --image IMG --text T [--ref-mask M.png ...]
    --pool POOL.json|auto [--out group.png]`` does for a RAS run: reads the reference masks,
    predicts, prints :meth:`RASPredictor.summary` and writes the drawing."""
    h, w = image.shape[:2]
    refs = [read_mask(p, h, w) for p in ref_mask_paths]
    pred = predictor.predict(image, text, refs, pool)
    print(predictor.summary(pred))
    if out:
        predictor.draw(image, pred, text).save(out)
        print(f"wrote {out}")
    return pred


__all__ = ["PALETTE", "RASPredictor", "read_mask", "run_cli"]
