"""ONNX: a single-file export checked against torch, and ONNX Runtime latency.

The export uses torch's TorchScript-based exporter (``dynamo=False``). The torch.export-based one
cannot export the int8 layers (torch.ao's quantized convs keep their packed weights in TorchScript
objects, which ``torch.export`` cannot flatten) and took 10 s instead of 0.5 s for a ResNet-18,
which matters when every trial of a search is exported. The TorchScript exporter writes int8
layers as QuantizeLinear -> DequantizeLinear around float Conv/Gemm nodes (QDQ), which ONNX
Runtime runs with its own int8 kernels.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from ranksearch.errors import RanksearchError
from ranksearch.measure.ort import ort_session, paired_sessions, session_timer
from ranksearch.measure.timing import Latency, PairedLatency
from ranksearch.techniques.int8 import Int8Module
from ranksearch.util import atomic_open, first_line, require_modules

if TYPE_CHECKING:
    import onnxruntime

DEFAULT_OPSET = 17
FLOAT_TOLERANCE = 1e-4
INT8_TOLERANCE = 5e-2
"""Allowed max abs error of ONNX Runtime against torch, relative to ``max(1, max |torch output|)``. With int8
layers, fbgemm and ONNX Runtime may round a requantized value to neighbouring int8 steps (measured: 1% of
the output range when the classifier is int8)."""
INT8_GAP_FACTOR = 2.0
"""With several int8 layers the two runtimes' rounding differences add up past :data:`INT8_TOLERANCE` (ONNX Runtime
0.07-0.63 from torch in the logits of a 224 px ResNet-18 with 7-11 int8 layers), while each stays about as far from
the float model as the other (on the default problem's trained model, 1 to 19 int8 layers: ONNX Runtime 0.3-4.3 %
of the largest logit from the float model, torch's int8 0.3-7.4 %). Given the float model, an int8 export passes
when ONNX Runtime is at most this many times torch's distance from it."""


@dataclass(frozen=True)
class OnnxExport:
    """A written ONNX model and how closely ONNX Runtime reproduced torch on the example."""

    path: Path
    size_bytes: int
    max_abs_error: float
    """ONNX Runtime's output against torch's, max abs."""
    tolerance: float
    """The bound the check applied: to ``max_abs_error``, or (an int8 export checked against its float model) to
    ONNX Runtime's distance from the float model's output."""
    opset: int
    against_float: bool = False
    """Whether the export passed on its distance from the float model (an int8 model over the tolerance against
    torch's int8 output, within :data:`INT8_GAP_FACTOR` times torch's own distance from the float model)."""


def require_onnxruntime() -> None:
    """Raise a one-line error naming the extra to install when ONNX Runtime is missing."""
    require_modules(("onnxruntime", "onnx"), extra="onnx", what="ONNX export")


def export_onnx(
    model: nn.Module,
    example: torch.Tensor,
    path: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    tolerance: float | None = None,
    float_model: nn.Module | None = None,
) -> OnnxExport:
    """Write ``model`` (eval mode) as one self-contained ONNX file, input ``input``, output ``output``, dynamic batch.

    Before ``path`` is written, ONNX Runtime (CPU) runs the model on ``example`` and its output
    is compared with torch's: a max abs error over ``tolerance`` (relative to
    ``max(1, max |torch output|)``; default :data:`FLOAT_TOLERANCE`, or :data:`INT8_TOLERANCE`
    when the model has int8 layers) raises :class:`RanksearchError`, unless the model has int8 layers and
    ``float_model`` (the same model before quantization, on ``example``'s device) is given: then ONNX Runtime may
    differ from torch as long as it stays within :data:`INT8_GAP_FACTOR` times torch's distance from the float model
    (both runtimes approximate the float model; neither is the reference).
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
    against_float = not error <= allowed
    if against_float:
        if not int8_layers or float_model is None:
            raise RanksearchError(
                f"{path}: ONNX Runtime's output differs from torch's by {error:.3g} (max abs), over the tolerance "
                f"{allowed:.3g}; the export is wrong, not written"
            )
        allowed = int8_export_checked(path, output, reference, _float_output(float_model, example))
    try:
        with atomic_open(path, "wb") as handle:
            handle.write(data)
    except OSError as exc:
        raise RanksearchError(f"{path}: cannot be written ({exc.strerror}); pass a writable path") from None
    return OnnxExport(path, len(data), error, allowed, opset, against_float=against_float)


def _float_output(float_model: nn.Module, example: torch.Tensor) -> torch.Tensor:
    was_training = float_model.training
    float_model.eval()
    try:
        with torch.no_grad():
            return float_model(example).float().cpu()
    finally:
        float_model.train(was_training)


def int8_export_checked(path: Path, output: torch.Tensor, reference: torch.Tensor, exact: torch.Tensor) -> float:
    """The bound ONNX Runtime's ``output`` met: within :data:`INT8_GAP_FACTOR` times torch's int8 ``reference``'s
    distance from the float model's ``exact`` output (plus :data:`FLOAT_TOLERANCE`); raises otherwise."""
    torch_gap = (reference - exact).abs().max().item()
    onnx_gap = (output - exact).abs().max().item()
    allowed = INT8_GAP_FACTOR * torch_gap + FLOAT_TOLERANCE * max(1.0, exact.abs().max().item())
    if not onnx_gap <= allowed:
        raise RanksearchError(
            f"{path}: ONNX Runtime's output is {onnx_gap:.3g} from the float model's (max abs), over "
            f"{INT8_GAP_FACTOR:g}x torch's int8 output's {torch_gap:.3g}; the export is wrong, not written"
        )
    return allowed


def onnx_bytes(model: nn.Module, example: torch.Tensor, *, opset: int = DEFAULT_OPSET) -> bytes:
    """``model`` (eval mode) exported as :func:`export_onnx` exports it, unchecked and in memory: what a per-layer
    latency table times (its values do not matter, its operators do)."""
    require_onnxruntime()
    int8_layers = [name for name, module in model.named_modules() if isinstance(module, Int8Module)]
    was_training = model.training
    model.eval()
    try:
        return _onnx_bytes(model, example, opset, int8_layers)
    finally:
        model.train(was_training)


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
        raise RanksearchError(f"ONNX export of {type(model).__name__} failed ({first_line(exc)}){hint}") from None
    return buffer.getvalue()


def _session(model: str | Path | bytes, *, threads: int | None) -> onnxruntime.InferenceSession:
    """:func:`ort_session` on ``threads`` intra-op threads (torch's count when None)."""
    return ort_session(model, threads=threads if threads is not None else torch.get_num_threads())


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
    return onnxruntime_timer(path, example, threads=threads)(
        warmup=warmup,
        min_runs=min_runs,
        max_runs=max_runs,
        target_seconds=target_seconds,
        max_spread=max_spread,
        max_attempts=max_attempts,
    )


def onnxruntime_speedup(
    reference: str | Path,
    path: str | Path,
    example: torch.Tensor,
    *,
    threads: int | None = None,
    rounds: int = 4,
    target_seconds: float = 0.5,
) -> PairedLatency:
    """The ONNX models at ``reference`` and ``path`` timed in alternating rounds in ONNX Runtime on CPU, each in
    its own session loaded once (as :func:`~ranksearch.measure.latency.measure_speedup` times torch models)."""
    require_onnxruntime()
    used = threads if threads is not None else torch.get_num_threads()
    sessions = [_session(Path(model), threads=used) for model in (reference, path)]
    return paired_sessions(
        *sessions, example.detach().cpu().numpy(), threads=used, rounds=rounds, target_seconds=target_seconds
    )


def onnxruntime_timer(
    model: str | Path | bytes, example: torch.Tensor, *, threads: int | None = None
) -> Callable[..., Latency]:
    """A session of the ONNX model (a file, or its bytes), loaded once, and a function that times it on ``example``
    with :func:`~ranksearch.measure.timing.time_repeatedly` (its keyword arguments: warm-up, runs, target seconds,
    attempts)."""
    require_onnxruntime()
    used = threads if threads is not None else torch.get_num_threads()
    source = model if isinstance(model, bytes) else Path(model)
    return session_timer(_session(source, threads=used), example.detach().cpu().numpy(), threads=used)
