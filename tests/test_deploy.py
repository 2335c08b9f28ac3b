"""Deployable models: single-file ONNX export checked in real ONNX Runtime, its latency, `ranksearch apply`, and
a search timed in ONNX Runtime."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import conftest
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import space_yaml
from optuna.trial import TrialState
from rich.console import Console
from typer.testing import CliRunner

import ranksearch as rs
from ranksearch.cli import app
from ranksearch.measure.onnx import (
    FLOAT_TOLERANCE,
    INT8_GAP_FACTOR,
    INT8_TOLERANCE,
    export_onnx,
    int8_export_checked,
    onnxruntime_latency,
)
from ranksearch.measure.timing import Latency, PairedLatency
from ranksearch.models import build_model
from ranksearch.results.apply import (
    APPLY_ROUNDS,
    ApplyResult,
    BackendTiming,
    apply_to_checkpoint,
    print_apply,
    searched_timing,
)
from ranksearch.study import RunSettings, run_search
from ranksearch.techniques.int8 import int8_available

SPEC = {"name": "resnet18", "num_classes": 10, "in_channels": 1, "image_size": 28}
LAYERS = ("layer1.0.conv1", "layer2.0.conv2")
FAST_TIMING = {"warmup": 2, "min_runs": 5, "max_runs": 20, "target_seconds": 0.05, "max_attempts": 1}
needs_int8 = pytest.mark.skipif(not int8_available(), reason="no x86 (fbgemm) quantized engine")
SPACE = space_yaml(
    techniques={"spatial_conv": ["keep", "svd", "tucker2"], "pointwise_conv": ["keep", "svd"]}, data_aware=False
)
runner = CliRunner()


@pytest.fixture(scope="module", autouse=True)
def isolated_cache(tmp_path_factory) -> Iterator[None]:
    """Nothing in the user's cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RANKSEARCH_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def factor_store() -> rs.FactorStore:
    """conftest's fresh in-memory store, shared by this module's tests: they compress the same model's layers."""
    store = rs.FactorStore()
    rs.set_default_store(store)
    return store


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("resnet18", num_classes=10, in_channels=1, image_size=28).eval()


def images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def compressed(model: torch.nn.Module, technique: str, *, int8: bool) -> torch.nn.Module:
    rank = {} if technique == "keep" else {"rank": 0.25}
    layers = {name: {"technique": technique, **rank, "int8": int8} for name in LAYERS}
    if int8:  # an int8 classifier too: its output is the model's, rounded as int8 (the loosest case)
        layers["fc"] = {"technique": "keep", "int8": True}
    config = {"layers": layers}
    return rs.apply_config(model, config, calib_inputs=images(16, seed=1)).eval()


def ort_output(path: Path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x.numpy()})[0]


@pytest.mark.parametrize("int8", [False, pytest.param(True, marks=needs_int8)], ids=["float", "int8"])
@pytest.mark.parametrize("technique", rs.list_techniques())
def test_export_is_one_file_matching_torch(model, technique: str, int8: bool, tmp_path: Path) -> None:
    net = compressed(model, technique, int8=int8)
    path = tmp_path / "model.onnx"
    exported = export_onnx(net, images(1, seed=2), path)
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]  # weights inside: no .onnx.data sidecar
    assert exported.size_bytes == path.stat().st_size > 1_000_000
    assert 0 <= exported.max_abs_error <= exported.tolerance
    x = images(3, seed=3)  # another batch size: the batch axis is dynamic
    with torch.no_grad():
        expected = net(x).numpy()
    error = np.abs(ort_output(path, x) - expected).max()
    assert error <= (INT8_TOLERANCE if int8 else FLOAT_TOLERANCE) * max(1.0, np.abs(expected).max())
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert ({"QuantizeLinear", "DequantizeLinear"} <= ops) == int8  # int8 layers stay int8 in ONNX Runtime


