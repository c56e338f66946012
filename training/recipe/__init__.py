"""The training recipe (docs/training.md): adversarial training, distillation, M, P, calibration."""

from ism_edge_training.recipe.config import (
           BASELINE_HELP,
           BASELINE_STAGES,
           STAGE_HELP,
           STAGES,
           RecipeConfig,
           baseline_stages,
)
from ism_edge_training.recipe.runner import TrainRequest, train_bundle

__all__ = ["BASELINE_HELP", "BASELINE_STAGES", "STAGES", "STAGE_HELP", "RecipeConfig", "TrainRequest",
           "baseline_stages", "train_bundle"]
