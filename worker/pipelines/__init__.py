"""Pipelines by name. A pipeline runs a claimed job and returns the delivery ids to publish.

Imported only by workers: pipelines import model code (torch).
"""

from __future__ import annotations

from collections.abc import Callable

from worker.jobs import ClaimedJob, PermanentJobError
from worker.runtime import Runtime

Pipeline = Callable[[Runtime, ClaimedJob], list[int]]


def get_pipeline(name: str) -> Pipeline:
    """The implementation of pipeline ``name``; PermanentJobError when there is none."""
    if name == "cxr-classification":
        from worker.pipelines.cxr import run_cxr_classification

        return run_cxr_classification
    if name == "liver-segmentation":
        from worker.pipelines.liver import run_liver_segmentation

        return run_liver_segmentation
    if name == "symptom-analysis":
        from worker.pipelines.symptoms import run_symptom_analysis

        return run_symptom_analysis
    if name == "risk-scoring":
        from worker.pipelines.risk import run_risk_scoring

        return run_risk_scoring
    if name == "treatment-suggestion":
        from worker.pipelines.treatment import run_treatment_suggestion

        return run_treatment_suggestion
    raise PermanentJobError(
        f"pipeline {name!r} is not implemented in this version of carebridge; "
        "remove it from the routing rules or upgrade"
    )
