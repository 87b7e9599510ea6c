"""Tokenizers trained on RefShapes text: BEiT-3 / LLaMA id layouts, OneRef encoding, round trips."""

from __future__ import annotations

import os

import numpy as np
import pytest

from refjax.data import refshapes as rs
from refjax.data import tokenizers as tk
from refjax.data.errors import BadRecordError


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    cfg = rs.CONFIGS["tiny"]
    texts = []
    for split in ("train", "val"):
        for s in rs.generate_split(cfg, split, 0, 20):
            texts += [e.text for e in s.expressions] + [s.caption]
    return texts


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory) -> dict[str, str]:
    return tk.train_tokenizers(corpus, str(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def beit3(trained):
    return tk.load_beit3_tokenizer(trained["beit3"])


@pytest.fixture(scope="module")
def llama(trained):
    return tk.load_llama_tokenizer(trained["llama"])


def test_beit3_layout(beit3, trained):
    assert os.path.basename(trained["beit3"]) == "beit3.spm"
    assert beit3.convert_tokens_to_ids(["<s>", "<pad>", "</s>", "<unk>"]) == [0, 1, 2, 3]
    assert beit3.mask_token_id == len(beit3) - 1
    assert beit3.convert_ids_to_tokens(len(beit3) - 1) == "<mask>"
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=trained["beit3"])
    assert len(beit3) == sp.get_piece_size() + 2  # fairseq offset + <mask>
    text = "the small red circle left of the blue box"
    assert beit3.encode(text, add_special_tokens=False) == [i + 1 for i in sp.encode(text)]


def test_llama_layout(llama, trained):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=trained["llama"])
    assert (llama.bos_token_id, llama.eos_token_id, llama.unk_token_id) == (1, 2, 0)
    text = "all shapes with the same color as <mask-ref>"
    ids = llama(text)["input_ids"]
    assert ids[0] == 1
    assert ids[1:] == sp.encode(text)
    assert len(llama) == sp.get_piece_size()


def test_mask_ref_is_one_token(beit3, llama):
    for tok in (beit3, llama):
        ids = tok.encode("everything left of <mask-ref>", add_special_tokens=False)
        ref = tok.convert_tokens_to_ids(tk.MASK_REF)
        assert ids.count(ref) == 1 and ref != tok.unk_token_id


def test_round_trip_on_refshapes_text(beit3, llama, corpus):
    assert any(tk.MASK_REF in t for t in corpus) and any("," in t for t in corpus)
    for text in corpus:
        for tok in (beit3, llama):
            ids = tok.encode(text, add_special_tokens=False)
            assert tok.unk_token_id not in ids, text
            assert tk.decode(tok, ids) == text
        assert llama.decode(llama.encode(text, add_special_tokens=False)) == text
        if tk.MASK_REF not in text:
            assert beit3.decode(beit3.encode(text, add_special_tokens=False)) == text


def test_beit3_encode(beit3):
    ids, pad = tk.beit3_encode(beit3, "The Small RED Circle", 12)
    assert ids.dtype == np.int32 and pad.dtype == np.int32 and ids.shape == pad.shape == (12,)
    pieces = beit3.encode("the small red circle", add_special_tokens=False)
    n = len(pieces) + 2
    assert ids.tolist() == [0] + pieces + [2] + [1] * (12 - n)
    assert pad.tolist() == [0] * n + [1] * (12 - n)
    long_ids, long_pad = tk.beit3_encode(beit3, " ".join(["red circle"] * 20), 8)
    assert long_ids[0] == 0 and long_ids[-1] == 2 and long_pad.sum() == 0
    assert tk.decode(beit3, ids) == "the small red circle"


def test_beit3_encode_rejects_empty_text(beit3):
    with pytest.raises(BadRecordError) as err:
        tk.beit3_encode(beit3, "   ", 8, record_id="scene-7-e2")
    assert err.value.record_id == "scene-7-e2" and err.value.field == "text"


def test_training_is_deterministic(corpus, trained, tmp_path):
    again = tk.train_tokenizers(reversed(corpus), str(tmp_path))
    for key in ("beit3", "llama"):
        with open(trained[key], "rb") as a, open(again[key], "rb") as b:
            assert a.read() == b.read()


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        tk.load_beit3_tokenizer(str(tmp_path / "missing.spm"))
    with pytest.raises(FileNotFoundError):
        tk.load_llama_tokenizer(str(tmp_path / "missing.model"))
