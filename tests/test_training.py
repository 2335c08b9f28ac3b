"""Baseline training cache, accuracy, BatchNorm recalibration, distillation and the CPU conv-gradient path."""

from __future__ import annotations

import contextlib
import copy
import os
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ranksearch.data import DataSplits, load_dataset, make_loader
from ranksearch.training import (
    DEFAULT_RECIPE,
    CpuConvGrads,
    DivergedError,
    Recipe,
    TeacherCache,
    distillation_loss,
    evaluate_accuracy,
    feature_loss,
    finetune,
    recalibrate_batchnorm,
    stage_names,
    train_baseline,
)
from ranksearch.util import memory_limit_bytes

TINY_RECIPE = Recipe(epochs=2, batch_size=32, lr=0.1)


@pytest.fixture(scope="module")
def splits(tmp_path_factory: pytest.TempPathFactory) -> DataSplits:
    return load_dataset("fashion_mnist", root=tmp_path_factory.mktemp("data"), train_subset=512, eval_subset=256)


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, stride=2, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 7 * 7, 10),
    )


def test_recipe_key_is_stable_and_covers_every_field() -> None:
    assert Recipe().key() == DEFAULT_RECIPE.key() == Recipe(**vars(DEFAULT_RECIPE)).key()
    assert len({DEFAULT_RECIPE.key(), Recipe(epochs=1).key(), Recipe(label_smoothing=0).key()}) == 3


def test_baseline_is_cached_and_reused(splits: DataSplits, tmp_path: Path) -> None:
    parts = {"model": "small_cnn", "dataset": "fashion_mnist"}
    model, meta = train_baseline(
        small_cnn(), splits, TINY_RECIPE, device="cpu", cache_dir=tmp_path, key_parts=parts, progress=False
    )
    assert not meta["cached"] and not model.training
    assert 0.4 < meta["val_accuracy"] <= 1 and 0.4 < meta["test_accuracy"] <= 1
    assert meta["recipe"]["epochs"] == 2 and meta["train_time_s"] > 0
    assert all(p.is_contiguous() for p in model.parameters())
    assert len(list(tmp_path.glob("baseline-*.pt"))) == 1

    again, meta2 = train_baseline(
        small_cnn(), splits, TINY_RECIPE, device="cpu", cache_dir=tmp_path, key_parts=parts, progress=False
    )
    assert meta2["cached"] and meta2["test_accuracy"] == meta["test_accuracy"]
    for key, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], value)

    other = replace(TINY_RECIPE, epochs=1)
    _, meta3 = train_baseline(
        small_cnn(), splits, other, device="cpu", cache_dir=tmp_path, key_parts=parts, progress=False
    )
    assert not meta3["cached"] and len(list(tmp_path.glob("baseline-*.pt"))) == 2
    assert not list(tmp_path.glob(".*.tmp"))


def test_corrupt_cache_entry_is_retrained(splits: DataSplits, tmp_path: Path) -> None:
    parts = {"model": "small_cnn"}
    train_baseline(small_cnn(), splits, TINY_RECIPE, device="cpu", cache_dir=tmp_path, key_parts=parts, progress=False)
    (entry,) = tmp_path.glob("baseline-*.pt")
    entry.write_bytes(entry.read_bytes()[:100])
    _, meta = train_baseline(
        small_cnn(), splits, TINY_RECIPE, device="cpu", cache_dir=tmp_path, key_parts=parts, progress=False
    )
    assert not meta["cached"]
    _, meta = train_baseline(
        small_cnn(), splits, TINY_RECIPE, device="cpu", cache_dir=tmp_path, key_parts=parts, progress=False
    )
    assert meta["cached"]


def test_evaluate_accuracy_restores_mode(splits: DataSplits) -> None:
    model = small_cnn().train()
    loader = make_loader(splits.val, batch_size=64, shuffle=False)
    accuracy = evaluate_accuracy(model, loader, device="cpu", max_batches=2)
    assert 0.0 <= accuracy <= 1.0 and model.training
    perfect = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    images, labels = next(iter(loader))
    with torch.no_grad():
        perfect[1].weight.zero_()
        perfect[1].bias.copy_(F.one_hot(labels[0], 10).float())
    assert evaluate_accuracy(perfect, [(images[:1], labels[:1])], device="cpu") == 1.0


