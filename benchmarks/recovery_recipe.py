"""Which recipe should the recovery fine-tune use? Finished trials recovered by several, scored twice.

    python benchmarks/recovery_recipe.py STUDY_DIR:TRIAL [STUDY_DIR:TRIAL ...] [--lrs 0.01 0.03 0.1]
        [--feature-weights 0] [--epochs 2] [--seeds 0 1] [--threads 2] [--continue-recovered] [--out FILE]

Each ``STUDY_DIR:TRIAL`` names a complete trial of a finished study (its directory, e.g.
``results/compare-s0-new/seed-0/compare-ranksearch:56``). The study's problem is rebuilt from its stored settings
(its trained dense model and data), and the trial's config is recovered as the recovery stage recovers it
(:meth:`ranksearch.study.recovery.Recoverer.finetuned`: BatchNorm recalibrated, ``--epochs`` epochs of distillation
from the dense model, a warm-up then cosine decay, int8 layers quantized) once per recipe (each peak learning rate in
``--lrs`` with each weight in ``--feature-weights`` of matching the dense model's block outputs) and fine-tune seed
in ``--seeds`` (the seed shuffles the training split). ``--continue-recovered`` starts each run from the model the
study's recovery saved for the trial instead (its recorded drops printed first) and distils it ``--epochs`` more, a
second warm-up and cosine decay: what more epochs for a member already recovered would buy. Each recovered model is
scored against
the dense model on the same images of the full validation split (what a recipe should be chosen on) and of the test
split (what the recovery stage reports), each as a paired drop in points with its 95 % interval. Nothing is written
to the studies. The runs of one trial share the dense model's outputs per batch, as the recovery stage's members do,
so a seed's first run pays the dense model's passes and its later runs' seconds do not.

It prints one row per trial and recipe (the median drop over the seeds, and their range) and, per recipe, the median
over the trials; ``--out`` also writes every run as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import optuna
from optuna.trial import TrialState
from rich.console import Console
from rich.table import Table

from ranksearch.data import make_loader
from ranksearch.measure.latency import torch_threads
from ranksearch.results import load_study
from ranksearch.results.confidence import paired_drop
from ranksearch.results.record import RECOVERED, TrialRecord
from ranksearch.study.recovery import RecoveredTrial, Recoverer, load_recovered, load_study_problem
from ranksearch.study.settings import RecoveryRecipe, RecoverySpec
from ranksearch.training import TeacherCache, correct_predictions
from ranksearch.util import atomic_write_text


@dataclass(frozen=True)
class Run:
    """One trial recovered by one recipe with one fine-tune seed."""

    target: str
    lr: float
    feature_weight: float
    seed: int
    continued: bool
    val_drop_pp: float
    test_drop_pp: float
    test_high_pp: float
    seconds: float


def parse_target(text: str) -> tuple[Path, int]:
    """``DIR:TRIAL`` as the study directory and the trial number."""
    directory, _, number = text.rpartition(":")
    if not directory or not number.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: pass STUDY_DIR:TRIAL, e.g. results/compare-ranksearch:56")
    return Path(directory), int(number)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("targets", nargs="+", type=parse_target, metavar="STUDY_DIR:TRIAL")
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.01, 0.03, 0.1])
    parser.add_argument("--feature-weights", type=float, nargs="+", default=[RecoverySpec.final_feature_weight])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--continue-recovered",
        action="store_true",
        help="start from the trial's recovered model (the study's recovery stage or `ranksearch finetune` saved it)",
    )
    parser.add_argument("--out", type=Path, help="also write every run as JSON")
    args = parser.parse_args()
    if args.epochs < 1 or not args.seeds or min(args.lrs) <= 0 or min(args.feature_weights) < 0:
        parser.error("--epochs must be 1 or more, --seeds non-empty, every --lrs positive and --feature-weights >= 0")
    recipes = [
        RecoveryRecipe(epochs=args.epochs, lr=lr, feature_weight=weight)
        for lr in args.lrs
        for weight in args.feature_weights
    ]
    console = Console(stderr=True)
    runs: list[Run] = []
    start = time.perf_counter()
    with torch_threads(args.threads), tempfile.TemporaryDirectory() as scratch:
        for directory, number in args.targets:
            runs += recover_target(
                directory,
                number,
                recipes=recipes,
                seeds=args.seeds,
                scratch=Path(scratch),
                console=console,
                continue_recovered=args.continue_recovered,
            )
    print_tables(runs, recipes=recipes, console=Console(width=160))
    more = " more" if args.continue_recovered else ""
    print(f"{len(runs)} recoveries of {args.epochs}{more} epochs in {time.perf_counter() - start:.0f} s")
    if args.out is not None:
        atomic_write_text(args.out, json.dumps([asdict(run) for run in runs], indent=1) + "\n")


def recover_target(
    directory: Path,
    number: int,
    *,
    recipes: list[RecoveryRecipe],
    seeds: list[int],
    scratch: Path,
    console: Console,
    continue_recovered: bool = False,
) -> list[Run]:
    """Trial ``number`` of the study in ``directory`` recovered by every recipe with every seed (from its recorded
    recovery's model where ``continue_recovered``)."""
    study = load_study(directory)
    context = load_study_problem(study, console)
    recoverer = Recoverer(  # the recipes of one seed fine-tune on the same batches: one teacher pass each
        study=study, context=context, directory=scratch, console=console, teacher_cache=TeacherCache()
    )
    trials = study.get_trials(deepcopy=False)
    if not 0 <= number < len(trials) or trials[number].state != TrialState.COMPLETE:
        raise SystemExit(f"{directory}:{number}: not a complete trial of that study; pick one from `ranksearch show`")
    config = TrialRecord.of(trials[number]).compression_config()
    if continue_recovered and config.split_int8()[1]:
        raise SystemExit(f"{directory}:{number}: has int8 layers, held quantized in its recovered model; drop it")
    splits = context.splits
    val = make_loader(splits.val if splits.full_val is None else splits.full_val, batch_size=256, shuffle=False)
    dense_val = correct_predictions(context.model, val, device=context.device)
    test = recoverer.test_loader()
    target = f"{directory.parent.name}/{directory.name}:{number}"
    checkpoint = recorded_model(study, number, directory) if continue_recovered else None
    runs = []
    for recipe in recipes:
        for seed in seeds:
            began = time.perf_counter()
            label = f"{target} {_label(recipe)}"
            start = None if checkpoint is None else load_recovered(checkpoint)
            model, _, device = recoverer.finetuned(config, recipe, label=label, seed=seed, start=start)
            val_drop = paired_drop(dense_val, correct_predictions(model, val, device=device))
            test_drop = paired_drop(recoverer.dense_correct(), correct_predictions(model, test, device=device))
            run = Run(
                target=target,
                lr=recipe.lr,
                feature_weight=recipe.feature_weight,
                seed=seed,
                continued=checkpoint is not None,
                val_drop_pp=val_drop.drop_pp,
                test_drop_pp=test_drop.drop_pp,
                test_high_pp=test_drop.high_pp,
                seconds=time.perf_counter() - began,
            )
            console.print(
                f"{label} seed {seed}: validation drop {val_drop.label()}, test drop "
                f"{test_drop.label()} ({run.seconds:.0f} s)"
            )
            runs.append(run)
    return runs


def recorded_model(study: optuna.Study, number: int, directory: Path) -> Path:
    """Where the model of trial ``number``'s recorded recovery is, its recorded drops printed."""
    stored = RECOVERED.read(study).get(str(number))
    if stored is None:
        raise SystemExit(f"{directory}:{number}: never recovered; drop --continue-recovered or recover it first")
    recovered = RecoveredTrial.from_dict(number, stored, directory=directory)
    validation = "-" if recovered.validation is None else recovered.validation.label()
    print(
        f"{directory.name}:{number} as recorded ({recovered.recipe.describe()}): validation drop {validation}, "
        f"test drop {recovered.drop.label()}"
    )
    return recovered.checkpoint


def _label(recipe: RecoveryRecipe) -> str:
    return f"lr {recipe.lr:g}, features {recipe.feature_weight:g}"


def _runs_of(runs: list[Run], target: str, recipe: RecoveryRecipe) -> list[Run]:
    return [r for r in runs if r.target == target and (r.lr, r.feature_weight) == (recipe.lr, recipe.feature_weight)]


def _median_range(values: list[float]) -> str:
    return f"{statistics.median(values):+.2f} ({min(values):+.2f} to {max(values):+.2f})"


def print_tables(runs: list[Run], *, recipes: list[RecoveryRecipe], console: Console) -> None:
    """Per trial and recipe, the drops' median over the seeds; then per recipe over the trials."""
    table = Table(title="Recovered drop against the dense model, points (median over seeds, range)")
    for column in ("trial", "recipe", "validation drop", "test drop", "test drop, 95 % upper end"):
        table.add_column(column)
    targets = list(dict.fromkeys(run.target for run in runs))
    for target in targets:
        for recipe in recipes:
            mine = _runs_of(runs, target, recipe)
            table.add_row(
                target,
                _label(recipe),
                _median_range([r.val_drop_pp for r in mine]),
                _median_range([r.test_drop_pp for r in mine]),
                _median_range([r.test_high_pp for r in mine]),
            )
    console.print(table)
    summary = Table(title="Per recipe: the median over trials of each trial's median drop")
    for column in ("recipe", "validation drop", "test drop", "trials best on validation"):
        summary.add_column(column)
    per_target = {
        (t, i): statistics.median(r.val_drop_pp for r in _runs_of(runs, t, recipe))
        for t in targets
        for i, recipe in enumerate(recipes)
    }
    for i, recipe in enumerate(recipes):
        val = [per_target[t, i] for t in targets]
        test = [statistics.median(r.test_drop_pp for r in _runs_of(runs, t, recipe)) for t in targets]
        best = sum(min(range(len(recipes)), key=lambda j, t=t: per_target[t, j]) == i for t in targets)
        summary.add_row(_label(recipe), f"{statistics.median(val):+.2f}", f"{statistics.median(test):+.2f}", str(best))
    console.print(summary)


if __name__ == "__main__":
    main()
