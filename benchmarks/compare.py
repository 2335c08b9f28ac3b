"""Does the search beat what a user would do by hand, after the fine-tune the user will run? Against baselines.

    python benchmarks/compare.py [--budget 50] [--seeds 0 1 2] [--threads 2] [--final-epochs 3] [--final-lr 0.03]
                                 [--methods ranksearch knapsack with-greedy fill-gaps nsga2 previous random random-time
                                            uniform greedy]
                                 [--latency-backend torch|onnxruntime] [--retime-backend torch|onnxruntime]
                                 [--results-dir results/compare]
                                 [--merge docs/compare/*/compare.json] [--speedups-from OLD/compare.json]
                                 [--pool OLD/compare.json ...]

On the default problem (resnet18, Fashion-MNIST, CPU latency, the default search space and evaluator), per seed:

- ranksearch: ``ranksearch run`` as shipped (TPE, knapsack and greedy warm starts, promotion rungs, recovery);
- knapsack: the same with ``--warm-starts knapsack``: the knapsack's warm starts alone (the default from 2026-12-01
  to 2026-12-04, when ``ranksearch`` outcomes were this);
- with-greedy: the same with ``--warm-starts knapsack+greedy``, named: the default since 2026-12-05 (earlier runs'
  ``ranksearch`` studies, read as they are, were the knapsack's alone);
- fill-gaps: the same with ``--fill-gaps``: after the warm starts, the knapsack configs in the measured front's widest
  gaps instead of TPE's trials;
- nsga2: the same with NSGA-II, its first population seeded by the same warm starts;
- previous: the default before 2026-12-01 (TPE, equal-sensitivity greedy warm starts, no promotion);
- random: random sampling with none of the screens, at the same trial count;
- random-time: the same at ranksearch's wall-clock time instead (its trial time as ``--timeout``);
- uniform: one technique at one fraction of full rank on every layer, swept over techniques and fractions;
- greedy: the equal-sensitivity configs of the sensitivity pass alone, at more levels than a search queues.

Every method is a study scored by the same evaluator, paired latency and rules: its front members are measurably
faster than the dense model, are tested on the test split with paired intervals, and the same number of them
(``--final-top``) is recovered by the same fine-tune (``--final-epochs``). Reported per method, as the median and
range over the seeds: the best recovered speedup within 0.5 and 1.0 test points of the dense model, the params and
MACs reduction there, the fastest uniform config's speedup (what the space offers), the hypervolume of the recovered
front, wall time and the recovery stage's share of it, front members not measurably faster than dense in their study
(must be 0), recovered members whose speedup in the table is under 1x (a re-timing, or another target, can put one
there), and Kendall's tau between the searched accuracy and the recovered one. Writes ``compare.md``,
``compare.json`` and ``compare.png`` (recovered fronts).
The speedups are those of a side-by-side re-timing once all of a seed's methods ran (``--retime-sweeps``; each
study times its configs at another hour, and on a shared machine that moves a config's speedup by 20 %), in
``--retime-backend``: a search timed in eager torch can have its recovered members timed in ONNX Runtime.
A rerun resumes an unfinished study and reads a finished one as it is, with its first wall time; one whose members
were recovered otherwise than ``--final-epochs`` and ``--final-lr`` say is recovered again (the same members; its
wall time then counts the new recoveries' time instead of the first's), and
``--speedups-from`` an earlier ``compare.json`` gives them that run's side-by-side speedups instead of timing them
again. ``--merge`` adds
the outcomes of earlier runs' ``compare.json`` files (a method and seed run here replaces the same pair read from
them), so the methods over three seeds can be run a few at a time (``--seeds`` with no seed only merges);
the table names every processor it was timed on. Two re-timings of the same members hours apart can differ by 30 %
where each one's sweeps agree within 7 %: ``--pool`` earlier runs' ``compare.json`` files, and each member's speedup
becomes the median over every re-timing of it (this run's and theirs, on one host and target; the fastest uniform
config's likewise). Rerunning finished studies costs only a new re-timing, so ``--seeds 0 --methods ranksearch uniform
--pool OLD/compare.json`` adds one to the pool.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import matplotlib
import optuna
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from scipy.stats import kendalltau

from ranksearch.config import CompressionConfig
from ranksearch.evaluate import PairedTiming
from ranksearch.measure.backends import latency_backend_title
from ranksearch.measure.timers import cpu_name
from ranksearch.models import model_family
from ranksearch.results import STORAGE_FILE
from ranksearch.results.front import compresses_nothing, front_with_speeds, study_speeds
from ranksearch.results.hypervolume import hypervolume_2d
from ranksearch.results.record import BASELINE, StudyRecord, TrialRecord, anchor_attrs, records
from ranksearch.search import config_to_params, default_space_path, uniform_config
from ranksearch.study import PreparedSearch, RunSettings, run_search
from ranksearch.study.front import RETIME_ROUNDS, RETIME_SECONDS
from ranksearch.study.problem import load_space
from ranksearch.study.recovery import load_study_problem, recover_front, recovery_plan
from ranksearch.study.settings import RecoverySpec
from ranksearch.study.storage import open_study
from ranksearch.util import atomic_write_text, file_digest

matplotlib.use("Agg")
import matplotlib.pyplot as plt

METHODS = (
    "ranksearch",
    "knapsack",
    "with-greedy",
    "fill-gaps",
    "nsga2",
    "previous",
    "random",
    "random-time",
    "uniform",
    "greedy",
)
DEFAULT_METHODS = tuple(method for method in METHODS if method not in ("knapsack", "with-greedy", "fill-gaps"))
"""What a plain run compares (``--fill-gaps`` is off by default; pass ``--methods ... fill-gaps`` to add it)."""
UNIFORM_TECHNIQUES = ("svd", "spatial_svd", "tucker2", "spatial_tucker2")
FRACTIONS = (0.125, 0.25, 0.375, 0.5, 0.75)
GREEDY_LEVELS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
UNIFORM_RETIMED = 4
"""The uniform sweep's fastest configs (by their study's speedups) re-timed side by side for the fastest uniform."""
HV_DROP = 5.0
"""Hypervolume region: recovered test accuracy within this many points of the dense model's, speedup above 1x."""


