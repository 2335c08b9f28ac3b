"""Users' models on users' photos, end to end on this CPU: a generated 224 px RGB image folder searched with
resnet50, mobilenet_v3_large, efficientnet_b0 and a timm model (random init, small budgets, few steps).

    python benchmarks/imagefolder_models.py [--models resnet50 ...] [--size 224] [--budget 4] [--out DIR]

Writes a sample folder (``ranksearch sample-folder``), then for each model runs the commands a user runs, as
subprocesses: ``run`` (baseline of 1 epoch, 2 fine-tune steps per trial, no promotion or recovery, BatchNorm
folded), ``show``, ``export`` (the fastest config within 100 points: any config faster than the dense model) and
``apply``. Prints per model: each command's exit code and wall time, the baseline's validation accuracy, the
number of complete trials, the front and its best speedup. An ``export`` that refuses with exit code 2 because no
config was measurably faster than the dense model is a result, not a failure (``apply`` is then skipped).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

MODELS = ("resnet50", "mobilenet_v3_large", "efficientnet_b0", "timm:mobilenetv3_small_100")


def ranksearch(*args: str, log: Path) -> tuple[int, float]:
    """Run one CLI command, its output appended to ``log``; returns its exit code and wall seconds."""
    start = time.perf_counter()
    with log.open("a") as handle:
        handle.write(f"\n$ ranksearch {' '.join(args)}\n")
        handle.flush()
        code = subprocess.run([sys.executable, "-m", "ranksearch.cli", *args], stdout=handle, stderr=handle).returncode
    return code, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--train-per-class", type=int, default=40)
    parser.add_argument("--test-per-class", type=int, default=10)
    parser.add_argument("--budget", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--out", type=Path, default=None, help="where the folder, results and log go (default: a temp dir)"
    )
    args = parser.parse_args()
    work = args.out or Path(tempfile.mkdtemp(prefix="imagefolder-models-"))
    work.mkdir(parents=True, exist_ok=True)
    log = work / "commands.log"
    photos = work / "photos"
    results = work / "results"
    code, seconds = ranksearch(
        *("sample-folder", str(photos), "--size", str(args.size), "--classes", str(args.classes)),
        *("--train-per-class", str(args.train_per_class), "--test-per-class", str(args.test_per_class)),
        *("--data-root", str(work / "data")),
        log=log,
    )
    if code != 0:
        raise SystemExit(f"sample-folder failed (exit {code}); see {log}")
    console = Console(width=170)
    console.print(
        f"sample folder: {args.classes} classes x {args.train_per_class} train / {args.test_per_class} test "
        f"images at {args.size} px, written in {seconds:.0f} s; log: {log}"
    )
    table = Table(
        "model",
        "run s (exit)",
        "show s (exit)",
        "export s (exit)",
        "apply s (exit)",
        "baseline val acc",
        "complete trials",
        "front",
        "best speedup (drop pp)",
        title=f"budget {args.budget}, 1 baseline epoch, 2 fine-tune steps, batch 16, {args.threads} threads",
    )
    for model in args.models:
        study = model.replace(":", "-")
        where = ("--results-dir", str(results))
        run_code, run_s = ranksearch(
            *("run", "--model", model, "--dataset", f"imagefolder:{photos}", "--study-name", study, *where),
            *("--budget", str(args.budget), "--baseline-epochs", "1", "--finetune-steps", "2", "--batch-size", "16"),
            *("--promote-steps", "0", "--final-epochs", "0", "--threads", str(args.threads)),
            *("--data-root", str(work / "data")),
            log=log,
        )
        show_code, show_s = ranksearch("show", study, *where, log=log) if run_code == 0 else (None, 0.0)
        config = work / f"{study}.yaml"
        export_code, export_s = (
            ranksearch("export", study, "--max-accuracy-drop", "100", "--out", str(config), *where, log=log)
            if run_code == 0
            else (None, 0.0)
        )
        apply_code, apply_s = (
            ranksearch(
                "apply",
                "--config",
                str(config),
                "--out",
                str(work / f"{study}.pt"),
                "--threads",
                str(args.threads),
                log=log,
            )
            if export_code == 0
            else (None, 0.0)
        )
        summary = ["", "", "", ""]
        pareto_file = results / study / "pareto.json"
        if pareto_file.exists():
            pareto = json.loads(pareto_file.read_text())
            trials = pareto.get("front", [])
            compressed = [t for t in trials if t.get("speedup") and t["speedup"] > 1.0]
            best = max(compressed, key=lambda t: t["speedup"], default=None)
            summary = [
                f"{pareto['baseline']['accuracy']:.3f}",
                str(_complete_trials(results / study)),
                str(len(trials)),
                "none faster" if best is None else f"{best['speedup']:.2f}x ({best['accuracy_drop_pp']:+.1f})",
            ]
        table.add_row(
            model,
            f"{run_s:.0f} ({run_code})",
            f"{show_s:.0f} ({show_code})",
            f"{export_s:.0f} ({export_code})",
            f"{apply_s:.0f} ({apply_code})",
            *summary,
        )
    console.print(table)


def _complete_trials(directory: Path) -> int:
    import pandas as pd

    trials = pd.read_csv(directory / "trials.csv")
    return int((trials["state"] == "COMPLETE").sum())


if __name__ == "__main__":
    main()
