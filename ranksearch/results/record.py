"""What a study stores, written and read in one place: the trial record and the study record.

Every Optuna user attribute the tool writes has one named key here and is written by one helper
(:class:`TrialWriter`, the :data:`STUDY` fields) and read back through :class:`TrialRecord` / :class:`StudyRecord`.
A trial's fate is a typed :class:`Outcome` with a reason; studies written before outcomes were stored get theirs
from the reason's wording, here and nowhere else.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import optuna
from optuna.trial import FrozenTrial, TrialState

from ranksearch.config import CompressionConfig

T = TypeVar("T")


class Outcome(enum.StrEnum):
    """Why a finished trial ended as it did."""

    COMPLETE = "complete"
    FAILED = "failed"
    """Evaluating it raised: the reason is the exception's first line."""
    SCREENED = "screened"
    """Rejected before evaluation by a screen (latency table, sensitivity); not evaluated, does not count."""
    REJECTED_AT_ZERO_SHOT = "rejected_at_zero_shot"
    """Pruned by the zero-shot verdict before fine-tuning: evaluated that far, so it counts towards the budget."""
    NOT_EVALUATED = "not_evaluated"
    """Pruned because the trials ahead of it already fill the budget."""

    @property
    def prefix(self) -> str:
        """How the stored reason of this outcome starts (the wording of the first release)."""
        return _PREFIXES.get(self, "")


_PREFIXES = {
    Outcome.SCREENED: "rejected before evaluation: ",
    Outcome.REJECTED_AT_ZERO_SHOT: "rejected at zero shot: ",
    Outcome.NOT_EVALUATED: "not evaluated: ",
}

# trial user attributes
CONFIG = "config"
PARAMS, MACS, SIZE_BYTES = "params", "macs", "size_bytes"
ANCHOR, WARM_START, GAP_FILL, WORKER = "anchor", "warm_start", "gap_fill", "worker"
PREDICTED_LATENCY_MS, PREDICTED_SPEEDUP = "predicted_latency_ms", "predicted_speedup"
ACCURACY_DROP_PP, SPEEDUP = "accuracy_drop_pp", "speedup"
OUTCOME, SCREEN, FAIL_REASON, SECONDS_SAVED = "outcome", "screen", "fail_reason", "seconds_saved"
RUNG, PROMOTES, FINETUNE_STEPS = "rung", "promotes", "finetune_steps"
"""A promotion's rung (0: the trial the sampler proposed), the trial it promotes, and the fine-tune steps it ran."""
REJECTED_AT_ZERO_SHOT = "rejected_at_zero_shot"
"""Written by the first release on trials pruned at zero shot (read for their outcome)."""
COST_KEYS = (PARAMS, MACS, SIZE_BYTES)
BOOKKEEPING = {CONFIG, ANCHOR, WARM_START, WORKER, OUTCOME, SCREEN, FAIL_REASON, SECONDS_SAVED, REJECTED_AT_ZERO_SHOT}
BOOKKEEPING |= {GAP_FILL, *COST_KEYS, PREDICTED_LATENCY_MS, PREDICTED_SPEEDUP, ACCURACY_DROP_PP, SPEEDUP}
HEARTBEAT = "heartbeat"
"""A trial run through a storage server: ``[unix time of its last heartbeat, seconds between beats]``."""
RETRY_OF = "retry_of"
"""A retried trial (through a storage server): the number of the trial whose worker died."""
RETRIES = "retries"
"""A retried trial (through a storage server): how many times its config was retried."""
WENT_SILENT = "its process went silent (killed, or its machine lost) and another process failed it"
"""The reason of a trial failed because its process died: Optuna stores none for it."""
BOOKKEEPING |= {RUNG, PROMOTES, FINETUNE_STEPS, HEARTBEAT, RETRY_OF, RETRIES}
"""Trial attributes that are not the evaluator's metrics."""


