"""One search, prepared once: the problem, the searched layers, the evaluator, the baseline and the screens.

:meth:`PreparedSearch.prepare` is what ``ranksearch run``, each worker and the benchmarks build before any trial;
:class:`~ranksearch.study.objective.Objective` is the trial function over it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import optuna
from optuna.trial import TrialState
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from ranksearch.compress import ModelCost, dense_model_cost, layer_cost
from ranksearch.config import CompressionConfig, LayerChoice
from ranksearch.errors import USER_ERRORS, RanksearchError
from ranksearch.evaluate import (
    ClassificationEvaluator,
    DivergenceScorer,
    Evaluator,
    LayerTiming,
    LocalTorchTiming,
    Metrics,
    MultiFidelity,
    Split,
    ZeroShotScorer,
)
from ranksearch.measure.deployed import fold_batchnorm
from ranksearch.measure.timers import ModuleTimer, TorchTimer
from ranksearch.results.record import BASELINE, anchor_attrs, gap_fill_attrs, warm_start_attrs
from ranksearch.search import LayerSlot, SearchSpace, config_to_params, uniform_config
from ranksearch.search.knapsack import config_cost, knapsack_configs, knapsack_front
from ranksearch.search.latency_table import LatencyTable, cache_name
from ranksearch.search.screens import HopelessVariant, OverLatencyLimit, Screen, SlowerThanDense, ZeroShotDrop
from ranksearch.search.sensitivity import Sensitivity, VariantScore, measure_sensitivity
from ranksearch.study.gaps import next_gap_fill
from ranksearch.study.problem import RunContext, check_fingerprint, load_problem, problem_fingerprint
from ranksearch.study.settings import RunSettings
from ranksearch.util import describe, import_object

ANCHORS = (("keep", None), ("svd", 0.5), ("tucker2", 0.5), ("svd", 0.25), ("tucker2", 0.25), ("tucker2", 0.125))
"""The baseline and uniform configurations every study starts with (where the space offers them), shown beside the
searched configs for comparison. Tucker-2 at 0.125 shows what the space's fast end costs in accuracy: with spatial
Tucker-2 at 0.125 (within the timing's spread of it) the fastest uniform config in the benchmarks of the shipped
ResNet space."""


@dataclass(frozen=True)
class PreparedSearch:
    """Everything a trial needs, built once per run or worker."""

    settings: RunSettings
    context: RunContext
    space: SearchSpace
    slots: dict[str, LayerSlot]
    evaluator: Evaluator
    dense: ModelCost
    baseline: dict[str, float]
    fingerprint: dict[str, str]
    table: LatencyTable | None
    sensitivity: Sensitivity | None
    screens: tuple[Screen, ...]
    """Asked in order before a trial is evaluated."""
    zero_shot: ZeroShotDrop | None
    """Asked once the evaluator's zero-shot accuracy is measured (with early rejection on a zero-shot scorer)."""

    @classmethod
    def prepare(
        cls,
        settings: RunSettings,
        evaluator: Callable[[RunContext], Evaluator] | None = None,
        *,
        space: SearchSpace,
        open_study: Callable[[], optuna.Study],
        console: Console,
        phases: dict[str, float] | None = None,
    ) -> tuple[PreparedSearch, optuna.Study]:
        """Load the problem, open the study (``open_study``, once the problem loaded), check that its weights and data
        are the study's, measure (or read) the baseline, build the latency table and sensitivity, and the screens.

        ``evaluator`` builds the evaluator from the run's context (None: the built-in evaluator).
        ``phases`` receives the seconds spent per phase.
        """
        phases = {} if phases is None else phases
        start = time.perf_counter()
        context = load_problem(settings, settings.infra.devices()[0], console, phases, space=space)
        phases["load"] = time.perf_counter() - start - phases.get("baseline_training", 0.0)
        slots = space.layers(context.model, context.input_shapes)
        if not slots:
            raise RanksearchError(
                f"search space {settings.search.space}: no searchable layer in {settings.problem.model}; widen 'layers'"
            )
        evaluator = _evaluator(settings, context, evaluator)
        study = open_study()
        fingerprint = problem_fingerprint(context.model, context.splits)
        check_fingerprint(study, fingerprint, checkpoint=context.checkpoint)
        dense = dense_model_cost(context.model, context.example)
        full_val = bool(settings.search.promotion_steps) and context.splits.full_val is not None
        baseline = measure_baseline(study, evaluator, dense, console, full_val=full_val)
        loaded = _Loaded(settings, context, space, slots, evaluator, console, phases)
        table = loaded.latency_table()
        sensitivity = loaded.sensitivity(fingerprint, table)
        search = settings.search
        screens: list[Screen] = []
        if table is not None:
            screens += [OverLatencyLimit(limit_ms=search.max_latency_ms)] if search.max_latency_ms is not None else []
            screens.append(SlowerThanDense())
        if sensitivity is not None:
            screens.append(HopelessVariant(sensitivity=sensitivity, max_drop=search.max_zero_shot_drop))
        zero_shot = None
        if search.early_reject and isinstance(evaluator, ZeroShotScorer):
            zero_shot = ZeroShotDrop(
                baseline_accuracy=evaluator.zero_shot_baseline(), max_drop=search.max_zero_shot_drop
            )
        prepared = cls(
            settings,
            context,
            space,
            slots,
            evaluator,
            dense,
            baseline,
            fingerprint,
            table,
            sensitivity,
            tuple(screens),
            zero_shot,
        )
        return prepared, study

    @property
    def rank_multiple(self) -> int:
        return self.space.rank_multiple

    def variant_cost(self) -> Callable[[str, LayerChoice], float]:
        """A layer variant's cost for the warm starts: what it adds to the latency table's prediction where there is
        a table (:meth:`~ranksearch.search.latency_table.LatencyTable.variant_ms`), else its MACs."""
        table = self.table
        if table is not None:
            return table.variant_ms
        modules = dict(self.context.model.named_modules())

        def macs(name: str, choice: LayerChoice) -> float:
            shape = self.context.input_shapes[name]
            cost = layer_cost(
                modules[name], choice.technique, choice.rank, shape, rank_multiple=self.rank_multiple, **choice.options
            )
            return float(cost.macs)

        return macs

    def enqueue_starts(self, study: optuna.Study) -> None:
        """The uniform anchors, then (with sensitivity) the ``--warm-starts`` configs that differ from those queued:
        the knapsack solutions (per budget of the searched layers' dense cost, :meth:`variant_cost`, the config of least
        summed sensitivity within it), or the greedy equal-sensitivity levels; no more than the budget leaves room for
        (evenly spread over the sweep), so that nothing queued is left waiting when the budget is spent."""
        queued: set[tuple[tuple[str, object], ...]] = set()
        for technique, fraction in ANCHORS:
            params = config_to_params(
                uniform_config(self.slots, technique, fraction, rank_multiple=self.rank_multiple), self.slots
            )
            key = _params_key(params)
            if key in queued:
                continue
            queued.add(key)
            label = "baseline" if technique == "keep" else f"uniform {technique}@{fraction}"
            study.enqueue_trial(params, user_attrs=anchor_attrs(label))
        starts: dict[tuple[tuple[str, object], ...], tuple[str, dict[str, object]]] = {}
        for label, config in self._warm_starts().items():
            params = config_to_params(config, self.slots)
            key = _params_key(params)
            if key not in queued and key not in starts:
                starts[key] = (label, params)
        room = max(self.settings.search.budget - len(queued), 0)  # none left waiting once the budget is spent
        chosen = list(starts.values())
        if len(chosen) > room:  # evenly spread over the sweep, its ends included
            chosen = [chosen[round(i * (len(chosen) - 1) / max(room - 1, 1))] for i in range(room)]
        for label, params in chosen:
            study.enqueue_trial(params, user_attrs=warm_start_attrs(label))

    def fill_gap(self, study: optuna.Study) -> None:
        """With ``--fill-gaps``, when no trial is waiting, enqueue the knapsack config for the widest gap of the
        measured front (:func:`~ranksearch.study.gaps.next_gap_fill`); none left: the sampler takes the trial.

        Workers each ask before their own trial; two that ask at once may enqueue the same config (it is then
        evaluated twice), as two workers may sample the same one."""
        if not self.settings.search.fill_gaps or not self._knapsack_front:
            return
        trials = study.get_trials(deepcopy=False)
        if any(trial.state == TrialState.WAITING for trial in trials):
            return
        # an enqueued trial's parameters stay in Optuna's "fixed_params" until its objective has suggested them all
        tried = {_params_key(trial.system_attrs.get("fixed_params") or trial.params) for trial in trials}
        untried = [(cost, config) for cost, config, key in self._knapsack_front if key not in tried]
        cost = self.variant_cost()
        dense = config_cost(CompressionConfig(layers={}), self.slots, cost)
        fill = next_gap_fill(trials, untried, cost_of=lambda config: config_cost(config, self.slots, cost) / dense)
        if fill is not None:
            label = fill.label(self._cost_measure)
            study.enqueue_trial(config_to_params(fill.config, self.slots), user_attrs=gap_fill_attrs(label))

    @cached_property
    def _knapsack_front(self) -> list[tuple[float, CompressionConfig, tuple[tuple[str, object], ...]]]:
        """The knapsack's front of configs (:func:`~ranksearch.search.knapsack.knapsack_front`), each with its
        trial parameters' key; none without sensitivity."""
        if self.sensitivity is None:
            return []
        front = knapsack_front(self.sensitivity, self.slots, self.variant_cost(), **self._knapsack_options())
        return [(cost, config, _params_key(config_to_params(config, self.slots))) for cost, config in front]

    def _knapsack_options(self) -> dict[str, Any]:
        """The knapsack's keywords shared by the warm starts and the gap fills."""
        return {"rank_multiple": self.rank_multiple, "max_drop": self.settings.search.max_zero_shot_drop}

    @property
    def _cost_measure(self) -> str:
        """What :meth:`variant_cost` sums: latency where there is a table, else MACs."""
        return "latency" if self.table is not None else "MACs"

    def _warm_starts(self) -> dict[str, CompressionConfig]:
        """The ``--warm-starts`` configs by label, mildest first (none without sensitivity); both kinds together
        interleave by cost, so that a budget too small for all of them keeps them spread over the sweep."""
        kind = self.settings.search.warm_starts
        if self.sensitivity is None or kind == "none":
            return {}
        cost = self.variant_cost()
        starts: dict[str, CompressionConfig] = {}
        if kind in ("knapsack", "knapsack+greedy"):
            knapsack = knapsack_configs(self.sensitivity, self.slots, cost, **self._knapsack_options())
            measure = self._cost_measure
            starts |= {f"knapsack, layer {measure} <= {_percent_up(b)} % of dense": c for b, c in knapsack.items()}
        if kind in ("greedy", "knapsack+greedy"):
            greedy = self.sensitivity.greedy_configs(self.slots, cost, rank_multiple=self.rank_multiple)
            starts |= {f"greedy, each layer <= {level:g} pp alone": c for level, c in greedy.items()}
        if kind in ("knapsack", "greedy"):
            return starts
        return dict(sorted(starts.items(), key=lambda item: -config_cost(item[1], self.slots, cost)))  # interleaved


def _percent_up(fraction: float) -> str:
    """``fraction`` in percent, rounded up to a tenth (``80``, ``44.7``): a bound a budget's label may state."""
    return f"{math.ceil(round(1000 * fraction, 6)) / 10:g}"


def _params_key(params: Mapping[str, object]) -> tuple[tuple[str, object], ...]:
    """Trial parameters in one hashable order."""
    return tuple(sorted(params.items()))


def evaluator_factory(settings: RunSettings) -> Callable[[RunContext], Evaluator] | None:
    """The class ``--evaluator`` names, as a factory of the run's context (None: the built-in evaluator)."""
    if settings.infra.evaluator is None:
        return None
    cls = import_object(settings.infra.evaluator, "--evaluator")
    return lambda context: cls(context=context)


def _evaluator(
    settings: RunSettings, context: RunContext, factory: Callable[[RunContext], Evaluator] | None
) -> Evaluator:
    """The evaluator ``factory`` builds on the run's context, or the built-in one."""
    if factory is None:
        return ClassificationEvaluator(
            model=context.model,
            splits=context.splits,
            device=context.device,
            latency_device=context.timing_device,
            options=settings.evaluation,
            threads=settings.infra.threads,
            seed=settings.problem.seed,
        )
    name = settings.infra.evaluator
    try:
        evaluator = factory(context)
    except USER_ERRORS:
        raise
    except Exception as exc:
        raise RanksearchError(
            f"--evaluator {name}: construction failed ({describe(exc)}); make Class(*, context) build without raising"
        ) from None
    if not isinstance(evaluator, Evaluator):
        raise RanksearchError(
            f"evaluator {name or type(evaluator).__name__}: not a ranksearch.Evaluator; derive the class from it"
        )
    return evaluator


def measure_baseline(
    study: optuna.Study, evaluator: Evaluator, dense: ModelCost, console: Console, *, full_val: bool = False
) -> dict[str, float]:
    """The uncompressed model's metrics and costs, measured once per study (recorded). With ``full_val`` (promotions
    ahead, on a validation split larger than the trials' subset) and an evaluator that scores there, also its
    accuracy on the whole validation split, which promotions are compared with."""
    if BASELINE.stored(study):
        return dict(BASELINE.read(study))
    console.print("baseline: measuring the uncompressed model")
    val, test = (_baseline_metrics(evaluator, split) for split in ("val", "test"))
    whole: dict[str, float] = {}
    if full_val and isinstance(evaluator, MultiFidelity) and evaluator.scores_full_val:
        whole["full_val_accuracy"] = _baseline_metrics(evaluator, "full_val").accuracy
    baseline = {
        "accuracy": val.accuracy,
        **whole,
        "test_accuracy": test.accuracy,
        "latency_ms": val.latency_ms,
        "params": dense.params,
        "macs": dense.macs,
        "size_bytes": dense.size_bytes,
    }
    BASELINE.write(study, baseline)
    return baseline


def _baseline_metrics(evaluator: Evaluator, split: Split) -> Metrics:
    """The uncompressed model's metrics: an evaluator failing on it can score nothing, so the run stops."""
    try:
        return Metrics.coerce(evaluator, evaluator.evaluate(CompressionConfig(layers={}), split=split))
    except (*USER_ERRORS, KeyboardInterrupt):
        raise
    except Exception as exc:
        raise RanksearchError(
            f"evaluator {type(evaluator).__name__} failed on the uncompressed model ({describe(exc)}); "
            "fix the evaluator or its settings, then rerun"
        ) from None


def build_latency_table(
    settings: RunSettings,
    context: RunContext,
    slots: dict[str, LayerSlot],
    rank_multiple: int,
    timer: ModuleTimer,
    console: Console,
) -> LatencyTable:
    """:meth:`LatencyTable.build` for a run's model and slots, timed by ``timer`` (the evaluator's latency target), in
    its deployed form (``fold_batchnorm``: folded layers have a bias, timed as such), with a progress bar, cached
    under ``results_dir / "latency-tables"``."""
    timing = context.timing_device
    if settings.evaluation.fold_batchnorm:
        model = fold_batchnorm(context.model).model.to(timing)
    else:
        model = context.model if timing == context.device else copy.deepcopy(context.model).to(timing)
    with _progress_bar("latency table", console) as update:
        return LatencyTable.build(
            model,
            slots,
            context.input_shapes,
            context.example.to(timing),
            timer=timer,
            rank_multiple=rank_multiple,
            cache_file=settings.infra.results_dir / "latency-tables" / cache_name(timer),
            progress=update,
        )


@dataclass(frozen=True)
class _Loaded:
    """What :meth:`PreparedSearch.prepare` has loaded when it builds the latency table and the sensitivity."""

    settings: RunSettings
    context: RunContext
    space: SearchSpace
    slots: dict[str, LayerSlot]
    evaluator: Evaluator
    console: Console
    phases: dict[str, float]

    def latency_table(self) -> LatencyTable | None:
        """The per-layer latency table (built once per target, threads and versions, cached under
        ``results/latency-tables/``) when ``--latency-table`` is on and the evaluator can time layers where it times
        models (:class:`~ranksearch.evaluate.LayerTiming`, or :class:`~ranksearch.evaluate.LocalTorchTiming` for
        torch on this machine); otherwise None."""
        timer = self._layer_timer()
        if not self.settings.search.latency_table or timer is None:
            return None
        start = time.perf_counter()
        table = build_latency_table(
            self.settings, self.context, self.slots, self.space.rank_multiple, timer, self.console
        )
        seconds = self.phases["latency_table"] = time.perf_counter() - start
        variants = sum(len(times) for times in table.layer_ms.values())
        self.console.print(
            f"latency table: {variants} layer variants of {len(self.slots)} layers and {len(table.calibration)} "
            f"whole configs ready in {seconds:.0f} s"
        )
        return table

    def _layer_timer(self) -> ModuleTimer | None:
        evaluator = self.evaluator
        if isinstance(evaluator, LayerTiming):
            return evaluator.layer_timer()
        if isinstance(evaluator, LocalTorchTiming) and evaluator.times_local_torch:
            return TorchTimer(device=self.context.timing_device, threads=self.settings.infra.threads)
        return None

    def sensitivity(self, fingerprint: dict[str, str], table: LatencyTable | None) -> Sensitivity | None:
        """Each layer variant's output divergence and accuracy drop alone (with a
        :class:`~ranksearch.evaluate.DivergenceScorer`) or its zero-shot accuracy drop only (with a
        :class:`~ranksearch.evaluate.ZeroShotScorer`), cached under ``results/sensitivity/``, when ``--sensitivity``
        is on and the evaluator is either; otherwise None.
        ``fingerprint`` (of the run's model and data) keys the cache. With a latency ``table``, only variants faster
        than their dense layer are measured."""
        settings, evaluator = self.settings, self.evaluator
        if not (settings.search.sensitivity and isinstance(evaluator, DivergenceScorer | ZeroShotScorer)):
            return None
        start = time.perf_counter()
        multiple = self.space.rank_multiple
        parts = [fingerprint, settings.search.space_digest, multiple]
        if isinstance(evaluator, DivergenceScorer):

            def score(config: CompressionConfig) -> VariantScore:
                divergence = evaluator.output_divergence(config)
                return VariantScore(divergence.accuracy, divergence.kl)

            prefix, parts = "sensitivity-kl", [*parts, "kl", evaluator.divergence_key()]
            baseline = score(CompressionConfig(layers={}))
        else:

            def score(config: CompressionConfig) -> VariantScore:
                return VariantScore(evaluator.zero_shot_accuracy(config))

            prefix, parts = "sensitivity", [*parts, *evaluator.zero_shot_key().values()]  # the first release's key
            baseline = VariantScore(evaluator.zero_shot_baseline())
        key = hashlib.blake2b(json.dumps(parts, default=str).encode(), digest_size=8).hexdigest()
        cache_file = settings.infra.results_dir / "sensitivity" / f"{prefix}-{key}.json"
        max_drop = settings.search.max_zero_shot_drop
        with _progress_bar("sensitivity", self.console) as update:
            sensitivity = measure_sensitivity(
                self.context.model,
                self.slots,
                self.context.input_shapes,
                score=score,
                baseline=baseline,
                hopeless=max_drop,
                rank_multiple=multiple,
                worth=None if table is None else table.faster_than_dense,
                cache_file=cache_file,
                progress=update,
            )
        seconds = self.phases["sensitivity"] = time.perf_counter() - start
        drops = [d for layer in sensitivity.drops.values() for d in layer.values()]
        hopeless = sum(d > max_drop for d in drops)
        measured = "KL divergence and zero-shot drop" if sensitivity.divergences is not None else "zero-shot drop"
        self.console.print(
            f"sensitivity ({measured}): {len(drops)} layer variants of {len(self.slots)} layers ready in "
            f"{seconds:.0f} s; {hopeless} hopeless alone (zero-shot drop over {max_drop:g} points) are not evaluated"
        )
        return sensitivity


@contextmanager
def _progress_bar(label: str, console: Console) -> Iterator[Callable[[int, int], None]]:
    """A transient progress bar with an ETA; the block gets its ``update(done, total)``."""
    columns = (TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(label, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)