def test_recalibrate_batchnorm_resets_stats_and_restores_modes(splits: DataSplits) -> None:
    model = small_cnn().eval()
    norm = model[1]
    norm.momentum = 0.3
    before = norm.running_mean.clone()
    loader = make_loader(splits.val, batch_size=64, shuffle=False)
    recalibrate_batchnorm(model, loader, device="cpu", batches=3)
    assert not torch.allclose(norm.running_mean, before)
    assert norm.momentum == 0.3 and not model.training and not norm.training
    assert norm.num_batches_tracked.item() == 3
    images = torch.cat([images for images, _ in list(loader)[:3]])
    expected = F.conv2d(images, model[0].weight, model[0].bias, 2, 1).mean((0, 2, 3))
    torch.testing.assert_close(norm.running_mean, expected, rtol=1e-4, atol=1e-4)


def test_finetune_reduces_distillation_loss(splits: DataSplits) -> None:
    teacher = small_cnn()
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for param in student.parameters():
            param.add_(torch.randn_like(param) * 0.5)
    images, labels = next(iter(make_loader(splits.val, batch_size=256, shuffle=False)))

    def kd() -> float:
        with torch.no_grad():
            return distillation_loss(student.eval()(images), teacher.eval()(images), labels).item()

    before = kd()
    loader = make_loader(splits.train, batch_size=64, shuffle=True, seed=0)
    result = finetune(student, teacher, loader, device="cpu", steps=40, lr=0.05)
    assert result["steps"] == 40 and result["loss"] < before
    assert kd() < 0.5 * before
    assert not teacher.training


def test_stage_names_are_the_top_level_blocks() -> None:
    from torchvision.models import mobilenet_v2, resnet18, vgg11

    assert stage_names(resnet18(num_classes=10)) == ("layer1", "layer2", "layer3", "layer4")
    assert stage_names(mobilenet_v2(num_classes=10)) == ("features",)  # not the classifier: the output
    assert stage_names(vgg11(num_classes=10)) == ("features",)
    assert stage_names(small_cnn()) == ()  # a plain stack of layers has no block to match


def test_feature_loss_is_zero_on_the_teacher_and_blind_to_scale() -> None:
    torch.manual_seed(0)
    teacher = {"a": torch.randn(4, 8, 5, 5), "b": torch.randn(4, 16)}
    student = {name: t + 0.1 * torch.randn_like(t) for name, t in teacher.items()}
    assert feature_loss(teacher, teacher).item() == 0.0
    loss = feature_loss(student, teacher)
    assert loss.item() == pytest.approx(0.02, rel=0.2)  # 0.01 per stage: noise of 0.1 on outputs of unit scale
    scaled = feature_loss({"a": 100 * student["a"], "b": student["b"]}, {"a": 100 * teacher["a"], "b": teacher["b"]})
    assert scaled.item() == pytest.approx(loss.item(), rel=1e-4)  # every stage weighs alike, whatever its scale
    only_a = feature_loss(student, {"a": teacher["a"]}).item()  # the stages are the teacher's found in both
    assert feature_loss({"a": student["a"]}, teacher).item() == pytest.approx(only_a)


def test_matching_features_brings_the_stage_outputs_closer_and_leaves_no_hook(splits: DataSplits) -> None:
    teacher = small_cnn()
    images, _ = next(iter(make_loader(splits.val, batch_size=256, shuffle=False)))
    loader = make_loader(splits.train, batch_size=64, shuffle=True, seed=0)

    def stage_gap(weight: float) -> float:
        student = copy.deepcopy(teacher)
        torch.manual_seed(1)
        with torch.no_grad():
            for param in student.parameters():
                param.add_(torch.randn_like(param) * 0.5)
        finetune(student, teacher, loader, device="cpu", steps=40, lr=0.02, stages=["2", "5"], feature_weight=weight)
        assert not any(module._forward_hooks for net in (student, teacher) for module in net.modules())
        with torch.no_grad():
            outputs = {name: student.eval()[: int(name) + 1](images) for name in ("2", "5")}
            targets = {name: teacher.eval()[: int(name) + 1](images) for name in ("2", "5")}
        return feature_loss(outputs, targets).item()

    assert stage_gap(10.0) < 0.7 * stage_gap(0.0)


def teacher_and_student_after(splits: DataSplits) -> tuple[nn.Module, list[int], Callable[..., list[torch.Tensor]]]:
    """A teacher that counts its forward passes, and a function giving the parameters of a perturbed copy of it
    after 12 fine-tuning steps (its keywords go to :func:`finetune`)."""
    teacher = small_cnn()
    calls: list[int] = []
    teacher.register_forward_hook(lambda module, args, output: calls.append(len(output)) if module is teacher else None)

    def student_after(**options: object) -> list[torch.Tensor]:
        student = copy.deepcopy(teacher)
        torch.manual_seed(1)
        with torch.no_grad():
            for param in student.parameters():
                param.add_(torch.randn_like(param) * 0.1)
        loader = make_loader(splits.train, batch_size=64, shuffle=True, seed=0)
        finetune(student, teacher, loader, device="cpu", steps=12, lr=0.05, **options)
        return [p.detach().clone() for p in student.parameters()]

    return teacher, calls, student_after


