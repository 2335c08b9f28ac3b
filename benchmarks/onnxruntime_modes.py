"""Does a memory setting make ONNX Runtime's 28 px timings repeatable? Each variant in fresh processes, round robin.

    python benchmarks/onnxruntime_modes.py [--processes 3] [--pairs 4] [--variants as-shipped mmap-env ...]

At 28 px one ONNX model runs in one of two times per session (see docs/latency.md, "Which target is the default").
Each child process builds ResNet-18 at 28 px (1 channel, random weights) and uniform SVD at 0.25, then ``--pairs``
times: a few training steps of another model (a trial allocates and frees large tensors between timings), both
models exported with BatchNorm folded, two new sessions made with the variant's settings, and the pair timed in 6
alternating rounds (0.25 s per model and round, 20 warm-up runs). Prints one JSON line per pair and, at the end, per
variant: how many pairs had the SVD model in its slow mode (over 1.4x its fastest pair's time), and the spread of the
dense model's time and of the speedup. The variants: ``as-shipped`` (ranksearch's session options);
``mmap-env`` (``MALLOC_MMAP_THRESHOLD_=131072``: glibc's mmap threshold fixed, not raised by frees);
``mmap-mallopt`` (the same set by ``mallopt`` at run time, before any session); ``no-arena``
(``enable_cpu_mem_arena=False``); ``no-pattern`` (``enable_mem_pattern=False``); ``no-arena-no-pattern``.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = ("as-shipped", "mmap-env", "mmap-mallopt", "no-arena", "no-pattern", "no-arena-no-pattern")
SLOW_MODE = 1.4
"""A pair whose SVD model takes over this many times its fastest pair's time drew the slow mode."""


def child(variant: str, pairs: int) -> None:
    """One process of ``variant``: ``pairs`` JSON lines."""
    if variant == "mmap-mallopt":
        m_mmap_threshold = -3
        if ctypes.CDLL("libc.so.6").mallopt(m_mmap_threshold, 128 * 1024) != 1:
            raise SystemExit("mallopt(M_MMAP_THRESHOLD) failed")
    import onnxruntime
    import torch

    from ranksearch.compress import apply_config
    from ranksearch.measure.deployed import fold_batchnorm
    from ranksearch.measure.onnx import export_onnx
    from ranksearch.models import build_model
    from ranksearch.search import SearchSpace, default_space_path, record_input_shapes, uniform_config

    torch.set_num_threads(2)
    torch.manual_seed(0)
    dense = build_model("resnet18", num_classes=10, in_channels=1, image_size=28).eval()
    example = torch.randn(1, 1, 28, 28)
    space = SearchSpace.load(default_space_path("resnet"))
    slots = space.layers(dense, record_input_shapes(dense, example))
    config = uniform_config(slots, "svd", 0.25, rank_multiple=space.rank_multiple)
    model = apply_config(dense, config, calib_inputs=example, init="random").eval()
    trained = build_model("resnet18", num_classes=10, in_channels=1, image_size=28)
    optimizer = torch.optim.SGD(trained.parameters(), lr=0.01)

    def options() -> onnxruntime.SessionOptions:
        settings = onnxruntime.SessionOptions()  # as ranksearch.measure.ort.ort_session, then the variant's change
        settings.intra_op_num_threads = 2
        settings.inter_op_num_threads = 1
        settings.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
        settings.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        settings.log_severity_level = 3
        settings.enable_cpu_mem_arena = "no-arena" not in variant
        settings.enable_mem_pattern = "no-pattern" not in variant
        return settings

    feed = example.numpy()
    for pair in range(pairs):
        for _ in range(5):
            images, labels = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
            loss = torch.nn.functional.cross_entropy(trained(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with tempfile.TemporaryDirectory() as tmp:
            paths = [
                export_onnx(fold_batchnorm(m).model, example, Path(tmp) / f"{name}.onnx").path
                for name, m in (("dense", dense), ("svd", model))
            ]
            sessions = [
                onnxruntime.InferenceSession(str(p), options(), providers=["CPUExecutionProvider"]) for p in paths
            ]
        feeds = [{s.get_inputs()[0].name: feed} for s in sessions]
        for session, inputs in zip(sessions, feeds, strict=True):
            for _ in range(20):
                session.run(None, inputs)
        medians: list[list[float]] = [[], []]
        for _ in range(6):
            for index, (session, inputs) in enumerate(zip(sessions, feeds, strict=True)):
                times = []
                end = time.perf_counter() + 0.25
                while time.perf_counter() < end:
                    begin = time.perf_counter_ns()
                    session.run(None, inputs)
                    times.append((time.perf_counter_ns() - begin) / 1e6)
                medians[index].append(statistics.median(times))
        dense_ms, svd_ms = statistics.median(medians[0]), statistics.median(medians[1])
        print(json.dumps({"variant": variant, "pair": pair, "dense_ms": dense_ms, "svd_ms": svd_ms}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=3, help="fresh processes per variant")
    parser.add_argument("--pairs", type=int, default=4, help="session pairs timed per process")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.pairs)
        return
    rows: list[dict[str, float | str]] = []
    for _ in range(args.processes):
        for variant in args.variants:
            env = {**os.environ, **({"MALLOC_MMAP_THRESHOLD_": "131072"} if variant == "mmap-env" else {})}
            command = [sys.executable, __file__, "--child", variant, "--pairs", str(args.pairs)]
            output = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
            for line in output.splitlines():
                print(line, flush=True)
                rows.append(json.loads(line))
    fastest_svd = min(float(r["svd_ms"]) for r in rows)
    for variant in args.variants:
        mine = [r for r in rows if r["variant"] == variant]
        dense = [float(r["dense_ms"]) for r in mine]
        speedups = [float(r["dense_ms"]) / float(r["svd_ms"]) for r in mine]
        slow = sum(float(r["svd_ms"]) > SLOW_MODE * fastest_svd for r in mine)
        print(
            f"{variant:20s} pairs {len(mine):3d}  svd slow mode {slow:2d}  dense ms {min(dense):.3f}-{max(dense):.3f}  "
            f"speedup median {statistics.median(speedups):.2f}x [{min(speedups):.2f}, {max(speedups):.2f}]"
        )


if __name__ == "__main__":
    main()
