"""Chest X-ray classification (normal / pneumonia / lung cancer) from one frontal radiograph."""

from models.cxr.classifier import (
    CXR_LABELS,
    LUNG_CANCER,
    NORMAL,
    PNEUMONIA,
    ClassificationResult,
    CxrClassifier,
    build_network,
)
from models.cxr.preprocess import image_from_dataset, to_model_input

__all__ = [
    "CXR_LABELS",
    "LUNG_CANCER",
    "NORMAL",
    "PNEUMONIA",
    "ClassificationResult",
    "CxrClassifier",
    "build_network",
    "image_from_dataset",
    "to_model_input",
]
