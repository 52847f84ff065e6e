"""The classification task: evolve a supervised classification loss, scored by validation accuracy."""

from evaluators.classification.settings import PRESETS, ClassificationSettings
from evaluators.classification.task import ClassificationTask

__all__ = ["PRESETS", "ClassificationSettings", "ClassificationTask"]
