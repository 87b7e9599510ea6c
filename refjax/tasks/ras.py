"""RAS mask-group selection (spec/ras.md), registered as ``ras``.

Data half
---------
``RASData`` (the pipeline's generic RAS rows: every expression, the candidate pool and
reference masks at the OneRef letterbox canvas, labels by the IoA rule) stays as it was;
``RASTaskData`` is what the task trains on. Per example (spec 3.2, 5.2, 8.4):

1. ``prepare`` (original pixels): the pool is capped at ``pool_max`` (stored order, i.e. the
   segmenter's); LLaVA ``expand2square`` (``refjax.boxes.Expand2Square``): the image is pasted,
   centred, on a square of side ``max(w, h)`` filled with the image encoder's mean colour
   (``int(255 * mean)``), every mask (target union, references, candidates) zero-padded the
   same way; the towers' uint8 inputs are the square resized (PIL bicubic) to each encoder's
   input side (``refjax.data.ras_features.resize_square``), or, with ``data.features_dir``,
   the precomputed feature maps of the image (``FeatureStore``). The pipeline's letterbox stage
   then resizes the square masks to the ``S x S`` canvas (``data.image_size``) with PIL-exact
   nearest sampling, which is exactly ``Expand2Square(w, h, S).forward_mask``.
2. ``tokenize`` (the dataset's LLaMA-layout ``tokenizer.model``): the expression's raw text
   (``raw`` when the example carries it, else ``text``; lower-cased with ``data.lowercase``),
   cut at each ``<mask-ref>`` and encoded piece by piece with the placeholder between pieces
   (as LLaVA's ``tokenizer_image_token`` does around ``<image>``), so any LLaMA tokenizer works;
   the template pieces (``refjax.data.ras_layout.vicuna_v1`` / ``plain``) are encoded once.
3. ``RASLayoutStage`` (after tokenization): ``refjax.data.ras_layout.build_layout`` with the
   candidates in a random order in training (``grain`` ``RandomMap``: seeded by the element)
   and in stored order in evaluation; the AR baseline lays out ``[SEG]`` x (number of positive
   candidates, at most ``seg_max``: the highest-IoA ones; others are ignored) + EOS in training
   and the prompt alone in evaluation. Labels: 1 if IoA >= ``data.positive_ioa``, -1 (ignored
   by the losses) inside the optional band ``(data.ignore_ioa, positive_ioa)``, else 0.
   Evaluation rows also carry the exact original-resolution scoring terms: the atoms of the
   pool against the target union (``refjax.evaluate.gres.pool_atoms``) and the greedy pool
   oracle (``oracle_per_sample``), both at the original resolution.
4. ``row``: fixed shapes; see ``RASTaskData.blank``.

Stage 1 (``model.objective = "caption"``): one example per scene (the scene's first
expression; scenes without a caption are skipped as ineligible), the candidates only (no global
visual tokens), the ``plain`` template and the caption tokens as LM labels. The caption and the
expression's position come from the example when ``transforms.expand`` carries them
(``caption``, ``expr_pos``); otherwise from ``scene_text``, a per-process table of every
split's captions read once without decoding images.

Metrics at the original resolution (how and why exact): a row carries, instead of its
variable-size original masks, the pool's atoms (pixel sets covered by exactly the same
candidates) with their pixel and GT-pixel counts; any selection's ``I``, ``U`` and predicted
area are integer sums over the atoms it covers (``atom_terms``), computed in the eval step.
This is exact as long as a pool has at most ``data.atoms_max`` atoms (else the smallest atoms
are dropped and the metrics count the row in ``inexact_rows``).

Bad input (``BadRecordError`` naming the record and the field, skipped and counted with
``data.skip_bad_records``): an empty pool (``pool_masks``), a pool mask of the wrong size
(``pool/mask[j]`` when the scene is decoded, ``pool_masks`` in ``transforms.expand``), more
reference masks than ``refs_max`` or a ``<mask-ref>`` count that differs from the reference
masks (``ref_masks``), a sequence longer than ``data.max_text_len`` (``text``; RAS never
truncates), an image missing from the feature cache (``features``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from refjax.boxes import Expand2Square
from refjax.data import stages as st
from refjax.data.errors import BadRecordError
from refjax.data.ras_features import (
    FeatureStore,
    model_fill_mean,
    pad_fill,
    resize_square,
    storage_dtype,
)
from refjax.data.ras_layout import VICUNA_SYSTEM, LayoutConfig, build_layout, plain, vicuna_v1
from refjax.data.schema import POSITIVE_IOA
from refjax.data.spec import DataTask, pad_stack
from refjax.data.tokenizers import LLAMA_FILE, MASK_REF
from refjax.data.transforms import KINDS
from refjax.evaluate.gres import GresAccumulator, atom_terms, oracle_per_sample, pool_atoms
from refjax.evaluate.metrics import allreduce_sums
from refjax.losses.ras import lm_sums, ras_loss
from refjax.models import ras as ras_lib
from refjax.models.vit import ViTConfig
from refjax.tasks.base import Task, Variables

log = logging.getLogger(__name__)

OBJECTIVES = ("select", "caption")
SELECTIONS = ("ores", "res", "gres")
TEMPLATES = ("v1", "plain")


class RASData(DataTask):
    """Rows with ``pool_masks`` (P, S, S), ``pool_valid``, ``pool_labels``, ``ref_masks``
    (R, S, S), ``ref_valid`` and ``num_targets`` (the generic data half; the task trains on
    ``RASTaskData``)."""

    keep_pool = True
    augment = False

    def __init__(self, size: int, max_len: int, pool_max: int = 24, refs_max: int = 4):
        super().__init__(size, max_len)
        self.pool_max, self.refs_max = int(pool_max), int(refs_max)

    def blank(self) -> dict[str, np.ndarray]:
        row = super().blank()
        s = self.size
        row.update(
            pool_masks=np.zeros((self.pool_max, s, s), np.uint8),
            pool_valid=np.zeros(self.pool_max, np.int32),
            pool_labels=np.zeros(self.pool_max, np.int32),
            ref_masks=np.zeros((self.refs_max, s, s), np.uint8),
            ref_valid=np.zeros(self.refs_max, np.int32),
            num_targets=np.int32(0),
        )
        return row

    def row(self, ex: dict) -> dict[str, np.ndarray]:
        row = super().row(ex)
        row["pool_masks"], row["pool_valid"] = pad_stack(ex["pool_masks"], self.pool_max)
        labels = (ex["pool_ioa"][: self.pool_max] >= POSITIVE_IOA).astype(np.int32)
        row["pool_labels"][: len(labels)] = labels
        row["ref_masks"], row["ref_valid"] = pad_stack(ex["ref_masks"], self.refs_max)
        row["num_targets"] = np.int32(ex["num_targets"])
        return row


# ----------------------------------------------------------------------------- model config
def _init_meta(config: Any) -> dict[str, Any]:
    init = config.get("init") if hasattr(config, "get") else None
    if not init:
        raise ValueError("model.preset='init' needs config.init (a `convert ras` checkpoint)")
    path = os.path.join(os.path.expanduser(str(init)), "refjax_meta.json")
    if not os.path.isfile(path):
        raise ValueError(f"model.preset='init': {init} is not a converted checkpoint (no "
                         "refjax_meta.json); use a preset for train workdirs")
    with open(path) as f:
        meta = json.load(f)
    if meta.get("model") != "ras":
        raise ValueError(f"model.preset='init': {init} is not a RAS checkpoint "
                         f"(model={meta.get('model')!r})")
    return meta


def _exec(c: Any, kw: Mapping[str, Any]) -> Any:
    return dataclasses.replace(c, **kw)


def model_config(config: Any) -> ras_lib.RASConfig:
    """The ``RASConfig`` of ``config.model``: a preset (``ras_tiny`` / ``ras_13b``) or, with
    ``preset="init"``, the config saved in ``config.init`` (a ``convert ras`` checkpoint); then
    the encoder subset (``encoders``, in that order), input sizes (``image_sizes``), LLM field
    overrides (``llm``), ``vocab_size`` (the text vocabulary; AR appends ``[SEG]`` = its size),
    decoding, global tokens, 2D PE and head options. ``model.vocab_size`` must be resolved."""
    m = config.model
    ex = {"dtype": str(m.dtype), "remat_policy": str(m.remat_policy), "scan": bool(m.scan)}
    if m.preset == "init":
        base = ras_lib.RASConfig.from_dict(_init_meta(config)["config"])
        base = base.replace(llm=_exec(base.llm, ex),
                            encoders={n: _exec(c, ex) for n, c in base.encoders})
    else:
        base = ras_lib.ras_config(str(m.preset), **ex)
    names = tuple(str(n) for n in m.encoders)
    unknown = sorted(set(names) - set(base.encoder_names))
    if unknown or not names:
        raise ValueError(f"model.encoders {names}: unknown {unknown}; the preset has "
                         f"{base.encoder_names}")
    sizes = {str(k): int(v) for k, v in dict(m.image_sizes or {}).items() if v}
    encs: dict[str, Any] = {}
    for n in names:
        c = base.encoder_configs[n]
        if n in sizes and isinstance(c, ViTConfig):
            c = dataclasses.replace(c, image_size=sizes[n])
        encs[n] = c
    image_sizes = {n: sizes.get(n, base.input_size(n)) for n in names}
    if m.vocab_size is None:
        raise ValueError("model.vocab_size is unresolved (RASTask.resolve_config reads it "
                         "from the dataset's tokenizer)")
    vocab = int(m.vocab_size)
    ar = str(m.decoding) == "ar" and str(m.objective) == "select"
    llm_over = {k: v for k, v in dict(m.llm or {}).items() if v is not None}
    llm = dataclasses.replace(base.llm, **llm_over, vocab_size=vocab + (1 if ar else 0))
    vits = [n for n in names if isinstance(encs[n], ViTConfig)]
    image_encoder = base.image_encoder if base.image_encoder in vits else (vits or names)[0]
    kw: dict[str, Any] = dict(
        llm=llm, encoders=encs, image_sizes=image_sizes, use_pe2d=bool(m.use_pe2d),
        image_tokens=bool(m.image_tokens), image_encoder=image_encoder,
        decoding="ar" if ar else "nar", seg_token_id=vocab, eos_token_id=int(m.eos_token_id),
        head=str(m.head), head_prior=float(m.head_prior),
    )
    if m.pe2d_grid:
        kw["pe2d_grid"] = int(m.pe2d_grid)
    return base.replace(**kw)


def model_subtrees(cfg: ras_lib.RASConfig, features: bool) -> tuple[str, ...]:
    """Top-level parameter names of ``RAS(cfg)`` (towers absent when fed features)."""
    names = [] if features else list(cfg.encoder_names)
    names += ["mask_projector", "mask_pool_pre", "mask_ref_pre", "llm"]
    if cfg.image_tokens:
        names.append("image_projector")
    names.append("head" if cfg.decoding == "nar" else "seg_proj")
    return tuple(names)


def validate_config(config: Any) -> None:
    """Consistency checks of a RAS config (``ValueError`` naming the keys)."""
    m, d = config.model, config.data
    if m.objective not in OBJECTIVES:
        raise ValueError(f"model.objective={m.objective!r}: one of {OBJECTIVES}")
    if m.decoding not in ras_lib.DECODINGS:
        raise ValueError(f"model.decoding={m.decoding!r}: one of {ras_lib.DECODINGS}")
    if d.select not in SELECTIONS:
        raise ValueError(f"data.select={d.select!r}: one of {SELECTIONS}")
    want = "plain" if m.objective == "caption" else "v1"
    if d.template != want:
        raise ValueError(f"data.template={d.template!r}: model.objective={m.objective!r} "
                         f"uses {want!r}")
    if d.truncate_text:
        raise ValueError("data.truncate_text must be False: RAS never truncates (a too long "
                         "sequence is a bad record)")
    if not 0.0 < float(config.eval.threshold) < 1.0:
        raise ValueError(f"eval.threshold={config.eval.threshold} must be in (0, 1)")
    if m.decoding == "ar" and m.objective == "select" and int(d.seg_max) < 1:
        raise ValueError("AR decoding needs data.seg_max >= 1")
    if d.features_dtype not in ("float32", "bfloat16"):
        raise ValueError(f"data.features_dtype={d.features_dtype!r}: float32 | bfloat16")
    if d.ignore_ioa is not None and not 0.0 <= float(d.ignore_ioa) < float(d.positive_ioa):
        raise ValueError(f"data.ignore_ioa={d.ignore_ioa} must be in [0, positive_ioa)")


# ----------------------------------------------------------------------------- captions
_SCENE_TEXT: dict[str, dict[str, tuple[str, str]]] = {}
_SCENE_TEXT_LOCK = threading.Lock()


def scene_text(dataset: str, data_dir: str, dataset_config: str | None) -> dict[str, tuple]:
    """``{image id: (caption, first expression id)}`` of every split of a dataset, read once
    per process without decoding images or masks (for stage-1 examples, whose pipeline examples
    carry neither the scene's caption nor the expression's position in it)."""
    from refjax.data.sources import _PngBytes, dataset_dir

    path = dataset_dir(dataset, os.path.expanduser(data_dir), dataset_config)
    with _SCENE_TEXT_LOCK:
        if path not in _SCENE_TEXT:
            import tensorflow_datasets as tfds

            b = tfds.builder_from_directory(path)
            dec = {"image": _PngBytes(), "objects": {"mask": _PngBytes()},
                   "pool": {"mask": _PngBytes()}}
            table: dict[str, tuple[str, str]] = {}
            for split in b.info.splits.keys():
                ds = b.as_data_source(split=split, decoders=dec)
                for i in range(len(ds)):
                    r = ds[i]
                    ids = [_s(x) for x in r["expressions"]["id"]]
                    table[_s(r["image/id"])] = (_s(r["caption"]), ids[0] if ids else "")
            _SCENE_TEXT[path] = table
        return _SCENE_TEXT[path]


def _s(v: Any) -> str:
    return v.decode("utf-8") if isinstance(v, (bytes, np.bytes_)) else str(v)


# ----------------------------------------------------------------------------- data
@dataclasses.dataclass(frozen=True)
class RASDataSpec:
    """Everything ``RASTaskData`` needs (plain values; ``RASTask.data_task`` fills it)."""

    size: int
    max_len: int
    pool_max: int
    refs_max: int
    seg_max: int
    atoms_max: int
    objective: str
    decoding: str
    select: str
    encoders: tuple[tuple[str, int], ...]  # (name, input side)
    feature_shapes: tuple[tuple[str, tuple[int, int, int]], ...]
    fill: tuple[int, ...]
    features_dir: str | None
    features_dtype: str
    num_image_tokens: int
    seg_token_id: int
    vocab_size: int | None
    template: str
    system: str | None
    lowercase: bool
    positive_ioa: float
    ignore_ioa: float | None
    skip_bad: bool
    dataset: tuple[str, str, str | None]  # (name, data_dir, config): stage-1 caption lookup

    @property
    def ar(self) -> bool:
        return self.decoding == "ar" and self.objective == "select"

    @property
    def caption(self) -> bool:
        return self.objective == "caption"

    def layout_config(self) -> LayoutConfig:
        return LayoutConfig(
            max_len=self.max_len, pool_max=self.pool_max, refs_max=self.refs_max,
            num_image_tokens=self.num_image_tokens, decoding="ar" if self.ar else "nar",
            seg_max=self.seg_max if self.ar else 0,
            seg_token_id=self.seg_token_id if self.ar else -1, vocab_size=self.vocab_size)


class RASTaskData(RASData):
    """The RAS task's rows (module docstring). Fields (``blank``)::

        input_ids, slot_index, attention_mask, labels (L,) int32     the sequence (ras_layout)
        cand_pos (P,) int32; pool_masks (P, S, S) uint8; pool_valid, pool_labels (P,) int32
        ref_masks (R, S, S) uint8; ref_valid (R,) int32              (R = refs_max > 0)
        ar_pos, ar_valid, ar_target (K + 1,); seg_valid (K,)        (AR; K = seg_max)
        pixels_<enc> (Z, Z, 3) uint8  |  features_<enc> (h, w, D)   (features_dir)
        mask (S, S) uint8 target union; num_targets, kind, valid, expr_index, length int32
        letterbox (6,) float32 [orig_w, orig_h, S, S, left, top]   (Expand2Square offsets)
        atom_members (A, P) uint8; atom_area, atom_gt (A,) int32; gt_area, atom_exact,
        oracle_inter, oracle_union int32                             (selection; eval rows)
    """

    tokenizer_file = LLAMA_FILE

    def __init__(self, spec: RASDataSpec):
        super().__init__(spec.size, spec.max_len, spec.pool_max, spec.refs_max)
        self.spec = spec
        self.store = FeatureStore(spec.features_dir) if spec.features_dir else None
        self._templates: dict[int, Any] = {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_templates": {}}

    # -- choices -------------------------------------------------------------------------
    def _caption(self, ex: dict) -> str | None:
        """The scene caption if ``ex`` is its scene's first expression and it has one."""
        if "caption" in ex and "expr_pos" in ex:
            cap, first = str(ex["caption"]), int(ex["expr_pos"]) == 0
        else:
            table = scene_text(*self.spec.dataset)
            cap, first_id = table.get(str(ex["record_id"]), ("", ""))
            first = str(ex["expr_id"]) == first_id
        return cap if first and cap.strip() else None

    def eligible(self, ex: dict) -> bool:
        if self.spec.caption:
            return self._caption(ex) is not None
        return bool(self.eligible_counts(ex["num_targets"], len(ex["ref_masks"])))

    def eligible_counts(self, num_targets: int, num_refs: int) -> bool | None:
        s = self.spec
        if s.caption:
            return None  # the scene's caption and the expression's position decide
        if s.select == "res":
            return num_targets == 1 and num_refs == 0
        if s.select == "gres":
            return num_refs == 0
        return True

    def labels(self, ioa: np.ndarray) -> np.ndarray:
        """Candidate labels from IoA: 1, 0, or -1 in the ignore band (module docstring)."""
        ioa = np.asarray(ioa, np.float64)
        lab = (ioa >= self.spec.positive_ioa).astype(np.int32)
        if self.spec.ignore_ioa is not None:
            lab[(ioa > self.spec.ignore_ioa) & (ioa < self.spec.positive_ioa)] = -1
        return lab

    def load_tokenizer(self, path: str) -> Any:
        from refjax.data.tokenizers import load_llama_tokenizer

        return load_llama_tokenizer(path, add_bos_token=False)

    # -- stage 1: original pixels --------------------------------------------------------
    def prepare(self, ex: dict) -> dict:
        s = self.spec
        rid = str(ex["record_id"])
        pool = np.asarray(ex["pool_masks"])
        if len(pool) == 0:
            raise BadRecordError(rid, "pool_masks", "empty candidate pool (no masks)")
        ioa = np.asarray(ex["pool_ioa"], np.float32)
        if len(pool) > s.pool_max:
            pool, ioa = pool[: s.pool_max], ioa[: s.pool_max]
        refs = np.asarray(ex["ref_masks"])
        if s.caption:
            refs = refs[:0]
        if len(refs) > s.refs_max:
            raise BadRecordError(rid, "ref_masks", f"{len(refs)} reference masks; at most "
                                 f"refs_max={s.refs_max}")
        img = np.asarray(ex["image"])
        h, w = img.shape[:2]
        geo = Expand2Square(w, h, s.size)
        out = dict(ex)
        if not s.caption:
            out["ras_orig"] = {"pool": pool, "mask": np.asarray(ex["mask"])}
        out["ras_geometry"] = np.array([w, h, s.size, s.size, geo.left, geo.top], np.float32)
        square = geo.pad_image(img, s.fill)
        if self.store is not None:
            try:
                out["ras_features"] = self.store.lookup(rid, [n for n, _ in s.encoders])
            except KeyError:
                raise BadRecordError(rid, "features", f"image not in the feature cache "
                                     f"{self.store.path}; rerun ras-features") from None
        else:
            out["ras_pixels"] = resize_square(square, dict(s.encoders))
        out["image"] = square
        out["mask"] = geo.pad(np.asarray(ex["mask"]))
        out["ref_masks"] = geo.pad(refs)
        out["pool_masks"] = geo.pad(pool)
        out["pool_ioa"] = ioa
        return out

    # -- stage 2: text -------------------------------------------------------------------
    def _encode(self, tok: Any, text: str) -> list[int]:
        t = text.lower() if self.spec.lowercase else text
        return [int(x) for x in tok.encode(t, add_special_tokens=False)] if t else []

    def template(self, tok: Any) -> Any:
        """The template's token pieces for ``tok`` (cached per tokenizer object)."""
        key = id(tok)
        if key not in self._templates:
            s = self.spec
            enc = lambda t: self._encode(tok, t)  # noqa: E731
            ids = dict(bos=int(tok.bos_token_id if tok.bos_token_id is not None else 1),
                       eos=int(tok.eos_token_id if tok.eos_token_id is not None else 2),
                       pad=int(tok.pad_token_id if tok.pad_token_id is not None else 0))
            if s.template == "plain":
                tpl = plain(enc, **ids)
            else:
                system = VICUNA_SYSTEM if s.system is None else str(s.system)
                tpl = vicuna_v1(enc, system=system, **ids)
            self._templates[key] = tpl
        return self._templates[key]

    def encode_query(self, tok: Any, text: str, placeholder: int) -> list[int]:
        """Token ids of a query with ``placeholder`` for each ``<mask-ref>`` (the pieces
        between placeholders encoded separately, stripped)."""
        ids: list[int] = []
        for j, piece in enumerate(str(text).split(MASK_REF)):
            if j:
                ids.append(int(placeholder))
            if piece.strip():
                ids += self._encode(tok, piece.strip())
        return ids

    def tokenize(self, ex: dict, tokenizer: Any, truncate: bool) -> dict:
        del truncate  # RAS never truncates (module docstring)
        tpl = self.template(tokenizer)
        out = dict(ex)
        out["ras_template"] = tpl
        if self.spec.caption:
            cap = ex.get("caption") if "expr_pos" in ex else None
            if cap is None:
                cap = self._caption(ex) or ""
            out["ras_query"] = []
            out["ras_caption"] = self._encode(tokenizer, cap.strip())
        else:
            text = ex.get("raw") or ex["text"]
            out["ras_query"] = self.encode_query(tokenizer, text, tpl.ref_placeholder)
        return out

    # -- stage 3: layout -----------------------------------------------------------------
    def extra_stages(self, train: bool, tokenizer_path: str) -> Sequence[Any]:
        return (RASLayoutStage(self, train) if train else RASLayoutEvalStage(self),)

    def layout(self, ex: dict, train: bool, rng: np.random.Generator | None = None,
               eval_terms: bool = True) -> dict:
        """The sequence of ``ex`` (shuffled with ``rng`` in training) and, in evaluation,
        the original-resolution scoring terms (module docstring)."""
        s = self.spec
        rid = str(ex["record_id"])
        n, r = len(ex["pool_masks"]), len(ex["ref_masks"])
        ioa = np.asarray(ex["pool_ioa"], np.float64)
        labels = self.labels(ioa)
        order = rng.permutation(n) if (train and rng is not None) else None
        num_targets = None
        if s.ar and train:
            pos = np.flatnonzero(labels == 1)
            if len(pos) > s.seg_max:
                keep = pos[np.argsort(-ioa[pos], kind="stable")[: s.seg_max]]
                labels[np.setdiff1d(pos, keep)] = -1
                pos = keep
            num_targets = len(pos)
        lay = build_layout(rid, ex["ras_query"], n, r, ex["ras_template"], s.layout_config(),
                           caption_ids=ex.get("ras_caption"), num_targets=num_targets,
                           order=order)
        out = {k: v for k, v in ex.items() if k != "ras_orig"}
        out["ras_layout"], out["ras_labels"] = lay, labels
        if not s.caption and not train and eval_terms:
            orig = ex["ras_orig"]
            gt = orig["mask"] if ex["num_targets"] > 0 else np.zeros_like(orig["mask"])
            out["ras_atoms"] = pool_atoms(orig["pool"], gt, s.atoms_max)
            o = oracle_per_sample(orig["pool"], gt)
            out["ras_oracle"] = (int(o["oracle_inter"]), int(o["oracle_union"]))
        return out

    # -- rows ----------------------------------------------------------------------------
    def blank(self) -> dict[str, np.ndarray]:
        s = self.spec
        S, L, P, R, K, A = s.size, s.max_len, s.pool_max, s.refs_max, s.seg_max, s.atoms_max
        row: dict[str, np.ndarray] = {
            "input_ids": np.zeros(L, np.int32),
            "slot_index": np.zeros(L, np.int32),
            "attention_mask": np.zeros(L, np.int32),
            "labels": np.full(L, ras_lib.IGNORE_INDEX, np.int32),
            "cand_pos": np.zeros(P, np.int32),
            "pool_masks": np.zeros((P, S, S), np.uint8),
            "pool_valid": np.zeros(P, np.int32),
            "pool_labels": np.zeros(P, np.int32),
        }
        if R:
            row["ref_masks"] = np.zeros((R, S, S), np.uint8)
            row["ref_valid"] = np.zeros(R, np.int32)
        if s.ar:
            row.update(ar_pos=np.zeros(K + 1, np.int32), ar_valid=np.zeros(K + 1, np.int32),
                       ar_target=np.full(K + 1, ras_lib.IGNORE_INDEX, np.int32),
                       seg_valid=np.zeros(K, np.int32))
        if s.features_dir:
            dt = storage_dtype(s.features_dtype)
            for n, shape in s.feature_shapes:
                row[f"features_{n}"] = np.zeros(shape, dt)
        else:
            for n, z in s.encoders:
                row[f"pixels_{n}"] = np.zeros((z, z, 3), np.uint8)
        row.update(mask=np.zeros((S, S), np.uint8), num_targets=np.int32(0),
                   kind=np.int32(0), valid=np.int32(0), expr_index=np.int32(-1),
                   length=np.int32(0), letterbox=np.zeros(6, np.float32))
        if not s.caption:
            row.update(atom_members=np.zeros((A, P), np.uint8), atom_area=np.zeros(A, np.int32),
                       atom_gt=np.zeros(A, np.int32), gt_area=np.int32(0),
                       atom_exact=np.int32(0), oracle_inter=np.int32(0),
                       oracle_union=np.int32(0))
        return row

    def row(self, ex: dict) -> dict[str, np.ndarray]:
        s = self.spec
        row = self.blank()
        lay = ex["ras_layout"]
        for k in ("input_ids", "slot_index", "attention_mask", "labels", "cand_pos"):
            row[k] = lay[k]
        row["length"] = np.int32(lay["length"])
        n = len(ex["pool_masks"])
        row["pool_masks"][:n] = ex["pool_masks"]
        row["pool_valid"][:n] = 1
        row["pool_labels"][:n] = ex["ras_labels"]
        if s.refs_max:
            r = len(ex["ref_masks"])
            row["ref_masks"][:r] = ex["ref_masks"]
            row["ref_valid"][:r] = 1
        if s.ar:
            for k in ("ar_pos", "ar_valid", "ar_target", "seg_valid"):
                row[k] = lay[k]
        if s.features_dir:
            dt = storage_dtype(s.features_dtype)
            for name, _ in s.feature_shapes:
                row[f"features_{name}"] = np.asarray(ex["ras_features"][name]).astype(dt)
        else:
            for name, _ in s.encoders:
                row[f"pixels_{name}"] = ex["ras_pixels"][name]
        row.update(mask=np.asarray(ex["mask"], np.uint8), num_targets=np.int32(ex["num_targets"]),
                   kind=np.int32(ex["kind"]), valid=np.int32(1),
                   expr_index=np.int32(ex.get("expr_index", -1)),
                   letterbox=np.asarray(ex["ras_geometry"], np.float32))
        if "ras_atoms" in ex:
            a = ex["ras_atoms"]
            row["atom_members"][:, : a["atom_members"].shape[1]] = a["atom_members"]
            row["atom_area"], row["atom_gt"] = a["atom_area"], a["atom_gt"]
            row.update(gt_area=np.int32(a["gt_area"]), atom_exact=np.int32(a["atom_exact"]),
                       oracle_inter=np.int32(ex["ras_oracle"][0]),
                       oracle_union=np.int32(ex["ras_oracle"][1]))
        return row


