"""Does the search beat what a user would do by hand? ranksearch's default against three baselines.

    python benchmarks/compare.py [--budget 50] [--threads 2] [--results-dir results/compare]

On the default problem (resnet18, Fashion-MNIST, CPU latency, the default search space and evaluator):

- ranksearch: ``ranksearch run`` as shipped (TPE, latency table, sensitivity warm starts, early rejection);
- random: random sampling, none of the above (the same five anchors start it);
- uniform: one technique at one fraction of full rank on every layer, swept over techniques and fractions;
- greedy: the equal-sensitivity configs of the sensitivity pass alone, at more levels than the search queues.

Every config is scored by the same evaluator (fine-tuned, measured latency with the dense model timed beside
it); each method's Pareto front on validation accuracy and latency is then scored on the test split. Reported:
best speedup within 0.5 and 1.0 points of test-accuracy drop, the params reduction there, the hypervolume
of the front (speedup above 1x times test accuracy above the baseline's minus 5 points) and wall time.
ranksearch runs first, on cold caches (factorizations, latency table, sensitivity); the others reuse them.
Writes ``compare.md`` (the table) and ``compare.png`` (the fronts) to the results directory.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import matplotlib
import optuna
import torch
from rich.console import Console
from rich.table import Table

from ranksearch.compress import dense_model_cost, model_cost
from ranksearch.config import CompressionConfig
from ranksearch.evaluate.classification import ClassificationEvaluator
from ranksearch.models import model_family
from ranksearch.results import front_trials
from ranksearch.results.hypervolume import hypervolume_2d
from ranksearch.results.record import BASELINE, TEST_ACCURACY, TrialRecord, records
from ranksearch.search import default_space_path, uniform_config
from ranksearch.study import PreparedSearch, RunContext, RunSettings, run_search
from ranksearch.study.problem import load_space
from ranksearch.util import atomic_write_text, file_digest

matplotlib.use("Agg")
import matplotlib.pyplot as plt

UNIFORM_TECHNIQUES = ("svd", "spatial_svd", "tucker2", "spatial_tucker2")
FRACTIONS = (0.125, 0.25, 0.375, 0.5, 0.75)
GREEDY_LEVELS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
HV_DROP = 5.0
"""Hypervolume region: test accuracy within this many points of the baseline's, speedup above 1x."""


@dataclass(frozen=True)
class Point:
    """A front member: measured speedup, test accuracy and params."""

    speedup: float
    test_accuracy: float
    params: int


@dataclass
class Outcome:
    name: str
    evaluated: int
    front: list[Point]
    seconds: float


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--results-dir", type=Path, default=Path("results/compare"))
    parser.add_argument(
        "--also-max-zero-shot-drop",
        type=float,
        action="append",
        default=[],
        help="also run ranksearch with this --max-zero-shot-drop (repeatable)",
    )
    args = parser.parse_args()
    console = Console()
    torch.set_num_threads(args.threads)
    base = RunSettings.of(model="resnet18", budget=args.budget, threads=args.threads, results_dir=args.results_dir)
    searched, phases, study = _study("ranksearch", base, console)
    outcomes = [searched]

    device = torch.device("cpu")
    space_path = default_space_path(model_family(base.problem.model))
    settings = base.replace(study_name=study.study_name, space=space_path, space_digest=file_digest(space_path))
    start = time.perf_counter()
    search, _ = PreparedSearch.prepare(
        settings, space=load_space(space_path, device, console), open_study=lambda: study, console=console
    )
    assert search.sensitivity is not None and search.table is not None
    context, evaluator, slots, space = search.context, search.evaluator, search.slots, search.space
    greedy = search.sensitivity.greedy_configs(
        slots, search.variant_cost(), rank_multiple=space.rank_multiple, levels=GREEDY_LEVELS
    )
    # greedy alone needs the table and the sensitivity pass: the cold times the search paid for them
    prepare = phases.get("latency_table", 0.0) + phases.get("sensitivity", 0.0) + time.perf_counter() - start
    outcomes.append(
        _remembered(
            args.results_dir / "compare-greedy.json",
            lambda: _direct("greedy", list(greedy.values()), evaluator, context, console, extra_seconds=prepare),
        )
    )
    uniform = [
        uniform_config(slots, technique, fraction, rank_multiple=space.rank_multiple)
        for technique in UNIFORM_TECHNIQUES
        for fraction in FRACTIONS
    ]
    outcomes.append(
        _remembered(
            args.results_dir / "compare-uniform.json", lambda: _direct("uniform", uniform, evaluator, context, console)
        )
    )
    random_settings = base.replace(sampler="random", latency_table=False, sensitivity=False, early_reject=False)
    outcomes.append(_study("random", random_settings, console)[0])
    for drop in args.also_max_zero_shot_drop:
        outcomes.append(_study(f"ranksearch-zero-shot-{drop:g}pp", base.replace(max_zero_shot_drop=drop), console)[0])

    baseline = float(BASELINE.read(study)["test_accuracy"])
    dense_params = sum(p.numel() for p in context.model.parameters())
    _report(outcomes, baseline, dense_params, args.results_dir, console)


