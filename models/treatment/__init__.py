"""Treatment suggestion: biomarker findings + a cited evidence table -> ranked therapy proposals.

Decision support only: every suggestion is a proposal for clinician review, never an order.
"""

from models.treatment.biomarkers import (
    Biomarker,
    BiomarkerFindings,
    BiomarkerKind,
    CancerType,
    CancerTypes,
    SkippedResource,
    parse_biomarkers,
    parse_cancer_types,
)
from models.treatment.scorer import (
    CitedEvidence,
    Drug,
    EvidenceTable,
    TreatmentAssessment,
    TreatmentModel,
    TreatmentSuggestion,
    assess,
    build_model_dir,
    suggest,
)

__all__ = [
    "Biomarker",
    "BiomarkerFindings",
    "BiomarkerKind",
    "CancerType",
    "CancerTypes",
    "CitedEvidence",
    "Drug",
    "EvidenceTable",
    "SkippedResource",
    "TreatmentAssessment",
    "TreatmentModel",
    "TreatmentSuggestion",
    "assess",
    "build_model_dir",
    "parse_biomarkers",
    "parse_cancer_types",
    "suggest",
]
