"""Host-side RAS sequence layout (spec/ras.md 5.2, 6, 13): pure numpy, one example at a time.

The model (``refjax.models.ras.RAS``) splices projected vectors into the LLM input at sentinel
ids; this module decides where. For one example it returns fixed-shape arrays (pad to
``max_len`` on the right, ``pool_max`` candidates, ``seg_max`` AR targets):

v1 (Vicuna) template, NAR (stages 2-3)::

    prefix = [BOS] "A chat ... questions. USER: "
    prefix [IMG x n_img] "\\n"  [P c_1] ... [P c_N] "\\n"  query-with-[Q r_j]  " ASSISTANT:"
    [P c_1] ... [P c_N]                       <- second copy: cand_pos[i] = position of c_i

v1, AR baseline (spec 5.6): the same up to " ASSISTANT:", no second copy; for teacher forcing
``K`` ``[SEG]`` tokens and EOS follow; ``ar_pos[k]`` = the position whose next token is the
``k``-th [SEG] (``k < K``) or the EOS (``k = K``).

plain template (stage 1 captioning, spec 7)::

    [BOS] [IMG x n_img] [P c_1] ... [P c_N] "\\n" caption "\\n"

with ``labels`` = the token ids on ``caption "\\n"`` and -100 elsewhere (same positions as the
inputs, HF convention: the loss shifts).

Sentinels: ``IMAGE_TOKEN`` -200, ``CAND_TOKEN`` -201, ``REF_TOKEN`` -202, ``POOL_PRE`` -203
(``<mask-pool-pre>``), ``REF_PRE`` -204 (``<mask-ref-pre>``); ``slot_index`` names the image
token / candidate / reference of a slot (for a prefix: the mask it precedes). Only the
``N`` real candidates are laid out, so padded candidates never enter the sequence.
Candidates may be laid out in any ``order`` (training shuffles, spec 5.2); ``slot_index`` and
``cand_pos`` keep referring to candidate indices.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from refjax.data.errors import BadRecordError
from refjax.models.ras import (
    CAND_TOKEN,
    IGNORE_INDEX,
    IMAGE_TOKEN,
    POOL_PRE,
    REF_PRE,
    REF_TOKEN,
    SENTINELS,
)

TEMPLATES = ("v1", "plain")
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's "
                 "questions.")


@dataclasses.dataclass(frozen=True)
class Template:
    """Tokenised template pieces (token ids, no sentinels).

    ``prefix``: v1 ``[BOS] + "<system> USER: "``, plain ``[BOS]``; ``newline``: ``"\\n"``;
    ``assistant``: v1 ``" ASSISTANT:"`` (plain: unused); ``ref_placeholder``: the id that marks
    ``<mask-ref>`` in the query ids; ``pad``: the id written on padding.
    """

    name: str
    prefix: tuple[int, ...]
    newline: tuple[int, ...]
    assistant: tuple[int, ...] = ()
    eos: int = 2
    pad: int = 0
    ref_placeholder: int = REF_TOKEN

    def __post_init__(self):
        if self.name not in TEMPLATES:
            raise ValueError(f"unknown template {self.name!r}; one of {TEMPLATES}")
        for f in ("prefix", "newline", "assistant"):
            v = tuple(int(x) for x in getattr(self, f))
            if any(x < 0 for x in v):
                raise ValueError(f"template {f} holds negative ids {v}")
            object.__setattr__(self, f, v)
        if self.name == "v1" and not self.assistant:
            raise ValueError("the v1 template needs the ' ASSISTANT:' ids")


def vicuna_v1(encode: Callable[[str], Sequence[int]], *, bos: int = 1, eos: int = 2,
              pad: int = 0, ref_placeholder: int = REF_TOKEN,
              system: str = VICUNA_SYSTEM) -> Template:
    """The v1 template from ``encode(text) -> ids`` (no special tokens), pieces encoded
    separately as LLaVA's ``tokenizer_image_token`` does around its image token."""
    return Template("v1", (bos, *encode(system + " USER: ")), tuple(encode("\n")),
                    tuple(encode(" ASSISTANT:")), eos, pad, ref_placeholder)


def plain(encode: Callable[[str], Sequence[int]], *, bos: int = 1, eos: int = 2,
          pad: int = 0) -> Template:
    """LLaVA's ``plain`` template (stage 1): ``[BOS]`` then the masks, ``"\\n"``, caption."""
    return Template("plain", (bos,), tuple(encode("\n")), (), eos, pad)


