"""Routing rules: which pipelines run on a received DICOM series.

A declarative YAML file (format documented in the header of ``worker/rules/default.yaml``,
which is also the shipped default) lists the pipelines and the rules that select them from
DICOM attributes of a series (Modality, SOPClassUID, BodyPartExamined, ViewPosition,
ImageType, SeriesDescription, StudyDescription, ProtocolName).

Every rule is checked when the file is loaded, so a typo fails at start-up with the file
and the rule named, not silently at routing time. :meth:`RoutingRules.explain` says for
each rule whether it matched and why; :func:`explain_paths` renders that for files on disk
(``carebridge rules test PATH``).

Rules files are configuration, never code: they are parsed with ``yaml.safe_load`` (and
``yaml.compose`` for the duplicate-key check, which builds no objects). Never use
``yaml.load`` with a full or unsafe Loader here.
"""

from __future__ import annotations

import difflib
import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, cast, get_args

import pydicom
import yaml
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

Queue = Literal["gpu", "cpu"]
"""Celery queue a pipeline's task is sent to."""

QUEUES: tuple[str, ...] = get_args(Queue)

ROUTED_ATTRIBUTES: tuple[str, ...] = (
    "Modality",
    "SOPClassUID",
    "BodyPartExamined",
    "ViewPosition",
    "ImageType",
    "SeriesDescription",
    "StudyDescription",
    "ProtocolName",
)
"""DICOM keywords a rule may test, in the order they are reported."""

FORMAT_VERSION = 1
DEFAULT_RULES_RESOURCE = "default.yaml"

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_TOP_KEYS = ("version", "pipelines", "rules")
_PIPELINE_KEYS = ("queue", "model", "description")
_RULE_KEYS = ("name", "pipeline", "match", "exclude", "enabled", "description")
_CONDITION_KINDS = ("regex", "contains", "any")
_MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
_MAX_SHOWN_VALUE = 64

ConditionKind = Literal["values", "regex", "contains", "any"]


class RulesError(ValueError):
    """A routing rules file that cannot be used; the message names the file and the rule."""


@dataclass(frozen=True)
class PipelineSpec:
    """A pipeline a rule can select: the queue its task goes to and the model it runs."""

    name: str
    queue: Queue
    model: str
    description: str = ""


