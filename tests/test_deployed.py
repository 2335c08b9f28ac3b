"""The deployed form that is timed: BatchNorm folded into the layer before it, checked against the unfolded model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import trained_tiny_evaluator
from torch import nn

from ranksearch.compress import apply_config, quantize_layers
from ranksearch.config import CompressionConfig, LayerChoice
from ranksearch.errors import RanksearchError
from ranksearch.evaluate import EvaluatorOptions
from ranksearch.measure.deployed import fold_batchnorm
from ranksearch.models import build_model
from ranksearch.search import SearchSpace, default_space_path, record_input_shapes, uniform_config
from ranksearch.study.settings import RunSettings
from ranksearch.study.storage import check_existing_study, open_study
from ranksearch.techniques import get_technique, list_techniques


@pytest.fixture(scope="module")
def resnet() -> tuple[nn.Module, torch.Tensor]:
    """ResNet-18 (28 px, 1 channel) with BatchNorm statistics and affine parameters far from the identity."""
    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=10, in_channels=1, image_size=28).eval()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    return model, torch.randn(4, 1, 28, 28)


@pytest.mark.parametrize("technique", list_techniques())
def test_folding_keeps_the_outputs_and_the_names(resnet, technique: str) -> None:
    """Every technique, uniformly on the searched layers of the first stage (the rest dense): all 20 BatchNorms fold,
    the outputs match the unfolded model's, every config layer is still found by its name, and the model itself is
    left as it was."""
    model, images = resnet
    space = SearchSpace.load(default_space_path("resnet"))
    slots = {
        name: slot for name, slot in space.layers(model, record_input_shapes(model, images)).items() if "layer1" in name
    }
    fraction = 0.25 if get_technique(technique).rank_names else None
    config = uniform_config(slots, technique, fraction, rank_multiple=space.rank_multiple)
    compressed = apply_config(model, config, calib_inputs=images).eval()
    folded = fold_batchnorm(compressed)
    assert (folded.folded, folded.left) == (20, 0)
    with torch.no_grad():
        torch.testing.assert_close(folded.model(images), compressed(images), atol=1e-5, rtol=1e-4)
    for name in config.layers:
        folded.model.get_submodule(name)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in compressed.modules()) == 20


def test_int8_layers_quantize_after_folding(resnet) -> None:
    """Folded first, then quantized by name (as the evaluator builds an int8 config's deployed form): close to the
    unfolded model quantized alike, within int8's error."""
    model, images = resnet
    names = ["layer1.0.conv1", "layer2.0.conv2"]
    config = CompressionConfig(layers={name: LayerChoice("svd", 0.5) for name in names})
    compressed = apply_config(model, config, calib_inputs=images).eval()
    folded = fold_batchnorm(compressed).model
    quantize_layers(folded, names, images)
    quantize_layers(compressed, names, images)
    with torch.no_grad():
        reference = compressed(images)
        assert (folded(images) - reference).abs().max() < 0.05 * reference.abs().max()


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            x = -x
        return self.bn(self.conv(x))


class Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(self.bn(self.conv(x))))


@pytest.mark.parametrize("model", [Untraceable(), Shared()], ids=["untraceable", "shared"])
def test_what_cannot_be_folded_is_timed_as_it_is(model: nn.Module) -> None:
    """An untraceable model, or a BatchNorm called twice: nothing folds, a copy comes back and computes the same."""
    model.eval()
    folded = fold_batchnorm(model)
    assert (folded.folded, folded.left) == (0, 1) and folded.model is not model
    images = torch.randn(2, 1 if isinstance(model, Untraceable) else 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(folded.model(images), model(images))


def test_the_evaluator_times_the_deployed_form() -> None:
    """Folded or not, a config's accuracy is the same (scoring uses the fine-tuned model; an int8 config is timed
    folded then quantized, but scored quantized unfolded, as apply saves it), the folded BatchNorms are counted, and
    the trained model keeps its BatchNorms."""
    evaluators = {
        fold: trained_tiny_evaluator(
            EvaluatorOptions(finetune_steps=3, batch_size=64, calib_batches=1, fold_batchnorm=fold)
        )
        for fold in (False, True)
    }
    config = CompressionConfig(layers={"conv2": LayerChoice("svd", 0.25)})
    unfolded, folded = (evaluators[fold].evaluate(config) for fold in (False, True))
    assert folded.correct == unfolded.correct and folded.latency_ms > 0
    assert folded.extra["batchnorm_folded"] == 4.0 and "batchnorm_folded" not in unfolded.extra
    int8 = CompressionConfig(layers={"conv2": LayerChoice("svd", 0.25, int8=True)})
    scored = evaluators[True].evaluate(int8)
    assert scored.correct == evaluators[False].evaluate(int8).correct  # scored unfolded either way, as saved
    model = evaluators[True].model
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 4


class Guarded(nn.Module):
    """The trained tiny CNN behind a data-dependent branch: torch.fx cannot trace it."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) if x.abs().sum() >= 0 else -self.net(x)


def test_an_untraceable_model_is_timed_unfolded_beside_an_unfolded_dense_model() -> None:
    """When the uncompressed model cannot be folded, no config is: both are timed as trained (no folded count), so
    the speedup compares one form."""
    options = EvaluatorOptions(finetune_steps=2, batch_size=64, calib_batches=1)
    evaluator = trained_tiny_evaluator(options, wrap=Guarded)
    metrics = evaluator.evaluate(CompressionConfig(layers={"net.conv2": LayerChoice("svd", 0.25)}))
    assert metrics.extra["batchnorm_folded"] == 0.0 and metrics.latency_ms > 0


def test_a_study_from_before_folding_resumes_unfolded(tmp_path: Path) -> None:
    """A study whose identity predates the option measured unfolded models: its recorded settings read back so, a
    default run on it is refused with the option that resumes it, and that option resumes it."""
    old = RunSettings.of(fold_batchnorm=False, results_dir=tmp_path)
    identity = old.identity()
    del identity["fold_batchnorm"]
    directory = tmp_path / old.name()
    directory.mkdir()
    study = open_study(old, directory)
    study.set_user_attr("identity", identity)
    assert RunSettings.recorded_identity(identity)["fold_batchnorm"] is False
    flat = old.to_flat()
    del flat["fold_batchnorm"]
    assert RunSettings.from_flat(flat).evaluation.fold_batchnorm is False
    with pytest.raises(RanksearchError, match=r"fold_batchnorm=False, not True; rerun with the same settings \(--no-"):
        check_existing_study(RunSettings.of(results_dir=tmp_path), directory)
    check_existing_study(old, directory)
