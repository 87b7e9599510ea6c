"""RAS host-side sequence layout (refjax.data.ras_layout): slot positions of both candidate
copies and their prefixes, references inline, padding, stage-1 labels, AR tails, and the
bad-record errors (each names the record and the field)."""

import numpy as np
import pytest

from refjax.data import ras_layout as rl
from refjax.data.errors import BadRecordError
from refjax.models.ras import CAND_TOKEN, IGNORE_INDEX, IMAGE_TOKEN, POOL_PRE, REF_PRE, REF_TOKEN

PH = 99  # the tokenizer id of <mask-ref> in these tests
V1 = rl.Template("v1", prefix=(1, 10, 11, 12), newline=(13,), assistant=(14, 15), eos=2, pad=0,
                 ref_placeholder=PH)
PLAIN = rl.Template("plain", prefix=(1,), newline=(13,), eos=2, pad=0)
NAR = rl.LayoutConfig(max_len=64, pool_max=6, refs_max=2, num_image_tokens=4)
AR = rl.LayoutConfig(max_len=64, pool_max=6, refs_max=2, num_image_tokens=4, decoding="ar",
                     seg_max=3, seg_token_id=250)


def _runs(ids, slot, sentinel):
    return [int(slot[i]) for i in np.flatnonzero(ids == sentinel)]


def test_v1_nar_layout_round_trip():
    query = [20, 21, PH, 22, PH, 23]
    out = rl.build_layout("rec-1", query, 4, 2, V1, NAR, order=[2, 0, 3, 1])
    ids, slot, n = out["input_ids"], out["slot_index"], int(out["length"])
    assert ids.shape == slot.shape == out["attention_mask"].shape == (64,)
    assert out["attention_mask"].sum() == n and not out["attention_mask"][n:].any()
    assert (ids[n:] == V1.pad).all()
    # prefix then the image slots in order, then "\n"
    assert list(ids[:4]) == [1, 10, 11, 12]
    assert list(ids[4:8]) == [IMAGE_TOKEN] * 4 and list(slot[4:8]) == [0, 1, 2, 3]
    assert ids[8] == 13
    # every candidate appears exactly twice, in the given order, each preceded by the prefix
    cands = np.flatnonzero(ids == CAND_TOKEN)
    assert len(cands) == 8
    assert list(slot[cands]) == [2, 0, 3, 1, 2, 0, 3, 1]
    assert (ids[cands - 1] == POOL_PRE).all() and (slot[cands - 1] == slot[cands]).all()
    assert len(np.flatnonzero(ids == POOL_PRE)) == 8
    # second copy after " ASSISTANT:", cand_pos indexes candidates (not the order)
    asst = int(np.flatnonzero(ids == 15)[0])
    assert ids[asst - 1] == 14
    second = cands[cands > asst]
    first = cands[cands < asst]
    for i in range(4):
        assert out["cand_pos"][i] == second[list(slot[second]).index(i)]
        assert ids[out["cand_pos"][i]] == CAND_TOKEN and slot[out["cand_pos"][i]] == i
    assert list(out["cand_valid"]) == [1, 1, 1, 1, 0, 0] and list(out["cand_pos"][4:]) == [0, 0]
    # query tokens in order with each placeholder replaced by [<mask-ref-pre>, ref j]
    q = list(ids[first[-1] + 2: asst - 1])
    assert q == [20, 21, REF_PRE, REF_TOKEN, 22, REF_PRE, REF_TOKEN, 23]
    assert _runs(ids, slot, REF_TOKEN) == [0, 1]
    refs = np.flatnonzero(ids == REF_TOKEN)
    assert (ids[refs - 1] == REF_PRE).all()
    # the second copy ends the sequence; nothing is labelled in NAR
    assert second[-1] == n - 1
    assert (out["labels"] == IGNORE_INDEX).all()
    assert rl.layout_length(4, len(query), 2, V1, NAR) == n


def test_padded_candidates_are_not_in_the_sequence():
    a = rl.build_layout("a", [20, 21], 2, 0, V1, NAR)
    b = rl.build_layout("b", [20, 21], 5, 0, V1, NAR)
    assert _runs(a["input_ids"], a["slot_index"], CAND_TOKEN) == [0, 1, 0, 1]
    assert set(_runs(b["input_ids"], b["slot_index"], CAND_TOKEN)) == set(range(5))
    assert int(b["length"]) - int(a["length"]) == 4 * 3  # 2 copies x (prefix + token)


def test_no_image_tokens_and_stage1_plain_captions():
    cfg = rl.LayoutConfig(max_len=32, pool_max=4)
    out = rl.build_layout("cap", (), 3, 0, PLAIN, cfg, caption_ids=[40, 41, 42])
    ids, n = out["input_ids"], int(out["length"])
    assert IMAGE_TOKEN not in ids
    assert list(ids[:n]) == [1, POOL_PRE, CAND_TOKEN, POOL_PRE, CAND_TOKEN, POOL_PRE,
                             CAND_TOKEN, 13, 40, 41, 42, 13]
    lab = out["labels"]
    assert list(lab[:n]) == [IGNORE_INDEX] * 8 + [40, 41, 42, 13]
    assert (lab[n:] == IGNORE_INDEX).all()
    assert list(out["cand_pos"][:3]) == [2, 4, 6]
    assert rl.layout_length(3, 0, 0, PLAIN, cfg, caption_len=3) == n
    # v1 without global tokens: no image slots and no "\n" after them
    v1 = rl.build_layout("q", [20], 1, 0, V1, rl.LayoutConfig(max_len=32, pool_max=2))
    assert list(v1["input_ids"][:7]) == [1, 10, 11, 12, POOL_PRE, CAND_TOKEN, 13]