@dataclasses.dataclass(frozen=True)
class LayoutConfig:
    """Fixed shapes of a layout: ``max_len`` tokens, ``pool_max`` candidates, ``refs_max``
    references, ``num_image_tokens`` global visual tokens (0: none, stage 1), ``decoding``
    (``nar`` | ``ar``), ``seg_max`` AR targets and the ``[SEG]`` id, ``vocab_size`` (when
    set, text ids are checked against it)."""

    max_len: int
    pool_max: int
    refs_max: int = 0
    num_image_tokens: int = 0
    decoding: str = "nar"
    seg_max: int = 0
    seg_token_id: int = -1
    vocab_size: int | None = None

    def __post_init__(self):
        if self.decoding not in ("nar", "ar"):
            raise ValueError(f"unknown decoding {self.decoding!r}")
        if self.decoding == "ar" and self.seg_token_id < 0:
            raise ValueError("AR layouts need seg_token_id")
        if min(self.max_len, self.pool_max) < 1 or min(self.refs_max, self.seg_max,
                                                         self.num_image_tokens) < 0:
            raise ValueError(f"bad layout sizes {self}")


class _Seq:
    def __init__(self):
        self.ids: list[int] = []
        self.slot: list[int] = []
        self.label: list[int] = []

    def text(self, ids: Sequence[int], labelled: bool = False) -> None:
        ids = [int(x) for x in ids]
        self.ids += ids
        self.slot += [0] * len(ids)
        self.label += ids if labelled else [IGNORE_INDEX] * len(ids)

    def slot_(self, sentinel: int, index: int) -> int:
        self.ids.append(sentinel)
        self.slot.append(int(index))
        self.label.append(IGNORE_INDEX)
        return len(self.ids) - 1

    def masks(self, order: Sequence[int]) -> np.ndarray:
        pos = np.zeros(len(order), np.int64)
        for i in order:
            self.slot_(POOL_PRE, i)
            pos[i] = self.slot_(CAND_TOKEN, i)
        return pos


def _check_text(record_id: str, ids: Sequence[int], vocab: int | None, what: str,
                allow: int | None = None) -> None:
    bad = [int(x) for x in ids if (int(x) < 0 and int(x) != allow)
           or (vocab is not None and int(x) >= vocab and int(x) != allow)]
    if bad:
        raise BadRecordError(record_id, "text", f"{what} holds invalid token ids {bad[:8]}"
                             + (f" (vocabulary {vocab})" if vocab is not None else ""))


