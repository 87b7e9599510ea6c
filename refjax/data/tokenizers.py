"""Tokenizers: train RefShapes vocabularies and load BEiT-3 / LLaMA tokenizers via transformers.

Two SentencePiece models are trained on a corpus (RefShapes: the train split's expressions and
captions, lower-cased):

- ``beit3.spm``: a unigram model laid out like BEiT-3's/XLM-R's (spm ``unk=0, bos=1, eos=2``,
  no pad). ``XLMRobertaTokenizer`` adds the fairseq offset, which gives ``<s>``=0, ``<pad>``=1,
  ``</s>``=2, ``<unk>``=3, spm piece k -> k+1, and ``<mask>`` = the last id.
- ``tokenizer.model``: a BPE model laid out like LLaMA's (``unk=0, bos=1, eos=2``, no pad), so
  ``LlamaTokenizer`` ids equal spm ids.

SentencePiece's trainer is not stable across its versions (the same RefShapes corpus gave 152
pieces with 0.2.3 and 212 with 0.2.2), and a model trained on one machine reads every text id
wrongly on another. So the tokenizers of the corpora refjax ships checkpoints for are pinned:
``pinned_tokenizers/<digest>/`` holds the files trained here, keyed by ``corpus_digest``, and
``train_tokenizers`` copies them instead of training whenever the corpus matches.

``<mask-ref>`` (RAS reference-mask placeholder) is a user-defined symbol in both, so it is always
one token. Note transformers 5: ``Tokenizer(vocab_file=...)`` silently gives an empty tokenizer,
so loading goes through ``from_pretrained``.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable

import numpy as np

from refjax.data.errors import BadRecordError

MASK_REF = "<mask-ref>"
BEIT3_FILE = "beit3.spm"
LLAMA_FILE = "tokenizer.model"
BOS, PAD, EOS = 0, 1, 2  # BEiT-3 / XLM-R ids
PINNED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pinned_tokenizers")
log = logging.getLogger(__name__)


def _train_spm(texts: list[str], path: str, vocab_size: int, **kwargs) -> str:
    import sentencepiece as spm

    model = io.BytesIO()  # in-memory corpus and model: no temp paths inside the model proto
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        character_coverage=1.0,
        user_defined_symbols=[MASK_REF],
        num_threads=1,
        shuffle_input_sentence=False,
        minloglevel=2,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        **kwargs,
    )
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:
        f.write(model.getvalue())
    return path


def _corpus(texts: Iterable[str]) -> list[str]:
    corpus = sorted({t.strip().lower() for t in texts if t.strip()})
    if not corpus:
        raise ValueError("cannot train tokenizers on an empty corpus")
    return corpus


def corpus_digest(texts: Iterable[str], vocab_size: int = 1000) -> str:
    """The key of a corpus's pinned tokenizers: sha256 of the vocabulary bound and the
    deduplicated, lower-cased, sorted texts (what ``train_tokenizers`` trains on)."""
    h = hashlib.sha256(f"{vocab_size}\n".encode())
    for t in _corpus(texts):
        h.update(t.encode() + b"\n")
    return h.hexdigest()


def pin_tokenizers(texts: Iterable[str], trained_dir: str, vocab_size: int = 1000,
                   pinned_dir: str = PINNED_DIR) -> str:
    """Store the tokenizers trained on ``texts`` (``trained_dir``) as that corpus's pinned copy;
    returns its directory."""
    dst = os.path.join(pinned_dir, corpus_digest(texts, vocab_size)[:16])
    _copy_tokenizers(trained_dir, dst)
    return dst


def _copy_tokenizers(src: str, dst: str) -> dict[str, str]:
    os.makedirs(dst, exist_ok=True)
    out = {}
    for key, name in (("beit3", BEIT3_FILE), ("llama", LLAMA_FILE)):
        out[key] = os.path.join(dst, name)
        shutil.copyfile(os.path.join(src, name), out[key])
    return out


def train_tokenizers(texts: Iterable[str], out_dir: str, vocab_size: int = 1000,
                     pinned_dir: str | None = PINNED_DIR) -> dict[str, str]:
    """Train the BEiT-3-style unigram and LLaMA-style BPE models on ``texts`` (lower-cased).

    Writes ``out_dir/beit3.spm`` and ``out_dir/tokenizer.model``; returns their paths. The
    corpus is deduplicated and sorted, and training is single-threaded and in memory, so the
    files are a deterministic function of the text set for one SentencePiece version. Where
    ``pinned_dir`` holds this corpus's tokenizers (module docstring), they are copied instead,
    the same files on every machine. ``vocab_size`` is an upper bound (a small corpus gives
    fewer pieces).
    """
    corpus = _corpus(texts)
    if pinned_dir is not None:
        pinned = os.path.join(pinned_dir, corpus_digest(corpus, vocab_size)[:16])
        if all(os.path.isfile(os.path.join(pinned, n)) for n in (BEIT3_FILE, LLAMA_FILE)):
            log.info("tokenizers: the pinned copy for this corpus (%s), not trained", pinned)
            return _copy_tokenizers(pinned, out_dir)
    # Each distinct word once more as its own sentence: on small, repetitive corpora spm's
    # unigram trainer otherwise drops common whole words ('▁the' -> '▁' 'the').
    corpus += sorted({w for t in corpus for w in t.split()})
    beit3 = _train_spm(corpus, os.path.join(out_dir, BEIT3_FILE), vocab_size, model_type="unigram")
    llama = _train_spm(corpus, os.path.join(out_dir, LLAMA_FILE), vocab_size, model_type="bpe")
    return {"beit3": beit3, "llama": llama}


def load_beit3_tokenizer(path: str):
    """An ``XLMRobertaTokenizer`` from a SentencePiece file (any name, e.g. ``beit3.spm``) or dir.

    transformers recognises only ``*.model`` files or a directory holding
    ``sentencepiece.bpe.model``, so other file names are staged in a temporary directory.
    """
    from transformers import XLMRobertaTokenizer

    if os.path.isdir(path) or path.endswith(".model"):
        return XLMRobertaTokenizer.from_pretrained(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no SentencePiece model at {path}")
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copyfile(path, os.path.join(tmp, "sentencepiece.bpe.model"))
        return XLMRobertaTokenizer.from_pretrained(tmp)


def load_llama_tokenizer(path: str, add_bos_token: bool = True):
    """A ``LlamaTokenizer`` from a ``tokenizer.model`` file or a directory holding one."""
    from transformers import LlamaTokenizer

    if not os.path.exists(path):
        raise FileNotFoundError(f"no SentencePiece model at {path}")
    return LlamaTokenizer.from_pretrained(path, add_bos_token=add_bos_token)


def beit3_encode(
    tokenizer, text: str, max_len: int, record_id: str = "?"
) -> tuple[np.ndarray, np.ndarray]:
    """OneRef's text pipeline: lower-case, tokenize, truncate to ``max_len - 2``, add BOS/EOS.

    Returns ``(ids int32[max_len], padding_mask int32[max_len])``: ids ``[0] + pieces + [2]``
    padded with 1, and the mask 1 on padding positions. Empty text raises ``BadRecordError``.
    """
    if max_len < 3:
        raise ValueError(f"max_len must be >= 3, got {max_len}")
    if text is None or not str(text).strip():
        raise BadRecordError(record_id, "text", "empty expression text")
    pieces = tokenizer.encode(str(text).lower(), add_special_tokens=False)[: max_len - 2]
    ids = np.full((max_len,), PAD, np.int32)
    seq = [BOS] + list(pieces) + [EOS]
    ids[: len(seq)] = seq
    mask = np.ones((max_len,), np.int32)
    mask[: len(seq)] = 0
    return ids, mask


def decode(tokenizer, ids) -> str:
    """Decode ids to text, skipping special tokens and restoring the space before ``<mask-ref>``.

    (XLM-R's pre-tokenizer drops the whitespace in front of added tokens; LLaMA's keeps it.)
    """
    ids = [int(i) for i in np.asarray(ids).reshape(-1)]
    text = tokenizer.decode(ids, skip_special_tokens=True)
    text = re.sub(r"(?<=\S)" + re.escape(MASK_REF), " " + MASK_REF, text)
    return re.sub(re.escape(MASK_REF) + r"(?=\w)", MASK_REF + " ", text)