class RASLayoutStage(st._Guarded, grain.transforms.RandomMap):
    """Training: the layout with the candidates shuffled by the element's rng."""

    def __init__(self, task: RASTaskData, train: bool = True):
        self.task, self.train, self.skip_bad = task, bool(train), task.spec.skip_bad

    def random_map(self, x: Any, rng: np.random.Generator) -> Any:
        return self._run(x, rng)

    def _apply(self, x: dict, rng: np.random.Generator) -> dict:
        return self.task.layout(x, self.train, rng)


class RASLayoutEvalStage(st._Guarded, grain.transforms.Map):
    """Evaluation: the layout in stored order plus the scoring terms."""

    def __init__(self, task: RASTaskData):
        self.task, self.skip_bad = task, task.spec.skip_bad

    def map(self, x: Any) -> Any:
        return self._run(x)

    def _apply(self, x: dict) -> dict:
        return self.task.layout(x, False)


# ----------------------------------------------------------------------------- metrics
class RASAccumulator:
    """``GresAccumulator`` (gIoU, cIoU, N-acc, T-acc, Pr@x, oracle cIoU; overall, per kind,
    with / without reference masks; RES ``miou`` / ``oiou`` where no no-target sample) plus
    ``inexact_rows`` (rows whose pool had more atoms than ``data.atoms_max``) and
    ``mean_selected`` (candidates selected per sample)."""

    def __init__(self, gres: GresAccumulator | None = None, extra: np.ndarray | None = None):
        self.gres = gres if gres is not None else GresAccumulator(KINDS)
        self.extra = np.zeros(3, np.float64) if extra is None else extra

    def update(self, rows: Mapping[str, np.ndarray]) -> None:
        self.gres.update(rows)
        valid = np.asarray(rows["valid"]) > 0
        self.extra += [float(valid.sum()), float((valid & (np.asarray(rows["atom_exact"]) == 0))
                                                 .sum()),
                       float(np.asarray(rows["num_selected"], np.float64)[valid].sum())]

    def allreduce(self) -> RASAccumulator:
        extra = np.asarray(allreduce_sums(self.extra), np.float64).reshape(3)
        return RASAccumulator(self.gres.allreduce(), extra)

    def result(self) -> dict[str, float]:
        out = self.gres.result()
        out["inexact_rows"] = float(self.extra[1])
        out["mean_selected"] = float(self.extra[2] / max(self.extra[0], 1.0))
        return out


