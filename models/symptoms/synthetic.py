"""Generated clinical notes for training the demo symptom model (no patient data).

For each condition of the knowledge base, a note states 2-6 of its findings, drawn with
probability falling with their rank in the condition's list (the list is ordered by how typical a
finding is), each in a randomly chosen wording from the knowledge base, in one of several note
styles (triage line, HPI, complaint list, bullet list), sometimes with vital signs for fever,
tachycardia, hypoxia and blood pressure.

Most notes also carry distractors that must not count, so the model learns to rely on ConText:
findings of other conditions negated ("Denies ...", "No ... but reports ..."), other
conditions in relatives ("Mother has ..."), in the past ("History of ..."), as hypotheticals
("Return if ...") or as possibilities ("Rule out ..."); plus neutral sentences.

``hard=True`` notes (used to fit the calibration temperature) state only 1-3 findings drawn
uniformly, sometimes without the most typical one, and carry more distractors, so that the
temperature is fitted on notes about as ambiguous as real ones rather than on easy templates.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from models.symptoms.knowledge import Condition, KnowledgeBase

GENERATOR_ID = "symptom-notes-v1"

_VITALS = {
    "fever": ("T {:.1f}", lambda r: r.uniform(38.2, 40.1)),
    "tachycardia": ("HR {}", lambda r: r.randint(104, 142)),
    "hypoxia": ("SpO2 {}% on room air", lambda r: r.randint(82, 90)),
    "tachypnea": ("RR {}", lambda r: r.randint(24, 34)),
    "hypotension": ("BP {}/{}", lambda r: (r.randint(70, 86), r.randint(38, 55))),
    "elevated_blood_pressure": ("BP {}/{}", lambda r: (r.randint(162, 210), r.randint(96, 125))),
    "bradycardia": ("HR {}", lambda r: r.randint(38, 48)),
}
_NORMAL_VITALS = ("T 36.8", "HR 78", "RR 16", "SpO2 98% on room air", "BP 124/78")
_DURATIONS = (
    " for 2 days",
    " for 3 days",
    " x3 days",
    " x 1 week",
    " since yesterday",
    " since this morning",
    " for several days",
    " over the past week",
    " for 2 weeks",
    " for a few hours",
    "",
    "",
    "",
)
_FILLERS = (
    "Lives with family.",
    "Works in an office.",
    "Here with spouse.",
    "No known drug allergies.",
    "Tolerating fluids.",
    "Takes no daily medications.",
    "Arrived by private vehicle.",
    "Independent at baseline.",
    "Seen in clinic today.",
    "Interpreter not needed.",
)
_RELATIVES = ("Mother", "Father", "Sister", "Brother", "Maternal grandmother", "Paternal uncle")


@dataclass(frozen=True)
class GeneratedNote:
    """One generated note and the condition it was written for."""

    text: str
    condition_id: str


def _join(rng: random.Random, items: Sequence[str], *, semicolons: bool = True) -> str:
    """Join phrases as notes do; a ";" ends a ConText scope, so negated lists never use it."""
    items = list(items)
    if len(items) <= 1:
        return "".join(items)
    style = rng.random()
    if style < 0.6 or (style >= 0.8 and not semicolons):
        last = rng.choice((" and ", " or ", ", ")) if not semicolons else " and "
        return ", ".join(items[:-1]) + last + items[-1]
    if style < 0.8:
        return ", ".join(items)
    return "; ".join(items)


def _phrase(rng: random.Random, kb: KnowledgeBase, fid: str) -> str:
    return rng.choice(kb.findings[fid].terms)


def _name(rng: random.Random, condition: Condition) -> str:
    return rng.choice((condition.display.lower(), *condition.names))


class _Writer:
    def __init__(self, kb: KnowledgeBase, rng: random.Random, hard: bool) -> None:
        self.kb = kb
        self.rng = rng
        self.hard = hard
        self.sex = rng.choice(("F", "M"))
        self.pronoun = "She" if self.sex == "F" else "He"
        age = rng.randint(2, 12) if rng.random() < 0.1 else rng.randint(18, 88)
        self.demo = rng.choice(
            (
                f"{age}-year-old {'female' if self.sex == 'F' else 'male'}",
                f"{age} yo {self.sex}",
                f"{age}{self.sex}",
                f"{age} y/o {'woman' if self.sex == 'F' else 'man'}",
                "Patient",
                "Pt",
            )
        )

    def pick_findings(self, condition: Condition) -> list[str]:
        rng = self.rng
        findings = list(condition.findings)
        if self.hard:
            k = rng.randint(1, min(3, len(findings)))
            if len(findings) > 2 and rng.random() < 0.3:
                findings = findings[1:]
            return rng.sample(findings, min(k, len(findings)))
        k = rng.randint(min(2, len(findings)), min(6, len(findings)))
        weights = [(1.0 / (1 + rank)) ** 0.7 for rank in range(len(findings))]
        chosen: list[str] = []
        while len(chosen) < k:
            pick = rng.choices(findings, weights)[0]
            if pick not in chosen:
                chosen.append(pick)
        return chosen

    def main_sentences(self, phrases: list[str], vitals: list[str]) -> list[str]:
        rng = self.rng
        dur = rng.choice(_DURATIONS)
        if not phrases:
            phrases = ["feeling unwell"]
        first, rest = phrases[0], phrases[1:]
        style = rng.randrange(7)
        if style == 0:
            out = [f"{self.demo} presents with {_join(rng, phrases[:2])}{dur}."]
            if phrases[2:]:
                out.append(f"Also reports {_join(rng, phrases[2:])}.")
        elif style == 1:
            out = [f"CC: {first}.", f"HPI: {self.demo} with {_join(rng, phrases)}{dur}."]
        elif style == 2:
            out = [f"Pt c/o {first}{dur}."]
            if rest:
                out.append(f"Associated {_join(rng, rest)}.")
        elif style == 3:
            out = [f"Triage: {_join(rng, phrases)}{dur}."]
        elif style == 4:
            out = ["Symptoms:\n" + "\n".join(f"- {p}" for p in phrases)]
        elif style == 5:
            out = [f"{self.demo} reports {first}{dur}."]
            if rest:
                out.append(f"{self.pronoun} also notes {_join(rng, rest)}.")
        else:
            out = [f"Here with {_join(rng, phrases)}{dur}."]
        if vitals:
            out.append("Vitals: " + ", ".join(vitals) + ".")
        elif rng.random() < 0.25:
            out.append("Vitals: " + ", ".join(rng.sample(_NORMAL_VITALS, 2)) + ".")
        return out


def _other_findings(
    kb: KnowledgeBase, condition: Condition, rng: random.Random, k: int
) -> list[str]:
    own = set(condition.findings)
    pool = [f for f in kb.findings if f not in own]
    return rng.sample(pool, min(k, len(pool)))


def _other_condition(kb: KnowledgeBase, condition: Condition, rng: random.Random) -> Condition:
    while True:
        other = rng.choice(kb.conditions)
        if other.id != condition.id:
            return other


def write_note(
    kb: KnowledgeBase, condition: Condition, rng: random.Random, *, hard: bool = False
) -> str:
    """One generated note for ``condition`` (see the module docstring)."""
    w = _Writer(kb, rng, hard)
    chosen = w.pick_findings(condition)
    phrases: list[str] = []
    vitals: list[str] = []
    for fid in chosen:
        if fid in _VITALS and rng.random() < 0.4:
            fmt, draw = _VITALS[fid]
            value = draw(rng)
            vitals.append(fmt.format(*value) if isinstance(value, tuple) else fmt.format(value))
        else:
            phrases.append(_phrase(rng, kb, fid))
    sentences = w.main_sentences(phrases, vitals)
    boost = 1.4 if hard else 1.0
    extra: list[str] = []
    if rng.random() < 0.75 * boost:
        negated = [
            _phrase(rng, kb, f) for f in _other_findings(kb, condition, rng, rng.randint(1, 3))
        ]
        form = rng.randrange(6)
        if form == 0:
            extra.append(f"Denies {_join(rng, negated, semicolons=False)}.")
        elif form == 1:
            extra.append(f"No {_join(rng, negated, semicolons=False)}.")
        elif form == 2:
            extra.append(f"Negative for {_join(rng, negated, semicolons=False)}.")
        elif form == 3:
            extra.append(f"{w.pronoun} denies {_join(rng, negated, semicolons=False)}.")
        elif form == 4:
            extra.append(f"ROS negative for {_join(rng, negated, semicolons=False)}.")
        else:
            extra.append(f"No {negated[0]} but reports {_phrase(rng, kb, rng.choice(chosen))}.")
    if rng.random() < 0.35 * boost:
        other = _other_condition(kb, condition, rng)
        relative = rng.choice(_RELATIVES)
        extra.append(
            rng.choice(
                (
                    f"{relative} has {_name(rng, other)}.",
                    f"Family history of {_name(rng, other)}.",
                    f"FH: {_name(rng, other)} in mother.",
                    f"{relative} with {_phrase(rng, kb, rng.choice(other.findings))}.",
                )
            )
        )
    if rng.random() < 0.35 * boost:
        other = _other_condition(kb, condition, rng)
        second = _other_condition(kb, condition, rng)
        extra.append(
            rng.choice(
                (
                    f"History of {_name(rng, other)}.",
                    f"PMH: {_name(rng, other)}, {_name(rng, second)}.",
                    f"Past medical history of {_name(rng, other)}.",
                    f"Had {_phrase(rng, kb, rng.choice(other.findings))} last year, resolved.",
                )
            )
        )
    if rng.random() < 0.3 * boost:
        later = [_phrase(rng, kb, f) for f in _other_findings(kb, condition, rng, 2)]
        extra.append(
            rng.choice(
                (
                    f"Return if {later[0]} develops.",
                    f"Return precautions for {_join(rng, later, semicolons=False)} given.",
                    f"Call if {later[0]}.",
                    f"Advised to seek care if {later[0]} occurs.",
                )
            )
        )
    if rng.random() < 0.15 * boost:
        target = condition if rng.random() < 0.5 else _other_condition(kb, condition, rng)
        extra.append(
            rng.choice((f"Rule out {_name(rng, target)}.", f"Concern for {_name(rng, target)}."))
        )
    if not hard and rng.random() < 0.08:
        extra.append(f"Diagnosed with {_name(rng, condition)} today.")
    if rng.random() < 0.4:
        extra.append(rng.choice(_FILLERS))
    rng.shuffle(extra)
    cut = rng.randint(0, len(extra))
    ordered = (
        [*extra[:cut], *sentences, *extra[cut:]] if rng.random() < 0.3 else [*sentences, *extra]
    )
    separator = "\n" if rng.random() < 0.35 else " "
    return separator.join(ordered)


def generate_notes(
    kb: KnowledgeBase, per_condition: int, seed: int, *, hard: bool = False
) -> list[GeneratedNote]:
    """``per_condition`` notes for every condition, reproducible from ``seed``."""
    if per_condition < 1:
        raise ValueError("per_condition must be positive")
    notes = []
    for ci, condition in enumerate(kb.conditions):
        for i in range(per_condition):
            rng = random.Random(f"{GENERATOR_ID}:{seed}:{ci}:{i}:{int(hard)}")
            notes.append(GeneratedNote(write_note(kb, condition, rng, hard=hard), condition.id))
    return notes