@dataclass(frozen=True)
class TrialRecord:
    """One trial as the tool stored it."""

    number: int
    state: TrialState
    outcome: Outcome | None
    """None while the trial runs or waits."""
    reason: str
    """The stored reason (empty for complete trials), as the first release worded it."""
    screen: str
    """The screen that pruned it before evaluation (empty otherwise, and in studies of the first release)."""
    config: Mapping[str, Any]
    """The config as a dict (``CompressionConfig.to_dict``); empty before it was sampled."""
    anchor: str
    warm_start: str
    cost: Mapping[str, float]
    metrics: Mapping[str, float]
    """What the evaluator measured (``accuracy``, ``latency_ms``, ``time_<phase>_s`` ...)."""
    accuracy_drop_pp: float | None
    speedup: float | None
    predicted_latency_ms: float | None
    predicted_speedup: float | None
    seconds_saved: float | None
    constraints: Mapping[str, float]
    duration_s: float | None
    """Seconds from its start to its end; for a trial whose process died (:attr:`went_silent`), to its last
    heartbeat, or None without one: the time until the kill is not known, and the time until another process
    failed it (a resume hours later, say) was not spent on it."""
    worker: str
    rung: int = 0
    """0 for a trial the sampler proposed (or an anchor, a warm start); r for its promotion to the r-th rung."""
    promotes: int | None = None
    """The trial a promotion re-evaluates with a longer fine-tune."""
    finetune_steps: int | None = None
    """The fine-tune steps of a promotion (None: the study's ``--finetune-steps``)."""
    went_silent: bool = False
    """Failed because its process died, by another process or a resumed run that found it silent: failed with no
    stored reason, and retried (:data:`RETRY_OF`) or failed more than two beats after its last :data:`HEARTBEAT`
    (a trial that fails in its own process ends within a beat of its last)."""

    @classmethod
    def of(cls, trial: FrozenTrial, *, retried: bool = False) -> TrialRecord:
        """The record of ``trial``; ``retried``: the study holds a retry of it (:data:`RETRY_OF`)."""
        attrs = trial.user_attrs
        reason = str(attrs.get(FAIL_REASON, ""))
        went_silent = trial.state == TrialState.FAIL and not reason and (retried or _beats_before_its_end(trial) > 2)
        return cls(
            number=trial.number,
            state=trial.state,
            outcome=_outcome(trial),
            reason=WENT_SILENT if went_silent else reason,
            screen=str(attrs.get(SCREEN, "")),
            config=dict(attrs.get(CONFIG) or {}),
            anchor=str(attrs.get(ANCHOR, "")),
            warm_start=str(attrs.get(WARM_START, "")),
            cost={key: attrs[key] for key in COST_KEYS if key in attrs},
            metrics={k: v for k, v in attrs.items() if k not in BOOKKEEPING},
            accuracy_drop_pp=attrs.get(ACCURACY_DROP_PP),
            speedup=attrs.get(SPEEDUP),
            predicted_latency_ms=attrs.get(PREDICTED_LATENCY_MS),
            predicted_speedup=attrs.get(PREDICTED_SPEEDUP),
            seconds_saved=attrs.get(SECONDS_SAVED),
            constraints=dict(trial.constraints),
            duration_s=_duration_s(trial, went_silent=went_silent),
            worker=str(attrs.get(WORKER, "")),
            rung=int(attrs.get(RUNG, 0)),
            promotes=attrs.get(PROMOTES),
            finetune_steps=attrs.get(FINETUNE_STEPS),
            went_silent=went_silent,
        )

    @property
    def protected(self) -> bool:
        """An anchor or a warm start: a config the study chose to evaluate, not one it sampled."""
        return self.is_protected({ANCHOR: self.anchor, WARM_START: self.warm_start})

    @staticmethod
    def is_protected(user_attrs: Mapping[str, Any]) -> bool:
        """Whether a trial with these user attributes (a running one's) is an anchor or a warm start."""
        return bool(user_attrs.get(ANCHOR) or user_attrs.get(WARM_START))

    @staticmethod
    def passes_soft_screens(user_attrs: Mapping[str, Any]) -> bool:
        """Whether a trial with these user attributes (a waiting or running one's) faces only the hard limits: an
        anchor, a warm start, a promotion, or the retry of a trial whose process died (:data:`RETRY_OF`; the
        screens admitted the trial it repeats, and asking them again, against a latency table refitted since,
        could turn it away on timing noise alone)."""
        return (
            TrialRecord.is_protected(user_attrs)
            or TrialRecord.is_promotion(user_attrs)
            or user_attrs.get(RETRY_OF) is not None
        )

    @property
    def counts_toward_budget(self) -> bool:
        """COMPLETE trials and trials rejected at zero shot (evaluated up to the verdict); not promotions."""
        return self.rung == 0 and self.outcome in (Outcome.COMPLETE, Outcome.REJECTED_AT_ZERO_SHOT)

    @staticmethod
    def is_promotion(user_attrs: Mapping[str, Any]) -> bool:
        """Whether a trial with these user attributes (a waiting or running one's) is a promotion."""
        return int(user_attrs.get(RUNG, 0)) > 0

    @property
    def feasible(self) -> bool:
        """Within the study's constraints (``--max-accuracy-drop``, ``--max-latency-ms``)."""
        return all(value <= 0 for value in self.constraints.values())

    @property
    def layers(self) -> Mapping[str, Mapping[str, Any]]:
        return self.config.get("layers", {})

    def compression_config(self) -> CompressionConfig:
        return CompressionConfig.from_dict(self.config)

    def time_phases(self) -> dict[str, float]:
        """Seconds per evaluator phase (the ``time_<phase>_s`` metrics)."""
        return {k[5:-2]: v for k, v in self.metrics.items() if k.startswith("time_") and k.endswith("_s")}


