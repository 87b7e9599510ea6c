"""Subject and object word spans of a referring expression (MRefM's subject/object-first MLM).

OneRef masks the subject and object words first (spec/oneref.md 3.5), found with spaCy
``en_core_web_md``: subject = the first token whose dependency label is in ``SPACY_SUBJECT_DEPS``,
else the ROOT token; object = the first token whose label is in ``SPACY_OBJECT_DEPS``. RefShapes
knows its spans from the generator; real-data builders call :func:`parse_spans` (or a parser
from :func:`get_parser`) on each expression's ``text``.

Spans are ``[start, end)`` indices of the whitespace-separated words of the text, as RefShapes
stores them: the noun phrase's modifiers and its head, the head last (the consumer,
``refjax.data.transforms.tokenize``, masks the pieces of word ``end - 1`` first); ``(-1, -1)``
when there is none.

Two parsers, chosen once per build and reported (a log line and the builders' metadata field
``span_parser``), never silently swapped:

- ``spacy:<model>``: spaCy's dependency parse with the official rule above. The head's span
  starts at its leftmost contiguous pre-modifier (left children other than determiners,
  possessive/case markers, punctuation and conjunctions).
- ``rules-v1`` (the fallback when spaCy or an English model is missing): a small closed-class
  word list instead of a parser. Words are split into phrases at boundary words
  (prepositions, relative pronouns, conjunctions, verbs: ``-ing`` forms and a short list,
  ``-ly`` adverbs).
  Subject = the head of the first phrase: its last word that is not a determiner/adverb and
  not a trailing position word (``left``, ``right``, ``middle``, ... are taken only when the
  phrase has nothing else: "man far left" -> "man", "far left" -> "left"); the phrase's
  adjectives and nouns before the head, after any determiner, complete the span. Object = the
  head of the first phrase after a preposition or a verb ("man in red shirt on left" ->
  "shirt", "woman holding an umbrella" -> "umbrella", "the left zebra" -> none), the rule
  that spaCy's first ``pobj``/``dobj`` follows on such phrases.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from typing import Any

from refjax.data.schema import NO_SPAN

log = logging.getLogger(__name__)

Span = tuple[int, int]
SPACY_SUBJECT_DEPS = frozenset(
    {"subj", "xsubj", "npsubj", "nsubj", "nsubjpass", "csubj", "csubjpass", "agent", "expl"}
)
SPACY_OBJECT_DEPS = frozenset({"dobj", "pobj", "dative", "oprd"})
# Left children that do not belong to the head's span (spaCy labels).
_SPACY_NOT_MODIFIER = frozenset(
    {"det", "predet", "poss", "case", "punct", "cc", "prep", "mark", "advmod", "neg", "aux"}
)
SPACY_MODELS = ("en_core_web_md", "en_core_web_lg", "en_core_web_sm")
RULES_NAME = "rules-v1"
PARSERS = ("auto", "spacy", "rules", "none")

# ----------------------------------------------------------------------------- word lists
DETERMINERS = frozenset(
    "a an the this that these those his her its their my your our some any each every all "
    "both either neither another other no".split()
)
PREPOSITIONS = frozenset(
    "in on at of with near by behind beside besides between under above below over across "
    "along around against inside outside into onto toward towards without within beyond "
    "among through from underneath beneath atop after before like for to next than via off "
    "closest nearest farthest furthest".split()
)
RELATIVES = frozenset("who whom whose which that where while when what".split())
CONJUNCTIONS = frozenset("and or but nor".split())
VERBS = frozenset(
    "is are was were be being been has have had having wears wear wore holds hold held "
    "carries carry looks look sits sit stands stand faces face".split()
)
ADVERBS = frozenset("very most more less far almost just only also not".split())
# Nouns ending in -ly (other -ly words are adverbs that start a predicate: "partially").
LY_NOUNS = frozenset("belly jelly lily family butterfly ally rally holly bully dolly".split())
# Position words that trail a noun in RefCOCO ("guy far left", "zebra middle").
POSITION_WORDS = frozenset(
    "left right middle center centre front back top bottom up down side closest nearest "
    "farthest furthest leftmost rightmost first second third last corner edge".split()
)
# Nouns ending in -ing (not verbs).
ING_NOUNS = frozenset(
    "building buildings ceiling painting paintings clothing ring rings thing things king wing "
    "wings string pudding railing awning swing icing evening morning sibling something "
    "anything nothing everything earring earrings bedding frosting topping toppings sling "
    "spring dressing filling stuffing ping ceiling lighting sing siding stocking stockings "
    "wedding pudding landing opening".split()
)
_WORD = re.compile(r"[a-z0-9']+")


def _norm(word: str) -> str:
    m = _WORD.findall(word.lower())
    return "".join(m)


def _is_verb(w: str) -> bool:
    return w in VERBS or (len(w) > 4 and w.endswith("ing") and w not in ING_NOUNS)


def _boundary(w: str) -> bool:
    ly_adverb = len(w) > 4 and w.endswith("ly") and w not in LY_NOUNS
    return w in PREPOSITIONS or w in RELATIVES or w in CONJUNCTIONS or _is_verb(w) or ly_adverb


def _phrase_span(words: Sequence[str], start: int, end: int) -> Span:
    """The head span of the phrase ``words[start:end]`` (module docstring), or NO_SPAN."""
    content = [i for i in range(start, end)
               if words[i] and words[i] not in DETERMINERS and words[i] not in ADVERBS]
    if not content:
        return NO_SPAN
    heads = [i for i in content if words[i] not in POSITION_WORDS]
    head = heads[-1] if heads else content[-1]
    first = head
    while first - 1 >= start and first - 1 in content:
        first -= 1
    return (first, head + 1)


def _phrase_end(words: Sequence[str], start: int) -> int:
    end = start
    while end < len(words) and not _boundary(words[end]):
        end += 1
    return end


def rule_spans(text: str) -> tuple[Span, Span]:
    """``(subject_span, object_span)`` by the closed-class word rules (``rules-v1``)."""
    words = [_norm(w) for w in text.split()]
    n = len(words)
    if n == 0:
        return NO_SPAN, NO_SPAN
    # subject: the first phrase that has content (a leading preposition is skipped over)
    subject, i = NO_SPAN, 0
    subj_end = 0
    while i < n:
        if _boundary(words[i]):
            i += 1
            continue
        end = _phrase_end(words, i)
        subject = _phrase_span(words, i, end)
        subj_end = end
        if subject != NO_SPAN:
            break
        i = end
    if subject == NO_SPAN:  # only boundary words: fall back to the last word
        subject, subj_end = (n - 1, n), n
    # object: the first content phrase after a preposition or a verb, after the subject
    obj = NO_SPAN
    i = subj_end
    while i < n:
        w = words[i]
        if w in PREPOSITIONS or _is_verb(w):
            j = i + 1
            while j < n and (words[j] in PREPOSITIONS or words[j] in VERBS):
                j += 1  # "next to", "is holding"
            end = _phrase_end(words, j)
            span = _phrase_span(words, j, end)
            if span != NO_SPAN:
                obj = span
                break
            i = max(end, i + 1)
        else:
            i += 1
    return subject, obj


# ----------------------------------------------------------------------------- spaCy
def _word_index(text: str) -> Callable[[int], int]:
    """char offset -> index of the whitespace-separated word that contains it."""
    starts = [m.start() for m in re.finditer(r"\S+", text)]
    ends = [m.end() for m in re.finditer(r"\S+", text)]

    def index(offset: int) -> int:
        for k, (s, e) in enumerate(zip(starts, ends, strict=True)):
            if s <= offset < e:
                return k
        raise ValueError(f"offset {offset} is not inside a word of {text!r}")

    return index


def _token_span(tok: Any, word_of: Callable[[int], int]) -> Span:
    """Word span of a spaCy token's head phrase: its contiguous pre-modifiers + the token."""
    first = tok
    for child in reversed(list(tok.lefts)):  # nearest left child first
        if child.dep_ in _SPACY_NOT_MODIFIER or child.right_edge.i + 1 != first.i:
            break
        first = child.left_edge
    return (word_of(first.idx), word_of(tok.idx) + 1)