@dataclass(frozen=True)
class Condition:
    """One test of one attribute, as written under ``match`` or ``exclude``."""

    attribute: str
    kind: ConditionKind
    values: tuple[str, ...] = ()
    pattern: str = ""
    _normalized: frozenset[str] = field(default=frozenset(), repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_normalized", frozenset(_norm(v) for v in self.values))

    def test(self, value: str) -> tuple[bool, str]:
        """Return whether ``value`` satisfies the condition and a one-line reason."""
        shown = f"{self.attribute} {_quote(value)}"
        if self.kind == "any":
            return True, f"{shown}: any value accepted"
        if self.kind == "regex":
            if re.search(self.pattern, value):
                return True, f"{shown} matches /{self.pattern}/"
            return False, f"{shown} does not match /{self.pattern}/"
        if self.kind == "contains":
            parts = [_norm(p) for p in value.split("\\")]
            hits = [v for v in self.values if _norm(v) in parts]
            if hits:
                return True, f"{shown} contains {hits[0]}"
            return False, f"{shown} contains none of {_format_list(self.values)}"
        if _norm(value) in self._normalized:
            return True, f"{shown} in {_format_list(self.values)}"
        return False, f"{shown} not in {_format_list(self.values)}"


@dataclass(frozen=True)
class RuleExplanation:
    """Whether one rule matched a series, with one reason per condition."""

    rule_name: str
    pipeline: str
    matched: bool
    reasons: tuple[str, ...]


@dataclass(frozen=True)
class Rule:
    """A named rule: all ``match`` conditions hold and no ``exclude`` condition holds."""

    name: str
    pipeline: str
    match: tuple[Condition, ...]
    exclude: tuple[Condition, ...] = ()
    enabled: bool = True
    description: str = ""

    def explain(self, attrs: Mapping[str, str]) -> RuleExplanation:
        """Evaluate every condition (no short-circuit) so the explanation is complete."""
        if not self.enabled:
            return RuleExplanation(self.name, self.pipeline, False, ("rule disabled",))
        reasons: list[str] = []
        matched = True
        for cond in self.match:
            ok, reason = cond.test(_attr(attrs, cond.attribute))
            matched = matched and ok
            reasons.append(reason)
        for cond in self.exclude:
            hit, reason = cond.test(_attr(attrs, cond.attribute))
            matched = matched and not hit
            reasons.append(f"exclude: {reason}")
        return RuleExplanation(self.name, self.pipeline, matched, tuple(reasons))


class RoutingRules:
    """A validated routing rules file: its pipelines and its rules, in file order."""

    def __init__(
        self, pipelines: Mapping[str, PipelineSpec], rules: Sequence[Rule], source: str
    ) -> None:
        """Build from already validated parts; use :meth:`load` or :meth:`parse` instead."""
        self.pipelines: Mapping[str, PipelineSpec] = MappingProxyType(dict(pipelines))
        self.rules: tuple[Rule, ...] = tuple(rules)
        self.source = source

    def __repr__(self) -> str:
        return (
            f"RoutingRules(source={self.source!r}, pipelines={list(self.pipelines)!r}, "
            f"rules={[r.name for r in self.rules]!r})"
        )

    @classmethod
    def load(cls, path: Path | str | None = None) -> RoutingRules:
        """Load and validate a rules file; ``None`` loads the shipped default rules."""
        if path is None:
            resource = resources.files("worker.rules").joinpath(DEFAULT_RULES_RESOURCE)
            return cls.parse(resource.read_text(encoding="utf-8"), "default rules (default.yaml)")
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise RulesError(f"{path}: cannot read the rules file: {reason}") from exc
        return cls.parse(text, str(path))

    @classmethod
    def parse(cls, text: str, source: str = "<rules>") -> RoutingRules:
        """Validate rules given as YAML text; ``source`` names it in error messages."""
        data = _safe_yaml(text, source)
        pipelines, rules = _validate(data, source)
        return cls(pipelines, rules, source)

    def explain(self, attrs: Mapping[str, str]) -> list[RuleExplanation]:
        """Evaluate every rule, in file order, against a series' attributes."""
        return [rule.explain(attrs) for rule in self.rules]

    def select(self, attrs: Mapping[str, str]) -> list[PipelineSpec]:
        """Return the pipelines the matching rules select: distinct, in rule order."""
        selected: dict[str, PipelineSpec] = {}
        for explanation in self.explain(attrs):
            if explanation.matched and explanation.pipeline not in selected:
                selected[explanation.pipeline] = self.pipelines[explanation.pipeline]
        return list(selected.values())


def series_attributes(ds: Dataset) -> dict[str, str]:
    """Read the routed attributes of an instance as text ("" when absent or unreadable).

    Multi-valued attributes (ImageType) are joined with a backslash, as DICOM encodes them.
    """
    out: dict[str, str] = {}
    for keyword in ROUTED_ATTRIBUTES:
        try:
            value = ds.get(keyword)
        except Exception:  # a malformed element must not stop routing of the others
            value = None
        out[keyword] = _as_text(value)
    return out


# --------------------------------------------------------------------------- explain_paths


@dataclass
class _Series:
    uid: str
    attrs: dict[str, str]
    modality: str
    number: str
    instances: int = 1
    varying: set[str] = field(default_factory=set)


def explain_paths(rules: RoutingRules, paths: Sequence[Path]) -> str:
    """Render which rules match each DICOM series found under ``paths``, and why.

    Folders are read recursively (headers only); files that are not DICOM are listed as
    skipped. A series is named by Modality, SeriesNumber and a short hash of its
    SeriesInstanceUID: no patient names or identifiers are printed.
    """
    files, skipped = _collect_files(paths)
    series: dict[str, _Series] = {}
    for path in files:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except InvalidDicomError:
            skipped.append((path, "not DICOM"))
            continue
        except Exception as exc:  # truncated or malformed files: report, keep going
            skipped.append((path, f"unreadable DICOM ({type(exc).__name__})"))
            continue
        meta = getattr(ds, "file_meta", None) or Dataset()
        sop_class = _as_text(ds.get("SOPClassUID")) or _as_text(meta.get("MediaStorageSOPClassUID"))
        if sop_class == _MEDIA_STORAGE_DIRECTORY:
            skipped.append((path, "DICOMDIR"))
            continue
        attrs = series_attributes(ds)
        uid = _as_text(ds.get("SeriesInstanceUID"))
        known = series.get(uid)
        if known is None:
            series[uid] = _Series(
                uid=uid,
                attrs=attrs,
                modality=attrs["Modality"] or "?",
                number=_as_text(ds.get("SeriesNumber")) or "?",
            )
        else:
            known.instances += 1
            known.varying.update(k for k in ROUTED_ATTRIBUTES if attrs[k] != known.attrs[k])

    n_files = sum(s.instances for s in series.values())
    lines = [
        f"Routing rules: {rules.source}",
        f"{_plural(n_files, 'DICOM file')} in {_plural(len(series), 'series', 'series')}; "
        f"{_plural(len(skipped), 'file')} skipped.",
    ]
    for item in sorted(series.values(), key=_series_order):
        lines.append("")
        lines.extend(_render_series(rules, item))
    if skipped:
        lines.append("")
        lines.append("Skipped:")
        lines.extend(f"  {path}: {why}" for path, why in skipped)
    return "\n".join(lines) + "\n"


def _render_series(rules: RoutingRules, item: _Series) -> list[str]:
    ident = _short_hash(item.uid) if item.uid else "no SeriesInstanceUID"
    lines = [
        f"Series {item.modality} #{item.number} [{ident}] ({_plural(item.instances, 'instance')})"
    ]
    if item.varying:
        lines.append(
            f"  note: {', '.join(sorted(item.varying))} differ(s) within the series; "
            "the first instance's values are used"
        )
    for exp in rules.explain(item.attrs):
        verdict = "MATCH   " if exp.matched else "no match"
        lines.append(f"  {verdict}  {exp.rule_name} -> {exp.pipeline}")
        lines.extend(f"              {reason}" for reason in exp.reasons)
    selected = rules.select(item.attrs)
    if selected:
        shown = ", ".join(f"{p.name} (queue {p.queue}, model {p.model})" for p in selected)
        lines.append(f"  Pipelines: {shown}")
    else:
        lines.append("  Pipelines: none")
    return lines


def _collect_files(paths: Sequence[Path]) -> tuple[list[Path], list[tuple[Path, str]]]:
    files: list[Path] = []
    skipped: list[tuple[Path, str]] = []
    seen: set[Path] = set()

    def add(candidate: Path) -> None:
        key = candidate.resolve()
        if key not in seen:
            seen.add(key)
            files.append(candidate)

    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            for child in sorted(path.rglob("*")):
                if child.is_file():
                    add(child)
        elif path.is_file():
            add(path)
        else:
            skipped.append((path, "not found"))
    return files, skipped


def _series_order(item: _Series) -> tuple[str, int, str, str]:
    number = int(item.number) if item.number.lstrip("-").isdigit() else 1 << 31
    return (item.modality, number, item.number, _short_hash(item.uid))


def _short_hash(uid: str) -> str:
    return hashlib.sha256(uid.encode("utf-8")).hexdigest()[:8]


def _plural(n: int, word: str, plural: str | None = None) -> str:
    return f"{n} {word if n == 1 else (plural or word + 's')}"


# ------------------------------------------------------------------------------ validation


def _safe_yaml(text: str, source: str) -> Any:
    """Parse YAML with the safe loader, refusing duplicate keys (PyYAML keeps the last)."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)  # nodes only, constructs nothing
        if root is not None:
            _check_duplicate_keys(root, source)
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        where = ""
        if exc.problem_mark is not None:
            where = f"line {exc.problem_mark.line + 1}, column {exc.problem_mark.column + 1}: "
        raise RulesError(f"{source}: invalid YAML: {where}{exc.problem or exc}") from exc
    except yaml.YAMLError as exc:
        raise RulesError(f"{source}: invalid YAML: {exc}") from exc


def _check_duplicate_keys(node: yaml.Node, source: str) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key = str(key_node.value)
            if isinstance(key_node, yaml.ScalarNode) and key != "<<":
                if key in seen:
                    line = key_node.start_mark.line + 1
                    raise RulesError(f"{source}: line {line}: duplicate key {key!r}")
                seen.add(key)
            _check_duplicate_keys(value_node, source)
    elif isinstance(node, yaml.SequenceNode):
        for child in node.value:
            _check_duplicate_keys(child, source)


def _validate(data: Any, source: str) -> tuple[dict[str, PipelineSpec], list[Rule]]:
    if not isinstance(data, dict):
        raise RulesError(
            f"{source}: expected a mapping with 'pipelines' and 'rules', got {_type_name(data)}"
        )
    _check_keys(data, _TOP_KEYS, source, "top level")
    version = data.get("version", FORMAT_VERSION)
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise RulesError(
            f"{source}: unsupported version {version!r} (this carebridge reads version "
            f"{FORMAT_VERSION})"
        )
    if "pipelines" not in data:
        raise RulesError(f"{source}: missing 'pipelines' (the pipelines rules may select)")
    if "rules" not in data:
        raise RulesError(f"{source}: missing 'rules' (write 'rules: []' to route nothing)")
    pipelines = _validate_pipelines(data["pipelines"], source)
    raw_rules = data["rules"]
    if raw_rules is None:
        raw_rules = []
    if not isinstance(raw_rules, list):
        raise RulesError(f"{source}: 'rules' must be a list, got {_type_name(raw_rules)}")
    rules: list[Rule] = []
    names: set[str] = set()
    for index, raw in enumerate(raw_rules, start=1):
        rule = _validate_rule(raw, index, pipelines, source)
        if rule.name.casefold() in names:
            raise RulesError(f"{source}: rule {rule.name!r}: duplicate rule name")
        names.add(rule.name.casefold())
        rules.append(rule)
    return pipelines, rules


def _validate_pipelines(raw: Any, source: str) -> dict[str, PipelineSpec]:
    if not isinstance(raw, dict) or not raw:
        raise RulesError(
            f"{source}: 'pipelines' must be a non-empty mapping of pipeline name to "
            "{queue, model, description}"
        )
    pipelines: dict[str, PipelineSpec] = {}
    for name, spec in raw.items():
        where = f"{source}: pipeline {name!r}"
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise RulesError(f"{where}: names use letters, digits, '.', '_' and '-'")
        if not isinstance(spec, dict):
            raise RulesError(f"{where}: expected a mapping with 'queue' and 'model'")
        _check_keys(spec, _PIPELINE_KEYS, source, f"pipeline {name!r}")
        queue = spec.get("queue")
        if queue not in QUEUES:
            raise RulesError(
                f"{where}: queue {queue!r} is not one of {', '.join(QUEUES)}"
                if "queue" in spec
                else f"{where}: missing 'queue' ({' or '.join(QUEUES)})"
            )
        model = spec.get("model")
        if not isinstance(model, str) or not _NAME_RE.match(model):
            raise RulesError(
                f"{where}: 'model' must be a model name (letters, digits, '.', '_', '-'), "
                f"got {model!r}"
            )
        description = spec.get("description", "") or ""
        if not isinstance(description, str):
            raise RulesError(f"{where}: 'description' must be text")
        pipelines[name] = PipelineSpec(name, cast(Queue, queue), model, description.strip())
    return pipelines


def _validate_rule(
    raw: Any, index: int, pipelines: Mapping[str, PipelineSpec], source: str
) -> Rule:
    if not isinstance(raw, dict):
        raise RulesError(f"{source}: rule #{index}: expected a mapping, got {_type_name(raw)}")
    name = raw.get("name")
    if name is not None and not isinstance(name, str):
        raise RulesError(
            f"{source}: rule #{index}: name {name!r} was read by YAML as {_type_name(name)}; "
            "quote it"
        )
    if not isinstance(name, str) or not name.strip():
        raise RulesError(f"{source}: rule #{index}: missing 'name' (a non-empty text)")
    name = name.strip()
    label = f"rule {name!r}"
    where = f"{source}: {label}"
    _check_keys(raw, _RULE_KEYS, source, label)
    pipeline = raw.get("pipeline")
    if not isinstance(pipeline, str):
        raise RulesError(f"{where}: missing 'pipeline' (one of {', '.join(pipelines)})")
    if pipeline not in pipelines:
        raise RulesError(
            f"{where}: unknown pipeline {pipeline!r}{_suggest(pipeline, pipelines)} "
            f"(defined: {', '.join(pipelines)})"
        )
    enabled = raw.get("enabled", True)
    if not isinstance(enabled, bool):
        raise RulesError(f"{where}: 'enabled' must be true or false, got {enabled!r}")
    description = raw.get("description", "") or ""
    if not isinstance(description, str):
        raise RulesError(f"{where}: 'description' must be text")
    if "match" not in raw:
        raise RulesError(f"{where}: missing 'match' (at least one condition, e.g. Modality: [CT])")
    match = _validate_conditions(raw["match"], "match", where, required=True)
    exclude = _validate_conditions(raw.get("exclude") or {}, "exclude", where, required=False)
    return Rule(name, pipeline, match, exclude, enabled, description.strip())


def _validate_conditions(
    raw: Any, section: str, where: str, *, required: bool
) -> tuple[Condition, ...]:
    if not isinstance(raw, dict):
        raise RulesError(
            f"{where}: '{section}' must be a mapping of attribute to condition, "
            f"got {_type_name(raw)}"
        )
    if required and not raw:
        raise RulesError(f"{where}: '{section}' needs at least one condition")
    conditions: list[Condition] = []
    for attribute, spec in raw.items():
        if attribute not in ROUTED_ATTRIBUTES:
            raise RulesError(
                f"{where}: unknown attribute {attribute!r} in '{section}'"
                f"{_suggest(str(attribute), ROUTED_ATTRIBUTES)} "
                f"(known: {', '.join(ROUTED_ATTRIBUTES)})"
            )
        conditions.append(_validate_condition(attribute, spec, f"{where}: {section} {attribute}"))
    return tuple(conditions)


def _validate_condition(attribute: str, spec: Any, where: str) -> Condition:
    if isinstance(spec, str):
        return Condition(attribute, "values", (spec,))
    if isinstance(spec, list):
        if not spec:
            raise RulesError(f"{where}: empty list never matches; list values or use {{any: true}}")
        return Condition(attribute, "values", tuple(_text_value(v, where) for v in spec))
    if isinstance(spec, dict):
        if len(spec) != 1 or next(iter(spec)) not in _CONDITION_KINDS:
            keys = ", ".join(repr(k) for k in spec) or "nothing"
            raise RulesError(
                f"{where}: a condition mapping takes exactly one of "
                f"{', '.join(_CONDITION_KINDS)} (got {keys})"
            )
        kind, value = next(iter(spec.items()))
        if kind == "any":
            if value is not True:
                raise RulesError(f"{where}: write {{any: true}} (or remove the condition)")
            return Condition(attribute, "any")
        if kind == "regex":
            if not isinstance(value, str) or not value:
                raise RulesError(f"{where}: 'regex' needs a non-empty pattern text")
            try:
                re.compile(value)
            except re.error as exc:
                raise RulesError(f"{where}: bad regular expression {value!r}: {exc}") from exc
            return Condition(attribute, "regex", pattern=value)
        values = value if isinstance(value, list) else [value]
        if not values:
            raise RulesError(f"{where}: 'contains' needs at least one value")
        texts = tuple(_text_value(v, where) for v in values)
        if "" in (t.strip() for t in texts):
            raise RulesError(f"{where}: 'contains' values must not be empty")
        return Condition(attribute, "contains", texts)
    if spec is None:
        raise RulesError(
            f"{where}: no condition given; write [\"\"] for 'absent or empty' or {{any: true}}"
        )
    raise RulesError(
        f"{where}: expected a list of values, {{regex: ...}}, {{contains: [...]}} or "
        f"{{any: true}}, got {_type_name(spec)} {spec!r}"
    )


def _text_value(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    if value is None:
        raise RulesError(f"{where}: empty value; write \"\" for 'absent or empty'")
    raise RulesError(
        f"{where}: value {value!r} was read by YAML as {_type_name(value)}; "
        "quote it to compare it as text"
    )


def _check_keys(mapping: dict[Any, Any], allowed: Iterable[str], source: str, label: str) -> None:
    allowed = tuple(allowed)
    for key in mapping:
        if key not in allowed:
            raise RulesError(
                f"{source}: {label}: unknown key {key!r}{_suggest(str(key), allowed)} "
                f"(allowed: {', '.join(allowed)})"
            )


def _suggest(word: str, choices: Iterable[str]) -> str:
    options = list(choices)
    by_fold = {c.casefold(): c for c in options}
    close = by_fold.get(word.casefold())
    if close is None:
        found = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
        close = found[0] if found else None
    return f" (did you mean {close!r}?)" if close else ""


# --------------------------------------------------------------------------------- helpers


def _attr(attrs: Mapping[str, str], keyword: str) -> str:
    value = attrs.get(keyword)
    return "" if value is None else str(value)


def _norm(value: str) -> str:
    return value.strip().casefold()


def _as_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("ascii", "replace").strip()
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, Sequence):
        return "\\".join(_as_text(v) for v in value)
    return str(value).strip()


def _quote(value: str) -> str:
    shown = value if len(value) <= _MAX_SHOWN_VALUE else value[: _MAX_SHOWN_VALUE - 3] + "..."
    shown = "".join(ch if ch.isprintable() else "?" for ch in shown)
    return f"'{shown}'"


def _format_list(values: Iterable[str]) -> str:
    shown = []
    for value in values:
        plain = value and value == value.strip() and not re.search(r"[\s,\[\]'\"]", value)
        shown.append(value if plain else _quote(value))
    return "[" + ", ".join(shown) + "]"


def _type_name(value: Any) -> str:
    names = {dict: "a mapping", list: "a list", str: "text", bool: "a boolean", int: "a number"}
    if value is None:
        return "nothing"
    if isinstance(value, float):
        return "a number"
    return names.get(type(value), type(value).__name__)
