"""The trial function: sample a config, screen it, evaluate it, record what happened."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Mapping

import optuna
from optuna.trial import TrialState

from ranksearch.compress import model_cost
from ranksearch.config import CompressionConfig
from ranksearch.errors import RanksearchError, Rejected
from ranksearch.evaluate import Metrics, MultiFidelity, Split, ZeroShotScorer
from ranksearch.results.record import FINETUNE_STEPS, OBJECTIVES, Outcome, TrialRecord, TrialWriter, records
from ranksearch.search import sample_config
from ranksearch.search.latency_table import Observation
from ranksearch.search.screens import Candidate, Prediction, Verdict, first_verdict
from ranksearch.study.prepared import PreparedSearch
from ranksearch.util import describe

MAX_SCREENED_IN_A_ROW = 100
"""Configs screened out in a row after which the run stops: the screens reject everything the sampler proposes."""
SKIPPED_PHASES = ("finetune", "quantize", "latency", "accuracy")
DENSE_SPEEDUP_KEYS = ("speedup_low", "speedup_high")
"""Per-round speedups of a config that compresses nothing, recorded as exactly 1 like its speedup."""
"""The evaluator phases a zero-shot rejection skips."""


class Objective:
    """Evaluates one trial of a :class:`~ranksearch.study.prepared.PreparedSearch`.

    Per trial: sample a config (a promotion's is its source's, evaluated with its longer fine-tune and not screened)
    -> record its cost -> predict its latency (latency table) -> ask the screens, in
    order (the first verdict prunes the trial, which does not count towards the budget) -> with early rejection,
    measure its zero-shot accuracy and ask the zero-shot screen (a verdict prunes the trial, which counts) ->
    evaluate -> record the metrics, the accuracy drop, the speedup and the constraints -> return the accuracy and the
    latency relative to the dense model timed beside it (1 / speedup; exactly 1 for the dense model). Anchors, warm
    starts, promotions and retries of a dead process's trials are protected from all but hard limits. An evaluator
    exception fails the trial with its first line as the reason; a user error
    (:class:`~ranksearch.errors.RanksearchError`) stops the search.
    """

    def __init__(self, search: PreparedSearch, *, max_screened_in_a_row: int = MAX_SCREENED_IN_A_ROW) -> None:
        self.search = search
        self.max_screened_in_a_row = max_screened_in_a_row
        self.screened_in_a_row = 0
        """Consecutive trials screened out before evaluation (reset by any trial that passes the screens)."""

    def __call__(self, trial: optuna.Trial) -> tuple[float, float] | float:
        search = self.search
        writer = TrialWriter(trial)
        join_generation(trial)
        config = sample_config(trial, search.slots, rank_multiple=search.rank_multiple)
        try:
            cost = model_cost(search.context.model, config, search.context.input_shapes, dense=search.dense)
            writer.sampled(config, {"params": cost.params, "macs": cost.macs, "size_bytes": cost.size_bytes})
            protected = TrialRecord.passes_soft_screens(trial.user_attrs)
            candidate = Candidate(config, protected=protected, prediction=self.predict(trial.study, config))
            if candidate.prediction is not None:
                writer.predicted(candidate.prediction.latency_ms, candidate.prediction.speedup)
            self.screen(writer, first_verdict(list(search.screens), candidate))
            self.zero_shot_check(candidate)
            split = self.split_of(trial.user_attrs)
            metrics = Metrics.coerce(search.evaluator, self.evaluate(config, trial.user_attrs, split=split))
        except Rejected as exc:
            writer.rejected_at_zero_shot(str(exc), metrics=exc.metrics, seconds_saved=time_saved(trial.study))
            raise optuna.TrialPruned(str(exc)) from None
        except (RanksearchError, KeyboardInterrupt, optuna.TrialPruned):
            raise
        except Exception as exc:  # a trial failure, or a config that cannot be built: the search goes on
            return self.failed(writer, exc)
        baseline = search.baseline
        drop_pp = 100.0 * (baseline["full_val_accuracy" if split == "full_val" else "accuracy"] - metrics.accuracy)
        measured = metrics.as_dict()
        speedup = metrics.speedup(baseline["latency_ms"])
        if all(choice.technique == "keep" and not choice.int8 for choice in config.layers.values()):
            speedup = 1.0  # the dense model against itself: a front member by definition, whatever the noise
            measured.update({key: 1.0 for key in DENSE_SPEEDUP_KEYS if key in measured})
        writer.measured(measured, accuracy_drop_pp=drop_pp, speedup=speedup)
        limits = search.settings.search
        if limits.max_accuracy_drop is not None:
            trial.set_constraint("accuracy_drop", drop_pp - limits.max_accuracy_drop)
        if limits.max_latency_ms is not None:
            trial.set_constraint("latency", metrics.latency_ms - limits.max_latency_ms)
        if OBJECTIVES.read(trial.study).get("latency") == "relative":
            return metrics.accuracy, 1.0 / speedup
        return metrics.accuracy, metrics.latency_ms  # a study of an earlier release, resumed: milliseconds

    def split_of(self, user_attrs: Mapping[str, object]) -> Split:
        """Where a trial is scored: a promotion on the whole validation split (when the dense model was measured
        there), any other trial on the validation images of ``--eval-subset``."""
        promoted = isinstance(user_attrs.get(FINETUNE_STEPS), int) and isinstance(self.search.evaluator, MultiFidelity)
        return "full_val" if promoted and "full_val_accuracy" in self.search.baseline else "val"

    def evaluate(
        self, config: CompressionConfig, user_attrs: Mapping[str, object], *, split: Split
    ) -> Metrics | Mapping[str, float]:
        """The evaluator's metrics of ``config`` on ``split``: with a promotion's longer fine-tune
        (:class:`~ranksearch.evaluate.MultiFidelity`) when the trial is one."""
        evaluator = self.search.evaluator
        steps = user_attrs.get(FINETUNE_STEPS)
        if isinstance(steps, int) and isinstance(evaluator, MultiFidelity):
            return evaluator.evaluate_at(config, finetune_steps=steps, split=split)
        return evaluator.evaluate(config, split=split)

    def predict(self, study: optuna.Study, config: CompressionConfig) -> Prediction | None:
        """The latency table's prediction, refitted on every complete trial so far (:meth:`LatencyTable.fitted`):
        their latencies relative to the dense model timed beside each, scaled by the median of those dense
        timings, which follows the machine's state. None without a table."""
        table = self.search.table
        if table is None:
            return None
        current = table.fitted(observations(study))
        latency = current.predict(config)
        return Prediction(latency, latency * current.speedup(config))

    def screen(self, writer: TrialWriter, verdict: Verdict | None) -> None:
        """Prune the trial on a screen's verdict; stop a run whose screens reject everything."""
        if verdict is None:
            self.screened_in_a_row = 0
            return
        self.screened_in_a_row += 1
        writer.screened(verdict.screen, verdict.reason)
        if self.screened_in_a_row >= self.max_screened_in_a_row:
            raise RanksearchError(
                f"{self.screened_in_a_row} configs in a row rejected before evaluation (last: {verdict.reason}); "
                "raise --max-latency-ms or --max-zero-shot-drop, widen the search space, "
                "or pass --no-latency-table / --no-sensitivity"
            )
        raise optuna.TrialPruned(verdict.reason)

    def zero_shot_check(self, candidate: Candidate) -> None:
        """With early rejection on a zero-shot scorer: measure the candidate's zero-shot accuracy and raise
        :class:`Rejected` on the zero-shot screen's verdict (as an evaluator may itself). A config that compresses
        nothing is not checked."""
        screen, evaluator = self.search.zero_shot, self.search.evaluator
        layers = candidate.config.layers.values()
        if screen is None or not isinstance(evaluator, ZeroShotScorer) or candidate.protected:
            return
        if all(choice.technique == "keep" for choice in layers):
            return
        start = time.perf_counter()
        accuracy = evaluator.zero_shot_accuracy(candidate.config)
        seconds = time.perf_counter() - start
        verdict = screen.screen(Candidate(candidate.config, zero_shot_accuracy=accuracy))
        if verdict is not None:
            raise Rejected(verdict.reason, metrics={"zero_shot_accuracy": accuracy, "time_zero_shot_s": seconds})

    @staticmethod
    def failed(writer: TrialWriter, exc: BaseException) -> float:
        """Fail the trial with the exception's first line as its reason (Optuna fails a NaN result)."""
        writer.ended(Outcome.FAILED, describe(exc)[:500])
        return math.nan


