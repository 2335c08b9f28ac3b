"""What a remote latency target costs: a trial's wall time with its ONNX models timed by a target server on
loopback, against the same trials timed in ONNX Runtime in this process.

    python benchmarks/remote_target.py [--repeats 3] [--threads 2] [--finetune-steps 60] [--eval-subset 5000]

The default problem's evaluator (ResNet-18 at 28 px on Fashion-MNIST, the default fine-tune and validation; random
weights: what is timed does not depend on them) evaluates the uniform anchors of the default search space, once with
``--latency-backend onnxruntime`` here and once with ``--target`` a `ranksearch-target` process on 127.0.0.1, the two
interleaved config by config, ``--repeats`` times. Prints per config the median trial wall time of each, their ratio
(the issue's target: a remote trial takes at most 1.15x a local one), the latency phase alone, and the speedups each
measured. The server process shares this machine's cores: it times while the client waits.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from ranksearch.config import CompressionConfig
from ranksearch.data import load_dataset
from ranksearch.evaluate import ClassificationEvaluator, EvaluatorOptions
from ranksearch.measure.target_server import TOKEN_ENV
from ranksearch.models import build_model
from ranksearch.search import SearchSpace, default_space_path, record_input_shapes, uniform_config

ANCHORS = {"svd@0.25": ("svd", 0.25), "tucker2@0.25": ("tucker2", 0.25), "spatial_svd@0.5": ("spatial_svd", 0.5)}


def start_server(port: int, threads: int, token: str) -> subprocess.Popen[str]:
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ranksearch.measure.target_server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--threads",
            str(threads),
            "--token",
            token,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    line = server.stdout.readline()  # type: ignore[union-attr]
    if not line.startswith("ranksearch target"):
        raise SystemExit(f"the target server did not start: {line}")
    return server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--finetune-steps", type=int, default=EvaluatorOptions.finetune_steps)
    parser.add_argument("--eval-subset", type=int, default=5000)
    parser.add_argument("--data-root", type=Path, default=Path("data"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    console = Console(width=150)
    splits = load_dataset("fashion_mnist", root=args.data_root, val_fraction=0.1, seed=0, eval_subset=args.eval_subset)
    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=10, in_channels=1, image_size=28)
    space = SearchSpace.load(default_space_path("resnet"))
    slots = space.layers(model, record_input_shapes(model, torch.zeros(1, 1, 28, 28)))
    configs = {
        name: uniform_config(slots, technique, rank, rank_multiple=space.rank_multiple)
        for name, (technique, rank) in ANCHORS.items()
    }
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    token = os.urandom(16).hex()
    os.environ[TOKEN_ENV] = token
    server = start_server(port, args.threads, token)
    try:
        options = {"finetune_steps": args.finetune_steps, "latency_backend": "onnxruntime"}
        evaluators = {
            where: ClassificationEvaluator(
                model=model,
                splits=splits,
                device=torch.device("cpu"),
                options=EvaluatorOptions(**options, target=target),
                threads=args.threads,
            )
            for where, target in (("local", None), ("remote", f"http://127.0.0.1:{port}"))
        }
        runs = measure(evaluators, configs, args.repeats, console)
    finally:
        server.terminate()
    report(runs, args, console)


Runs = dict[tuple[str, str], list[dict[str, float]]]


def measure(
    evaluators: dict[str, ClassificationEvaluator],
    configs: dict[str, CompressionConfig],
    repeats: int,
    console: Console,
) -> Runs:
    """Each config evaluated by each evaluator, interleaved, ``repeats`` times: wall time, latency phase, speedup."""
    runs: Runs = {}
    for repeat in range(repeats):
        for name, config in configs.items():
            order = list(evaluators) if repeat % 2 == 0 else list(reversed(evaluators))
            for where in order:
                start = time.perf_counter()
                metrics = evaluators[where].evaluate(config)
                seconds = time.perf_counter() - start
                runs.setdefault((name, where), []).append(
                    {
                        "wall_s": seconds,
                        "latency_s": metrics.extra["time_latency_s"],
                        "speedup": metrics.speedup(0.0),
                    }
                )
                speedup = metrics.speedup(0.0)
                console.print(f"repeat {repeat + 1} {name:>16} {where:>6}: {seconds:.2f} s, {speedup:.2f}x")
    return runs


def report(runs: Runs, args: argparse.Namespace, console: Console) -> None:
    table = Table(
        title=f"A trial timed locally vs on a loopback target (median of {args.repeats}; {args.threads} threads; "
        f"{args.finetune_steps} fine-tune steps, {args.eval_subset} validation images)"
    )
    for column in (
        "config",
        "trial s, local",
        "trial s, remote",
        "remote / local",
        "latency phase s, local",
        "latency phase s, remote",
        "speedup, local",
        "speedup, remote",
    ):
        table.add_column(column, justify="right")
    ratios = []
    for name in dict.fromkeys(name for name, _ in runs):
        local, remote = runs[(name, "local")], runs[(name, "remote")]
        med = {
            key: (statistics.median(r[key] for r in local), statistics.median(r[key] for r in remote))
            for key in ("wall_s", "latency_s", "speedup")
        }
        ratio = med["wall_s"][1] / med["wall_s"][0]
        ratios.append(ratio)
        speedups = [f"{min(r['speedup'] for r in v):.2f}-{max(r['speedup'] for r in v):.2f}" for v in (local, remote)]
        table.add_row(
            name,
            f"{med['wall_s'][0]:.2f}",
            f"{med['wall_s'][1]:.2f}",
            f"{ratio:.3f}",
            f"{med['latency_s'][0]:.2f}",
            f"{med['latency_s'][1]:.2f}",
            *speedups,
        )
    console.print(table)
    median = statistics.median(ratios)
    console.print(f"median remote / local trial time over the configs: {median:.3f} (target <= 1.15)")


if __name__ == "__main__":
    main()
