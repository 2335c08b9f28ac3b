"""Exercise the CUDA paths: fine-tuning on a GPU, and a whole study trained on the GPU and timed on the CPU.

    python benchmarks/gpu_check.py [--results-dir results/gpu-check] [--budget 16] [--threads 4] [--skip-speed]

1. **Training speed.** Steps per second of the search's distillation fine-tune (``ranksearch.training.finetune``)
   on the GPU in float32, bf16, and bf16 with channels-last weights and inputs (``GPU_TRAINING``), for ResNet-18 at
   28 px (batch 128, Fashion-MNIST's shape) and ResNet-50 at 224 px (batch 64, random images); the variants are
   interleaved, each the median of ``--repeats`` timings; ResNet-18 on the CPU (``--threads``) for the ratio.
2. **End to end.** ``ranksearch run --device cuda --latency-device cpu`` on Fashion-MNIST (a 2-epoch baseline trained
   on the GPU, ``--budget`` trials, one promotion rung, 1-epoch recovery of 2 members), then ``show``, ``export`` and
   ``apply`` of the fastest member within 1 point; prints the run's phase seconds and whether int8 variants were
   offered to the sampler (latency on a CPU) and how many trials held one.

Needs Fashion-MNIST under ``--data-root`` (``FashionMNIST/raw/*-ubyte``) or Debian's ``dataset-fashion-mnist``. Exits 2
without CUDA.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader, TensorDataset

from ranksearch.models import build_model
from ranksearch.training import finetune
from ranksearch.training.loop import GPU_TRAINING

VARIANTS = {"float32": (False, False), "bf16": (True, False), "bf16 + channels-last": (True, True)}
"""Variant -> (bf16, channels_last)."""

CASES = {
    "resnet18 @ 28 px, batch 128": ("resnet18", 1, 28, 128),
    "resnet50 @ 224 px, batch 64": ("resnet50", 3, 224, 64),
}
"""Case -> (model, channels, image size, batch)."""


def steps_per_second(
    model_name: str, channels: int, size: int, batch: int, *, device: torch.device, steps: int
) -> float:
    """Distillation steps per second of a fresh student from a teacher of the same architecture (random weights and
    images: speed does not depend on them), after 3 warm-up steps."""
    torch.manual_seed(0)
    teacher = build_model(model_name, num_classes=10, in_channels=channels, image_size=size).to(device).eval()
    student = build_model(model_name, num_classes=10, in_channels=channels, image_size=size).to(device)
    images = torch.randn(batch * 4, channels, size, size)
    loader = DataLoader(TensorDataset(images, torch.randint(0, 10, (batch * 4,))), batch_size=batch, shuffle=False)
    finetune(student, teacher, loader, device=device, steps=3, lr=0.01)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    finetune(student, teacher, loader, device=device, steps=steps, lr=0.01)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return steps / (time.perf_counter() - start)


def training_speed(console: Console, *, repeats: int, threads: int) -> None:
    cuda = torch.device("cuda")
    table = Table(title=f"fine-tuning steps/s on {torch.cuda.get_device_name(cuda)} (median of {repeats}, spread)")
    for column in ("case", *VARIANTS, "bf16 + channels-last / float32"):
        table.add_column(column)
    for case, (model_name, channels, size, batch) in CASES.items():
        timings: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
        for _ in range(repeats):
            for variant, (bf16, channels_last) in VARIANTS.items():
                GPU_TRAINING.bf16, GPU_TRAINING.channels_last = bf16, channels_last
                timings[variant].append(steps_per_second(model_name, channels, size, batch, device=cuda, steps=30))
        GPU_TRAINING.bf16, GPU_TRAINING.channels_last = True, True
        medians = {variant: statistics.median(values) for variant, values in timings.items()}
        cells = [f"{medians[v]:.1f} [{min(timings[v]):.1f}, {max(timings[v]):.1f}]" for v in VARIANTS]
        table.add_row(case, *cells, f"{medians['bf16 + channels-last'] / medians['float32']:.2f}x")
        console.print(f"{case}: {json.dumps({v: [round(t, 2) for t in timings[v]] for v in VARIANTS})}")
    console.print(table)
    torch.set_num_threads(threads)
    model_name, channels, size, batch = CASES["resnet18 @ 28 px, batch 128"]
    cpu = [steps_per_second(model_name, channels, size, batch, device=torch.device("cpu"), steps=10) for _ in range(2)]
    gpu = steps_per_second(model_name, channels, size, batch, device=cuda, steps=30)
    console.print(
        f"resnet18 @ 28 px on the CPU ({threads} threads): {statistics.median(cpu):.2f} steps/s; "
        f"the GPU (bf16 + channels-last) runs {gpu / statistics.median(cpu):.1f}x as many"
    )


def ranksearch(*args: str, console: Console, refusal_ok: bool = False) -> subprocess.CompletedProcess[str]:
    """One ``ranksearch`` command, as a user runs it; its output echoed, a failure fatal (with ``refusal_ok``, not a
    one-line refusal, exit code 2: e.g. nothing to export)."""
    command = [sys.executable, "-c", "from ranksearch.cli import app; app()", *args]
    console.print(f"$ ranksearch {' '.join(args)}")
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    console.print(
        done.stdout[-4000:], done.stderr[-4000:], f"({time.perf_counter() - start:.0f} s, rc {done.returncode})"
    )
    if done.returncode != 0 and not (refusal_ok and done.returncode == 2):
        raise SystemExit(f"ranksearch {args[0]} failed with exit code {done.returncode}")
    return done


def end_to_end(
    console: Console, *, results_dir: Path, data_root: Path, budget: int, threads: int, device: str, run_args: list[str]
) -> None:
    import optuna

    from ranksearch.results.record import BASELINE, PHASES, records

    common = ["--results-dir", str(results_dir)]
    ranksearch(
        "run",
        "--model",
        "resnet18",
        "--device",
        device,
        "--latency-device",
        "cpu",
        "--threads",
        str(threads),
        "--budget",
        str(budget),
        "--baseline-epochs",
        "2",
        "--promote-steps",
        "300",
        "--final-epochs",
        "1",
        "--final-top",
        "2",
        "--data-root",
        str(data_root),
        "--study-name",
        "gpu-check",
        *common,
        *run_args,
        console=console,
    )
    ranksearch("show", "gpu-check", *common, console=console)
    config = results_dir / "gpu-check.yaml"
    exported = ranksearch(
        "export",
        "gpu-check",
        "--max-accuracy-drop",
        "1.0",
        "--out",
        str(config),
        *common,
        console=console,
        refusal_ok=True,
    )
    if exported.returncode == 0:
        ranksearch("apply", "--config", str(config), "--out", str(results_dir / "gpu-check.pt"), console=console)
    study = optuna.load_study(study_name="gpu-check", storage=f"sqlite:///{results_dir / 'gpu-check' / 'study.db'}")
    trials = list(records(study))
    int8 = sum(any(choice.int8 for choice in t.compression_config().layers.values()) for t in trials if t.config)
    offered = any(name.endswith(":int8") for trial in study.trials for name in trial.params)
    console.print(f"run phases (s): {json.dumps({k: round(v, 1) for k, v in PHASES.read(study).items()})}")
    console.print(f"baseline: {json.dumps(BASELINE.read(study))}")
    console.print(
        f"int8 offered to the sampler (latency is on the CPU): {'yes' if offered else 'NO'}; "
        f"trials holding an int8 layer: {int8} of {len(trials)}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results-dir", type=Path, default=Path("results/gpu-check"))
    parser.add_argument("--data-root", type=Path, default=Path("data"))
    parser.add_argument("--budget", type=int, default=16)
    parser.add_argument("--threads", type=int, default=4, help="CPU threads of the latency measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-speed", action="store_true", help="only the end-to-end study")
    parser.add_argument("--device", default="cuda", help="where the study trains (cpu: a dry run of the script)")
    parser.add_argument("--run-args", default="", help="more `ranksearch run` options, e.g. '--train-subset 4096'")
    args = parser.parse_args()
    console = Console(width=160)
    study = {
        "results_dir": args.results_dir,
        "data_root": args.data_root,
        "budget": args.budget,
        "threads": args.threads,
        "device": args.device,
        "run_args": args.run_args.split(),
    }
    if args.device == "cpu":
        end_to_end(console, **study)
        return
    if not torch.cuda.is_available():
        console.print("gpu_check: CUDA is not available here; run it on a machine with an NVIDIA GPU")
        raise SystemExit(2)
    console.print(
        f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name()}, "
        f"bf16 {torch.cuda.is_bf16_supported()}, {os.cpu_count()} CPUs"
    )
    if not args.skip_speed:
        training_speed(console, repeats=args.repeats, threads=args.threads)
    end_to_end(console, **study)


if __name__ == "__main__":
    main()
