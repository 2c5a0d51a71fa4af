"""Sentence splitting and the ConText algorithm for clinical notes.

ConText (Harkema H, Dowling JN, Thornblade T, Chapman WW. "ConText: an algorithm for determining
negation, experiencer, and temporal status from clinical reports." J Biomed Inform
2009;42(5):839-851) decides, for each mention of a clinical condition or finding (a *target*),
whether it is negated, hypothetical, historical, merely possible, or experienced by someone other
than the patient. It works inside one sentence:

* *trigger* phrases ("denies", "no", "history of", "mother", "return if", "rule out") each have a
  category and a direction: FORWARD triggers modify what follows them, BACKWARD triggers what
  precedes them ("... is negative"), BIDIRECTIONAL both;
* a trigger's *scope* runs from the trigger to the end (or start) of the sentence, and is cut short
  by a *termination* term ("but", "however", "except", "reports" ...) or, as in pyConText, by a
  trigger of another category; a rule may also cap its scope at ``max_scope`` tokens (the NegEx
  window), which the rules use for short backward triggers such as "negative";
* *pseudo-triggers* ("no increase", "gram negative", "history of present illness",
  "3-day history of") look like triggers but are not, and stop the shorter trigger inside them
  from firing;
* a target inside a trigger's scope takes that trigger's category.

Two additions that medspaCy (the usual implementation) also makes: a phrase that is itself a
target ("not eating", "absent breath sounds") is never read as a trigger, and section headers
("Family history:", "Past medical history:", "Differential:") give their section a category.
The trigger, termination, pseudo-trigger and section lists live in ``data/context_rules.yaml``.

Nothing here logs or keeps note text; every position is a character offset into the note.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Generic, TypeVar

import yaml

#: The rules shipped with the project.
DEFAULT_RULES_PATH = Path(__file__).resolve().parent / "data" / "context_rules.yaml"

T = TypeVar("T")


class Category(StrEnum):
    """What a ConText trigger says about the targets in its scope."""

    NEGATED_EXISTENCE = "NEGATED_EXISTENCE"
    FAMILY = "FAMILY"
    HISTORICAL = "HISTORICAL"
    HYPOTHETICAL = "HYPOTHETICAL"
    POSSIBLE = "POSSIBLE"


class Direction(StrEnum):
    """Which side of a trigger its scope lies on."""

    FORWARD = "FORWARD"
    BACKWARD = "BACKWARD"
    BIDIRECTIONAL = "BIDIRECTIONAL"


# --- tokens and phrase matching -------------------------------------------------------------

# Words keep an inner apostrophe ("can't", "Bell's"); numbers keep a decimal part; any other
# non-space character is a token of its own.
_TOKEN_RE = re.compile(r"[A-Za-z]+(?:['\u2019][A-Za-z]+)*|\d+(?:\.\d+)?|[^\sA-Za-z\d]")
# Hyphens and apostrophes are ignored when matching, so "non-productive" = "non productive"
# and "Bell's" = "Bells"; so are articles and possessives ("bit his tongue" = "bit tongue").
_IGNORED = frozenset({"-", "\u2010", "\u2011", "\u2013", "'", "\u2019"})
_IGNORED_WORDS = frozenset({"the", "a", "an", "his", "her", "their", "my", "its"})
# Inside a phrase a side may be named without the phrase saying so: "unable to close his right
# eye" is "unable to close eye". A phrase that names the side ("right lower quadrant") still
# matches only that side.
_SKIPPABLE_INSIDE = frozenset({"left", "right", "both", "bilateral"})


@dataclass(frozen=True)
class Token:
    """One token of a note: character offsets, the text as written and its matching form."""

    start: int
    end: int
    text: str
    norm: str


#: A phrase token that matches any number ("3", "2.5", "two", "few").
NUMBER = "#"
_NUMBER_WORDS = frozenset(
    (
        *("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"),
        *("eleven", "twelve", "few", "several", "couple"),
    )
)


def _is_number(norm: str) -> bool:
    return norm[:1].isdigit() or norm in _NUMBER_WORDS


def _norm(text: str) -> str:
    return text.lower().replace("'", "").replace("\u2019", "")


def tokenize(text: str, start: int = 0, end: int | None = None) -> list[Token]:
    """Tokens of ``text[start:end]`` that take part in matching (hyphens/apostrophes dropped)."""
    stop = len(text) if end is None else end
    tokens = []
    for m in _TOKEN_RE.finditer(text, start, stop):
        word = m.group()
        norm = _norm(word)
        if word in _IGNORED or norm in _IGNORED_WORDS:
            continue
        tokens.append(Token(m.start(), m.end(), word, norm))
    return tokens


def _is_case_sensitive(phrase: str) -> bool:
    """Short all-capital abbreviations ("SOB", "CP", "MI") only match as written in capitals."""
    letters = [c for c in phrase if c.isalpha()]
    return bool(letters) and len(phrase) <= 5 and all(c.isupper() for c in letters)


@dataclass(frozen=True)
class PhraseMatch(Generic[T]):
    """A phrase found in a token sequence: token index range, character offsets, its values."""

    first: int
    last: int  # exclusive token index
    start: int
    end: int
    values: tuple[T, ...]


@dataclass
class _Node(Generic[T]):
    children: dict[str, _Node[T]] = field(default_factory=dict)
    values: list[tuple[T, tuple[str, ...] | None]] = field(default_factory=list)


class PhraseMatcher(Generic[T]):
    """Finds phrases in token sequences: leftmost-longest, non-overlapping.

    A phrase is tokenized like the note; a short all-capital phrase ("SOB") matches only when
    written in capitals. A phrase added more than once keeps every value given to it.
    """

    def __init__(self) -> None:
        self._root: _Node[T] = _Node()
        self.max_tokens = 0

    def add(self, phrase: str, value: T, *, plural: bool = False) -> None:
        """Add ``phrase`` with ``value``; ``plural`` also adds an "-s" form of the last word."""
        tokens = tokenize(phrase)
        if not tokens:
            raise ValueError(f"phrase {phrase!r} has no words")
        forms = [[t.norm for t in tokens]]
        if plural and tokens[-1].norm.isalpha() and not tokens[-1].norm.endswith("s"):
            forms.append([*forms[0][:-1], forms[0][-1] + "s"])
        exact = tuple(t.text for t in tokens) if _is_case_sensitive(phrase) else None
        for form in forms:
            node = self._root
            for norm in form:
                node = node.children.setdefault(norm, _Node())
            node.values.append((value, exact if form is forms[0] else None))
            self.max_tokens = max(self.max_tokens, len(form))

    def find(self, tokens: Sequence[Token]) -> list[PhraseMatch[T]]:
        """All leftmost-longest, non-overlapping matches in ``tokens``."""
        found: list[PhraseMatch[T]] = []
        i = 0
        while i < len(tokens):
            best = self._longest(tokens, i)
            if best is None:
                i += 1
                continue
            last, values = best
            found.append(PhraseMatch(i, last, tokens[i].start, tokens[last - 1].end, values))
            i = last
        return found

    def _longest(self, tokens: Sequence[Token], first: int) -> tuple[int, tuple[T, ...]] | None:
        """The longest phrase starting at token ``first``: (end token index, its values)."""
        best: tuple[int, tuple[T, ...]] | None = None
        # (trie node, next token index, texts of the tokens the phrase consumed, skipped last)
        stack: list[tuple[_Node[T], int, tuple[str, ...], bool]] = [(self._root, first, (), False)]
        while stack:
            node, j, words, skipped = stack.pop()
            if node.values and words and not skipped:
                values = tuple(v for v, exact in node.values if exact is None or exact == words)
                if values and (best is None or j > best[0]):
                    best = (j, values)
            if j >= len(tokens):
                continue
            token = tokens[j]
            child = node.children.get(token.norm)
            if child is not None:
                stack.append((child, j + 1, (*words, token.text), False))
            wildcard = node.children.get(NUMBER)
            if wildcard is not None and _is_number(token.norm):
                stack.append((wildcard, j + 1, (*words, token.text), False))
            if words and token.norm in _SKIPPABLE_INSIDE:
                stack.append((node, j + 1, words, True))
        return best


# --- rules --------------------------------------------------------------------------------


@dataclass(frozen=True)
class TriggerRule:
    """A trigger phrase, its category and direction, and an optional scope cap in tokens."""

    phrase: str
    category: Category
    direction: Direction
    max_scope: int | None = None

    def __post_init__(self) -> None:
        if self.max_scope is not None and self.max_scope < 1:
            raise ValueError(f"max_scope of trigger {self.phrase!r} must be positive")


@dataclass(frozen=True)
class TerminationRule:
    """A phrase that ends the scope of triggers of ``categories`` (all when empty)."""

    phrase: str
    categories: frozenset[Category] = frozenset()

    def ends(self, category: Category) -> bool:
        """Whether this term ends the scope of a trigger of ``category``."""
        return not self.categories or category in self.categories


@dataclass(frozen=True)
class PseudoRule:
    """A phrase that looks like a trigger but is not one."""

    phrase: str


Rule = TriggerRule | TerminationRule | PseudoRule


def _category(value: Any, where: str) -> Category:
    try:
        return Category(str(value))
    except ValueError:
        allowed = ", ".join(c.value for c in Category)
        raise ValueError(f"{where}: unknown category {value!r} (use one of {allowed})") from None


def _phrases(value: Any, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(p, str) and p.strip() for p in value):
        raise ValueError(f"{where} must be a list of non-empty phrases")
    return [p.strip() for p in value]


@dataclass(frozen=True)
class ContextRules:
    """The trigger, termination, pseudo-trigger and section rules of :class:`ConText`."""

    triggers: tuple[TriggerRule, ...]
    terminations: tuple[TerminationRule, ...]
    pseudo: tuple[PseudoRule, ...]
    sections: Mapping[str, Category | None]
    sha256: str

    def __post_init__(self) -> None:
        if not self.triggers:
            raise ValueError("context rules define no trigger")
        # The same words may be listed twice ("in mother", "in her mother": articles and
        # possessives are ignored) but only with the same meaning.
        seen: dict[str, Rule] = {}
        every: tuple[Rule, ...] = (*self.triggers, *self.terminations, *self.pseudo)
        for rule in every:
            key = " ".join(t.norm for t in tokenize(rule.phrase))
            if not key:
                raise ValueError(f"context phrase {rule.phrase!r} has no words")
            earlier = seen.setdefault(key, rule)
            if dataclasses.replace(earlier, phrase=rule.phrase) != rule:
                raise ValueError(
                    f"context phrase {rule.phrase!r} is defined twice with different meanings"
                )

    @classmethod
    def from_yaml(cls, path: Path = DEFAULT_RULES_PATH) -> ContextRules:
        """Read and validate a rules file; ``ValueError`` names the offending entry."""
        raw = Path(path).read_bytes()
        data = yaml.safe_load(raw)
        if not isinstance(data, dict):
            raise ValueError(f"{Path(path).name} must hold a mapping")
        triggers: list[TriggerRule] = []
        for i, group in enumerate(data.get("triggers") or []):
            where = f"triggers[{i}]"
            if not isinstance(group, dict):
                raise ValueError(f"{where} must be a mapping")
            category = _category(group.get("category"), where)
            try:
                direction = Direction(str(group.get("direction")))
            except ValueError:
                raise ValueError(
                    f"{where}: direction must be FORWARD, BACKWARD or BIDIRECTIONAL"
                ) from None
            max_scope = group.get("max_scope")
            if max_scope is not None and not isinstance(max_scope, int):
                raise ValueError(f"{where}: max_scope must be an integer")
            for phrase in _phrases(group.get("phrases"), f"{where}.phrases"):
                triggers.append(TriggerRule(phrase, category, direction, max_scope))
        terminations: list[TerminationRule] = []
        for i, group in enumerate(data.get("terminations") or []):
            where = f"terminations[{i}]"
            if not isinstance(group, dict):
                raise ValueError(f"{where} must be a mapping")
            cats = frozenset(_category(c, where) for c in (group.get("categories") or []))
            for phrase in _phrases(group.get("phrases"), f"{where}.phrases"):
                terminations.append(TerminationRule(phrase, cats))
        pseudo = tuple(PseudoRule(p) for p in _phrases(data.get("pseudo") or [], "pseudo"))
        sections: dict[str, Category | None] = {}
        for i, group in enumerate(data.get("sections") or []):
            where = f"sections[{i}]"
            if not isinstance(group, dict):
                raise ValueError(f"{where} must be a mapping")
            raw_cat = group.get("category")
            section_cat = None if raw_cat is None else _category(raw_cat, where)
            for header in _phrases(group.get("headers"), f"{where}.headers"):
                sections[_header_key(header)] = section_cat
        return cls(
            triggers=tuple(triggers),
            terminations=tuple(terminations),
            pseudo=pseudo,
            sections=sections,
            sha256=hashlib.sha256(raw).hexdigest(),
        )


def _header_key(header: str) -> str:
    return " ".join(t.norm for t in tokenize(header))


# --- sentences ----------------------------------------------------------------------------

_ABBREVIATIONS = frozenset(
    {
        *("dr", "mr", "mrs", "ms", "prof", "vs", "etc", "approx", "e.g", "i.e", "eg", "ie"),
        *("a.m", "p.m", "p.o", "b.i.d", "t.i.d", "q.i.d", "q.d", "h.s", "fig"),
    }
)
_HEADER_RE = re.compile(r"[ \t]*([A-Za-z][A-Za-z0-9 /&()'\-]{0,40}?)[ \t]*:")
_BULLET_RE = re.compile(r"[ \t]*(?:[-*\u2022]|\d{1,2}[.)])[ \t]+")
_SENTENCE_END_RE = re.compile(r"[.!?]+(?=\s|$)|;")


@dataclass(frozen=True)
class Sentence:
    """One sentence: character offsets and the category its section gives it (if any)."""

    start: int
    end: int
    section: Category | None = None


def _line_spans(text: str) -> list[tuple[int, int]]:
    spans = []
    pos = 0
    for line in text.splitlines(keepends=True):
        stripped = line.rstrip("\r\n")
        spans.append((pos, pos + len(stripped)))
        pos += len(line)
    return spans


def _is_abbreviation(text: str, period: int) -> bool:
    i = period
    while i > 0 and (text[i - 1].isalpha() or text[i - 1] == "."):
        i -= 1
    return text[i:period].lower() in _ABBREVIATIONS


def _starts_block(line: str) -> bool:
    return bool(_BULLET_RE.match(line) or _HEADER_RE.match(line))


def _trimmed(text: str, start: int, end: int) -> tuple[int, int]:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


@dataclass
class _Pending:
    start: int
    starts_line: bool
    after_blank: bool


def _raw_sentences(text: str) -> list[tuple[int, int, bool, bool]]:
    """(start, end, starts_line, after_blank) of each sentence, before section handling."""
    found: list[tuple[int, int, bool, bool]] = []
    pending: _Pending | None = None

    def close(end: int) -> None:
        nonlocal pending
        if pending is not None:
            s, e = _trimmed(text, pending.start, end)
            if any(ch.isalnum() for ch in text[s:e]):
                found.append((s, e, pending.starts_line, pending.after_blank))
        pending = None

    lines = _line_spans(text)
    after_blank = False
    for index, (ls, le) in enumerate(lines):
        line = text[ls:le]
        if not line.strip():
            close(ls)
            after_blank = True
            continue
        if pending is not None and _starts_block(line):
            close(ls)
        if pending is None:
            pending = _Pending(ls, True, after_blank)
            after_blank = False
        for m in _SENTENCE_END_RE.finditer(text, max(pending.start, ls), le):
            if m.group().startswith(".") and _is_abbreviation(text, m.start()):
                continue
            close(m.end())
            pending = _Pending(m.end(), False, False)
        # A line ends its sentence when it ends in punctuation, is short (a list line) or the
        # next line starts a list item or header; otherwise it is wrapped prose.
        nxt = text[lines[index + 1][0] : lines[index + 1][1]] if index + 1 < len(lines) else ""
        ends = line.rstrip()[-1:] in (".", "!", "?", ":", ";") or len(line.strip()) < 40
        if ends or not nxt.strip() or _starts_block(nxt):
            close(le)
    close(len(text))
    return found


# --- the algorithm ------------------------------------------------------------------------


@dataclass(frozen=True)
class Modifier:
    """A trigger found in a sentence, with the character range it modifies."""

    category: Category
    start: int
    end: int
    scope_start: int
    scope_end: int

    def covers(self, start: int, end: int) -> bool:
        """Whether the target ``[start, end)`` lies inside this trigger's scope."""
        return self.scope_start <= start and end <= self.scope_end