def spacy_spans_of_doc(doc: Sequence[Any], text: str) -> tuple[Span, Span]:
    """``(subject_span, object_span)`` of a parsed spaCy ``Doc`` of ``text`` (the official
    rule; anything with tokens carrying ``i``, ``idx``, ``dep_``, ``lefts``, ``left_edge``,
    ``right_edge`` works, e.g. a test double)."""
    tokens = [t for t in doc if not getattr(t, "is_space", False)]
    if not tokens:
        return NO_SPAN, NO_SPAN
    word_of = _word_index(text)
    subj = next((t for t in tokens if t.dep_ in SPACY_SUBJECT_DEPS), None)
    if subj is None:
        subj = next((t for t in tokens if t.dep_ == "ROOT"), None)
    obj = next((t for t in tokens if t.dep_ in SPACY_OBJECT_DEPS), None)
    return (
        NO_SPAN if subj is None else _token_span(subj, word_of),
        NO_SPAN if obj is None else _token_span(obj, word_of),
    )


class SpanParser:
    """``parser(text) -> (subject_span, object_span)``; ``name`` says which parser it is."""

    def __init__(self, name: str, fn: Callable[[str], tuple[Span, Span]]):
        self.name = name
        self._fn = fn

    def __call__(self, text: str) -> tuple[Span, Span]:
        if not text.strip():
            return NO_SPAN, NO_SPAN
        return self._fn(text)