def test_export_over_tolerance_raises_and_writes_nothing(model, tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    with pytest.raises(rs.RanksearchError, match=r"differs from torch's by .* over the tolerance"):
        export_onnx(compressed(model, "svd", int8=False), images(1, seed=2), path, tolerance=1e-12)
    assert not list(tmp_path.iterdir())


class TorchOnly(torch.nn.Module):
    """``net``, whose output in torch (not in its ONNX export) is replaced by ``torch_output(x, output)``: torch and
    ONNX Runtime made to differ by a known amount."""

    def __init__(
        self, net: torch.nn.Module, torch_output: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    ) -> None:
        super().__init__()
        self.net, self.torch_output = net, torch_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.net(x)
        return y if torch.onnx.is_in_onnx_export() else self.torch_output(x, y)


@needs_int8
def test_int8_export_is_checked_against_the_float_model(model, tmp_path: Path) -> None:
    """Given its float model, an int8 export that differs from torch beyond the tolerance passes while ONNX Runtime
    stays within 2x torch's distance from the float model's output, and is refused farther from it."""
    x = images(1, seed=2)
    float_net = compressed(model, "svd", int8=False)
    int8_net = compressed(model, "svd", int8=True)
    with torch.no_grad():
        exact, rounded = float_net(x), int8_net(x)
    gap = (rounded - exact).abs().max().item()
    assert gap > 0
    # torch's output moved away from the float model by half its int8 error: ONNX Runtime (the int8 model) is closer
    farther = TorchOnly(int8_net, lambda _x, y: y + 0.5 * gap)
    path = tmp_path / "model.onnx"
    with pytest.raises(rs.RanksearchError, match=r"differs from torch's by .* over the tolerance"):
        export_onnx(farther, x, path, tolerance=0.0)
    exported = export_onnx(farther, x, path, tolerance=0.0, float_model=float_net)
    assert path.exists() and exported.max_abs_error == pytest.approx(0.5 * gap, rel=1e-3) and exported.against_float
    assert not export_onnx(int8_net, x, tmp_path / "plain.onnx", float_model=float_net).against_float
    assert exported.tolerance >= INT8_GAP_FACTOR * 0.5 * gap  # torch 0.5-1.5 x gap from the float model
    # torch's output is the float model's itself: ONNX Runtime's int8 rounding is then more than 2x torch's (zero)
    exact_in_torch = TorchOnly(int8_net, lambda x_, _y: float_net(x_))
    with pytest.raises(rs.RanksearchError, match=r"from the float model's .* over 2x torch's int8 output's"):
        export_onnx(exact_in_torch, x, tmp_path / "refused.onnx", tolerance=0.0, float_model=float_net)
    assert not (tmp_path / "refused.onnx").exists()
    assert int8_export_checked(path, exact + 1.5 * (rounded - exact), rounded, exact) > 0


def test_onnxruntime_latency_stats(model, tmp_path: Path) -> None:
    path = export_onnx(model, images(1, seed=2), tmp_path / "dense.onnx").path
    latency = onnxruntime_latency(path, images(1, seed=2), threads=1, **FAST_TIMING)
    assert latency.backend == "onnxruntime" and latency.threads == 1 and latency.device == "cpu"
    assert 0 < latency.p10_ms <= latency.median_ms <= latency.p90_ms
    assert latency.spread >= 0 and 5 <= latency.runs <= 20 and latency.to_dict()["spread"] == latency.spread
    torch_latency = rs.measure_latency(model, images(1, seed=2), threads=1, **FAST_TIMING)
    assert torch_latency.backend == "torch" and torch_latency.median_ms > 0


@pytest.fixture(scope="module")
def apply_files(model, tmp_path_factory) -> Path:
    """A trained-weights checkpoint and an exported-style config with a float and an int8 layer."""
    root = tmp_path_factory.mktemp("apply")
    torch.save(model.state_dict(), root / "weights.pt")
    layers = {"layer1.0.conv1": {"technique": "svd", "rank": 0.5}}
    if int8_available():
        layers["layer2.0.conv2"] = {"technique": "tucker2", "rank": 0.5, "int8": True}
    config = {"model": SPEC, "layers": layers, "meta": {"settings": {"dataset": "fashion_mnist", "seed": 0}}}
    (root / "config.json").write_text(json.dumps(config))
    return root


def test_apply_cli_end_to_end(apply_files: Path, tmp_path: Path) -> None:
    out, onnx = tmp_path / "compressed.pt", tmp_path / "compressed.onnx"
    args = ["apply", "--config", str(apply_files / "config.json"), "--checkpoint", str(apply_files / "weights.pt")]
    args += ["--out", str(out), "--onnx", str(onnx), "--threads", "1", "--data-root", str(apply_files / "data")]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "ONNX Runtime" in result.stdout and "eager torch" in result.stdout and "compressed.onnx" in result.stdout
    assert "10 alternating rounds" in result.stdout and "ONNX Runtime: onnx_max_abs_error" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["compressed.onnx", "compressed.pt"]
    loaded = torch.load(out, weights_only=False)  # the documented one-line load-back
    x = images(2, seed=4)
    with torch.no_grad():
        got = loaded(x)
    rebuilt = build_model("resnet18", num_classes=10, in_channels=1, image_size=28)
    rebuilt.load_state_dict(torch.load(apply_files / "weights.pt"))
    assert not torch.equal(got, rebuilt.eval()(x))  # it is the compressed model, not the dense one
    assert isinstance(loaded.get_submodule("layer1.0.conv1"), rs.CompressedLayer)
    assert torch.equal(got, loaded(x))
    np.testing.assert_allclose(ort_output(onnx, x), got.detach().numpy(), atol=INT8_TOLERANCE * 2)


def test_apply_times_each_backend_in_paired_rounds(apply_files: Path, tmp_path: Path) -> None:
    """Each backend asked for times both deployed models in alternating rounds; a model a backend cannot run gets a
    row saying why, and the others are still timed."""
    config = json.loads((apply_files / "config.json").read_text())
    config["layers"] = {"layer1.0.conv1": {"technique": "svd", "rank": 0.5}}  # float: torch.compile takes it whole
    path = tmp_path / "float.json"
    path.write_text(json.dumps(config))
    console = Console(record=True, width=200)
    result = apply_to_checkpoint(
        path, apply_files / "weights.pt", tmp_path / "out.pt", backends=["torch", "compile"], threads=1, console=console
    )
    assert [t.backend for t in result.timings] == ["torch", "compile"] and result.folded
    for timing in result.timings:
        assert timing.failure is None and timing.paired is not None and len(timing.paired.ratios) == APPLY_ROUNDS
        assert timing.paired.reference.threads == 1 and timing.paired.speedup > 0
    assert result.timings[1].extra["compile_graph_breaks"] == 0
    assert result.params["compressed"] < result.params["uncompressed"]
    shown = console.export_text()
    assert "eager torch" in shown and "torch.compile: compile_graph_breaks 0," in shown


def test_apply_times_as_the_search_did_unless_told_otherwise(apply_files: Path, tmp_path: Path) -> None:
    """Threads, batch and backend left out are those the config's search timed its trials with (so its speedup
    compares with the config's), and the table says so; an option given wins and is not claimed as the search's."""
    config = json.loads((apply_files / "config.json").read_text())
    config["layers"] = {"layer1.0.conv1": {"technique": "svd", "rank": 0.5}}
    config["meta"]["settings"].update(threads=1, latency_batch=2, latency_backend="torch")
    path = tmp_path / "searched.json"
    path.write_text(json.dumps(config))
    console = Console(record=True, width=300)
    result = apply_to_checkpoint(path, apply_files / "weights.pt", tmp_path / "a.pt", console=console)
    assert result.batch == 2 and [t.backend for t in result.timings] == ["torch"]
    assert result.timings[0].paired is not None and result.timings[0].paired.reference.threads == 1
    assert result.from_search == ("backend torch", "threads 1", "batch 2")
    shown = " ".join(console.export_text().split())  # the caption wraps at the table's width
    assert "latency at batch 2, 1 thread(s)" in shown
    assert "timed as the search timed its trials (backend torch, threads 1, batch 2: the config's settings)" in shown
    told = apply_to_checkpoint(path, apply_files / "weights.pt", tmp_path / "b.pt", batch=1, console=console)
    assert told.batch == 1 and told.from_search == ("backend torch", "threads 1")
    assert searched_timing(rs.CompressionConfig.coerce(apply_files / "config.json")) == (None, None, None)


def test_apply_says_when_rounds_disagree_too_much_to_trust_the_speedup(tmp_path: Path) -> None:
    def latency(ms: float) -> Latency:
        return Latency(median_ms=ms, p10_ms=ms, p90_ms=ms, runs=10, attempts=1, device="cpu", threads=1)

    steady = PairedLatency(reference=latency(2.0), candidate=latency(1.0), ratios=(1.9, 2.0, 2.1))
    busy = PairedLatency(reference=latency(2.0), candidate=latency(1.0), ratios=(1.1, 2.0, 4.4))
    timings = [BackendTiming("torch", steady, {}), BackendTiming("onnxruntime", busy, {})]
    result = ApplyResult(tmp_path / "out.pt", None, 1, {"uncompressed": 10, "compressed": 5}, timings)
    console = Console(record=True, width=300)
    print_apply(result, console)
    shown = console.export_text()
    assert "ONNX Runtime: rounds disagree by more than 2x" in shown and "eager torch: rounds" not in shown


def bad_apply(tmp_path: Path, config: Path, checkpoint: Path, *options: str) -> tuple[int, str]:
    out = tmp_path / "out.pt"
    args = ["apply", "--config", str(config), "--checkpoint", str(checkpoint), "--out", str(out), *options]
    result = runner.invoke(app, args)
    assert not out.exists()
    return result.exit_code, result.stderr


def test_apply_unknown_latency_backend_is_one_line_exit_2(apply_files: Path, tmp_path: Path) -> None:
    code, stderr = bad_apply(
        tmp_path, apply_files / "config.json", apply_files / "weights.pt", "--latency-backend", "tvm"
    )
    lines = stderr.strip().splitlines()
    assert code == 2 and lines == ["error: --latency-backend 'tvm' is unknown; choose torch, onnxruntime or compile"]


def test_apply_config_with_a_bad_recorded_thread_count_is_one_line_exit_2(apply_files: Path, tmp_path: Path) -> None:
    config = json.loads((apply_files / "config.json").read_text())
    config["meta"]["settings"]["threads"] = "four"
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(config))
    code, stderr = bad_apply(tmp_path, path, apply_files / "weights.pt")
    lines = stderr.strip().splitlines()
    assert code == 2 and lines == [
        "error: the config's meta.settings.threads 'four' is not a positive whole number; fix it there (or remove it)"
    ], stderr