def _study(name: str, settings: RunSettings, console: Console) -> tuple[Outcome, dict[str, float], optuna.Study]:
    console.rule(f"{name}: ranksearch run")
    start = time.perf_counter()
    result = run_search(settings.replace(study_name=f"compare-{name}"), console=console)
    # a rerun of the benchmark resumes the finished study in seconds: keep the first run's times
    seconds = result.study.user_attrs.get("compare_wall_s") or time.perf_counter() - start
    phases = result.study.user_attrs.get("compare_phases") or result.phase_seconds
    result.study.set_user_attr("compare_wall_s", seconds)
    result.study.set_user_attr("compare_phases", phases)
    tests = TEST_ACCURACY.read(result.study)
    front = [
        Point(t.speedup, tests[str(t.number)], t.cost["params"])
        for t in map(TrialRecord.of, front_trials(result.study))
        if str(t.number) in tests
    ]
    evaluated = sum(t.counts_toward_budget for t in records(result.study))
    return Outcome(name, evaluated, front, seconds), phases, result.study


def _direct(
    name: str,
    configs: list[CompressionConfig],
    evaluator: ClassificationEvaluator,
    context: RunContext,
    console: Console,
    *,
    extra_seconds: float = 0.0,
) -> Outcome:
    """Evaluate ``configs`` as the search would, keep the validation front, score it on the test split."""
    console.rule(f"{name}: {len(configs)} configs")
    start = time.perf_counter()
    dense = dense_model_cost(context.model, context.example)
    scored = []
    for i, config in enumerate(configs, start=1):
        metrics = evaluator.evaluate(config, split="val")
        params = model_cost(context.model, config, context.input_shapes, dense=dense).params
        scored.append((config, metrics, params))
        console.print(
            f"{name} {i}/{len(configs)}: val {100 * metrics.accuracy:.2f} %, "
            f"{metrics.reference_latency_ms / metrics.latency_ms:.2f}x"
        )
    front = [
        entry
        for entry in scored
        if not any(
            o[1].accuracy >= entry[1].accuracy
            and o[1].latency_ms <= entry[1].latency_ms
            and (o[1].accuracy > entry[1].accuracy or o[1].latency_ms < entry[1].latency_ms)
            for o in scored
        )
    ]
    points = [
        Point(
            metrics.reference_latency_ms / metrics.latency_ms,
            evaluator.evaluate(config, split="test").accuracy,
            params,
        )
        for config, metrics, params in front
    ]
    return Outcome(name, len(configs), points, time.perf_counter() - start + extra_seconds)


def _remembered(path: Path, evaluate: Callable[[], Outcome]) -> Outcome:
    """A direct method's outcome, kept in ``path`` so that a rerun of the benchmark does not evaluate it again."""
    if path.is_file():
        data = json.loads(path.read_text())
        return Outcome(data["name"], data["evaluated"], [Point(**p) for p in data["front"]], data["seconds"])
    outcome = evaluate()
    atomic_write_text(path, json.dumps(asdict(outcome)))
    return outcome


def hypervolume(points: list[Point], baseline: float, max_drop: float = HV_DROP) -> float:
    """Area dominated by ``points`` in (speedup - 1) x (test accuracy points above baseline - max_drop)."""
    reference = (100 * baseline - max_drop, -1.0)  # speedup is maximized: negated, it is minimized like a latency
    return hypervolume_2d(((100 * p.test_accuracy, -p.speedup) for p in points), reference)


def _best_within(points: list[Point], baseline: float, drop: float) -> Point | None:
    within = [p for p in points if 100 * (baseline - p.test_accuracy) <= drop]
    return max(within, key=lambda p: p.speedup, default=None)


def _report(outcomes: list[Outcome], baseline: float, dense_params: int, out: Path, console: Console) -> None:
    columns = (
        "method",
        "configs evaluated",
        "best speedup, <= 0.5 pp",
        "params reduction there",
        "best speedup, <= 1.0 pp",
        "params reduction there",
        f"hypervolume (<= {HV_DROP:g} pp)",
        "wall time s",
    )
    table = Table(title=f"resnet18 / Fashion-MNIST, CPU; baseline test accuracy {100 * baseline:.2f} %")
    for column in columns:
        table.add_column(column, justify="left" if column == "method" else "right")
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for outcome in outcomes:
        cells = [outcome.name, str(outcome.evaluated)]
        for drop in (0.5, 1.0):
            best = _best_within(outcome.front, baseline, drop)
            cells += [f"{best.speedup:.2f}x", f"{dense_params / best.params:.2f}x"] if best else ["-", "-"]
        cells += [f"{hypervolume(outcome.front, baseline):.2f}", f"{outcome.seconds:.0f}"]
        table.add_row(*cells)
        lines.append("| " + " | ".join(cells) + " |")
    console.print(table)
    atomic_write_text(out / "compare.md", "\n".join(lines) + "\n")
    figure, axes = plt.subplots(figsize=(8, 5))
    for outcome in outcomes:
        front = sorted(outcome.front, key=lambda p: p.speedup)
        axes.plot(
            [p.speedup for p in front],
            [100 * (baseline - p.test_accuracy) for p in front],
            marker="o",
            drawstyle="steps-post",
            label=f"{outcome.name} (HV {hypervolume(outcome.front, baseline):.2f})",
        )
    axes.axhline(1.0, color="grey", linestyle=":", linewidth=1)
    axes.axhline(0.5, color="grey", linestyle=":", linewidth=1)
    axes.set_xlabel("measured speedup over the dense model (x)")
    axes.set_ylabel("test accuracy drop (points)")
    axes.set_ylim(-0.5, HV_DROP + 1)
    axes.invert_yaxis()
    axes.set_title("Pareto fronts on the test split: up and right is better")
    axes.legend()
    figure.tight_layout()
    tmp = out / ".compare.png.tmp"
    figure.savefig(tmp, format="png", dpi=120)
    tmp.replace(out / "compare.png")
    console.print(f"table: {out / 'compare.md'}; plot: {out / 'compare.png'}")


if __name__ == "__main__":
    main()
