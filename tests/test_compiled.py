"""torch.compile as a latency target: compiled models compute what eager ones do, graph breaks are counted, pairs are
timed in rounds, the latency table times compiled variants, and int8 is left out of the search."""

from __future__ import annotations

import os
import signal
from dataclasses import replace

import pytest
import torch
from conftest import convnet, trained_tiny_evaluator
from rich.console import Console
from torch import nn

from ranksearch.config import CompressionConfig, LayerChoice
from ranksearch.errors import RanksearchError
from ranksearch.evaluate import EvaluatorOptions
from ranksearch.measure.compile_worker import CompilingProcess
from ranksearch.measure.compiled import compile_fastest, compiled_speedup
from ranksearch.measure.timers import CompiledTimer
from ranksearch.search import SearchSpace
from ranksearch.search.latency_table import LatencyTable, variant_key, variants
from ranksearch.search.space import record_input_shapes
from ranksearch.study.problem import load_space


class Branching(nn.Module):
    """A forward pass that branches on a tensor's value: dynamo breaks the graph there."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y * 2 if y.sum().item() > 0 else y - 1


def test_compiled_models_compute_what_eager_ones_do() -> None:
    """Each model runs its own compiled graph, in the mode chosen for it, even beside a model of the same structure."""
    twin = convnet(8)
    with torch.no_grad():
        for parameter in twin.parameters():
            parameter.mul_(-1.5)
    models, example = [convnet(8), twin], torch.randn(2, 3, 12, 12)
    compiled = compile_fastest(models, example, threads=1)
    assert compiled.graph_breaks == 0
    with torch.inference_mode():
        for model, module in zip(models, compiled.modules):
            assert module.model is model and isinstance(module.frozen, bool)
            torch.testing.assert_close(module(example), model(example), rtol=1e-4, atol=1e-4)


def test_graph_breaks_are_counted() -> None:
    model, example = Branching().eval(), torch.randn(1, 3, 8, 8)
    compiled = compile_fastest([model], example, threads=1)
    assert compiled.graph_breaks >= 1
    with torch.inference_mode():
        torch.testing.assert_close(compiled.modules[0](example), model(example))


def test_compiled_pair_is_timed_in_rounds() -> None:
    """A 64-channel net against an 8-channel one (64x fewer MACs in the middle conv): measurably faster compiled."""
    example = torch.randn(1, 3, 32, 32)
    paired, compiled = compiled_speedup(convnet(64), convnet(8), example, threads=1, rounds=4, target_seconds=0.4)
    assert compiled.graph_breaks == 0 and len(compiled.modules) == 2 and len(paired.ratios) == 4
    assert paired.candidate.backend == paired.reference.backend == "compile"
    assert paired.speedup > 1 and paired.speedup_low <= paired.speedup <= paired.speedup_high


def test_latency_table_times_compiled_variants() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.Conv2d(32, 32, 3, padding=1), nn.Flatten()).eval()
    example = torch.randn(1, 3, 8, 8)
    shapes = record_input_shapes(model, example)
    space = SearchSpace.from_dict(
        {"layers": {"include": ["1"]}, "techniques": {"spatial_conv": ["keep", "tucker2"]}, "ranks": [0.25, 0.5]}
    )
    slots = space.layers(model, shapes)
    process = CompilingProcess(layers_per_process=3)
    timer = CompiledTimer(threads=1, process=process)
    layer_input, pids = torch.randn(1, 32, 8, 8), []
    try:
        for _ in range(4):  # a fresh child replaces the first one after 3 layers
            assert timer.median_ms(model[1], layer_input) > 0
            pids.append(process.pid)
        assert pids[0] == pids[1] == pids[2] != pids[3]
        table = LatencyTable.build(model, slots, shapes, example, timer=timer, rank_multiple=8)
        assert set(table.layer_ms["1"]) == {variant_key(v) for v in variants(slots["1"])}
        assert all(ms > 0 for ms in table.layer_ms["1"].values())
        assert timer.slug().startswith("compile-inductor-") and "-threads1-torch" in timer.slug()
        dense = table.predict(CompressionConfig(layers={}))
        assert 0.3 < dense / timer.median_ms(model, example) < 3  # calibrated on the compiled dense model
        assert not process.in_process and process.pid not in pids  # the table's variants were timed in children
    finally:
        process.close()


def test_int8_is_not_searched_with_torch_compile(tmp_path) -> None:
    path = tmp_path / "space.yaml"
    path.write_text("techniques:\n  spatial_conv: [keep, svd]\nranks: [0.5]\nint8: true\n")
    console = Console(record=True, width=200)
    cpu = torch.device("cpu")
    assert load_space(path, cpu, console).int8
    space = load_space(path, cpu, console, backend="compile")
    assert space == replace(SearchSpace.load(path), int8=False)
    assert "int8: torch.ao's quantized layers do not compile (graph breaks)" in console.export_text()


def test_the_evaluator_times_trials_compiled() -> None:
    """A config and the dense model, both folded, compile without a graph break and are timed in rounds; what a trial
    scores does not depend on the latency target."""
    options = EvaluatorOptions(finetune_steps=2, batch_size=64, calib_batches=1, latency_backend="compile")
    evaluator = trained_tiny_evaluator(options)
    assert evaluator.layer_timer().slug().startswith("compile-inductor-")
    config = CompressionConfig(layers={"conv2": LayerChoice("svd", 0.25)})
    metrics = evaluator.evaluate(config)
    assert metrics.extra["compile_graph_breaks"] == 0 and metrics.extra["batchnorm_folded"] == 4.0
    assert {metrics.extra["compile_frozen"], metrics.extra["compile_frozen_reference"]} <= {0.0, 1.0}
    assert metrics.latency_ms > 0 and metrics.extra["latency_rounds"] == 4
    eager = trained_tiny_evaluator(replace(options, latency_backend="torch")).evaluate(config)
    assert eager.correct == metrics.correct


def test_pairs_are_compiled_in_child_processes_replaced_every_few_pairs() -> None:
    """Compiled graphs keep memory that resetting dynamo does not give back: a child compiles and times the pairs,
    and a fresh one replaces it after ``pairs_per_process``; a killed child fails its pair only."""
    process = CompilingProcess(pairs_per_process=2)
    example, pids = torch.randn(1, 3, 16, 16), []
    try:
        for _ in range(3):
            paired, extra = process.time_pair(convnet(32), convnet(8), example, threads=1, rounds=2, target_seconds=0.1)
            assert paired.speedup > 0 and extra["compile_graph_breaks"] == 0
            pids.append(process.pid)
        assert pids[0] == pids[1] != pids[2] and not process.in_process
        os.kill(pids[2], signal.SIGKILL)
        with pytest.raises(RanksearchError, match=r"torch\.compile's process died"):
            process.time_pair(convnet(32), convnet(8), example, threads=1, rounds=1, target_seconds=0.1)
        process.time_pair(convnet(32), convnet(8), example, threads=1, rounds=1, target_seconds=0.1)
        assert process.pid not in pids
    finally:
        process.close()


def test_a_model_the_child_cannot_import_is_timed_here() -> None:
    """A class defined where the child cannot import it (here: this test module) is compiled in this process."""
    process = CompilingProcess()
    try:
        paired, extra = process.time_pair(
            convnet(8), Branching().eval(), torch.randn(1, 3, 8, 8), threads=1, rounds=1, target_seconds=0.1
        )
        assert process.in_process and extra["compile_graph_breaks"] >= 1 and paired.speedup > 0
        assert process.time_layer(Branching().eval(), torch.randn(1, 3, 8, 8), threads=1) > 0
        assert process.pid is None  # no child started again
    finally:
        process.close()