def test_apply_missing_config_is_one_line_exit_2(apply_files: Path, tmp_path: Path) -> None:
    code, stderr = bad_apply(tmp_path, tmp_path / "missing.yaml", apply_files / "weights.pt")
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "missing.yaml" in lines[0] and "cannot be read" in lines[0], stderr


def test_apply_checkpoint_of_another_architecture_is_one_line_exit_2(apply_files: Path, tmp_path: Path) -> None:
    other = tmp_path / "mobilenet.pt"
    torch.save(build_model("mobilenet_v2", num_classes=10, in_channels=1, image_size=28).state_dict(), other)
    code, stderr = bad_apply(tmp_path, apply_files / "config.json", other)
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "mobilenet.pt does not fit the model" in lines[0], stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--latency-backend", "tvm"], "--latency-backend 'tvm' is unknown; choose torch, onnxruntime or compile"),
        (
            ["--latency-backend", "onnxruntime", "--device", "cuda"],
            "use --latency-device cpu or --latency-backend torch",
        ),
    ],
)
def test_bad_latency_backend_is_one_line_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    results = tmp_path / "results"
    result = runner.invoke(app, ["run", "--results-dir", str(results), *args])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and message in lines[0], result.stderr
    assert not results.exists()


@pytest.fixture
def study_dir(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setenv("RANKSEARCH_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path


def tiny_settings(root: Path, checkpoint: Path, **changes: object) -> RunSettings:
    """The tiny search (``conftest.tiny_settings``) from given weights (no baseline training): 3 trials, this space."""
    values = {"checkpoint": checkpoint, "budget": 3, "finetune_steps": 2, "study_name": "ort", **changes}
    return conftest.tiny_settings(root, space_text=SPACE, **values)


def test_search_timed_in_onnxruntime(study_dir: Path, apply_files: Path) -> None:
    weights = apply_files / "weights.pt"
    settings = tiny_settings(study_dir, weights, latency_backend="onnxruntime")
    result = run_search(settings)
    complete = result.study.get_trials(states=(TrialState.COMPLETE,))
    assert sum("rung" not in t.user_attrs for t in complete) == 3  # and the promotions of the anchors
    for trial in complete:  # each trial's model went through an export checked in ONNX Runtime, then timed there
        attrs = trial.user_attrs
        assert attrs["latency_ms"] > 0 and trial.values[1] == pytest.approx(1 / attrs["speedup"])
        assert attrs["latency_rounds"] == 4 and attrs["speedup_low"] <= attrs["speedup_high"]  # paired, in rounds
        assert 0 <= attrs["onnx_max_abs_error"] <= 1e-3  # float anchors: baseline, svd, tucker2
        assert attrs["onnx_checked_against_float"] == 0.0 and attrs["onnx_tolerance"] >= 1e-4
    assert result.study.user_attrs["settings"]["latency_backend"] == "onnxruntime"
    with pytest.raises(rs.RanksearchError, match="exists with latency_backend='onnxruntime', not 'torch'"):
        run_search(tiny_settings(study_dir, weights))