class CaptionAccumulator:
    """Stage-1 eval: ``loss`` (mean caption-token CE), ``ppl``, ``token_acc``, ``count``."""

    def __init__(self, sums: np.ndarray | None = None):
        self.sums = np.zeros(4, np.float64) if sums is None else sums

    def update(self, rows: Mapping[str, np.ndarray]) -> None:
        v = (np.asarray(rows["valid"]) > 0).astype(np.float64)
        self.sums += [v.sum()] + [float(np.sum(np.asarray(rows[k], np.float64) * v))
                                  for k in ("lm_nll", "lm_tokens", "lm_correct")]

    def allreduce(self) -> CaptionAccumulator:
        return CaptionAccumulator(np.asarray(allreduce_sums(self.sums), np.float64).reshape(4))

    def result(self) -> dict[str, float]:
        count, nll, tokens, correct = (float(x) for x in self.sums)
        out = {"count": count}
        if tokens > 0:
            out.update(loss=nll / tokens, ppl=float(np.exp(min(nll / tokens, 50.0))),
                       token_acc=correct / tokens)
        return out


# ----------------------------------------------------------------------------- task
def model_inputs(batch: Mapping[str, Any], config: Any, cfg: ras_lib.RASConfig, *,
                 features: bool, train: bool) -> dict[str, Any]:
    """``model.apply`` keywords of a batch: the sequence, masks, pixels (normalised here,
    ``refjax.models.ras.normalize_pixels``) or features, and the mode (``lm`` for captioning,
    ``nar``, or AR ``ar`` (teacher forcing, training) / ``ar_decode`` (evaluation))."""
    kw: dict[str, Any] = {k: batch[k] for k in ("input_ids", "slot_index", "attention_mask",
                                                 "cand_pos", "pool_masks", "pool_valid")}
    if "ref_masks" in batch:
        kw["ref_masks"] = batch["ref_masks"]
    if features:
        kw["features"] = {n: batch[f"features_{n}"] for n in cfg.encoder_names}
    else:
        kw["pixels"] = {n: ras_lib.normalize_pixels(batch[f"pixels_{n}"],
                                                    *ras_lib.pixel_stats(cfg, n))
                        for n in cfg.encoder_names}
    if str(config.model.objective) == "caption":
        kw["mode"] = "lm"
    elif cfg.decoding == "ar":
        kw["ar_pos"] = batch["ar_pos"]
        kw["mode"] = "ar" if train else "ar_decode"
    else:
        kw["mode"] = "nar"
    return kw


