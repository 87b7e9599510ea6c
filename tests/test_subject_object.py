"""Subject/object word spans: the rule-based fallback, the official spaCy rule (on test
doubles of spaCy tokens: no spaCy model can be installed here), and the parser choice."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import pytest

from refjax.data import subject_object as so
from refjax.data.schema import NO_SPAN


def words(text: str, span: tuple[int, int]) -> list[str]:
    return text.split()[span[0] : span[1]] if span != NO_SPAN else []


def head(text: str, span: tuple[int, int]) -> str | None:
    return text.split()[span[1] - 1] if span != NO_SPAN else None


# ----------------------------------------------------------------------------- fallback
@pytest.mark.parametrize(
    "text, subject, obj",
    [
        ("man in red shirt on left", ["man"], ["red", "shirt"]),
        ("the left zebra", ["left", "zebra"], []),
        ("a woman holding an umbrella", ["woman"], ["umbrella"]),
        ("guy far left", ["guy"], []),
        ("far left", ["left"], []),
        ("zebra on left", ["zebra"], ["left"]),
        ("white car next to the bus", ["white", "car"], ["bus"]),
        ("the building behind the tree", ["building"], ["tree"]),
        ("the man who is holding a bat", ["man"], ["bat"]),
        ("kid with the blue hat on the right", ["kid"], ["blue", "hat"]),
        ("person in front of the tv", ["person"], ["front"]),
        ("brown dog", ["brown", "dog"], []),
        ("on the left", ["left"], []),
        ("person partially cut off on left", ["person"], ["left"]),  # -ly adverb ends the NP
        ("left half of sandwich", ["left", "half"], ["sandwich"]),
        ("jelly donut", ["jelly", "donut"], []),
    ],
)
def test_rule_spans_on_refcoco_like_phrases(text, subject, obj):
    s, o = so.rule_spans(text)
    assert words(text, s) == subject
    assert words(text, o) == obj


def test_rule_spans_edge_cases():
    assert so.rule_spans("") == (NO_SPAN, NO_SPAN)
    assert so.rule_spans("   ") == (NO_SPAN, NO_SPAN)
    # punctuation stays attached to its whitespace word; indices are whitespace words
    s, o = so.rule_spans("Man, in a red shirt.")
    assert head("Man, in a red shirt.", s) == "Man,"
    assert head("Man, in a red shirt.", o) == "shirt."
    # a leading preposition is skipped; only boundary words: the last word is the subject
    assert so.rule_spans("on top of") == ((1, 2), NO_SPAN)
    assert so.rule_spans("next to") == ((1, 2), NO_SPAN)
    for text in ("man in red shirt on left", "the one on the right", "two boxes"):
        s, o = so.rule_spans(text)
        n = len(text.split())
        for span in (s, o):
            assert span == NO_SPAN or 0 <= span[0] < span[1] <= n


# ----------------------------------------------------------------------------- spaCy rule
@dataclass(eq=False)
class FakeToken:
    """The attributes of a spaCy Token that the official rule reads."""

    i: int
    idx: int
    text: str
    dep_: str
    head_i: int
    doc: list = field(repr=False, default_factory=list)

    @property
    def children(self):
        return [t for t in self.doc if t.head_i == self.i and t.i != self.i]

    @property
    def lefts(self):
        return [t for t in self.children if t.i < self.i]

    def _subtree(self):
        out = [self]
        for c in self.children:
            out += c._subtree()
        return out

    @property
    def left_edge(self):
        return min(self._subtree(), key=lambda t: t.i)

    @property
    def right_edge(self):
        return max(self._subtree(), key=lambda t: t.i)


def fake_doc(text: str, tokens: list[tuple[str, str, int]]) -> list[FakeToken]:
    """tokens: (text, dep, head index) in order; char offsets are found in ``text``."""
    doc: list[FakeToken] = []
    pos = 0
    for i, (tok, dep, h) in enumerate(tokens):
        pos = text.index(tok, pos)
        doc.append(FakeToken(i, pos, tok, dep, h, doc))
        pos += len(tok)
    return doc


PARSES = {
    "man in red shirt on left": [
        ("man", "ROOT", 0), ("in", "prep", 0), ("red", "amod", 3), ("shirt", "pobj", 1),
        ("on", "prep", 0), ("left", "pobj", 4)],
    "the man who is holding a bat": [
        ("the", "det", 1), ("man", "ROOT", 1), ("who", "nsubj", 4), ("is", "aux", 4),
        ("holding", "relcl", 1), ("a", "det", 6), ("bat", "dobj", 4)],
    "a woman holding an umbrella": [
        ("a", "det", 1), ("woman", "ROOT", 1), ("holding", "acl", 1), ("an", "det", 4),
        ("umbrella", "dobj", 2)],
    "man's hat on the big table": [
        ("man", "poss", 2), ("'s", "case", 0), ("hat", "ROOT", 2), ("on", "prep", 2),
        ("the", "det", 6), ("big", "amod", 6), ("table", "pobj", 3)],
    "the dog is brown": [
        ("the", "det", 1), ("dog", "nsubj", 2), ("is", "ROOT", 2), ("brown", "acomp", 2)],
}


@pytest.mark.parametrize(
    "text, subject, obj",
    [
        # no subject label: the ROOT; the first pobj with its adjective
        ("man in red shirt on left", ["man"], ["red", "shirt"]),
        # the official rule takes the first subject label, here the relative pronoun
        ("the man who is holding a bat", ["who"], ["bat"]),
        ("a woman holding an umbrella", ["woman"], ["umbrella"]),
        # spaCy splits "man's" into two tokens: spans index whitespace words; poss/det dropped
        ("man's hat on the big table", ["hat"], ["big", "table"]),
        ("the dog is brown", ["dog"], []),
    ],
)
def test_spacy_rule_on_fake_docs(text, subject, obj):
    s, o = so.spacy_spans_of_doc(fake_doc(text, PARSES[text]), text)
    assert words(text, s) == subject
    assert words(text, o) == obj


def test_spacy_rule_without_root_or_tokens():
    assert so.spacy_spans_of_doc([], "x") == (NO_SPAN, NO_SPAN)
    text = "red shirt"
    doc = fake_doc(text, [("red", "amod", 1), ("shirt", "dep", 1)])
    assert so.spacy_spans_of_doc(doc, text) == (NO_SPAN, NO_SPAN)


# ----------------------------------------------------------------------------- choice
def fake_nlp(text: str):
    return fake_doc(text, PARSES[text])


def test_get_parser_choices(monkeypatch, caplog):
    assert so.get_parser("none") is None
    assert so.get_parser("rules").name == so.RULES_NAME
    with pytest.raises(ValueError, match="unknown span parser"):
        so.get_parser("stanza")
    # no spaCy: auto falls back loudly; spacy refuses
    monkeypatch.setattr(so, "_load_spacy", lambda *a, **k: None)
    with caplog.at_level(logging.WARNING, logger=so.__name__):
        p = so.get_parser("auto")
    assert p.name == so.RULES_NAME
    assert "not installed" in caplog.text and so.RULES_NAME in caplog.text
    with pytest.raises(RuntimeError, match="spaCy"):
        so.get_parser("spacy")
    # with a (fake) spaCy pipeline: auto and spacy use it
    monkeypatch.setattr(so, "_load_spacy", lambda *a, **k: (fake_nlp, "spacy-x:fake_md-0"))
    for kind in ("auto", "spacy"):
        p = so.get_parser(kind)
        assert p.name == "spacy-x:fake_md-0"
        s, o = p("the man who is holding a bat")
        assert (s, o) == ((2, 3), (6, 7))


def test_parse_spans_names_the_parser(monkeypatch):
    monkeypatch.setattr(so, "_DEFAULT", None)
    monkeypatch.setattr(so, "_load_spacy", lambda *a, **k: None)
    s, o, name = so.parse_spans("man in red shirt on left")
    assert (s, o, name) == ((0, 1), (2, 4), so.RULES_NAME)
    monkeypatch.setattr(so, "_DEFAULT", None)
    monkeypatch.setattr(so, "_load_spacy", lambda *a, **k: (fake_nlp, "spacy-x:fake_md-0"))
    assert so.parse_spans("the man who is holding a bat") == ((2, 3), (6, 7),
                                                              "spacy-x:fake_md-0")


def test_auto_parser_is_spacy_when_installed_else_the_rules():
    """``auto`` picks real spaCy where it and an English model are installed (no English model
    is on PyPI, so CI takes the rules) and says which it picked."""
    loaded = so._load_spacy()
    name = so.get_parser("auto").name
    if loaded is None:
        assert name == so.RULES_NAME
        return
    assert name.startswith("spacy")
    p = so.spacy_parser(*loaded)
    s, o = p("man in red shirt on left")
    assert head("man in red shirt on left", s) == "man"
    assert head("man in red shirt on left", o) == "shirt"
