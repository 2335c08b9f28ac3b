"""Training on one device and timing on another (``--device`` / ``--latency-device``).

Without a GPU here, the second device is ``cpu:0``: torch treats it as a device other than ``cpu``, so the evaluator
takes the path a GPU-trained, CPU-timed run takes (a copy of the model goes to the latency device, int8 layers are
quantized there and the model is scored there), and the results must equal those of one device. BatchNorm folding
(which copies the model too) is off here; ``test_deployed.py`` tests it.
``benchmarks/gpu_check.py`` runs the real thing on a CUDA machine.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import trained_tiny_evaluator

from ranksearch.config import CompressionConfig, LayerChoice
from ranksearch.errors import RanksearchError
from ranksearch.evaluate import ClassificationEvaluator, EvaluatorOptions
from ranksearch.study.settings import RunSettings
from ranksearch.training.loop import mixed_precision

CONFIGS = {
    "float": CompressionConfig(layers={"conv2": LayerChoice("svd", 0.25)}),
    "int8": CompressionConfig(
        layers={"conv2": LayerChoice("svd", 0.25, int8=True), "conv3": LayerChoice("keep", int8=True)}
    ),
}


def _evaluator(latency_device: torch.device | None) -> ClassificationEvaluator:
    options = EvaluatorOptions(finetune_steps=4, batch_size=64, calib_batches=1, fold_batchnorm=False)
    return trained_tiny_evaluator(options, latency_device=latency_device)


@pytest.fixture(scope="module")
def pair() -> tuple[ClassificationEvaluator, ClassificationEvaluator]:
    return _evaluator(None), _evaluator(torch.device("cpu:0"))


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_timing_on_another_device_measures_what_one_device_does(pair, kind: str, monkeypatch) -> None:
    """The same config on one device and on two: the same accuracy, image by image, on val and (a promoted model,
    kept) on test; with two devices the timed model is a copy made for the latency device, and the trained model is
    left as it was."""
    one, two = pair
    config = CONFIGS[kind]
    copied: list[str] = []
    real_deepcopy = copy.deepcopy

    def spy(thing, *args):
        if isinstance(thing, torch.nn.Module):
            copied.append(type(thing).__name__)
        return real_deepcopy(thing, *args)

    for split in ("val", "test"):
        same = one.evaluate_at(config, finetune_steps=8, split=split)
        elsewhere = two.evaluate_at(config, finetune_steps=8, split=split)
        assert elsewhere.correct == same.correct and elsewhere.accuracy == same.accuracy
        assert elsewhere.latency_ms > 0 and elsewhere.reference_latency_ms > 0
    assert two.evaluate_at(config, finetune_steps=8, split="test").extra.get("reused_model") == 1.0
    monkeypatch.setattr(copy, "deepcopy", spy)
    one.evaluate_at(config, finetune_steps=4)
    on_one = len(copied)
    two.evaluate_at(config, finetune_steps=4)
    assert len(copied) - on_one == on_one + 1, "the candidate is copied to the latency device (the dense model once)"
    assert isinstance(two.model.get_submodule("conv2"), torch.nn.Conv2d)


def test_int8_layers_are_quantized_on_the_copy_that_is_timed(pair) -> None:
    """time_beside_dense quantizes the latency device's copy; the trained dense model keeps its float layers."""
    _, two = pair
    paired = two.time_beside_dense(CONFIGS["int8"], rounds=2, target_seconds=0.05)
    assert len(paired.ratios) == 2 and paired.candidate.median_ms > 0
    assert isinstance(two.model.get_submodule("conv2"), torch.nn.Conv2d)


def test_the_latency_device_is_part_of_a_studys_identity() -> None:
    """Timing where it trains, named or not, is one identity (studies made before the option resume); timing
    elsewhere is another."""
    plain = RunSettings.of(device="cpu")
    assert RunSettings.of(device="cpu", latency_device="cpu").identity() == plain.identity()
    assert plain.identity()["latency_device"] is None
    assert RunSettings.of(device="cuda", latency_device="cpu").identity()["latency_device"] == "cpu"
    assert RunSettings.of(device="cuda", latency_device="cpu").infra.timing_device == "cpu"
    assert plain.infra.timing_device == "cpu"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"latency_device": "cuda"}, "--latency-device cuda was asked for but CUDA is not available here"),
        ({"latency_device": "tpu"}, "--latency-device 'tpu' is not"),
        ({"device": "cuda"}, "--device cuda was asked for but CUDA is not available here; use --device cpu"),
    ],
)
def test_a_device_not_here_is_a_one_line_error_naming_its_option(options: dict[str, str], message: str) -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA is here")
    with pytest.raises(RanksearchError, match=message):
        RunSettings.of(**options).infra.devices()


def test_onnxruntime_timing_needs_a_cpu_latency_device() -> None:
    """Training elsewhere is fine; timing elsewhere in ONNX Runtime is a one-line error naming the option."""
    RunSettings.of(device="cuda", latency_device="cpu", latency_backend="onnxruntime").validate()
    with pytest.raises(RanksearchError, match="not --latency-device cuda; use --latency-device cpu"):
        RunSettings.of(latency_device="cuda", latency_backend="onnxruntime").validate()


def test_mixed_precision_is_for_gpus_only() -> None:
    """On CPU, training runs in float32 (the CPU fast path is channels-last and its own conv gradients)."""
    with mixed_precision(torch.device("cpu")):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