def _outcome(trial: FrozenTrial) -> Outcome | None:
    if trial.state == TrialState.COMPLETE:
        return Outcome.COMPLETE
    if trial.state == TrialState.FAIL:
        return Outcome.FAILED
    if trial.state != TrialState.PRUNED:
        return None
    stored = trial.user_attrs.get(OUTCOME)
    if stored in Outcome.__members__.values():  # one this release knows (a later one may store others)
        return Outcome(stored)
    if trial.user_attrs.get(REJECTED_AT_ZERO_SHOT):  # the first release: no stored outcome
        return Outcome.REJECTED_AT_ZERO_SHOT
    reason = str(trial.user_attrs.get(FAIL_REASON, ""))
    return Outcome.SCREENED if reason.startswith(Outcome.SCREENED.prefix) else Outcome.NOT_EVALUATED


def last_heartbeat(user_attrs: Mapping[str, Any]) -> tuple[float, float] | None:
    """A trial's :data:`HEARTBEAT`: the unix time of its last beat and the seconds between beats (None: it never
    beat)."""
    beat = user_attrs.get(HEARTBEAT)
    return (float(beat[0]), float(beat[1])) if isinstance(beat, list) and len(beat) == 2 else None


def _beats_before_its_end(trial: FrozenTrial) -> float:
    """How many heartbeat intervals passed between the trial's last beat and its end (0 without either)."""
    beat = last_heartbeat(trial.user_attrs)
    if beat is None or not beat[1] or trial.datetime_complete is None:
        return 0.0
    return (trial.datetime_complete.timestamp() - beat[0]) / beat[1]


def _duration_s(trial: FrozenTrial, *, went_silent: bool) -> float | None:
    """:attr:`TrialRecord.duration_s`."""
    if trial.duration is None or trial.datetime_start is None:
        return None
    seconds = trial.duration.total_seconds()
    if not went_silent:
        return seconds
    beat = last_heartbeat(trial.user_attrs)
    return None if beat is None else min(seconds, max(0.0, beat[0] - trial.datetime_start.timestamp()))


def records(study: optuna.Study, *, states: tuple[TrialState, ...] | None = None) -> list[TrialRecord]:
    """Every trial of ``study`` (or those in ``states``) as a record, by number."""
    if states is not None and TrialState.FAIL not in states:  # only failed trials can have been retried
        return [TrialRecord.of(t) for t in study.get_trials(deepcopy=False, states=states)]
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get(RETRY_OF) for t in trials} - {None}
    return [TrialRecord.of(t, retried=t.number in retried) for t in trials if states is None or t.state in states]