def select_candidates(logits: jax.Array, pool_valid: jax.Array, threshold: float,
                      argmax_fallback: bool) -> jax.Array:
    """NAR selection (spec 5.5): ``sigmoid(logit) > threshold`` over valid candidates; with
    ``argmax_fallback`` a row selecting nothing takes its highest-scoring valid candidate
    (RES, exactly one target: an eval-time choice)."""
    valid = jnp.asarray(pool_valid) > 0
    s = jnp.asarray(logits, jnp.float32)
    sel = (jax.nn.sigmoid(s) > jnp.float32(threshold)) & valid
    if argmax_fallback:
        best = jnp.argmax(jnp.where(valid, s, -jnp.inf), axis=-1)
        one = (jnp.arange(s.shape[-1]) == best[..., None]) & valid
        sel = jnp.where(jnp.any(sel, axis=-1, keepdims=True), sel, one)
    return sel


class RASTask(Task):
    """RAS (module docstring). ``config.model.objective``: ``select`` (NAR or AR mask-group
    selection, stages 2-3) or ``caption`` (stage 1)."""

    name = "ras"

    def __init__(self):
        self._config: Any = None

    # -- config and model ------------------------------------------------------------------
    def resolve_config(self, config: Any) -> None:
        """``model.vocab_size`` when unset: the dataset tokenizer's size (or the checkpoint's
        LLM vocabulary for ``preset="init"``, minus the AR ``[SEG]`` row)."""
        m = config.model
        if m.vocab_size is None:
            if m.preset == "init":
                llm = _init_meta(config)["config"]["llm"]
                meta_cfg = _init_meta(config)["config"]
                m.vocab_size = int(llm["vocab_size"]) - (1 if meta_cfg.get("decoding") == "ar"
                                                         else 0)
            else:
                from refjax.data.sources import tokenizer_file
                from refjax.data.tokenizers import load_llama_tokenizer

                tok = load_llama_tokenizer(tokenizer_file(config.data, LLAMA_FILE))
                m.vocab_size = len(tok)
        validate_config(config)

    def check_tokenizer(self, config: Any) -> None:
        m = config.model
        if m.preset != "ras_tiny" or m.vocab_size is None:
            return  # 13b / a converted init: the LLM's own vocabulary
        from refjax.data.sources import check_dataset_tokenizer
        from refjax.data.tokenizers import load_llama_tokenizer

        check_dataset_tokenizer(config, LLAMA_FILE, lambda p: len(load_llama_tokenizer(p)),
                                m.vocab_size)

    def build_model(self, config: Any) -> ras_lib.RAS:
        validate_config(config)
        self._config = config
        cfg = model_config(config)
        if int(config.data.max_text_len) > cfg.llm.max_position_embeddings:
            raise ValueError(f"data.max_text_len={config.data.max_text_len} exceeds the LLM "
                             f"context ({cfg.llm.max_position_embeddings} positions)")
        return ras_lib.RAS(cfg)

    def data_spec(self, config: Any) -> RASDataSpec:
        validate_config(config)
        m, d = config.model, config.data
        cfg = model_config(config)
        caption = m.objective == "caption"
        ar = cfg.decoding == "ar"
        return RASDataSpec(
            size=int(d.image_size), max_len=int(d.max_text_len), pool_max=int(d.pool_max),
            refs_max=0 if caption else int(d.refs_max), seg_max=int(d.seg_max) if ar else 0,
            atoms_max=int(d.atoms_max), objective=str(m.objective), decoding=cfg.decoding,
            select=str(d.select),
            encoders=tuple((n, cfg.input_size(n)) for n in cfg.encoder_names),
            feature_shapes=tuple((n, (*cfg.grid(n), cfg.feature_dim(n)))
                                 for n in cfg.encoder_names),
            fill=pad_fill(model_fill_mean(cfg)),
            features_dir=(os.path.abspath(os.path.expanduser(str(d.features_dir)))
                          if d.features_dir else None),
            features_dtype=str(d.features_dtype), num_image_tokens=cfg.num_image_tokens,
            seg_token_id=cfg.seg_token_id, vocab_size=int(m.vocab_size),
            template=str(d.template), system=None if d.system is None else str(d.system),
            lowercase=bool(d.lowercase), positive_ioa=float(d.positive_ioa),
            ignore_ioa=None if d.ignore_ioa is None else float(d.ignore_ioa),
            skip_bad=bool(d.skip_bad_records),
            dataset=(str(d.dataset), str(d.data_dir), d.dataset_config),
        )

    def data_task(self, config: Any) -> RASTaskData:
        spec = self.data_spec(config)
        data = RASTaskData(spec)
        if data.store is not None:
            data.store.meta  # noqa: B018  (a missing cache: FileNotFoundError with the command)
            data.store.check(dict(spec.feature_shapes), spec.features_dtype)
        return data

    def model_inputs(self, batch: Mapping[str, Any], config: Any) -> dict[str, Any]:
        return model_inputs(batch, config, model_config(config),
                            features=bool(config.data.features_dir), train="step" in batch)

    def frozen_subtrees(self, config: Any) -> tuple[str, ...]:
        """The towers (absent when fed cached features) and ``model.freeze`` (stage 1: the
        LLM and the heads), where the model has them."""
        cfg = model_config(config)
        features = bool(config.data.features_dir)
        have = model_subtrees(cfg, features)
        known = set(cfg.encoder_names) | {"mask_projector", "mask_pool_pre", "mask_ref_pre",
                                          "llm", "image_projector", "head", "seg_proj"}
        extra = tuple(str(n) for n in config.model.freeze)
        unknown = sorted(set(extra) - known)
        if unknown:
            raise ValueError(f"model.freeze names unknown subtrees {unknown}; known "
                             f"{sorted(known)}")
        towers = () if features else cfg.encoder_names
        return towers + tuple(n for n in extra if n in have and n not in towers)

    # -- training and evaluation -----------------------------------------------------------
    def loss(self, outputs: Any, aux: Mapping[str, Any], batch: Any, config: Any):
        if config.model.objective == "caption":
            return ras_loss({"lm_logits": outputs}, batch, config.loss)
        cfg = model_config(config)
        if cfg.decoding == "nar":
            return ras_loss({"logits": outputs}, batch, config.loss)
        lm = aux["lm_logits"]
        decision = jnp.stack([lm[..., cfg.seg_token_id], lm[..., cfg.eos_token_id]], axis=-1)
        return ras_loss({"scores": outputs, "decision": decision}, batch, config.loss)

    def eval_outputs(self, outputs: Any, aux: Mapping[str, Any], batch: Any, config: Any):
        valid = batch["valid"]
        if config.model.objective == "caption":
            return {**lm_sums(outputs, batch["labels"]), "valid": valid}
        cfg = model_config(config)
        if cfg.decoding == "nar":
            sel = select_candidates(outputs, batch["pool_valid"], float(config.eval.threshold),
                                    bool(config.eval.argmax_fallback))
        else:
            sel = jnp.asarray(outputs["selected"]) & (jnp.asarray(batch["pool_valid"]) > 0)
        terms = atom_terms(sel, batch["atom_members"], batch["atom_area"], batch["atom_gt"],
                           batch["gt_area"])
        out = {**terms, "has_target": (batch["num_targets"] > 0).astype(jnp.int32),
               "oracle_inter": batch["oracle_inter"], "oracle_union": batch["oracle_union"],
               "kind": batch["kind"], "valid": valid, "atom_exact": batch["atom_exact"],
               "num_selected": jnp.sum(sel.astype(jnp.int32), axis=-1)}
        if "ref_valid" in batch:
            out["ref_valid"] = batch["ref_valid"]
        return out

    def make_accumulator(self, config: Any) -> Any:
        if config.model.objective == "caption":
            return CaptionAccumulator()
        return RASAccumulator()

    # -- checkpoints and inference ---------------------------------------------------------
    def map_init(self, loaded: Variables, meta: Mapping[str, Any], model: Variables) -> Variables:
        """``config.init`` onto the model: a ``convert ras`` checkpoint (``params`` = the whole
        RAS tree) or a train workdir (its ``params`` and ``frozen`` merged: a previous
        stage). A smaller LLM vocabulary is extended for AR's ``[SEG]`` row (mean-initialised,
        ``refjax.convert.ras.extend_vocab``); ``model.fill_from`` (a converted checkpoint)
        supplies subtrees the init lacks (e.g. stage 2 from a stage-1 workdir without the
        image projector); subtrees whose shapes differ (e.g. a mask projector for other
        encoders) keep the model's initialisation, with a log line."""
        params = {**(loaded.get("params") or {}), **(loaded.get("frozen") or {})}
        if meta.get("model") not in (None, "ras") and "llm" not in params:
            raise ValueError(f"init: a {meta.get('model')!r} checkpoint is not a RAS init; "
                             f"top-level keys {sorted(params)}")
        target = model.get("params") or {}
        config = self._config
        fill = getattr(getattr(config, "model", None), "fill_from", None) if config else None
        if fill:
            from refjax.train.state import read_variables

            extra, _ = read_variables(str(fill))
            extra_p = {**(extra.get("params") or {}), **(extra.get("frozen") or {})}
            for k in sorted(set(target) - set(params)):
                if k in extra_p:
                    params[k] = extra_p[k]
                    log.info("init: %s from model.fill_from %s", k, fill)
        if "llm" in params and "llm" in target:
            params["llm"] = self._fit_vocab(params["llm"], target["llm"])
            params["llm"] = self._fit_lora(params["llm"], target["llm"])
        kept = {}
        for k, v in params.items():
            if k not in target:
                continue
            shapes_a = [np.shape(x) for x in jax.tree.leaves(v)]
            shapes_b = [tuple(x.shape) for x in jax.tree.leaves(nn.unbox(target[k]))]
            if (jax.tree.structure(v) != jax.tree.structure(nn.unbox(target[k]))
                    or shapes_a != shapes_b):
                log.warning("init: %s does not fit the model (other shapes); keeping its "
                            "initialisation", k)
                continue
            kept[k] = v
        return super().map_init({"params": kept, "batch_stats": {}}, meta, model)

    @staticmethod
    def _fit_lora(llm: Any, target: Any) -> Any:
        """LoRA adapters: fresh ones where the init has none (B = 0, a no-op); an init with
        adapters for a model without them is an error (merge them first)."""
        from refjax.models.llama import add_missing_lora, has_lora

        if has_lora(llm) and not has_lora(target):
            raise ValueError("init: the LLM has LoRA adapters but this model has none; train "
                             "with lora=on, or fold them in with "
                             "refjax.models.llama.merge_lora")
        return add_missing_lora(llm, target) if has_lora(target) else llm

    def _fit_vocab(self, llm: Any, target: Any) -> Any:
        emb = np.shape(llm["embed_tokens"]["embedding"])
        want = tuple(nn.unbox(target)["embed_tokens"]["embedding"].shape)
        if emb == want or emb[1:] != want[1:] or emb[0] > want[0]:
            return llm
        from refjax.convert.ras import extend_vocab

        cfg = model_config(self._config).llm if self._config is not None else None
        if cfg is None:
            return llm
        log.info("init: LLM vocabulary %d -> %d rows (AR [SEG])", emb[0], want[0])
        return extend_vocab(llm, dataclasses.replace(cfg, vocab_size=emb[0]), want[0])

    def make_predictor(self, model: nn.Module, variables: Variables, config: Any) -> Any:
        if config.model.objective == "caption":
            raise NotImplementedError("a stage-1 (caption) run has no mask-group predictor")
        from refjax.tasks.ras_predict import RASPredictor

        return RASPredictor.create(model, variables, config)


__all__ = ["CaptionAccumulator", "RASAccumulator", "RASData", "RASDataSpec", "RASTask",
           "RASTaskData", "model_config", "model_inputs", "scene_text", "select_candidates",
           "validate_config"]
