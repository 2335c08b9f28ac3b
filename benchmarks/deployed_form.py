"""Which latency target rewards what factorization saves? Speedup per MAC reduction in eager torch, eager torch
with BatchNorm folded, torch.compile (inductor, CPU; weights frozen or not, whichever is faster)
and ONNX Runtime.

    python benchmarks/deployed_form.py [--threads 2] [--rounds 6] [--seconds 3] [--repeats 1] [--no-compile]
        [--sizes 28 224]

For ResNet-18 at 28 px (1 channel, the default problem's shape) and 224 px (3 channels; random weights: latency does
not depend on them), batch 1: the dense model and uniform configs (SVD, Tucker-2 and spatial SVD at rank choice
0.25 on every layer of the default search space) are timed per target, each config beside the dense model of the
same target in alternating rounds (``measure_speedup`` / ``onnxruntime_speedup``). Prints the paired speedup
(median of the rounds' ratios, and their range), the MAC reduction counted on the built module, and their ratio:
1.0 means every MAC saved shows up as time saved. With ``--repeats N`` each pair is timed N times (the targets
interleaved), the table gives the median of the N speedups and their range, and the last line how far apart a
target's repeats land (median over rows of the fastest repeat / the slowest): how reliable each target's timing is.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from ranksearch.compress import apply_config, dense_model_cost
from ranksearch.measure.compiled import compiled_speedup
from ranksearch.measure.deployed import fold_batchnorm
from ranksearch.measure.latency import measure_speedup
from ranksearch.measure.timing import PairedLatency
from ranksearch.models import build_model
from ranksearch.search import SearchSpace, default_space_path, record_input_shapes, uniform_config

CONFIGS = {"svd@0.25": ("svd", 0.25), "tucker2@0.25": ("tucker2", 0.25), "spatial_svd@0.25": ("spatial_svd", 0.25)}


def timed_pair(target: str, dense: nn.Module, model: nn.Module, example: torch.Tensor, args) -> PairedLatency:
    """``model`` beside ``dense``, both in ``target``'s form."""
    if target == "onnxruntime":
        from ranksearch.measure.onnx import export_onnx, onnxruntime_speedup

        with tempfile.TemporaryDirectory() as tmp:
            reference = export_onnx(fold_batchnorm(dense).model, example, Path(tmp) / "dense.onnx").path
            candidate = export_onnx(fold_batchnorm(model).model, example, Path(tmp) / "model.onnx").path
            return onnxruntime_speedup(
                reference, candidate, example, threads=args.threads, rounds=args.rounds, target_seconds=args.seconds
            )
    if target == "torch.compile, BatchNorm folded":  # as --latency-backend compile times trials
        pair = (fold_batchnorm(dense).model, fold_batchnorm(model).model)
        return compiled_speedup(*pair, example, threads=args.threads, rounds=args.rounds, target_seconds=args.seconds)[
            0
        ]
    form: Callable[[nn.Module], nn.Module] = {
        "eager": lambda m: m,
        "eager, BatchNorm folded": lambda m: fold_batchnorm(m).model,
    }[target]
    return measure_speedup(
        form(dense), form(model), example, threads=args.threads, rounds=args.rounds, target_seconds=args.seconds
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=3.0, help="timing per model and pair, over all rounds")
    parser.add_argument("--sizes", type=int, nargs="+", default=[28, 224])
    parser.add_argument("--repeats", type=int, default=1, help="time each pair this many times, targets interleaved")
    parser.add_argument(
        "--no-compile", action="store_true", help="leave out torch.compile (each pair compiles, 5-25 s)"
    )
    parser.add_argument("--no-onnx", action="store_true", help="leave out ONNX Runtime")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    console = Console(width=150)
    targets = ["eager", "eager, BatchNorm folded"]
    targets += [] if args.no_compile else ["torch.compile, BatchNorm folded"]
    targets += [] if args.no_onnx else ["onnxruntime"]
    space = SearchSpace.load(default_space_path("resnet"))
    spread = f"{args.rounds} rounds" if args.repeats == 1 else f"{args.repeats} repeats of {args.rounds} rounds each"
    table = Table(title=f"speedup beside the dense model (median \\[min, max] of {spread}) / MAC reduction")
    for column in ("model", "config", "MAC reduction", *targets):
        table.add_column(column)
    summary: dict[str, list[float]] = {target: [] for target in targets}
    repeatability: dict[str, list[float]] = {target: [] for target in targets}
    for size in args.sizes:
        channels = 1 if size == 28 else 3
        torch.manual_seed(0)
        dense = build_model("resnet18", num_classes=10, in_channels=channels, image_size=size).eval()
        example = torch.randn(1, channels, size, size)
        slots = space.layers(dense, record_input_shapes(dense, example))
        dense_macs = dense_model_cost(dense, example).macs
        for label, (technique, fraction) in CONFIGS.items():
            config = uniform_config(slots, technique, fraction, rank_multiple=space.rank_multiple)
            model = apply_config(dense, config, calib_inputs=example, init="random").eval()
            reduction = dense_macs / dense_model_cost(model, example).macs
            speedups: dict[str, list[float]] = {target: [] for target in targets}
            rounds_range: dict[str, tuple[float, float]] = {}
            for repeat in range(args.repeats):
                for target in targets:
                    start = time.perf_counter()
                    paired = timed_pair(target, dense, model, example, args)
                    seconds = time.perf_counter() - start
                    speedups[target].append(statistics.median(paired.ratios))
                    low, high = rounds_range[target] = (paired.speedup_low, paired.speedup_high)
                    console.print(
                        f"resnet18@{size} {label} {target} (repeat {repeat + 1}): dense "
                        f"{paired.reference.median_ms:.3f} ms, model {paired.candidate.median_ms:.3f} ms, "
                        f"{speedups[target][-1]:.2f}x, rounds {low:.2f}-{high:.2f}x ({seconds:.0f} s)"
                    )
            cells = []
            for target in targets:
                values = speedups[target]
                speedup = statistics.median(values)
                summary[target].append(speedup / reduction)
                repeatability[target].append(max(values) / min(values))
                low, high = rounds_range[target] if args.repeats == 1 else (min(values), max(values))
                cells.append(f"{speedup:.2f}x [{low:.2f}, {high:.2f}] / {speedup / reduction:.2f}")
            table.add_row(f"resnet18 @ {size} px", label, f"{reduction:.2f}x", *cells)
    console.print(table)
    console.print(
        "median speedup per MAC reduction over all rows: "
        + ", ".join(f"{target} {statistics.median(values):.2f}" for target, values in summary.items())
    )
    if args.repeats > 1:
        console.print(
            f"fastest / slowest of {args.repeats} repeats, median \\[max] over all rows: "
            + ", ".join(
                f"{target} {statistics.median(values):.2f} [{max(values):.2f}]"
                for target, values in repeatability.items()
            )
        )


if __name__ == "__main__":
    main()
