"""Training building blocks: cached baseline training, accuracy, BatchNorm recalibration, distillation fine-tuning.

Everything runs on the given device (CPU or CUDA). On CPU, weights are held channels-last while
training and evaluating, and convolution weight gradients of tiny feature maps (at most 2x2 outputs,
or single-channel inputs) are computed as one matrix product, because oneDNN's kernels for those
shapes are up to 20x slower than the forward pass (measured on a 2-core AVX2 CPU; see
:class:`CpuConvGrads`). Together these train ResNet-18 at 28x28 3.4x faster per thread.

Modules: ``baseline`` (:func:`train_baseline` and its :class:`Recipe`), ``finetune`` (distillation),
``evaluation`` (accuracy, BatchNorm recalibration), ``conv_grad`` (the CPU gradient path) and ``loop``
(what the loops share).
"""

from ranksearch.training.baseline import DEFAULT_RECIPE, Recipe, train_baseline
from ranksearch.training.conv_grad import CpuConvGrads
from ranksearch.training.evaluation import correct_predictions, evaluate_accuracy, recalibrate_batchnorm
from ranksearch.training.finetune import (
    TeacherCache,
    distillation_loss,
    feature_loss,
    finetune,
    stage_names,
    warmup_cosine,
)
from ranksearch.training.loop import DivergedError

__all__ = [
    "DEFAULT_RECIPE",
    "CpuConvGrads",
    "DivergedError",
    "Recipe",
    "TeacherCache",
    "correct_predictions",
    "distillation_loss",
    "evaluate_accuracy",
    "feature_loss",
    "finetune",
    "recalibrate_batchnorm",
    "stage_names",
    "train_baseline",
    "warmup_cosine",
]