@dataclass(frozen=True)
class Point:
    """A recovered front member: its speedup beside the dense model, recovered test accuracy, costs, and the
    accuracy the search measured for it."""

    trial: int
    speedup: float
    test_accuracy: float
    drop_high_pp: float
    params: int
    macs: int
    searched_accuracy: float
    study_speedup: float | None = None
    """The speedup its study measured, where ``speedup`` is a side-by-side re-timing's (:func:`retime_side_by_side`)."""


@dataclass(frozen=True)
class Retiming:
    """One side-by-side re-timing of a seed's members (:func:`retime_side_by_side`): each member's speedup, the
    median of that re-timing's sweeps, and the fastest uniform config's (``None`` where the uniform sweep was not
    timed in it)."""

    session: str
    """What tells one re-timing from another: when it ran (one from before this record: its seed and its sweeps'
    spread, which every method timed in it shares)."""
    host: str
    speedups: tuple[tuple[int, float], ...]
    """(trial, speedup) for each member it timed."""
    fastest_uniform: float | None

    @classmethod
    def from_json(cls, data: dict[str, object]) -> Retiming:
        pairs = tuple((int(trial), float(speedup)) for trial, speedup in data["speedups"])  # type: ignore[attr-defined]
        return cls(**{**data, "speedups": pairs})  # type: ignore[arg-type]

    def speedup_of(self, trial: int) -> float | None:
        return dict(self.speedups).get(trial)


