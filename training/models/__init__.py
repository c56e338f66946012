"""Networks of the defense (paper Tables 1 and 2) and their configuration presets."""

from ism_edge_training.models.config import PRESETS, ModelConfig, preset
from ism_edge_training.models.networks import (
    Classifier,
    Discriminator,
    MappingNetwork,
    PerturbationClassifier,
    ScaledLogits,
    count_parameters,
    js_divergence,
    k_sparse,
    reconstruction_error,
    sparse_l1,
)

__all__ = [
    "PRESETS",
    "ModelConfig",
    "preset",
    "Classifier",
    "Discriminator",
    "MappingNetwork",
    "PerturbationClassifier",
    "ScaledLogits",
    "count_parameters",
    "js_divergence",
    "k_sparse",
    "reconstruction_error",
    "sparse_l1",
]
