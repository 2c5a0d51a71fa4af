"""Symptom analysis of clinical notes: ranked ICD-10-CM/SNOMED CT-coded conditions.

Sentence splitting and ConText (negation, experiencer, temporality, certainty) decide which
findings a note affirms; a knowledge base of conditions with their codes and typical findings
and the offline MiniLM encoder score the conditions; temperature scaling calibrates the
confidence. See :mod:`models.symptoms.analyzer` for the method.
"""

from models.symptoms.analyzer import (
    TASK,
    Mention,
    MentionStatus,
    RankedCondition,
    SymptomAnalysis,
    SymptomAnalyzer,
)
from models.symptoms.context import Category, ConText, ContextRules
from models.symptoms.knowledge import Code, Condition, KnowledgeBase

__all__ = [
    "TASK",
    "Category",
    "Code",
    "ConText",
    "Condition",
    "ContextRules",
    "KnowledgeBase",
    "Mention",
    "MentionStatus",
    "RankedCondition",
    "SymptomAnalysis",
    "SymptomAnalyzer",
]