def test_ar_teacher_forcing_tail_and_prompt():
    out = rl.build_layout("ar", [20, PH], 3, 1, V1, AR, num_targets=2)
    ids, n = out["input_ids"], int(out["length"])
    assert list(ids[n - 3:n]) == [250, 250, 2]
    assert len(np.flatnonzero(ids == CAND_TOKEN)) == 3  # one copy only
    assert list(out["ar_pos"]) == [n - 4, n - 3, n - 2, 0]
    assert list(out["ar_valid"]) == [1, 1, 1, 0]
    assert list(out["ar_target"]) == [250, 250, 2, IGNORE_INDEX]
    assert list(out["seg_valid"]) == [1, 1, 0]
    # each ar_pos is the position right before the token it predicts
    for p, t in zip(out["ar_pos"][:3], out["ar_target"][:3]):
        assert ids[p + 1] == t
    assert ids[out["ar_pos"][0]] == 15  # the last token of " ASSISTANT:"
    prompt = rl.build_layout("ar", [20, PH], 3, 1, V1, AR)
    assert int(prompt["length"]) == n - 3 and not prompt["ar_valid"].any()
    np.testing.assert_array_equal(prompt["input_ids"][: n - 3], ids[: n - 3])
    no_target = rl.build_layout("ar0", [20], 2, 0, V1, AR, num_targets=0)
    m = int(no_target["length"])
    assert no_target["input_ids"][m - 1] == 2 and list(no_target["ar_pos"][:1]) == [m - 2]
    assert rl.layout_length(3, 2, 1, V1, AR, num_targets=2) == n


def test_stack_batches_rows():
    rows = [rl.build_layout(str(i), [20] * (i + 1), i + 1, 0, V1, NAR) for i in range(3)]
    b = rl.stack(rows)
    assert b["input_ids"].shape == (3, 64) and b["cand_pos"].shape == (3, 6)
    assert list(b["length"]) == [int(r["length"]) for r in rows]


@pytest.mark.parametrize("kwargs,field,match", [
    (dict(query_ids=[20] * 40, num_candidates=6), "text", "exceeds max_len=64"),
    (dict(query_ids=[20, PH]), "ref_masks", "1 <mask-ref> placeholder"),
    (dict(query_ids=[20], num_refs=1), "ref_masks", "0 <mask-ref>"),
    (dict(query_ids=[20, PH, PH, PH], num_refs=3), "ref_masks", "refs_max=2"),
    (dict(query_ids=[20], num_candidates=7), "pool_masks", "pool_max=6"),
    (dict(query_ids=[20], num_candidates=0), "pool_masks", "candidates"),
    (dict(query_ids=[]), "text", "empty query"),
    (dict(query_ids=[PH], num_refs=1), "text", "empty query"),
    (dict(query_ids=[20, -5]), "text", "invalid token ids"),
])
def test_bad_records_name_the_record_and_field(kwargs, field, match):
    kw = dict(query_ids=[20], num_candidates=2, num_refs=0)
    kw.update(kwargs)
    with pytest.raises(BadRecordError, match=match) as e:
        rl.build_layout("img7/expr3", kw["query_ids"], kw["num_candidates"], kw["num_refs"],
                        V1, NAR)
    assert e.value.record_id == "img7/expr3" and e.value.field == field
    assert "img7/expr3" in str(e.value)


def test_bad_records_vocab_caption_and_targets():
    cfg = rl.LayoutConfig(max_len=64, pool_max=6, vocab_size=50)
    with pytest.raises(BadRecordError, match="vocabulary 50") as e:
        rl.build_layout("r", [20, 60], 2, 0, V1, cfg)
    assert e.value.field == "text"
    with pytest.raises(BadRecordError, match="empty caption") as e:
        rl.build_layout("c", (), 2, 0, PLAIN, rl.LayoutConfig(max_len=16, pool_max=2))
    assert e.value.field == "text"
    with pytest.raises(BadRecordError, match="seg_max=3") as e:
        rl.build_layout("t", [20], 2, 0, V1, AR, num_targets=4)
    assert e.value.field == "num_targets"
    with pytest.raises(ValueError, match="permutation"):
        rl.build_layout("o", [20], 2, 0, V1, NAR, order=[0, 0])


def test_template_helpers_encode_pieces():
    vocab: dict[str, int] = {}

    def encode(text):
        return [vocab.setdefault(w, 100 + len(vocab)) for w in text.replace("\n", " \\n ").split()]

    t = rl.vicuna_v1(encode, ref_placeholder=PH)
    assert t.name == "v1" and t.prefix[0] == 1 and len(t.prefix) > 10
    assert t.newline == (vocab["\\n"],) and t.assistant == (vocab["ASSISTANT:"],)
    p = rl.plain(encode)
    assert p.prefix == (1,) and p.newline == (vocab["\\n"],)
    with pytest.raises(ValueError, match="ASSISTANT"):
        rl.Template("v1", (1,), (13,))