@dataclass
class Outcome:
    """One method on one seed."""

    method: str
    seed: int
    evaluated: int
    seconds: float
    front: list[Point]
    dense_test_accuracy: float
    dense_params: int
    dense_macs: int
    front_size: int
    not_faster: int
    """Front members (the dense model aside) not measurably faster than the dense model: must be 0."""
    fastest_uniform: float | None = None
    extra: dict[str, float] = field(default_factory=dict)
    host: str = ""
    """The processor the study was timed on (outcomes merged from earlier runs may come from another host)."""
    timed_in: str = "torch"
    """The latency target its speedups were timed in: its study's, or the side-by-side re-timing's."""
    recovery_lr: float = 0.01
    """The peak learning rate its front members were recovered with (``--final-lr``; runs before it: 0.01)."""
    recovery_epochs: int = 2
    """The epochs its front members were recovered for (``--final-epochs``; runs before it recorded none: 2)."""
    recovery_feature_weight: float = 0.0
    """The weight its recoveries matched the dense model's block outputs at (``--final-feature-weight``; runs before
    it: 0, logits only)."""
    retimings: list[Retiming] = field(default_factory=list)
    """The side-by-side re-timings its members' speedups are the median of (:func:`pool_retimings`); none: its
    study's own timings."""

    @classmethod
    def from_json(cls, data: dict[str, object]) -> Outcome:
        """An outcome as :func:`report` wrote it to ``compare.json``. One re-timed before re-timings were recorded
        gets its one re-timing back from its speedups."""
        front = [Point(**point) for point in data["front"]]  # type: ignore[attr-defined]
        retimings = [Retiming.from_json(r) for r in data.get("retimings", [])]  # type: ignore[attr-defined]
        outcome = cls(**{**data, "front": front, "retimings": retimings})  # type: ignore[arg-type]
        spread = outcome.extra.get("retimed_spread_pct")
        if not retimings and spread is not None:
            outcome.retimings = [
                Retiming(
                    session=f"seed {outcome.seed}, sweeps {spread!r} % apart",
                    host=outcome.host,
                    speedups=tuple((p.trial, p.speedup) for p in front),
                    fastest_uniform=outcome.fastest_uniform,
                )
            ]
        return outcome

    def retimed_speedups(self, trial: int) -> list[float]:
        """``trial``'s speedup in each of its re-timings that timed it."""
        return [s for r in self.retimings if (s := r.speedup_of(trial)) is not None]

    @property
    def search_seconds(self) -> float:
        """Wall time without training the dense model (a seed that trains it pays that once, for every method)."""
        return self.seconds - self.extra.get("baseline_training", 0.0)

    def best_within(self, drop_pp: float) -> Point | None:
        within = [p for p in self.front if 100 * (self.dense_test_accuracy - p.test_accuracy) <= drop_pp]
        return max(within, key=lambda p: p.speedup, default=None)

    def nondominated(self) -> list[Point]:
        """The recovered members no other recovered member beats on both speedup and test accuracy, slowest first:
        a side-by-side re-timing or the recovery can leave a member of its study's front dominated here."""
        kept: list[Point] = []
        for point in sorted(self.front, key=lambda p: (-p.speedup, -p.test_accuracy)):
            if not kept or point.test_accuracy > kept[-1].test_accuracy:
                kept.append(point)
        return kept[::-1]

    def hypervolume(self) -> float:
        """Area dominated by the recovered front in (speedup - 1) x (test accuracy above dense - HV_DROP points)."""
        reference = (100 * self.dense_test_accuracy - HV_DROP, -1.0)
        return hypervolume_2d(((100 * p.test_accuracy, -p.speedup) for p in self.front), reference)

    def recovery_share(self) -> float | None:
        """The recovery stage's share of the wall time without baseline training."""
        recovery = self.extra.get("recovery")
        return None if recovery is None or self.search_seconds <= 0 else recovery / self.search_seconds

    def tau(self) -> float | None:
        """Kendall's tau between the searched accuracy and the recovered one over the recovered configs."""
        if len(self.front) < 3:
            return None
        value = kendalltau([p.searched_accuracy for p in self.front], [p.test_accuracy for p in self.front])[0]
        return None if value != value else float(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=int, default=50)
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2], help="none: only report --merge's")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--final-epochs", type=int, default=RecoverySpec.final_epochs, help="recovery epochs, the same for every method"
    )
    parser.add_argument(
        "--final-top", type=int, default=RecoverySpec.final_top, help="front members recovered per method"
    )
    parser.add_argument(
        "--final-lr",
        type=float,
        default=RecoverySpec.final_lr,
        help="recovery peak learning rate, the same for every method (a finished study recovered at another is "
        "recovered again)",
    )
    parser.add_argument(
        "--final-feature-weight",
        type=float,
        default=RecoverySpec.final_feature_weight,
        help="weight of matching the dense model's block outputs in every recovery (0: logits only)",
    )
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=METHODS)
    parser.add_argument(
        "--latency-backend", default="torch", choices=("torch", "onnxruntime"), help="what speedups are timed in"
    )
    parser.add_argument(
        "--retime-backend",
        default=None,
        choices=("torch", "onnxruntime"),
        help="what the side-by-side re-timing times in (default: --latency-backend)",
    )
    parser.add_argument("--results-dir", type=Path, default=None, help="default: results/compare[-onnxruntime]")
    parser.add_argument(
        "--merge", type=Path, nargs="*", default=[], help="earlier runs' compare.json, reported with this run's"
    )
    parser.add_argument(
        "--speedups-from",
        type=Path,
        help="an earlier run's compare.json: the same members take its side-by-side speedups instead of being "
        "re-timed (to recover finished studies again, e.g. at another --final-lr, with nothing timed)",
    )
    parser.add_argument(
        "--pool",
        type=Path,
        nargs="*",
        default=[],
        help="earlier runs' compare.json whose side-by-side re-timings of the same studies' members are pooled with "
        "this run's: each member's speedup is the median over the re-timings (on one host, in one target)",
    )
    parser.add_argument(
        "--retime-sweeps",
        type=int,
        default=3,
        help="sweeps re-timing every method's recovered members side by side once a seed's methods ran (0: off)",
    )
    args = parser.parse_args()
    if not args.seeds and not args.merge:
        parser.error("--seeds with no seed only reports --merge's files; pass seeds to run or files to merge")
    retime_backend = args.retime_backend or args.latency_backend
    sweeps = 0 if args.speedups_from else args.retime_sweeps
    timed = [Outcome.from_json(d) for d in json.loads(args.speedups_from.read_text())] if args.speedups_from else []
    run_target = retime_backend if sweeps else timed[0].timed_in if timed else args.latency_backend
    earlier = [Outcome.from_json(data) for path in args.merge for data in json.loads(path.read_text())]
    # a seed's fastest uniform config, the table's title and its recovery line take one target and one recipe
    for what, found, here in (
        ("timed in", {o.timed_in for o in merged(earlier)}, run_target),
        ("recovered at peak learning rates", {f"{o.recovery_lr:g}" for o in merged(earlier)}, f"{args.final_lr:g}"),
        ("recovered for epochs", {str(o.recovery_epochs) for o in merged(earlier)}, str(args.final_epochs)),
        (
            "recovered at feature weights",
            {f"{o.recovery_feature_weight:g}" for o in merged(earlier)},
            f"{args.final_feature_weight:g}",
        ),
    ):
        mixed = found | ({here} if args.seeds else set())
        if len(mixed) > 1:
            parser.error(f"these outcomes are {what} {' and '.join(sorted(mixed))}; report one at a time")
    console = Console(width=shutil.get_terminal_size((160, 24)).columns)  # logs get the CLI's width, not 80
    torch.set_num_threads(args.threads)
    suffix = "" if args.latency_backend == "torch" else f"-{args.latency_backend}"
    results_dir = args.results_dir or Path(f"results/compare{suffix}")
    outcomes = []
    for seed in args.seeds:
        base = RunSettings.of(
            model="resnet18",
            budget=args.budget,
            threads=args.threads,
            seed=seed,
            final_epochs=args.final_epochs,
            final_top=args.final_top,
            final_lr=args.final_lr,
            final_feature_weight=args.final_feature_weight,
            latency_backend=args.latency_backend,
            results_dir=results_dir / f"seed-{seed}",
        )
        found = run_seed(base, args.methods, console, sweeps=sweeps, retime_backend=retime_backend)
        if args.speedups_from:
            take_speedups(found, timed, source=args.speedups_from)
        outcomes += found
    final = merged([*earlier, *outcomes])
    for path in args.pool:
        pooled = [Outcome.from_json(data) for data in json.loads(path.read_text())]
        for line in pool_retimings(final, pooled, source=str(path)):
            console.print(f"--pool {path}: not pooled, {line}")
    report(final, results_dir, console)


