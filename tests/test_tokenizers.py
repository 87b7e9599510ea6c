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


def test_a_pinned_corpus_is_copied_not_trained(corpus, trained, tmp_path):
    # Pin files that training could not produce (the other model's bytes in each slot): a
    # matching corpus must get exactly those, whatever the installed SentencePiece trains.
    fake = tmp_path / "fake"
    fake.mkdir()
    for src, name in ((trained["llama"], tk.BEIT3_FILE), (trained["beit3"], tk.LLAMA_FILE)):
        (fake / name).write_bytes(open(src, "rb").read())
    pinned = tmp_path / "pinned"
    where = tk.pin_tokenizers(corpus, str(fake), pinned_dir=str(pinned))
    assert os.path.basename(where) == tk.corpus_digest(corpus)[:16]
    # the digest ignores order, case, surrounding space and duplicates, as training does
    assert tk.corpus_digest([c.upper() + " " for c in reversed(corpus)] + corpus) == \
        tk.corpus_digest(corpus)
    got = tk.train_tokenizers(corpus, str(tmp_path / "out"), pinned_dir=str(pinned))
    assert open(got["beit3"], "rb").read() == open(trained["llama"], "rb").read()
    assert open(got["llama"], "rb").read() == open(trained["beit3"], "rb").read()
    # another corpus or vocabulary bound is trained as before
    other = tk.train_tokenizers(corpus[:-1], str(tmp_path / "o1"), pinned_dir=str(pinned))
    assert tk.load_beit3_tokenizer(other["beit3"]) is not None
    assert tk.corpus_digest(corpus, 500) != tk.corpus_digest(corpus)


def test_the_shipped_refshapes_default_tokenizers_are_pinned():
    # The checkpoints in checkpoints/ were trained on RefShapes 'default' with these files; a
    # build of that corpus anywhere must give them (BENCHMARKS.md, session 6).
    from refjax.train.trainer import load_config_json

    entries = sorted(os.listdir(tk.PINNED_DIR))
    assert entries, "no pinned tokenizers"
    sizes = set()
    for e in entries:
        files = sorted(os.listdir(os.path.join(tk.PINNED_DIR, e)))
        assert files == sorted([tk.BEIT3_FILE, tk.LLAMA_FILE]), e
        beit3 = tk.load_beit3_tokenizer(os.path.join(tk.PINNED_DIR, e, tk.BEIT3_FILE))
        llama = tk.load_llama_tokenizer(os.path.join(tk.PINNED_DIR, e, tk.LLAMA_FILE))
        assert beit3.convert_tokens_to_ids(tk.MASK_REF) != beit3.unk_token_id
        sizes.add((len(beit3), len(llama)))
    ckpts = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         "checkpoints")
    oneref = load_config_json(os.path.join(ckpts, "refshapes_oneref_tiny"))
    ras = load_config_json(os.path.join(ckpts, "refshapes_ras_tiny"))
    assert oneref.data.dataset_config == ras.data.dataset_config == "default"
    assert (oneref.model.vocab_size, ras.model.vocab_size) in sizes