def _load_spacy(models: Sequence[str] = SPACY_MODELS) -> tuple[Any, str] | None:
    """``(nlp, "spacy:<model>-<version>")`` of the first installed model, or None."""
    try:
        import spacy
    except ImportError:
        return None
    for model in models:
        try:
            nlp = spacy.load(model, disable=["ner"])
        except OSError:  # the model package is not installed
            continue
        version = nlp.meta.get("version", "?")
        return nlp, f"spacy-{spacy.__version__}:{model}-{version}"
    return None


def spacy_parser(nlp: Any, name: str) -> SpanParser:
    """A :class:`SpanParser` running ``nlp`` (a loaded spaCy pipeline)."""
    return SpanParser(name, lambda text: spacy_spans_of_doc(nlp(text), text))


def get_parser(kind: str = "auto") -> SpanParser | None:
    """The span parser for a build: ``auto`` (spaCy with ``en_core_web_md``, else ``_lg``,
    else ``_sm`` when installed, else ``rules-v1``), ``spacy`` (an error without spaCy and an
    English model), ``rules``, or ``none`` (None: spans stay ``(-1, -1)``). Logs the choice."""
    if kind not in PARSERS:
        raise ValueError(f"unknown span parser {kind!r}; one of {PARSERS}")
    if kind == "none":
        log.info("subject/object spans: not parsed (span_parser=none)")
        return None
    if kind in ("auto", "spacy"):
        loaded = _load_spacy()
        if loaded is not None:
            parser = spacy_parser(*loaded)
            log.info("subject/object spans: %s dependency parse", parser.name)
            return parser
        if kind == "spacy":
            raise RuntimeError(
                "span_parser=spacy needs spaCy and an English model "
                f"({', '.join(SPACY_MODELS)}); install them or use span_parser=rules"
            )
        log.warning("subject/object spans: spaCy or an English model (%s) is not installed; "
                    "using the rule-based fallback %s (refjax.data.subject_object)",
                    SPACY_MODELS[0], RULES_NAME)
    else:
        log.info("subject/object spans: rule-based %s", RULES_NAME)
    return SpanParser(RULES_NAME, rule_spans)


_DEFAULT: SpanParser | None = None


def parse_spans(text: str) -> tuple[Span, Span, str]:
    """``(subject_span, object_span, parser_name)`` of ``text`` with the ``auto`` parser
    (chosen, and logged, on the first call)."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = get_parser("auto")
    assert _DEFAULT is not None
    subject, obj = _DEFAULT(text)
    return subject, obj, _DEFAULT.name