@pytest.mark.parametrize("features", [{}, {"stages": ["2", "5"], "feature_weight": 10.0}], ids=["logits", "features"])
def test_teacher_cache_gives_the_same_student_with_one_teacher_pass_per_batch(
    splits: DataSplits, features: dict[str, object]
) -> None:
    _, calls, student_after = teacher_and_student_after(splits)
    plain = student_after(**features)
    assert len(calls) == 12
    cache = TeacherCache()
    first, second = student_after(teacher_cache=cache, **features), student_after(teacher_cache=cache, **features)
    assert len(calls) == 12 + 12  # the first cached fine-tune fills the cache, the second runs no teacher pass
    assert len(cache) == 12
    for a, b, c in zip(plain, first, second, strict=True):
        assert torch.equal(a, b) and torch.equal(b, c)


def test_teacher_cache_keeps_logits_and_features_apart_and_stops_at_its_size(splits: DataSplits) -> None:
    _, calls, student_after = teacher_and_student_after(splits)
    cache = TeacherCache()
    student_after(teacher_cache=cache)
    logits_bytes = cache.bytes
    matched = student_after(teacher_cache=cache, stages=["2", "5"], feature_weight=10.0)
    assert len(calls) == 24 and len(cache) == 24  # logits alone do not serve a fine-tune that matches features
    assert all(torch.equal(a, b) for a, b in zip(matched, student_after(stages=["2", "5"], feature_weight=10.0)))
    calls.clear()
    batch = (cache.bytes - logits_bytes) // 12
    small = TeacherCache(max_bytes=5 * batch)
    student_after(teacher_cache=small, stages=["2", "5"], feature_weight=10.0)
    student_after(teacher_cache=small, stages=["2", "5"], feature_weight=10.0)
    assert len(small) == 5 and small.bytes <= small.max_bytes
    assert len(calls) == 12 + 7  # the second fine-tune runs the teacher on the 7 batches that did not fit


def test_teacher_cache_holds_the_stage_outputs_in_bf16_and_the_logits_in_float32(splits: DataSplits) -> None:
    _, _, student_after = teacher_and_student_after(splits)
    kept: list[tuple[torch.dtype, dict[str, torch.dtype]]] = []

    class NotingCache(TeacherCache):
        def put(
            self, images: bytes, stages: tuple[str, ...], logits: torch.Tensor, features: Mapping[str, torch.Tensor]
        ) -> None:
            kept.append((logits.dtype, {name: tensor.dtype for name, tensor in features.items()}))
            super().put(images, stages, logits, features)

    cache = NotingCache()
    student_after(teacher_cache=cache, stages=["2", "5"], feature_weight=10.0)
    assert len(kept) == 12
    assert all(
        logits == torch.float32 and features == {"2": torch.bfloat16, "5": torch.bfloat16} for logits, features in kept
    )


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"memory.max": "2147483648\n", "memory.limit_in_bytes": "1024\n"}, 2 << 30),  # v2 before v1
        ({"memory.max": "max\n", "memory.limit_in_bytes": "1024\n"}, None),  # v2 unlimited: v1 is not read
        ({"memory.limit_in_bytes": "3221225472\n"}, 3 << 30),  # v1 only
        ({"memory.limit_in_bytes": "9223372036854771712\n"}, None),  # v1's "unlimited" is above the machine's
        ({}, None),  # no control group
    ],
)
def test_memory_limit_reads_the_control_group_and_the_machine(
    tmp_path: Path, files: dict[str, str], expected: int | None
) -> None:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    machine = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    paths = (tmp_path / "memory.max", tmp_path / "memory.limit_in_bytes")
    assert memory_limit_bytes(cgroup_files=paths) == min(machine, expected or machine)
    assert TeacherCache().max_bytes == min(memory_limit_bytes() // 4, 4 << 30)


def test_finetune_divergence_raises(splits: DataSplits) -> None:
    loader = make_loader(splits.train, batch_size=64, shuffle=True, seed=0)
    with pytest.raises(DivergedError, match=r"exploded past .*; lower the learning rate"):
        finetune(small_cnn(), small_cnn(), loader, device="cpu", steps=50, lr=1e6)
    student = small_cnn()
    with torch.no_grad():
        student[-1].weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="step 1: loss is nan"):
        finetune(student, small_cnn(), loader, device="cpu", steps=5, lr=0.01)


