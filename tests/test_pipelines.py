"""Pipelines the routing rules name but this version does not implement fail clearly."""

from __future__ import annotations

import pytest

from worker.jobs import PermanentJobError
from worker.pipelines import get_pipeline
from worker.routing import RoutingRules


def test_every_default_pipeline_is_implemented_or_refused_with_a_reason() -> None:
    for name in RoutingRules.load(None).pipelines:
        if name == "cxr-classification":
            assert callable(get_pipeline(name))
        else:
            with pytest.raises(PermanentJobError, match="not implemented"):
                get_pipeline(name)