def merged(outcomes: Sequence[Outcome]) -> list[Outcome]:
    """One outcome per method and seed, a later one replacing an earlier (earlier runs' ``compare.json`` files first,
    in order, then this run's). Each seed's fastest uniform config is the uniform sweep's of that seed, wherever it
    was run."""
    by_key = {(outcome.method, outcome.seed): outcome for outcome in outcomes}
    fastest = {seed: o.fastest_uniform for (method, seed), o in by_key.items() if method == "uniform"}
    for (_, seed), outcome in by_key.items():
        outcome.fastest_uniform = fastest.get(seed, outcome.fastest_uniform)
    order = {method: index for index, method in enumerate(METHODS)}
    return sorted(by_key.values(), key=lambda o: (order.get(o.method, len(order)), o.seed))


def run_seed(
    base: RunSettings, methods: Sequence[str], console: Console, *, sweeps: int, retime_backend: str
) -> list[Outcome]:
    """Every method of ``methods`` on ``base``'s seed; ranksearch first (on cold caches), whose wall time the
    equal-time method gets; then, with ``sweeps``, their recovered members re-timed side by side in
    ``retime_backend`` (the studies' own latency backend, or another target)."""
    outcomes: dict[str, Outcome] = {}
    studies: dict[str, optuna.Study] = {}
    searches: dict[str, Callable[[], tuple[Outcome, optuna.Study]]] = {
        "ranksearch": lambda: study_outcome("ranksearch", base, console),
        "knapsack": lambda: study_outcome("knapsack", base.replace(warm_starts="knapsack"), console),
        "with-greedy": lambda: study_outcome("with-greedy", base.replace(warm_starts="knapsack+greedy"), console),
        "fill-gaps": lambda: study_outcome("fill-gaps", base.replace(fill_gaps=True), console),
        "nsga2": lambda: study_outcome("nsga2", base.replace(sampler="nsga2"), console),
        "previous": lambda: study_outcome("previous", base.replace(warm_starts="greedy", promote_steps="0"), console),
        "random": lambda: study_outcome("random", plain(base), console),
        "random-time": lambda: study_outcome(
            "random-time",
            plain(base).replace(budget=10 * base.search.budget, timeout=outcomes["ranksearch"].extra["trials_s"]),
            console,
        ),
    }
    for method in ("ranksearch", *methods):
        if method in outcomes or method not in searches:
            continue
        outcomes[method], studies[method] = searches[method]()
    direct = [m for m in methods if m in ("uniform", "greedy")]
    prepared = configs_search(base, console) if direct or sweeps else None  # the problem, prepared once
    if prepared is not None and direct:
        configs = direct_configs(prepared)
        for method in direct:
            outcomes[method], studies[method] = study_outcome(method, plain(base), console, configs=configs[method])
    fastest_uniform = outcomes["uniform"].fastest_uniform if "uniform" in outcomes else None
    for outcome in outcomes.values():
        outcome.fastest_uniform = fastest_uniform
    if prepared is not None and sweeps:
        timer = prepared
        if retime_backend != base.evaluation.latency_backend:  # the same problem, timed in another target
            retarget = base.replace(latency_backend=retime_backend, latency_table=False, sensitivity=False)
            timer = configs_search(retarget, console, name=f"compare-configs-{retime_backend}")
        retime_side_by_side(timer.evaluator, outcomes, studies, console, sweeps=sweeps, backend=retime_backend)
    return [outcomes[m] for m in methods if m in outcomes]


