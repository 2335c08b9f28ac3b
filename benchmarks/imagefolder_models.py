"""Users' models on users' photos, end to end on this CPU: a generated 224 px RGB image folder searched with
resnet50, mobilenet_v3_large, efficientnet_b0 and a timm model (random init, small budgets, few steps).

    python benchmarks/imagefolder_models.py [--models resnet50 ...] [--size 224] [--budget 4] [--out DIR]

Writes a sample folder (``ranksearch sample-folder``; by default 10 classes x 250 training and 50 test images),
then for each model runs the commands a user runs, as subprocesses: ``run`` (a baseline of 1 epoch on
``--train-subset`` images, 2 fine-tune steps per trial, ``--eval-subset`` validation and test images, no promotion
or recovery, BatchNorm folded; without the latency table and the sensitivity pass, which time and score every
layer variant, unless ``--screens``), ``show``, ``export`` (the fastest config within 100 points: any config
faster than the dense model) and ``apply``. Prints per model: each command's exit code and wall time, the
baseline's validation accuracy, the number of complete trials, the front and its best speedup; then the run's
seconds per phase. An ``export`` that refuses with exit code 2 because no config was measurably faster than the
dense model is a result, not a failure (``apply`` is then skipped).
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
PHASES = (
    "baseline_training",
    "latency_table",
    "sensitivity",
    "trials (wall)",
    "apply",
    "recalibrate",
    "finetune",
    "accuracy",
    "latency",
    "test_front",
)


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
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--train-per-class", type=int, default=250)
    parser.add_argument("--test-per-class", type=int, default=50)
    parser.add_argument("--train-subset", type=int, default=320)
    parser.add_argument("--eval-subset", type=int, default=160)
    parser.add_argument("--budget", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--screens", action="store_true", help="build the latency table and the sensitivity pass")
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
            *("--train-subset", str(args.train_subset), "--eval-subset", str(args.eval_subset)),
            *(() if args.screens else ("--no-latency-table", "--no-sensitivity")),
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
    phases = Table("model", *PHASES, title="run: seconds per phase")
    for model in args.models:
        seconds = _phases(results / model.replace(":", "-"))
        phases.add_row(model, *(f"{seconds[p]:.1f}" if p in seconds else "" for p in PHASES))
    console.print(phases)


def _phases(directory: Path) -> dict[str, float]:
    """The run's seconds per phase, as it printed them (empty when the study is missing)."""
    import optuna

    from ranksearch.results.phases import phase_seconds
    from ranksearch.results.record import PHASES as STUDY_PHASES

    database = directory / "study.db"
    if not database.exists():
        return {}
    study = optuna.load_study(study_name=directory.name, storage=f"sqlite:///{database}")
    return {**STUDY_PHASES.read(study), **phase_seconds(study)}


def _complete_trials(directory: Path) -> int:
    import pandas as pd

    trials = pd.read_csv(directory / "trials.csv")
    return int((trials["state"] == "COMPLETE").sum())


if __name__ == "__main__":
    main()
