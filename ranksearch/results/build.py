"""Rebuild a compressed model from an exported config alone (its ``model`` section and its layers)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ranksearch.compress import Init, apply_config, quantize_layers
from ranksearch.config import CompressionConfig
from ranksearch.errors import RanksearchError
from ranksearch.models import build_model, load_checkpoint

__all__ = ["MODEL_FIELDS", "build_from_config"]

MODEL_FIELDS = ("name", "num_classes", "in_channels", "image_size")
"""The ``build_model`` arguments an exported ``model`` section must hold (plus ``checkpoint``, the weights' file)."""


def build_from_config(
    config: CompressionConfig | Mapping[str, Any] | str | Path,
    *,
    checkpoint: str | Path | None = None,
    trust_checkpoint: bool = False,
    init: Init = "decompose",
    calib_inputs: torch.Tensor | None = None,
) -> nn.Module:
    """A fresh model built from ``config``'s ``model`` section, compressed by its layers, in eval mode.

    ``checkpoint`` holds the uncompressed model's trained weights (an export records the study's
    in ``config.model["checkpoint"]``); without it the model starts from random weights. It loads as
    :func:`ranksearch.models.load_checkpoint` says (``trust_checkpoint``: a whole pickled model too).
    ``init`` and ``calib_inputs`` (model inputs, needed by int8 and data-aware layers) are as in
    :func:`ranksearch.apply_config`; as in the search, int8 layers are quantized last, their scales
    calibrated on the factorized model. This is the compressed model before fine-tuning: the
    study's accuracy was measured after BatchNorm recalibration and a short distillation before
    quantizing, as :class:`ranksearch.evaluate.classification.ClassificationEvaluator` does.
    """
    config = CompressionConfig.coerce(config)
    missing = [key for key in MODEL_FIELDS if config.model.get(key) is None]
    if missing:
        raise RanksearchError(
            f"config: its 'model' section lacks {', '.join(missing)}; export it with `ranksearch export` "
            "or add them (name, num_classes, in_channels, image_size)"
        )
    spec = config.model
    model = build_model(
        str(spec["name"]),
        num_classes=int(spec["num_classes"]),
        in_channels=int(spec["in_channels"]),
        image_size=int(spec["image_size"]),
    )
    if checkpoint is not None:
        model = load_checkpoint(model, checkpoint, trust=trust_checkpoint)
    float_config, int8_layers = config.split_int8()
    model = apply_config(model.eval(), float_config, inplace=True, calib_inputs=calib_inputs, init=init)
    return quantize_layers(model, int8_layers, calib_inputs) if int8_layers else model
