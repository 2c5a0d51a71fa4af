"""Clinical routing rules: which pipelines run on a patient's FHIR resources.

The file format is documented at the top of ``worker/rules/clinical.yaml`` (the default).
Loading is strict, like the DICOM rules: unknown keys, bad queues or empty trigger lists
are refused with the file name and the pipeline in the message.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from worker.routing import RulesError

DEFAULT_CLINICAL_RULES = Path(__file__).resolve().parent / "rules" / "clinical.yaml"
LOINC = "http://loinc.org"
RESOURCE_TYPES = ("DocumentReference", "Observation", "Condition", "Patient")
_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_LOINC_CODE = re.compile(r"^\d{1,7}-\d$")


def loinc_codes(resource: Mapping[str, Any]) -> set[str]:
    """The LOINC codes of a resource's ``code`` (every coding, not just the first)."""
    code = resource.get("code")
    codings = code.get("coding", []) if isinstance(code, dict) else []
    return {
        str(coding["code"])
        for coding in codings
        if isinstance(coding, dict) and coding.get("system") == LOINC and coding.get("code")
    }


@dataclass(frozen=True)
class ResourceSelector:
    """Resources of one type, optionally only those carrying one of ``codes`` (LOINC)."""

    resource_type: str
    codes: frozenset[str] = frozenset()

    def matches(self, resource: Mapping[str, Any]) -> bool:
        if resource.get("resourceType") != self.resource_type:
            return False
        return not self.codes or bool(self.codes & loinc_codes(resource))


@dataclass(frozen=True)
class ClinicalPipeline:
    """One pipeline of the clinical rules."""

    name: str
    queue: str
    model: str
    description: str
    per_resource: bool
    triggers: tuple[ResourceSelector, ...]
    inputs: tuple[ResourceSelector, ...]
    # Imaging pipelines (of the DICOM routing rules) whose latest result for the patient
    # joins the context: matched by DICOM Patient ID = the Patient's PATIENT_ID_SYSTEM id.
    imaging: tuple[str, ...] = ()

    def is_trigger(self, resource: Mapping[str, Any]) -> bool:
        return any(selector.matches(resource) for selector in self.triggers)

    def is_input(self, resource: Mapping[str, Any]) -> bool:
        return any(selector.matches(resource) for selector in self.inputs)


class ClinicalRules:
    """The clinical pipelines, in file order."""

    def __init__(self, pipelines: Iterable[ClinicalPipeline], source: str) -> None:
        self.pipelines = tuple(pipelines)
        self.source = source

    @classmethod
    def load(cls, path: Path | str | None = None) -> ClinicalRules:
        """Read and validate a rules file (the shipped default when ``path`` is None)."""
        file = Path(path) if path is not None else DEFAULT_CLINICAL_RULES
        try:
            text = file.read_text(encoding="utf-8")
        except OSError as exc:
            raise RulesError(f"{file}: cannot read clinical rules: {exc.strerror}") from exc
        return cls.parse(text, str(file))

    @classmethod
    def parse(cls, text: str, source: str = "<clinical rules>") -> ClinicalRules:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise RulesError(f"{source}: not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise RulesError(f"{source}: expected a mapping with 'pipelines'")
        _check_keys(data, ("version", "pipelines"), f"{source}")
        if data.get("version", 1) != 1:
            raise RulesError(f"{source}: unsupported version {data.get('version')!r}")
        raw = data.get("pipelines")
        if not isinstance(raw, dict) or not raw:
            raise RulesError(f"{source}: 'pipelines' must map pipeline names to settings")
        return cls((_pipeline(name, spec, source) for name, spec in raw.items()), source)


def _check_keys(mapping: Mapping[Any, Any], allowed: Iterable[str], where: str) -> None:
    unknown = sorted(str(key) for key in mapping if key not in set(allowed))
    if unknown:
        raise RulesError(f"{where}: unknown keys {unknown}; allowed: {sorted(allowed)}")


def _pipeline(name: Any, spec: Any, source: str) -> ClinicalPipeline:
    where = f"{source}: pipeline {name!r}"
    if not isinstance(name, str) or not _NAME.match(name):
        raise RulesError(f"{where}: names use letters, digits, '.', '_' and '-'")
    if not isinstance(spec, dict):
        raise RulesError(f"{where}: expected a mapping")
    _check_keys(
        spec,
        ("queue", "model", "description", "per_resource", "triggers", "inputs", "imaging"),
        where,
    )
    queue = spec.get("queue")
    if queue not in ("gpu", "cpu"):
        raise RulesError(f"{where}: queue must be 'gpu' or 'cpu', not {queue!r}")
    model = spec.get("model")
    if not isinstance(model, str) or not _NAME.match(model):
        raise RulesError(f"{where}: 'model' must name a model directory")
    per_resource = spec.get("per_resource", False)
    if not isinstance(per_resource, bool):
        raise RulesError(f"{where}: per_resource must be true or false")
    triggers = _selectors(spec.get("triggers"), f"{where} triggers")
    if not triggers:
        raise RulesError(f"{where}: at least one trigger is required")
    inputs = _selectors(spec.get("inputs", []), f"{where} inputs")
    imaging = spec.get("imaging", [])
    if not isinstance(imaging, list) or not all(
        isinstance(item, str) and _NAME.match(item) for item in imaging
    ):
        raise RulesError(f"{where}: 'imaging' must be a list of imaging pipeline names")
    return ClinicalPipeline(
        name=name,
        queue=queue,
        model=model,
        description=str(spec.get("description", "")),
        per_resource=per_resource,
        triggers=triggers,
        inputs=inputs,
        imaging=tuple(imaging),
    )


def _selectors(raw: Any, where: str) -> tuple[ResourceSelector, ...]:
    if not isinstance(raw, list):
        raise RulesError(f"{where}: expected a list of {{resourceType, codes}}")
    selectors = []
    for item in raw:
        if not isinstance(item, dict):
            raise RulesError(f"{where}: expected {{resourceType, codes}}, got {item!r}")
        _check_keys(item, ("resourceType", "codes"), where)
        resource_type = item.get("resourceType")
        if resource_type not in RESOURCE_TYPES:
            raise RulesError(f"{where}: resourceType must be one of {list(RESOURCE_TYPES)}")
        codes = item.get("codes", [])
        if not isinstance(codes, list) or not all(
            isinstance(code, str) and _LOINC_CODE.match(code) for code in codes
        ):
            raise RulesError(f"{where}: codes must be a list of LOINC codes such as '8480-6'")
        selectors.append(ResourceSelector(resource_type, frozenset(codes)))
    return tuple(selectors)