def join_generation(trial: optuna.Trial) -> None:
    """Under a genetic sampler (NSGA-II), give ``trial`` its generation before it samples anything.

    Optuna assigns a generation when a trial samples relative parameters, which a queued trial (an anchor, a warm
    start, a gap fill: every parameter fixed) never does; without this the queued configs would stay outside the
    sampler's populations, and its first generation would be drawn at random, which the screens may reject on and on.
    """
    study = trial.study
    sampler = study.sampler
    if isinstance(sampler, optuna.samplers.BaseGASampler):
        frozen = next(frozen for frozen in study.get_trials(deepcopy=False) if frozen.number == trial.number)
        sampler.get_trial_generation(study, frozen)


def time_saved(study: optuna.Study) -> float:
    """The median time complete trials (not promotions) spent in the phases a zero-shot rejection skips (0 before
    any)."""
    spent = [
        sum(phases.get(name, 0.0) for name in SKIPPED_PHASES)
        for trial in records(study, states=(TrialState.COMPLETE,))
        if trial.rung == 0 and "finetune" in (phases := trial.time_phases())
    ]
    return statistics.median(spent) if spent else 0.0


def observations(study: optuna.Study) -> list[Observation]:
    """The complete trials' latencies with the dense model's timed beside each (what the latency table is fitted on)."""
    return [
        Observation(trial.compression_config(), trial.metrics["latency_ms"], trial.metrics["reference_latency_ms"])
        for trial in records(study, states=(TrialState.COMPLETE,))
        if "reference_latency_ms" in trial.metrics
    ]