def retime_side_by_side(
    evaluator: object,
    outcomes: dict[str, Outcome],
    studies: dict[str, optuna.Study],
    console: Console,
    *,
    sweeps: int,
    backend: str,
) -> None:
    """Time every method's recovered members, and the uniform sweep's fastest configs, again beside the dense model
    in one session: ``sweeps`` sweeps over all of them in a shuffled order, each a paired timing as the front's
    confirmation takes (``RETIME_ROUNDS`` rounds); each config's speedup is the median of its sweeps. Each study
    timed its configs at another hour, and one config's speedup moves by 20 % between two such timings (seed 0's
    knapsack config measured 4.76x, then 3.87x at its promotion), so only timings taken side by side compare
    methods. The points get the re-timed speedups (their studies' in ``study_speedup``), and the fastest uniform
    config's speedup is re-timed too. The outcomes record ``backend``, the target ``evaluator`` times in."""
    if not isinstance(evaluator, PairedTiming):
        console.print("re-timing side by side: the evaluator cannot time configs beside the dense model; skipped")
        return
    configs: dict[str, CompressionConfig] = {}
    keys: dict[tuple[str, int], str] = {}
    for method, study in studies.items():
        wanted = {p.trial for p in outcomes[method].front}
        if method == "uniform":  # the sweep's fastest configs, whose best is the fastest uniform speedup
            speeds = study_speeds(study)
            sweep = [r for r in records(study) if r.counts_toward_budget and r.anchor.startswith("config")]
            sweep.sort(key=lambda r: -(speeds[r.number].speedup or 0.0))
            wanted |= {r.number for r in sweep[:UNIFORM_RETIMED] if not compresses_nothing(r)}
        for trial in study.get_trials(deepcopy=False):
            if trial.number in wanted:
                config = TrialRecord.of(trial).compression_config()
                key = keys[(method, trial.number)] = json.dumps(config.to_dict(), sort_keys=True)
                configs[key] = config
    if not configs:
        console.print("re-timing side by side: no recovered member to time; skipped")
        return
    samples: dict[str, list[float]] = {key: [] for key in configs}
    columns = (TextColumn("re-timing side by side"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("retime", total=sweeps * len(configs))
        for sweep_index in range(sweeps):
            order = sorted(configs)
            random.Random(sweep_index).shuffle(order)
            for key in order:
                paired = evaluator.time_beside_dense(configs[key], rounds=RETIME_ROUNDS, target_seconds=RETIME_SECONDS)
                samples[key].append(paired.speedup)
                bar.advance(task)
    retimed = {key: statistics.median(values) for key, values in samples.items()}
    spread = statistics.median((max(v) - min(v)) / statistics.median(v) for v in samples.values())
    fastest = max((retimed[key] for (method, _), key in keys.items() if method == "uniform"), default=None)
    session, host = datetime.now(UTC).isoformat(), cpu_name()
    for method, outcome in outcomes.items():
        outcome.front = [
            replace(p, speedup=retimed[keys[(method, p.trial)]], study_speedup=p.speedup) for p in outcome.front
        ]
        outcome.extra["retimed_configs"] = float(len(configs))
        outcome.extra["retimed_sweeps"] = float(sweeps)
        outcome.extra["retimed_spread_pct"] = 100 * spread
        outcome.timed_in = backend
        outcome.retimings = [
            Retiming(
                session=session,
                host=host,
                speedups=tuple((p.trial, p.speedup) for p in outcome.front),
                fastest_uniform=fastest,
            )
        ]
        if "uniform" in outcomes:
            outcome.fastest_uniform = fastest
    console.print(
        f"re-timed {len(configs)} configs side by side in {sweeps} sweeps of {RETIME_ROUNDS} paired rounds each; "
        f"a config's sweeps differ by a median {100 * spread:.0f} % of its speedup (largest over smallest)"
    )


def take_speedups(outcomes: Sequence[Outcome], timed: Sequence[Outcome], *, source: Path) -> None:
    """Each recovered member's speedup, each seed's fastest uniform config and the target they were timed in, from
    the same method, seed and trial of ``timed`` (``source``'s outcomes): the same configs, timed side by side
    there. A member it did not time ends the run."""
    by_key = {(o.method, o.seed): o for o in timed}
    for outcome in outcomes:
        earlier = by_key.get((outcome.method, outcome.seed))
        speeds = {} if earlier is None else {p.trial: p.speedup for p in earlier.front}
        missing = [p.trial for p in outcome.front if p.trial not in speeds]
        if earlier is not None and "retimed_sweeps" not in earlier.extra:
            sys.exit(
                f"--speedups-from {source}: its {outcome.method} on seed {outcome.seed} was not re-timed side by side"
            )
        if earlier is None or missing:
            sys.exit(
                f"--speedups-from {source}: {outcome.method} on seed {outcome.seed} has members it did not time "
                f"({missing or 'no such outcome'}); re-time them without --speedups-from"
            )
        outcome.front = [replace(p, speedup=speeds[p.trial], study_speedup=p.speedup) for p in outcome.front]
        outcome.fastest_uniform = earlier.fastest_uniform
        outcome.timed_in = earlier.timed_in
        outcome.retimings = earlier.retimings
        outcome.extra.update({k: v for k, v in earlier.extra.items() if k.startswith("retimed_")})
        outcome.extra["speedups_reused"] = 1.0


def pool_retimings(outcomes: Sequence[Outcome], earlier: Sequence[Outcome], *, source: str) -> list[str]:
    """Each re-timed outcome's members take the median speedup of every side-by-side re-timing of them: its own and
    those of the same method and seed in ``earlier`` (``source``'s outcomes), on the same host and target, each
    counted once however many files hold it. Each seed's fastest uniform config takes the median of the seed's
    re-timings that timed the uniform sweep. The members must be the same configs (the same trials, params and
    MACs: the same studies), or the run ends. Returns what it skipped, one line each."""
    skipped: list[str] = []
    for outcome in outcomes:
        if not outcome.retimings:
            continue
        host = outcome.retimings[0].host
        costs = {p.trial: (p.params, p.macs) for p in outcome.front}
        sessions = {r.session: r for r in outcome.retimings}
        for other in earlier:
            if (other.method, other.seed) != (outcome.method, outcome.seed) or not other.retimings:
                continue
            changed = [p.trial for p in other.front if costs.get(p.trial, (p.params, p.macs)) != (p.params, p.macs)]
            if changed:
                sys.exit(
                    f"--pool {source}: {other.method} on seed {other.seed}: trials {changed} are other configs there "
                    "(another study); pool only re-timings of the same studies"
                )
            if other.timed_in != outcome.timed_in:
                skipped.append(f"{other.method}, seed {other.seed}: a re-timing in {other.timed_in}")
                continue
            for retiming in other.retimings:
                if retiming.host != host:
                    skipped.append(f"{other.method}, seed {other.seed}: a re-timing on {retiming.host}")
                else:
                    sessions.setdefault(retiming.session, retiming)
        outcome.retimings = sorted(sessions.values(), key=lambda r: r.session)
        outcome.front = [
            replace(point, speedup=statistics.median(outcome.retimed_speedups(point.trial))) for point in outcome.front
        ]
    for seed in {o.seed for o in outcomes}:
        fastest = {
            r.session: r.fastest_uniform
            for o in outcomes
            if o.seed == seed
            for r in o.retimings
            if r.fastest_uniform is not None
        }
        if fastest:
            for outcome in outcomes:
                if outcome.seed == seed:
                    outcome.fastest_uniform = statistics.median(fastest.values())
    return sorted(set(skipped))


def plain(settings: RunSettings) -> RunSettings:
    """No screens, warm starts or promotion: what a plain sampler gets."""
    return settings.replace(
        sampler="random",
        latency_table=False,
        sensitivity=False,
        early_reject=False,
        warm_starts="none",
        promote_steps="0",
    )


def configs_search(base: RunSettings, console: Console, *, name: str = "compare-configs") -> PreparedSearch:
    """``base``'s problem prepared in a study of its own, ``name`` (its sensitivity pass and latency table cached)."""
    settings = with_default_space(base.replace(study_name=name))
    directory = settings.infra.results_dir / settings.name()
    directory.mkdir(parents=True, exist_ok=True)
    search, _ = PreparedSearch.prepare(
        settings,
        space=load_space(settings.search.space or "", torch.device("cpu"), console),
        open_study=lambda: open_study(settings, directory),
        console=console,
    )
    return search


def direct_configs(search: PreparedSearch) -> dict[str, list[CompressionConfig]]:
    """The uniform sweep and the greedy levels on ``search``'s problem."""
    assert search.sensitivity is not None
    dense = CompressionConfig(layers={})
    uniform = [
        uniform_config(search.slots, technique, fraction, rank_multiple=search.rank_multiple)
        for technique in UNIFORM_TECHNIQUES
        for fraction in FRACTIONS
    ]
    greedy = search.sensitivity.greedy_configs(
        search.slots, search.variant_cost(), rank_multiple=search.rank_multiple, levels=GREEDY_LEVELS
    )
    return {"uniform": [dense, *uniform], "greedy": [dense, *greedy.values()]}


def study_outcome(
    method: str, settings: RunSettings, console: Console, *, configs: list[CompressionConfig] | None = None
) -> tuple[Outcome, optuna.Study]:
    """Run (or resume) ``method``'s study and read its recovered front. With ``configs``: a study of exactly those
    configs, enqueued before the run (the direct methods). A study an earlier run finished is read as it is (an
    equal-time method resumed would get its whole time again)."""
    console.rule(f"{method}: seed {settings.problem.seed}")
    settings = settings.replace(study_name=f"compare-{method}")
    directory = settings.infra.results_dir / settings.name()
    if (directory / STORAGE_FILE).exists() and "compare_wall_s" in (
        done := open_study(with_default_space(settings), directory)
    ).user_attrs:
        console.print(f"{method}: finished by an earlier run, read as it is")
        recover_again(done, settings, directory, console)
        return outcome_of(method, settings, done, done.user_attrs["compare_wall_s"]), done
    if configs is not None:
        settings = settings.replace(budget=len(configs))
        _enqueue(settings, configs, console)
    start = time.perf_counter()
    result = run_search(settings, console=console)
    study = result.study
    seconds = study.user_attrs.get("compare_wall_s") or time.perf_counter() - start
    study.set_user_attr("compare_wall_s", seconds)
    return outcome_of(method, settings, study, seconds), study


def recover_again(study: optuna.Study, settings: RunSettings, directory: Path, console: Console) -> None:
    """A finished study's recovery stage run again where its recorded recoveries do not make up the plan that
    ``settings`` asks for (``--final-top`` and the ``--final-*`` recipe; :func:`recovery_plan`): another
    recipe, or a study recovered by an earlier release's choice of members. What is recorded is read back."""
    spec = settings.recovery

    def unfinished() -> int | None:
        plan = recovery_plan(study, spec.final_top, spec.recipe)
        return None if plan.next is None else plan.next.number

    if spec.final_epochs == 0 or unfinished() is None:
        return
    console.print(f"{study.study_name}: recovered again ({spec.recipe.describe()})")
    context = load_study_problem(study, console)
    context = replace(context, settings=context.settings.replace(**asdict(spec)))
    recover_front(study, context, directory=directory, console=console)
    if (left := unfinished()) is not None:
        console.print(f"{study.study_name}: trial {left} failed to recover again and is left out of its front")


def with_default_space(settings: RunSettings) -> RunSettings:
    """``settings`` with the model's default search space named, as a run resolves it."""
    space_path = default_space_path(model_family(settings.problem.model))
    return settings.replace(space=space_path, space_digest=file_digest(space_path))


def _enqueue(settings: RunSettings, configs: list[CompressionConfig], console: Console) -> None:
    settings = with_default_space(settings)
    directory = settings.infra.results_dir / settings.name()
    directory.mkdir(parents=True, exist_ok=True)
    study = open_study(settings, directory)
    if study.trials:
        return
    search, _ = PreparedSearch.prepare(
        settings,
        space=load_space(settings.search.space or "", torch.device("cpu"), console),
        open_study=lambda: study,
        console=console,
    )
    for number, config in enumerate(configs):
        study.enqueue_trial(config_to_params(config, search.slots), user_attrs=anchor_attrs(f"config {number}"))


def outcome_of(method: str, settings: RunSettings, study: optuna.Study, seconds: float) -> Outcome:
    """``method``'s outcome from its finished ``study`` (run with ``settings``), timed as the study timed it."""
    stored, (members, speeds) = StudyRecord.of(study), front_with_speeds(study)
    dense = BASELINE.read(study)
    front = {t.number: TrialRecord.of(t) for t in members}
    points = []
    spec = settings.recovery
    recovery_s = 0.0
    # the recovery stage's members only: those an earlier run or command recovered beyond them would give one
    # method more recovered members than another
    for recovered in recovery_plan(study, spec.final_top, spec.recipe).recovered:
        trial = front[recovered.trial]
        recovery_s += recovered.seconds
        points.append(
            Point(
                trial=trial.number,
                speedup=float(speeds[trial.number].speedup or 0.0),
                test_accuracy=recovered.test_accuracy,
                drop_high_pp=recovered.drop.high_pp,
                params=int(trial.cost["params"]),
                macs=int(trial.cost["macs"]),
                searched_accuracy=float(trial.metrics["accuracy"]),
            )
        )
    complete = [r for r in records(study) if r.counts_toward_budget]
    uniform = [speeds[r.number].speedup or 0.0 for r in complete if r.anchor.startswith("config") and r.speedup]
    recovered_dense = next(iter(stored.recovered.values()), {})
    dense_test = float(dense["test_accuracy"])
    if recovered_dense:  # recovery tests on the full test split: compare with the dense model's accuracy there
        dense_test = float(recovered_dense["test_accuracy"]) + float(recovered_dense["drop_pp"]) / 100
    # the recovery stage's time is what its members' recorded recoveries took: a study recovered again (another
    # recipe) replaces the first recovery's time with the second's
    phases = {**stored.phase_seconds, "recovery": recovery_s}
    return Outcome(
        method=method,
        seed=settings.problem.seed,
        evaluated=len(complete),
        seconds=seconds - stored.phase_seconds.get("recovery", 0.0) + recovery_s,
        front=points,
        dense_test_accuracy=dense_test,
        dense_params=int(dense["params"]),
        dense_macs=int(dense["macs"]),
        front_size=len(front),
        not_faster=sum(not compresses_nothing(r) and not speeds[r.number].measurably_faster for r in front.values()),
        fastest_uniform=max(uniform, default=None) if method == "uniform" else None,
        extra={"trials_s": sum(r.duration_s or 0.0 for r in records(study)), **phases},
        host=cpu_name(),
        timed_in=settings.evaluation.latency_backend,
        recovery_lr=spec.final_lr,
        recovery_epochs=spec.final_epochs,
        recovery_feature_weight=spec.final_feature_weight,
    )


def _summary(values: list[float | None], fmt: str) -> str:
    """The median over seeds with the range: ``1.62x (1.41-1.80)``; a dash where a seed has none."""
    known = [v for v in values if v is not None]
    if not known:
        return "-"
    text = fmt.format(statistics.median(known))
    if len(known) > 1:
        text += f" ({fmt.format(min(known))}-{fmt.format(max(known))})"
    return text + ("" if len(known) == len(values) else f" [{len(known)}/{len(values)} seeds]")


def report(outcomes: list[Outcome], out: Path, console: Console) -> None:
    """The table (median and range over seeds per method), its JSON, and a plot of the recovered fronts."""
    columns = (
        "method",
        "seeds",
        "configs evaluated",
        "best speedup, <= 0.5 pp",
        "MACs reduction there",
        "params reduction there",
        "best speedup, <= 1.0 pp",
        "fastest uniform",
        "<= 0.5 pp / fastest uniform",
        f"hypervolume (<= {HV_DROP:g} pp)",
        "wall time s (no baseline training)",
        "recovery share",
        "members not faster",
        "recovered under 1x",
        "Kendall tau",
    )
    target = latency_backend_title(outcomes[0].timed_in) if outcomes else "no target"
    hosts = ", ".join(sorted({o.host or "unrecorded" for o in outcomes}))
    table = Table(title=f"resnet18 / Fashion-MNIST, CPU ({target}; {hosts}): recovered fronts on the test split")
    for column in columns:
        table.add_column(column, justify="left" if column == "method" else "right")
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    methods = list(dict.fromkeys(o.method for o in outcomes))
    for method in methods:
        runs = [o for o in outcomes if o.method == method]
        best05 = [o.best_within(0.5) for o in runs]
        cells = [
            method,
            ",".join(str(o.seed) for o in runs),
            _summary([float(o.evaluated) for o in runs], "{:.0f}"),
            _summary([None if p is None else p.speedup for p in best05], "{:.2f}x"),
            _summary(
                [None if p is None else o.dense_macs / p.macs for o, p in zip(runs, best05, strict=True)], "{:.1f}x"
            ),
            _summary(
                [None if p is None else o.dense_params / p.params for o, p in zip(runs, best05, strict=True)], "{:.1f}x"
            ),
            _summary([None if (p := o.best_within(1.0)) is None else p.speedup for o in runs], "{:.2f}x"),
            _summary([o.fastest_uniform for o in runs], "{:.2f}x"),
            _summary(
                [
                    None if p is None or not o.fastest_uniform else p.speedup / o.fastest_uniform
                    for o, p in zip(runs, best05, strict=True)
                ],
                "{:.0%}",
            ),
            _summary([o.hypervolume() for o in runs], "{:.2f}"),
            _summary([o.search_seconds for o in runs], "{:.0f}"),
            _summary([o.recovery_share() for o in runs], "{:.0%}"),
            _summary([float(o.not_faster) for o in runs], "{:.0f}"),
            _summary([float(sum(p.speedup < 1.0 for p in o.front)) for o in runs], "{:.0f}"),
            _summary([o.tau() for o in runs], "{:.2f}"),
        ]
        table.add_row(*cells)
        lines.append("| " + " | ".join(cells) + " |")
    console.print(table)
    lines.append(f"\nTimed in {target} on: {hosts}.")
    lrs = ", ".join(f"{lr:g}" for lr in sorted({o.recovery_lr for o in outcomes}))
    epochs = ", ".join(str(e) for e in sorted({o.recovery_epochs for o in outcomes}))
    weights = ", ".join(f"{w:g}" for w in sorted({o.recovery_feature_weight for o in outcomes}))
    lines.append(
        f"Front members recovered for {epochs} epochs (`--final-epochs`) at a peak learning rate of {lrs} "
        f"(`--final-lr`), matching the dense model's block outputs at a weight of {weights} "
        "(`--final-feature-weight`; 0: logits only); recovery share: the members' recorded recoveries over the wall "
        "time."
    )
    retimed = [o for o in outcomes if "retimed_sweeps" in o.extra]
    if retimed:
        seeds = ", ".join(str(seed) for seed in sorted({o.seed for o in retimed}))
        sweeps = max(int(o.extra["retimed_sweeps"]) for o in retimed)
        spread = statistics.median(o.extra["retimed_spread_pct"] for o in retimed)
        lines.append(
            f"Speedups of seed(s) {seeds} re-timed side by side after all their methods ran (every recovered member "
            f"and the uniform sweep's fastest configs, the median of {sweeps} shuffled sweeps of paired timings, "
            f"which differ by a median {spread:.0f} % per config); the others are their studies' own timings."
        )
    pooled = {o.seed: len({r.session for s in outcomes if s.seed == o.seed for r in s.retimings}) for o in outcomes}
    if any(count > 1 for count in pooled.values()):
        moved = [
            (max(timed) - min(timed)) / statistics.median(timed)
            for o in outcomes
            for p in o.front
            if len(timed := o.retimed_speedups(p.trial)) > 1
        ]
        counts = ", ".join(f"seed {seed}: {count}" for seed, count in sorted(pooled.items()))
        lines.append(
            f"Speedups pooled over side-by-side re-timings ({counts}; `--pool`): each member's is the median of the "
            "re-timings that timed it (each the median of its sweeps), each seed's fastest uniform config's the median "
            "of those that timed the uniform sweep; a member timed more than once moved by a median "
            f"{100 * statistics.median(moved):.0f} % between its re-timings (largest over smallest)."
        )
    reused = sorted({o.seed for o in outcomes if o.extra.get("speedups_reused")})
    if reused:
        lines.append(
            f"Seed(s) {', '.join(map(str, reused))}: the speedups are an earlier run's side-by-side re-timing of the "
            "same members (`--speedups-from`); the accuracies were recovered in this run."
        )
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "compare.md", "\n".join(lines) + "\n")
    atomic_write_text(out / "compare.json", json.dumps([asdict(o) for o in outcomes], indent=2) + "\n")
    figure, axes = plt.subplots(figsize=(8, 5))
    for method in methods:
        runs = [o for o in outcomes if o.method == method]
        for index, outcome in enumerate(runs):
            color, alpha = f"C{methods.index(method)}", 1.0 if index == 0 else 0.4
            front = outcome.nondominated()
            dominated = [p for p in outcome.front if p not in front]

            def drops(points: Sequence[Point], outcome: Outcome = outcome) -> list[float]:
                return [100 * (outcome.dense_test_accuracy - p.test_accuracy) for p in points]

            # the staircase: a speedup between two members is reached only at the faster one's accuracy
            axes.plot(
                [p.speedup for p in front],
                drops(front),
                marker="o",
                drawstyle="steps-pre",
                color=color,
                alpha=alpha,
                label=method if index == 0 else None,
            )
            axes.scatter(
                [p.speedup for p in dominated], drops(dominated), facecolors="none", edgecolors=color, alpha=alpha
            )
    for level in (0.5, 1.0):
        axes.axhline(level, color="grey", linestyle=":", linewidth=1)
    axes.set_xlabel("speedup over the dense model, timed beside it (x)")
    axes.set_ylabel("test accuracy drop after recovery (points)")
    axes.invert_yaxis()
    axes.set_title(
        f"Recovered fronts, timed in {target} (one line per seed; hollow: dominated after recovery)\n"
        "up and right is better",
        fontsize=10,
    )
    axes.legend()
    figure.tight_layout()
    tmp = out / ".compare.png.tmp"
    figure.savefig(tmp, format="png", dpi=120)
    tmp.replace(out / "compare.png")
    console.print(f"table: {out / 'compare.md'}; plot: {out / 'compare.png'}")


if __name__ == "__main__":
    main()