class TrialWriter:
    """Writes what happens to one trial, each fact under its key."""

    def __init__(self, trial: optuna.Trial) -> None:
        self.trial = trial

    def worker(self, label: str) -> None:
        self.trial.set_user_attr(WORKER, label)

    def sampled(self, config: CompressionConfig, cost: Mapping[str, float]) -> None:
        self.trial.set_user_attr(CONFIG, config.to_dict())
        for key in COST_KEYS:
            self.trial.set_user_attr(key, cost[key])

    def predicted(self, latency_ms: float, speedup: float) -> None:
        self.trial.set_user_attr(PREDICTED_LATENCY_MS, latency_ms)
        self.trial.set_user_attr(PREDICTED_SPEEDUP, speedup)

    def fine_tuned(self, steps: int) -> None:
        self.trial.set_user_attr(FINETUNE_STEPS, steps)

    def measured(self, metrics: Mapping[str, float], *, accuracy_drop_pp: float, speedup: float) -> None:
        for key, value in {**metrics, ACCURACY_DROP_PP: accuracy_drop_pp, SPEEDUP: speedup}.items():
            self.trial.set_user_attr(key, value)

    def ended(self, outcome: Outcome, reason: str, *, metrics: Mapping[str, float] | None = None) -> None:
        """A trial that did not complete: its outcome and reason (and what was measured before it ended)."""
        for key, value in (metrics or {}).items():
            self.trial.set_user_attr(key, value)
        self.trial.set_user_attr(OUTCOME, outcome.value)
        self.trial.set_user_attr(FAIL_REASON, outcome.prefix + reason)

    def screened(self, screen: str, reason: str) -> None:
        """Pruned before evaluation by ``screen``."""
        self.trial.set_user_attr(SCREEN, screen)
        self.ended(Outcome.SCREENED, reason)

    def rejected_at_zero_shot(self, reason: str, *, metrics: Mapping[str, float], seconds_saved: float) -> None:
        self.trial.set_user_attr(SECONDS_SAVED, seconds_saved)
        self.trial.set_user_attr(REJECTED_AT_ZERO_SHOT, True)
        self.ended(Outcome.REJECTED_AT_ZERO_SHOT, reason, metrics=metrics)


def anchor_attrs(label: str) -> dict[str, str]:
    """The user attributes of an enqueued anchor (the baseline or a uniform config)."""
    return {ANCHOR: label}


def warm_start_attrs(label: str) -> dict[str, str]:
    """The user attributes of an enqueued warm start."""
    return {WARM_START: label}


def gap_fill_attrs(label: str) -> dict[str, str]:
    """The user attributes of an enqueued gap fill (``--fill-gaps``): screened and rejected like a sampled trial."""
    return {GAP_FILL: label}


def promotion_attrs(source: TrialRecord, *, rung: int, finetune_steps: int) -> dict[str, Any]:
    """The user attributes of an enqueued promotion of ``source`` (or of the trial ``source`` promotes) to ``rung``."""
    return {RUNG: rung, PROMOTES: source.promotes or source.number, FINETUNE_STEPS: finetune_steps}


class StudyField(Generic[T]):
    """One study user attribute: its key, and its value when the study has none yet."""

    def __init__(self, key: str, empty: Callable[[], T]) -> None:
        self.key = key
        self.empty = empty

    def read(self, study: optuna.Study) -> T:
        value = study.user_attrs.get(self.key)
        return self.empty() if value is None else value

    def stored(self, study: optuna.Study) -> bool:
        return study.user_attrs.get(self.key) is not None

    def write(self, study: optuna.Study, value: T) -> None:
        study.set_user_attr(self.key, value)


