"""The training recipe of SPEC §2: adversarial training, distillation, M, P, calibration."""

from training.recipe.config import STAGE_HELP, STAGES, RecipeConfig
from training.recipe.runner import TrainRequest, train_bundle

__all__ = ["STAGES", "STAGE_HELP", "RecipeConfig", "TrainRequest", "train_bundle"]