def build_layout(
    record_id: str,
    query_ids: Sequence[int],
    num_candidates: int,
    num_refs: int,
    template: Template,
    cfg: LayoutConfig,
    *,
    caption_ids: Sequence[int] | None = None,
    num_targets: int | None = None,
    order: Sequence[int] | None = None,
) -> dict[str, np.ndarray]:
    """The layout of one example (see the module docstring).

    ``query_ids``: the tokenised query, ``template.ref_placeholder`` for each ``<mask-ref>``
    (the j-th placeholder takes reference j); ``num_candidates`` N (1..pool_max) and
    ``num_refs`` (0..refs_max, must equal the number of placeholders); ``caption_ids`` (plain
    template); ``num_targets`` (AR teacher forcing: that many ``[SEG]`` + EOS; None: the
    prompt only, for decoding); ``order``: the sequence order of the candidates (a permutation
    of ``range(N)``; default identity).

    Returns int32 arrays: ``input_ids``, ``slot_index``, ``attention_mask``, ``labels``
    (max_len,); ``cand_pos``, ``cand_valid`` (pool_max,) (second-copy positions; plain / AR:
    the only copy); AR also ``ar_pos``, ``ar_valid``, ``ar_target`` (seg_max + 1,) and
    ``seg_valid`` (seg_max,); and ``length`` (). Raises ``BadRecordError`` naming
    ``record_id`` and the field (``text``, ``pool_masks``, ``ref_masks``, ``num_targets``).
    """
    n, r = int(num_candidates), int(num_refs)
    if not 1 <= n <= cfg.pool_max:
        raise BadRecordError(record_id, "pool_masks",
                             f"{n} candidates; need 1..pool_max={cfg.pool_max}")
    if not 0 <= r <= cfg.refs_max:
        raise BadRecordError(record_id, "ref_masks",
                             f"{r} reference masks; at most refs_max={cfg.refs_max}")
    order = list(range(n)) if order is None else [int(i) for i in order]
    if sorted(order) != list(range(n)):
        raise ValueError(f"order {order} is not a permutation of range({n})")
    q = [int(x) for x in query_ids]
    ph = template.ref_placeholder
    _check_text(record_id, q, cfg.vocab_size, "query", allow=ph)
    n_ph = sum(1 for x in q if x == ph)
    if n_ph != r:
        raise BadRecordError(record_id, "ref_masks",
                             f"the text has {n_ph} <mask-ref> placeholder(s) but {r} "
                             f"reference mask(s) were given")
    for piece in ("prefix", "newline", "assistant"):
        _check_text(record_id, getattr(template, piece), cfg.vocab_size, f"template {piece}")

    s = _Seq()
    s.text(template.prefix)
    for k in range(cfg.num_image_tokens):
        s.slot_(IMAGE_TOKEN, k)
    ar: dict[str, np.ndarray] = {}
    if template.name == "plain":
        if not caption_ids:
            raise BadRecordError(record_id, "text", "empty caption (plain template)")
        _check_text(record_id, caption_ids, cfg.vocab_size, "caption")
        if q:
            raise ValueError("the plain template takes no query (pass query_ids=())")
        cand_pos = s.masks(order)
        s.text(template.newline)
        s.text(list(caption_ids) + list(template.newline), labelled=True)
    else:
        if not [x for x in q if x != ph]:
            raise BadRecordError(record_id, "text", "empty query text")
        if cfg.num_image_tokens:
            s.text(template.newline)
        first = s.masks(order)
        s.text(template.newline)
        j = 0
        for x in q:
            if x == ph:
                s.slot_(REF_PRE, j)
                s.slot_(REF_TOKEN, j)
                j += 1
            else:
                s.text([x])
        s.text(template.assistant)
        if cfg.decoding == "nar":
            cand_pos = s.masks(order)
        else:
            cand_pos = first
            ar = _ar_tail(record_id, s, template, cfg, num_targets)
    length = len(s.ids)
    if length > cfg.max_len:
        raise BadRecordError(record_id, "text",
                             f"sequence of {length} tokens exceeds max_len={cfg.max_len} "
                             f"({n} candidates, {len(q)} query tokens, {r} references)")
    pad = cfg.max_len - length
    out = {
        "input_ids": np.asarray(s.ids + [template.pad] * pad, np.int32),
        "slot_index": np.asarray(s.slot + [0] * pad, np.int32),
        "attention_mask": np.asarray([1] * length + [0] * pad, np.int32),
        "labels": np.asarray(s.label + [IGNORE_INDEX] * pad, np.int32),
        "cand_pos": np.zeros(cfg.pool_max, np.int32),
        "cand_valid": np.zeros(cfg.pool_max, np.int32),
        "length": np.int32(length),
    }
    out["cand_pos"][:n] = cand_pos
    out["cand_valid"][:n] = 1
    out.update(ar)
    return out


def _ar_tail(record_id: str, s: _Seq, template: Template, cfg: LayoutConfig,
             num_targets: int | None) -> dict[str, np.ndarray]:
    k_max = cfg.seg_max
    out = {
        "ar_pos": np.zeros(k_max + 1, np.int32),
        "ar_valid": np.zeros(k_max + 1, np.int32),
        "ar_target": np.full(k_max + 1, IGNORE_INDEX, np.int32),
        "seg_valid": np.zeros(k_max, np.int32),
    }
    if num_targets is None:
        return out
    k = int(num_targets)
    if not 0 <= k <= k_max:
        raise BadRecordError(record_id, "num_targets", f"{k} targets; at most seg_max={k_max}")
    start = len(s.ids)  # first [SEG] (or the EOS)
    s.text([cfg.seg_token_id] * k + [template.eos])
    out["ar_pos"][: k + 1] = np.arange(start - 1, start + k)
    out["ar_valid"][: k + 1] = 1
    out["ar_target"][:k] = cfg.seg_token_id
    out["ar_target"][k] = template.eos
    out["seg_valid"][:k] = 1
    return out


def layout_length(num_candidates: int, query_len: int, num_refs: int, template: Template,
                  cfg: LayoutConfig, *, caption_len: int = 0,
                  num_targets: int | None = None) -> int:
    """The unpadded length :func:`build_layout` would produce (for bucketing / max_len)."""
    n = 2 * int(num_candidates)
    if template.name == "plain":
        return (len(template.prefix) + cfg.num_image_tokens + n + caption_len
                + 2 * len(template.newline))
    length = (len(template.prefix) + cfg.num_image_tokens
              + (len(template.newline) if cfg.num_image_tokens else 0) + n
              + len(template.newline) + query_len + num_refs + len(template.assistant))
    if cfg.decoding == "nar":
        return length + n
    return length + (0 if num_targets is None else int(num_targets) + 1)


def stack(rows: Sequence[dict[str, np.ndarray]]) -> dict[str, Any]:
    """Stack per-example layouts into a batch (leading axis)."""
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


__all__ = ["LayoutConfig", "SENTINELS", "Template", "build_layout", "layout_length", "plain",
           "stack", "vicuna_v1"]