@pytest.mark.parametrize(
    ("channels", "out", "size", "kernel", "stride", "padding", "routed"),
    [
        (512, 64, 1, 3, 1, 1, True),
        (16, 8, 1, 3, 2, 1, True),
        (32, 64, 2, 3, 2, 1, True),
        (1, 16, 28, 7, 2, 3, True),
        (8, 4, 2, 1, 1, 0, True),
        (8, 4, 1, 1, 2, 0, True),
        (8, 4, 7, 3, 1, 1, False),
    ],
)
def test_cpu_conv_grads_match_autograd(
    channels: int, out: int, size: int, kernel: int, stride: int, padding: int, routed: bool
) -> None:
    torch.manual_seed(0)
    x = torch.randn(4, channels, size, size, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    w = torch.randn(out, channels, kernel, kernel, dtype=torch.float64)
    b = torch.randn(out, dtype=torch.float64)
    grads = []
    for mode in (None, CpuConvGrads()):
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        if mode is None:
            y = F.conv2d(*leaves, stride, padding)
        else:
            with mode:
                y = F.conv2d(*leaves, stride=stride, padding=padding)
            assert (type(y.grad_fn).__name__ == "_MatmulWeightGradConv2dBackward") == routed
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
        grads.append([y, *(t.grad for t in leaves)])
    for expected, actual in zip(*grads):
        torch.testing.assert_close(actual, expected)


def test_cpu_conv_grads_allow_an_in_place_activation_after_a_1x1_map() -> None:
    """A squeeze-excitation conv on a pooled 1x1 map followed by ReLU(inplace=True), as timm builds them: the routed
    conv's output may be modified in place, and the gradients match autograd's."""
    torch.manual_seed(0)
    x, w = torch.randn(4, 16, 1, 1, dtype=torch.float64), torch.randn(8, 16, 1, 1, dtype=torch.float64)
    grads = []
    for mode in (None, CpuConvGrads()):
        leaves = [t.clone().requires_grad_() for t in (x, w)]
        with mode or contextlib.nullcontext():
            y = torch.relu_(F.conv2d(*leaves))
        y.sum().backward()
        grads.append([y, *(t.grad for t in leaves)])
    for expected, actual in zip(*grads):
        torch.testing.assert_close(actual, expected)


@pytest.mark.parametrize(
    ("channels", "out", "size", "stride", "groups"),
    [(8, 16, 56, 2, 1), (8, 16, 57, 2, 1), (8, 16, 12, (2, 1), 1), (8, 16, 12, 3, 4)],
)
def test_cpu_conv_grads_run_strided_pointwise_convs_on_the_subsampled_input(
    channels: int, out: int, size: int, stride: int | tuple[int, int], groups: int
) -> None:
    """A strided 1x1 conv becomes the stride-1 conv of the pixels it visits: the same outputs and gradients."""
    torch.manual_seed(0)
    x = torch.randn(2, channels, size, size, dtype=torch.float64)
    w = torch.randn(out, channels // groups, 1, 1, dtype=torch.float64)
    b = torch.randn(out, dtype=torch.float64)
    grads = []
    for mode in (None, CpuConvGrads()):
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        with mode or contextlib.nullcontext():
            y = F.conv2d(*leaves, stride=stride, groups=groups)
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
        grads.append([y, *(t.grad for t in leaves)])
    for expected, actual in zip(*grads):
        torch.testing.assert_close(actual, expected)


def test_training_a_strided_pointwise_conv_in_channels_last_survives() -> None:
    """torch 2.14's CPU backward of a strided 1x1 conv with 8 input channels on a 56x56 map in channels-last memory
    writes out of bounds (a segmentation fault here; what Tucker-2 at rank 0.125 makes of ResNet-18's first
    downsample layer at 224 px). Under the training context it trains; run in a child process, so that a
    regression kills the child, not the test session."""
    code = """
import torch
from torch import nn
from ranksearch.training.loop import fast_training
torch.manual_seed(0)
conv = nn.Conv2d(8, 16, 1, stride=2, bias=False)
x = torch.randn(16, 8, 56, 56, requires_grad=True)
with fast_training(conv, torch.device("cpu")):
    for _ in range(3):
        conv(x).sum().backward()
print("trained", tuple(conv.weight.grad.shape))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "trained (16, 8, 1, 1)" in done.stdout
