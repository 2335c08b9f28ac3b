"""CPU latency of fp32 vs int8 for single ResNet-18-sized 3x3 convs and their 1x1-3x3-1x1 factorizations.

Compares torch fp32, torch.ao int8 (:func:`ranksearch.techniques.int8.quantize_int8`), onnxruntime fp32
and onnxruntime int8 (static QDQ, per-channel weights). Batch 1, a fixed thread count, warm-up, then
the variants run interleaved (``--inner`` calls per timed block, rotating order) and each reports the
median over ``--repeats`` blocks. The onnxruntime timings include the torch<->numpy hand-off, as
they would inside a torch model, and its threads do not spin between calls (they would steal the
cores from the torch ops around it). ``err`` is the int8 output's relative L2 error vs fp32;
``ort8/int8`` is onnxruntime int8 time over torch.ao int8 time (above 1: torch.ao is faster).

Run from the repository root: ``python -m benchmarks.int8_latency [--threads 2]``.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from torch import nn

from ranksearch.techniques.int8 import quantize_int8

SHAPES = [(64, 28), (128, 14), (256, 7), (512, 4)]  # (channels, spatial size) of a 3x3 C->C conv
CALIB_BATCH = 32


class _Reader(CalibrationDataReader):
    """Feeds the calibration batch to onnxruntime one sample at a time."""

    def __init__(self, calib: torch.Tensor) -> None:
        self._samples = iter([{"x": s[None].numpy()} for s in calib])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._samples, None)


def _activations(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.relu(torch.randn(shape, generator=torch.Generator().manual_seed(seed)) + 0.2)


def _layer(channels: int, factorized: bool) -> nn.Module:
    if not factorized:
        return nn.Conv2d(channels, channels, 3, padding=1)
    rank = channels // 4
    return nn.Sequential(
        nn.Conv2d(channels, rank, 1, bias=False),
        nn.Conv2d(rank, rank, 3, padding=1, bias=False),
        nn.Conv2d(rank, channels, 1),
    )


def _ort_runners(
    layer: nn.Module, x: torch.Tensor, calib: torch.Tensor, threads: int, tmp: Path
) -> tuple[Callable[[], torch.Tensor], Callable[[], torch.Tensor]]:
    fp32_path, int8_path = tmp / "fp32.onnx", tmp / "int8.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            layer, (x,), fp32_path, input_names=["x"], output_names=["y"], external_data=False, verbose=False
        )
    quantize_static(
        str(fp32_path),
        str(int8_path),
        _Reader(calib),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        reduce_range=True,  # as torch's x86 qconfig: avoids u8*s8 saturation on CPUs without VNNI
    )
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")

    def runner(path: Path) -> Callable[[], torch.Tensor]:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return lambda: torch.from_numpy(session.run(None, {"x": x.numpy()})[0])

    return runner(fp32_path), runner(int8_path)


def _median_ms(runs: dict[str, Callable[[], torch.Tensor]], warmup: int, repeats: int, inner: int) -> dict[str, float]:
    names = list(runs)
    for _ in range(warmup):
        for name in names:
            runs[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            run = runs[name]
            start = time.perf_counter()
            for _ in range(inner):
                run()
            samples[name].append((time.perf_counter() - start) / inner * 1e3)
    return {name: statistics.median(s) for name, s in samples.items()}


def _rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y - ref).norm() / ref.norm()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch and onnxruntime")
    parser.add_argument("--warmup", type=int, default=20, help="untimed rounds before measuring")
    parser.add_argument("--repeats", type=int, default=200, help="timed blocks per variant (median reported)")
    parser.add_argument("--inner", type=int, default=5, help="calls per timed block")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger().setLevel(logging.ERROR)  # onnxruntime.quantization's "consider pre-processing" advice
    torch.manual_seed(0)
    print(
        f"torch {torch.__version__} (quantized engine x86, CPU {torch.backends.cpu.get_cpu_capability()}), "
        f"onnxruntime {ort.__version__}, threads={args.threads}, batch 1, "
        f"median of {args.repeats} x {args.inner} calls, times in ms, load average {os.getloadavg()[0]:.2f}"
    )
    header = (
        f"{'layer':<34}{'fp32':>8}{'int8':>8}{'speedup':>9}{'err':>7}"
        f"{'ort fp32':>10}{'ort int8':>10}{'speedup':>9}{'err':>7}{'ort8/int8':>11}"
    )
    print(header)
    print("-" * len(header))
    for channels, size in SHAPES:
        for factorized in (False, True):
            layer = _layer(channels, factorized).eval()
            x = _activations((1, channels, size, size), seed=1)
            calib = _activations((CALIB_BATCH, channels, size, size), seed=2)
            qlayer = quantize_int8(layer, calib)
            with tempfile.TemporaryDirectory() as tmp:
                ort_fp32, ort_int8 = _ort_runners(layer, x, calib, args.threads, Path(tmp))
            with torch.inference_mode():
                ref = layer(x)
                runs = {
                    "fp32": partial(layer, x),
                    "int8": partial(qlayer, x),
                    "ort_fp32": ort_fp32,
                    "ort_int8": ort_int8,
                }
                ms = _median_ms(runs, args.warmup, args.repeats, args.inner)
                err, ort_err = _rel_error(qlayer(x), ref), _rel_error(ort_int8(), ref)
            shape = f"{channels}x{channels}x3x3 @{size}x{size}"
            name = f"{shape} 1x1-3x3-1x1 r={channels // 4}" if factorized else shape
            print(
                f"{name:<34}{ms['fp32']:>8.3f}{ms['int8']:>8.3f}{ms['fp32'] / ms['int8']:>8.2f}x{err:>7.3f}"
                f"{ms['ort_fp32']:>10.3f}{ms['ort_int8']:>10.3f}{ms['ort_fp32'] / ms['ort_int8']:>8.2f}x{ort_err:>7.3f}"
                f"{ms['ort_int8'] / ms['int8']:>10.2f}x"
            )
    print(f"load average at the end {os.getloadavg()[0]:.2f} (other processes on the CPU skew the timings)")


if __name__ == "__main__":
    main()
