"""Deployable models: a single-file ONNX export checked against torch, ONNX Runtime latency, ``ranksearch apply``.

The export uses torch's TorchScript-based exporter (``dynamo=False``). The torch.export-based one
cannot export the int8 layers (torch.ao's quantized convs keep their packed weights in TorchScript
objects, which ``torch.export`` cannot flatten) and took 10 s instead of 0.5 s for a ResNet-18,
which matters when every trial of a search is exported. The TorchScript exporter writes int8
layers as QuantizeLinear -> DequantizeLinear around float Conv/Gemm nodes (QDQ), which ONNX
Runtime runs with its own int8 kernels.
"""

from __future__ import annotations

import importlib.util
import io
import tempfile
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.ao.nn.quantized as nnq
from rich.console import Console
from rich.table import Table
from torch import nn

from ranksearch.config import CompressionConfig, atomic_open
from ranksearch.errors import RanksearchError
from ranksearch.evaluate.latency import Latency, measure_latency, time_repeatedly
from ranksearch.techniques.int8 import Int8Module

if TYPE_CHECKING:
    import onnxruntime

ONNX_EXTRA = "pip install 'ranksearch[onnx]'"
DEFAULT_OPSET = 17
FLOAT_TOLERANCE = 1e-4
INT8_TOLERANCE = 5e-2
"""Allowed max abs error of ONNX Runtime against torch, relative to ``max(1, max |torch output|)``. With int8
layers, fbgemm and ONNX Runtime may round a requantized value to neighbouring int8 steps (measured: 1% of
the output range when the classifier is int8)."""


@dataclass(frozen=True)
class OnnxExport:
    """A written ONNX model and how closely ONNX Runtime reproduced torch on the example."""

    path: Path
    size_bytes: int
    max_abs_error: float
    tolerance: float
    opset: int


def require_onnxruntime() -> None:
    """Raise a one-line error naming the extra to install when ONNX Runtime is missing."""
    missing = [name for name in ("onnxruntime", "onnx") if importlib.util.find_spec(name) is None]
    if missing:
        raise RanksearchError(f"{' and '.join(missing)} not installed; install the extra: {ONNX_EXTRA}")


def export_onnx(
    model: nn.Module,
    example: torch.Tensor,
    path: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    tolerance: float | None = None,
) -> OnnxExport:
    """Write ``model`` (eval mode) as one self-contained ONNX file, input ``input``, output ``output``, dynamic batch.

    Before ``path`` is written, ONNX Runtime (CPU) runs the model on ``example`` and its output
    is compared with torch's: a max abs error over ``tolerance`` (relative to
    ``max(1, max |torch output|)``; default :data:`FLOAT_TOLERANCE`, or :data:`INT8_TOLERANCE`
    when the model has int8 layers) raises :class:`RanksearchError`.
    """
    require_onnxruntime()
    path = Path(path)
    int8_layers = [name for name, module in model.named_modules() if isinstance(module, Int8Module)]
    if tolerance is None:
        tolerance = INT8_TOLERANCE if int8_layers else FLOAT_TOLERANCE
    was_training = model.training
    model.eval()
    try:
        data = _onnx_bytes(model, example, opset, int8_layers)
        with torch.no_grad():
            reference = model(example).float().cpu()
    finally:
        model.train(was_training)
    output = torch.from_numpy(_session(data, threads=None).run(None, {"input": example.cpu().numpy()})[0])
    error = (output - reference).abs().max().item()
    allowed = tolerance * max(1.0, reference.abs().max().item())
    if not error <= allowed:
        raise RanksearchError(
            f"{path}: ONNX Runtime's output differs from torch's by {error:.3g} (max abs), over the tolerance "
            f"{allowed:.3g}; the export is wrong, not written"
        )
    try:
        with atomic_open(path, "wb") as handle:
            handle.write(data)
    except OSError as exc:
        raise RanksearchError(f"{path}: cannot be written ({exc.strerror}); pass a writable path") from None
    return OnnxExport(path, len(data), error, allowed, opset)


def _onnx_bytes(model: nn.Module, example: torch.Tensor, opset: int, int8_layers: list[str]) -> bytes:
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings(), torch.no_grad():  # the TorchScript exporter's deprecation and tracer notes
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                (example,),
                buffer,
                input_names=["input"],
                output_names=["output"],
                dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
                opset_version=opset,
                external_data=False,
                dynamo=False,
            )
    except Exception as exc:
        hint = f"; layers {', '.join(int8_layers)} are int8, try a config without int8" if int8_layers else ""
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise RanksearchError(f"ONNX export of {type(model).__name__} failed ({first_line}){hint}") from None
    return buffer.getvalue()