IDENTITY = StudyField[dict[str, Any]]("identity", dict)
"""The settings that define what the study measures; a study resumed with others is refused."""
SETTINGS = StudyField[dict[str, Any]]("settings", dict)
"""The latest run's settings by option name (workers follow its budget and timeout)."""
MODEL = StudyField[dict[str, Any]]("model", dict)
"""How to rebuild the uncompressed model: ``build_model`` arguments and its weights file."""
BASELINE = StudyField[dict[str, float]]("baseline", dict)
"""The uncompressed model's metrics and costs."""
FINGERPRINT = StudyField[dict[str, str]]("fingerprint", dict)
"""Digests of the trained weights and the data splits the study was measured with."""
TEST_ACCURACY = StudyField[dict[str, float]]("test_accuracy", dict)
"""Test accuracy per front member, keyed by the trial number as a string."""
PHASES = StudyField[dict[str, float]]("phase_seconds", dict)
"""Seconds per phase outside the trials (load, baseline training, test of the front), summed over the runs of the
study: a run killed and resumed, or rerun with a larger budget, adds its phases to the earlier runs'."""
OBJECTIVES = StudyField[dict[str, str]]("objectives", dict)
"""What the objective values are: ``{"latency": "relative"}`` (the candidate's latency over the dense model's timed
beside it); absent in studies written before paired latency, whose second value is milliseconds."""
RETIMED = StudyField[dict[str, dict[str, float]]]("retimed", dict)
"""Front members timed again beside the dense model after the search, keyed by trial number as a string:
``speedup`` (median), ``speedup_low`` / ``speedup_high`` (its 95 % interval over rounds), ``rounds``."""
CUT_TIMINGS = StudyField[dict[str, dict[str, float]]]("cut_timings", dict)
"""Trials timed again beside the dense model before a promotion cut, keyed by trial number as a string: the fields
of :data:`RETIMED` and ``cut``, the rung the cut promoted to. Each counts as one more timing of the trial's config
(pooled into its speedup, its rounds among the config's), not as a re-timing that decides."""
TEST_DROP = StudyField[dict[str, dict[str, float]]]("test_drop", dict)
"""Per front member (trial number as a string): the test accuracy drop against the baseline on the same images, in
points, with its paired 95 % interval: ``drop_pp``, ``low_pp``, ``high_pp``, ``images``."""
RECOVERED = StudyField[dict[str, dict[str, Any]]]("recovered", dict)
"""Trials fine-tuned after the search (the recovery stage, ``ranksearch finetune``), keyed by trial number as a
string: ``epochs``, ``lr``, ``feature_weight``, ``steps``, ``seconds``, ``test_accuracy``, ``drop_pp``,
``low_pp``, ``high_pp``, ``images`` (the test split's), ``checkpoint`` (the path of the recovered model) and
:data:`RECOVERED_VALIDATION`."""
RECOVERED_VALIDATION = "validation"
"""The entry of a :data:`RECOVERED` trial that holds its drop on the whole validation split (``drop_pp``, ``low_pp``,
``high_pp``, ``images``); recoveries by releases before 2026-12-03 have none."""
RECOVERED_FOLDER = "recovered"
"""The folder of a study's results directory that its recovered models are saved in (``trial-<N>.pt``)."""


def recovered_checkpoint(stored: Mapping[str, Any], directory: Path | None) -> Path:
    """Where the model of a :data:`RECOVERED` entry is: the path recorded when it was saved or, when no file is there
    any more (the study's results directory was moved or copied elsewhere), the file of that name in
    ``directory``'s :data:`RECOVERED_FOLDER` if one is there. ``directory``: the study's results directory, where
    known."""
    recorded = Path(stored["checkpoint"])
    if directory is not None and not recorded.is_file():
        moved = directory / RECOVERED_FOLDER / recorded.name
        if moved.is_file():
            return moved.resolve()
    return recorded


@dataclass(frozen=True)
class StudyRecord:
    """The study-level facts the tool stored."""

    name: str
    identity: Mapping[str, Any] = field(default_factory=dict)
    settings: Mapping[str, Any] = field(default_factory=dict)
    model: Mapping[str, Any] = field(default_factory=dict)
    baseline: Mapping[str, float] = field(default_factory=dict)
    fingerprint: Mapping[str, str] = field(default_factory=dict)
    test_accuracy: Mapping[str, float] = field(default_factory=dict)
    phase_seconds: Mapping[str, float] = field(default_factory=dict)
    objectives: Mapping[str, str] = field(default_factory=dict)
    retimed: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    test_drop: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    recovered: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    @classmethod
    def of(cls, study: optuna.Study) -> StudyRecord:
        return cls(
            name=study.study_name,
            identity=IDENTITY.read(study),
            settings=SETTINGS.read(study),
            model=MODEL.read(study),
            baseline=BASELINE.read(study),
            fingerprint=FINGERPRINT.read(study),
            test_accuracy=TEST_ACCURACY.read(study),
            phase_seconds=PHASES.read(study),
            objectives=OBJECTIVES.read(study),
            retimed=RETIMED.read(study),
            test_drop=TEST_DROP.read(study),
            recovered=RECOVERED.read(study),
        )

    @property
    def relative_latency(self) -> bool:
        """Whether the second objective is the latency relative to the dense model (else milliseconds)."""
        return self.objectives.get("latency") == "relative"

    def test_accuracy_of(self, trial: int) -> float | None:
        return self.test_accuracy.get(str(trial))

    def recovered_validation_drop(self, trial: int) -> Mapping[str, float] | None:
        """Trial ``trial``'s drop on the validation split after its recovery (:data:`RECOVERED_VALIDATION`); None
        when it was not recovered, or recovered before validation was measured."""
        return self.recovered.get(str(trial), {}).get(RECOVERED_VALIDATION)
