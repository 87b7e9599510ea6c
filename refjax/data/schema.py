"""The one record scheme shared by every refjax TFDS builder (RefShapes and real data).

One record per **image** (scene), so image bytes are stored once, however many expressions
refer to it. Only one level of ``tfds.features.Sequence`` is used (deeper nesting needs
TensorFlow to serialise); variable-length per-expression lists (target objects, reference
masks) are stored CSR-style: scene-level flat lists plus per-expression ``*_start``/``*_count``.
Builders set ``disable_shuffling = True`` so record order equals generation order, and write
``expressions_per_record`` for each split into the dataset's ``metadata.json`` so that the
pipeline can index expressions without decoding any record.

Record fields (what ``scene_features()`` declares):

- ``image/id`` (str), ``image/filename`` (str), ``image`` (PNG/JPEG bytes -> uint8 HxWx3),
  ``image/height``, ``image/width`` (int32)
- ``objects``: Sequence of ``{id: int64, box: float32[4] COCO xywh pixels, mask: PNG (HxWx1),
  category: str}``: the ground-truth instances (COCO: the annotations of the image).
- ``expressions``: Sequence of ``{id: str, text: str, raw: str, kind: str,
  target_start, target_count, ref_start, ref_count: int32,
  subject_span: int32[2], object_span: int32[2] (word indices [start, end), -1 if absent)}``.
  ``text`` is the expression as models are trained on it (refer's normalised ``sent``: lower
  case, tokenised, no punctuation); ``raw`` is the sentence as written, with its case and
  punctuation (refer's ``raw``; an LLM tokenizer wants it). Builders whose text is already raw
  store it twice: RefShapes (raw = text) and MaskGroups-HQ (raw = the query text). A
  refer-format sentence without ``raw`` stores its ``sent``. ``subject_span``/``object_span``
  index the whitespace-separated words of ``text``; the span is the noun phrase without its
  determiner, its head word last (the word MRefM masks first). RefShapes records them from its
  generator; RefCOCO/+/g and gRefCOCO parse them (``refjax.data.subject_object``: spaCy's
  dependency parse with OneRef's rule when spaCy and an English model are installed, else a
  rule-based fallback; ``metadata.json`` names the parser under ``span_parser``); MaskGroups-HQ
  stores ``(-1, -1)`` (``span_parser`` = ``none``).
- ``expr_targets`` (Sequence int32): indices into ``objects``; expression e's targets are
  ``expr_targets[target_start:target_start + target_count]`` (count 0 = no-target).
- ``expr_refs`` (Sequence int32): indices into ``objects`` of ``<mask-ref>`` reference masks.
- ``pool``: Sequence of ``{mask: PNG (HxWx1), source: str}``: the candidate mask pool (RAS).
- ``pool_ioa`` (Sequence float32): row-major ``[num_expressions, num_pool]`` IoA of each
  candidate against the union of the expression's targets (labels: IoA >= 0.5).
- ``caption`` (str): one scene caption ('' when absent).
- ``expr_word_scores`` (Sequence float32; real-data builders from version 1.3.0, absent in
  RefShapes): per-word scores for MRefM's semantic target-relation label (spec oneref.md 3.6;
  the paper's CLIP similarities), flat over the scene's expressions in order, one value per
  whitespace-separated word of ``text``. Either empty (no expression of the scene has scores)
  or exactly as long as all the expressions' words together; an expression without scores
  holds NaN for each of its words. Builders fill it from an optional side file
  (``sts_scores``: ``{expression id: [score per word]}``); ``metadata.json`` names the file and
  counts the scored expressions per split under ``sts_scores``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# Keys of the metadata.json entry holding, per split, the number of expressions in each record.
EXPRESSIONS_PER_RECORD = "expressions_per_record"
NO_SPAN = (-1, -1)
POSITIVE_IOA = 0.5


def scene_features(word_scores: bool = False) -> Any:
    """The tfds FeaturesDict of a scene record (see module docstring); ``word_scores`` adds
    ``expr_word_scores`` (the real-data builders)."""
    import tensorflow_datasets as tfds

    png = dict(encoding_format="png")
    extra = {"expr_word_scores": tfds.features.Sequence(np.float32)} if word_scores else {}
    return tfds.features.FeaturesDict(
        {
            "image/id": tfds.features.Text(),
            "image/filename": tfds.features.Text(),
            "image": tfds.features.Image(shape=(None, None, 3)),
            "image/height": np.int32,
            "image/width": np.int32,
            "objects": tfds.features.Sequence(
                {
                    "id": np.int64,
                    "box": tfds.features.Tensor(shape=(4,), dtype=np.float32),
                    "mask": tfds.features.Image(shape=(None, None, 1), **png),
                    "category": tfds.features.Text(),
                }
            ),
            "expressions": tfds.features.Sequence(
                {
                    "id": tfds.features.Text(),
                    "text": tfds.features.Text(),
                    "raw": tfds.features.Text(),
                    "kind": tfds.features.Text(),
                    "target_start": np.int32,
                    "target_count": np.int32,
                    "ref_start": np.int32,
                    "ref_count": np.int32,
                    "subject_span": tfds.features.Tensor(shape=(2,), dtype=np.int32),
                    "object_span": tfds.features.Tensor(shape=(2,), dtype=np.int32),
                }
            ),
            "expr_targets": tfds.features.Sequence(np.int32),
            "expr_refs": tfds.features.Sequence(np.int32),
            "pool": tfds.features.Sequence(
                {
                    "mask": tfds.features.Image(shape=(None, None, 1), **png),
                    "source": tfds.features.Text(),
                }
            ),
            "pool_ioa": tfds.features.Sequence(np.float32),
            "caption": tfds.features.Text(),
            **extra,
        }
    )


def word_count(text: str) -> int:
    """The number of whitespace-separated words of an expression's text (the unit of spans and
    of ``expr_word_scores``)."""
    return len(text.split())