@dataclass(frozen=True)
class TargetContext:
    """What ConText decided about one target."""

    sentence: Sentence
    categories: frozenset[Category]


class ConText:
    """Sentence splitting plus the ConText algorithm over a fixed rule set."""

    def __init__(self, rules: ContextRules) -> None:
        """Compile ``rules`` into one phrase matcher."""
        self.rules = rules
        self._matcher: PhraseMatcher[Rule] = PhraseMatcher()
        every: tuple[Rule, ...] = (*rules.triggers, *rules.terminations, *rules.pseudo)
        for rule in every:
            self._matcher.add(rule.phrase, rule)

    @classmethod
    def default(cls) -> ConText:
        """ConText over the rules shipped in ``data/context_rules.yaml``."""
        return cls(ContextRules.from_yaml(DEFAULT_RULES_PATH))

    def sentences(self, text: str) -> list[Sentence]:
        """Split ``text`` into sentences and give each the category of its section.

        A header alone on its line ("Family history:") gives its category to the lines that
        follow, up to a blank line or the next header; a header with text after it
        ("FH: mother with diabetes") to its own sentence and the list items right after it.
        Headers not in the rules end the section before them.
        """
        result: list[Sentence] = []
        current: Category | None = None
        block = False
        for start, end, starts_line, after_blank in _raw_sentences(text):
            if after_blank:
                current, block = None, False
            header = _HEADER_RE.match(text, start, end) if starts_line else None
            key = _header_key(header.group(1)) if header else ""
            known = key in self.rules.sections
            # Inside a header block ("Family history:" then one line per relative) a label
            # that is not a known section ("Mother: ...") is content, not a new section.
            if header and (known or (not block and len(key.split()) <= 3)):
                current = self.rules.sections.get(key)
                block = not text[header.end() : end].strip()
                result.append(Sentence(start, end, current))
                continue
            if not block and not (starts_line and _BULLET_RE.match(text, start)):
                current = None
            result.append(Sentence(start, end, current))
        return result

    def modifiers(
        self, text: str, sentence: Sentence, targets: Iterable[tuple[int, int]] = ()
    ) -> list[Modifier]:
        """The triggers of one sentence and their scopes.

        Trigger phrases that overlap a target (``targets``: character ranges) are not triggers.
        """
        tokens = tokenize(text, sentence.start, sentence.end)
        spans = sorted(targets)
        matches = self._matcher.find(tokens)
        triggers: list[tuple[PhraseMatch[Rule], TriggerRule]] = []
        stops: list[tuple[PhraseMatch[Rule], TerminationRule]] = []
        for match in matches:
            rule = match.values[0]
            if isinstance(rule, PseudoRule):
                continue
            if any(s < match.end and match.start < e for s, e in spans):
                continue
            if isinstance(rule, TriggerRule):
                triggers.append((match, rule))
            elif isinstance(rule, TerminationRule):
                stops.append((match, rule))
        found: list[Modifier] = []
        for match, rule in triggers:
            scope_start, scope_end = match.start, match.end
            if rule.direction in (Direction.FORWARD, Direction.BIDIRECTIONAL):
                limit = sentence.end
                last_token = len(tokens)
                for other, other_rule in triggers:
                    if other.first >= match.last and other_rule.category != rule.category:
                        limit = min(limit, other.start)
                        last_token = min(last_token, other.first)
                for other, stop in stops:
                    if other.first >= match.last and stop.ends(rule.category):
                        limit = min(limit, other.start)
                        last_token = min(last_token, other.first)
                if rule.max_scope is not None:
                    capped = min(last_token, match.last + rule.max_scope)
                    if capped < last_token:
                        limit = min(limit, tokens[capped - 1].end)
                scope_end = limit
            if rule.direction in (Direction.BACKWARD, Direction.BIDIRECTIONAL):
                limit = sentence.start
                first_token = 0
                for other, other_rule in triggers:
                    if other.last <= match.first and other_rule.category != rule.category:
                        limit = max(limit, other.end)
                        first_token = max(first_token, other.last)
                for other, stop in stops:
                    if other.last <= match.first and stop.ends(rule.category):
                        limit = max(limit, other.end)
                        first_token = max(first_token, other.last)
                if rule.max_scope is not None:
                    capped = max(first_token, match.first - rule.max_scope)
                    if capped > first_token:
                        limit = max(limit, tokens[capped].start)
                scope_start = limit
            found.append(Modifier(rule.category, match.start, match.end, scope_start, scope_end))
        return found

    def annotate(
        self,
        text: str,
        targets: Sequence[tuple[int, int]],
        sentences: Sequence[Sentence] | None = None,
    ) -> ContextResult:
        """Decide the ConText categories of each target (character ranges), in order.

        A target takes the category of its section and of every trigger whose scope holds it.
        The result also lists the text that asserts nothing about the patient now: trigger
        phrases with their scopes, sections with a category, and negatively answered questions.
        """
        sents = list(sentences) if sentences is not None else self.sentences(text)
        by_sentence: dict[int, list[int]] = {}
        for index, (start, _end) in enumerate(targets):
            by_sentence.setdefault(_sentence_of(sents, start), []).append(index)
        contexts: list[TargetContext | None] = [None] * len(targets)
        unasserted: list[tuple[int, int]] = []
        answered = [
            s < len(sents) - 1 and _answers_no(text, sents[s], sents[s + 1])
            for s in range(len(sents))
        ]
        for s, sentence in enumerate(sents):
            indices = by_sentence.get(s, [])
            mods = self.modifiers(text, sentence, [targets[i] for i in indices])
            if sentence.section is not None or answered[s] or (s > 0 and answered[s - 1]):
                unasserted.append((sentence.start, sentence.end))
            else:
                unasserted.extend(
                    (min(m.start, m.scope_start), max(m.end, m.scope_end)) for m in mods
                )
            for i in indices:
                start, end = targets[i]
                cats = {m.category for m in mods if m.covers(start, end)}
                if sentence.section is not None:
                    cats.add(sentence.section)
                if answered[s]:
                    cats.add(Category.NEGATED_EXISTENCE)
                contexts[i] = TargetContext(sentence, frozenset(cats))
        whole = Sentence(0, len(text))
        for i in by_sentence.get(-1, []):
            contexts[i] = TargetContext(whole, frozenset())
        return ContextResult(
            sentences=tuple(sents),
            contexts=tuple(
                c if c is not None else TargetContext(whole, frozenset()) for c in contexts
            ),
            unasserted=tuple(_merge(unasserted)),
        )

    def assign(
        self,
        text: str,
        targets: Sequence[tuple[int, int]],
        sentences: Sequence[Sentence] | None = None,
    ) -> list[TargetContext]:
        """The ConText categories of each target (see :meth:`annotate`)."""
        return list(self.annotate(text, targets, sentences).contexts)


@dataclass(frozen=True)
class ContextResult:
    """ConText's decisions for one note."""

    sentences: tuple[Sentence, ...]
    contexts: tuple[TargetContext, ...]
    #: Character ranges that assert nothing about the patient now (sorted, disjoint).
    unasserted: tuple[tuple[int, int], ...]


def _merge(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for start, end in sorted(r for r in ranges if r[1] > r[0]):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


_NO_ANSWERS = frozenset({("no",), ("none",), ("negative",), ("denies",), ("denied",), ("neg",)})


def _answers_no(text: str, question: Sentence, answer: Sentence) -> bool:
    """Review-of-systems style "Chest pain? No." negates the question's targets."""
    if not text[question.start : question.end].rstrip().endswith("?"):
        return False
    words = tuple(t.norm for t in tokenize(text, answer.start, answer.end) if t.norm.isalnum())
    return words in _NO_ANSWERS


def _sentence_of(sentences: Sequence[Sentence], offset: int) -> int:
    lo, hi = 0, len(sentences) - 1
    while lo <= hi:
        mid = (lo + hi) // 2
        s = sentences[mid]
        if offset < s.start:
            hi = mid - 1
        elif offset >= s.end:
            lo = mid + 1
        else:
            return mid
    return -1
