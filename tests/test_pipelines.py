"""Every pipeline the shipped rules name has an implementation; an unknown name is refused
with a reason (a rules file naming a pipeline this version does not have)."""

from __future__ import annotations

import pytest

from worker.clinical_rules import ClinicalRules
from worker.jobs import PermanentJobError
from worker.pipelines import get_pipeline
from worker.routing import RoutingRules


def test_every_shipped_pipeline_is_implemented() -> None:
    names = set(RoutingRules.load(None).pipelines)
    names |= {pipeline.name for pipeline in ClinicalRules.load().pipelines}
    assert names == {
        "cxr-classification",
        "liver-segmentation",
        "symptom-analysis",
        "risk-scoring",
        "treatment-suggestion",
    }
    for name in names:
        assert callable(get_pipeline(name))


def test_an_unknown_pipeline_is_refused_with_a_reason() -> None:
    with pytest.raises(PermanentJobError, match="not implemented"):
        get_pipeline("bone-age")