def _session(model: str | Path | bytes, *, threads: int | None) -> onnxruntime.InferenceSession:
    """A CPU session running ops one after another on ``threads`` intra-op threads (torch's count when None)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads if threads is not None else torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only
    source = str(model) if isinstance(model, Path) else model
    try:
        return onnxruntime.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        name = model if isinstance(model, str | Path) else "the exported model"
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise RanksearchError(f"{name}: ONNX Runtime cannot load it ({first_line}); pass an ONNX model file") from None


def onnxruntime_latency(
    path: str | Path,
    example: torch.Tensor,
    *,
    threads: int | None = None,
    warmup: int = 5,
    min_runs: int = 10,
    max_runs: int = 200,
    target_seconds: float = 0.5,
    max_spread: float = 0.15,
    max_attempts: int = 3,
) -> Latency:
    """Median latency of the ONNX model at ``path`` on ``example`` in ONNX Runtime on CPU.

    Timed like :func:`ranksearch.measure_latency` (the same loop, :func:`time_repeatedly`), one
    ``session.run`` per call, input already in numpy; ``threads`` intra-op threads (torch's count
    when None) and one inter-op thread.
    """
    require_onnxruntime()
    used = threads if threads is not None else torch.get_num_threads()
    session = _session(Path(path), threads=used)
    feed = {session.get_inputs()[0].name: example.detach().cpu().numpy()}

    def time_once() -> float:
        begin = time.perf_counter_ns()
        session.run(None, feed)
        return (time.perf_counter_ns() - begin) / 1e6

    return time_repeatedly(
        time_once,
        device="cpu",
        threads=used,
        backend="onnxruntime",
        warmup=warmup,
        min_runs=min_runs,
        max_runs=max_runs,
        target_seconds=target_seconds,
        max_spread=max_spread,
        max_attempts=max_attempts,
    )


@dataclass(frozen=True)
class ApplyRow:
    """One model's size and latency on both backends (ONNX Runtime's when exported)."""

    name: str
    params: int
    torch: Latency
    onnxruntime: Latency | None


@dataclass(frozen=True)
class ApplyResult:
    """What ``ranksearch apply`` wrote and measured."""

    out: Path
    onnx: OnnxExport | None
    batch: int
    rows: list[ApplyRow]


def apply_to_checkpoint(
    config: str | Path,
    checkpoint: str | Path | None,
    out: str | Path,
    *,
    onnx: str | Path | None = None,
    threads: int | None = None,
    batch: int = 1,
    dataset: str | None = None,
    data_root: str | Path | None = None,
    console: Console | None = None,
) -> ApplyResult:
    """Compress the trained model as ``config`` says and save it; optionally export it to ONNX; time both backends.

    The model is rebuilt from ``config``'s ``model`` section (a ``ranksearch export`` file) with
    the uncompressed weights of ``checkpoint`` (default: the one the config records), compressed
    (see :func:`ranksearch.results.export.build_from_config`), and saved whole to ``out``:
    ``model = torch.load(out, weights_only=False)`` loads it back (with ranksearch installed).
    Int8 and data-aware layers are calibrated on training images of ``dataset`` (default: the
    one the config's study used, read from ``data_root``). With ``onnx``, the single-file ONNX
    model is written there after checking ONNX Runtime's output against torch's. The uncompressed
    and compressed models are then timed at batch ``batch`` on ``threads`` threads, in torch and
    (with ``onnx``) ONNX Runtime; the table goes to ``console``.
    """
    from ranksearch.results.export import build_from_config

    config = CompressionConfig.coerce(config)
    if onnx is not None:
        require_onnxruntime()
    for option, value in (("--batch", batch), ("--threads", threads)):
        if value is not None and value <= 0:
            raise RanksearchError(f"{option} {value}: must be positive")
    checkpoint = checkpoint if checkpoint is not None else config.model.get("checkpoint")
    if checkpoint is None:
        raise RanksearchError(
            "no trained weights: the config records no checkpoint; pass --checkpoint with the uncompressed model's"
        )
    calib = _calibration_inputs(config, dataset, data_root)
    dense = build_from_config(replace(config, layers={}), checkpoint=checkpoint)
    compressed = build_from_config(config, checkpoint=checkpoint, calib_inputs=calib)
    spec = config.model
    example = torch.randn(
        batch, int(spec["in_channels"]), int(spec["image_size"]), int(spec["image_size"]),
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    exported = None if onnx is None else export_onnx(compressed, example, onnx)
    out = Path(out)
    try:
        with atomic_open(out, "wb") as handle:
            torch.save(compressed, handle)
    except OSError as exc:
        raise RanksearchError(f"--out {out}: cannot be written ({exc.strerror}); pass a writable path") from None
    with tempfile.TemporaryDirectory(prefix="ranksearch-onnx-") as tmp:
        dense_onnx = None if exported is None else export_onnx(dense, example, Path(tmp) / "dense.onnx").path
        rows = [
            _measure("uncompressed", dense, example, threads, dense_onnx),
            _measure("compressed", compressed, example, threads, exported and exported.path),
        ]
    result = ApplyResult(out, exported, batch, rows)
    print_apply(result, console or Console())
    return result


def _measure(name: str, model: nn.Module, example: torch.Tensor, threads: int | None, onnx: Path | None) -> ApplyRow:
    return ApplyRow(
        name,
        _param_count(model),
        measure_latency(model, example, threads=threads),
        None if onnx is None else onnxruntime_latency(onnx, example, threads=threads),
    )


def _param_count(model: nn.Module) -> int:
    """Parameters, counting the int8 layers' packed weights and biases (they are not ``nn.Parameter``s)."""
    count = sum(p.numel() for p in model.parameters())
    for module in model.modules():
        if isinstance(module, nnq.Conv2d | nnq.Linear):
            count += module.weight().numel() + (0 if module.bias() is None else module.bias().numel())
    return count


def _calibration_inputs(
    config: CompressionConfig, dataset: str | None, data_root: str | Path | None
) -> torch.Tensor | None:
    """Training images for int8/data-aware layers, taken as the search took them; None when no layer needs any."""
    needing = [name for name, choice in config.layers.items() if choice.int8 or choice.data_aware]
    if not needing:
        return None
    from ranksearch.data import load_dataset
    from ranksearch.evaluate.classification import calibration_batch

    settings = dict(config.meta.get("settings") or {})
    dataset = dataset or settings.get("dataset")
    if dataset is None:
        raise RanksearchError(
            f"layer {needing[0]!r} is int8/data-aware and needs calibration images, but the config names no dataset; "
            "pass --dataset"
        )
    splits = load_dataset(
        str(dataset),
        root=Path(data_root or settings.get("data_root") or "data"),
        val_fraction=float(settings.get("val_fraction", 0.1)),
        seed=int(settings.get("seed", 0)),
        train_subset=settings.get("train_subset"),
    )
    return calibration_batch(
        splits.train,
        batch_size=int(settings.get("batch_size", 128)),
        batches=int(settings.get("calib_batches", 4)),
        seed=int(settings.get("seed", 0)),
    )


def print_apply(result: ApplyResult, console: Console) -> None:
    """The table of :func:`apply_to_checkpoint`: median ms (p10-p90) per model and backend, speedups, files written."""
    first = result.rows[0]
    title = f"latency at batch {result.batch}, {first.torch.threads} thread(s), CPU"
    table = Table("model", "params M", "torch ms (p10-p90)", "speedup", title=title)
    written = [f"wrote {result.out} (load: torch.load(path, weights_only=False))"]
    if result.onnx is not None:
        table.add_column("onnxruntime ms (p10-p90)")
        table.add_column("speedup")
        written.append(
            f"wrote {result.onnx.path} ({result.onnx.size_bytes / 1e6:.1f} MB, opset {result.onnx.opset}), "
            f"max abs error vs torch {result.onnx.max_abs_error:.2g} (tolerance {result.onnx.tolerance:.2g})"
        )
    for row in result.rows:
        cells = [row.name, f"{row.params / 1e6:.3f}", _ms(row.torch), _speedup(first.torch, row.torch)]
        if row.onnxruntime is not None and first.onnxruntime is not None:
            cells += [_ms(row.onnxruntime), _speedup(first.onnxruntime, row.onnxruntime)]
        table.add_row(*cells)
    table.caption = "\n".join(written)
    console.print(table)


def _speedup(reference: Latency, latency: Latency) -> str:
    return f"{reference.median_ms / latency.median_ms:.2f}x"


def _ms(latency: Latency) -> str:
    return f"{latency.median_ms:.3f} ({latency.p10_ms:.3f}-{latency.p90_ms:.3f})"
