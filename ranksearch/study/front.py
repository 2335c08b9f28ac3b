"""After the trials: confirm the front's speedups, then measure its members on the test split with paired intervals."""

from __future__ import annotations

import optuna
import torch
from rich.console import Console

from ranksearch.config import CompressionConfig
from ranksearch.errors import RanksearchError
from ranksearch.evaluate import Evaluator, Metrics, MultiFidelity, PairedTiming
from ranksearch.results import front_trials
from ranksearch.results.confidence import paired_drop
from ranksearch.results.front import compresses_nothing, front_with_speeds, study_speeds
from ranksearch.results.record import CUT_TIMINGS, OBJECTIVES, RETIMED, TEST_ACCURACY, TEST_DROP, TrialRecord

__all__ = [
    "RETIME_ROUNDS",
    "RETIME_SECONDS",
    "confirm_front_speedups",
    "measure_front_test_accuracy",
    "paired_timer",
    "retime_trial",
]

RETIME_ROUNDS = 10
"""Alternating rounds of a re-timing: a config no faster than the dense model passes all of them with p <= 1/1024."""
RETIME_SECONDS = 2.0
"""Seconds a re-timing spends on both models together."""


def confirm_front_speedups(
    study: optuna.Study,
    evaluator: Evaluator,
    console: Console,
    *,
    rounds: int = RETIME_ROUNDS,
    target_seconds: float = RETIME_SECONDS,
) -> int:
    """Time the front's borderline members (:attr:`~ranksearch.results.front.Speed.borderline`: not faster in every
    round, or rounds too far apart) again beside the dense model (:func:`retime_trial`), until every
    member is measurably faster than the dense model (or is the dense model): a member found not faster leaves
    the front, and whoever it dominated is considered in turn. Needs a :class:`PairedTiming` evaluator and a study
    with paired latency; returns the number of trials timed again."""
    timer = paired_timer(study, evaluator)
    if timer is None:
        return 0
    count = 0
    while True:
        members, speeds = front_with_speeds(study, confirmed=False)
        pending = [
            record
            for record in map(TrialRecord.of, members)
            if not compresses_nothing(record) and speeds[record.number].borderline
        ]
        if not pending:
            return count
        for record in pending:
            retime_trial(study, timer, record, console, rounds=rounds, target_seconds=target_seconds)
            count += 1


def paired_timer(study: optuna.Study, evaluator: object) -> PairedTiming | None:
    """``evaluator`` where it can time a config beside the dense model and ``study``'s latency is paired, else None."""
    if isinstance(evaluator, PairedTiming) and OBJECTIVES.read(study).get("latency") == "relative":
        return evaluator
    return None


def retime_trial(
    study: optuna.Study,
    timer: PairedTiming,
    record: TrialRecord,
    console: Console,
    *,
    before_cut: int | None = None,
    rounds: int = RETIME_ROUNDS,
    target_seconds: float = RETIME_SECONDS,
) -> None:
    """Time ``record``'s config again beside the dense model and say so on ``console``. After the search it is
    recorded in ``RETIMED`` (it then decides the config's speedup and its slowest and fastest rounds); ``before_cut``,
    the rung a promotion cut is about to promote to, records it in ``CUT_TIMINGS`` instead, as one more timing of the
    config."""
    earlier = study_speeds(study)[record.number]
    paired = timer.time_beside_dense(record.compression_config(), rounds=rounds, target_seconds=target_seconds)
    timing = {
        "speedup": paired.speedup,
        "speedup_low": paired.speedup_low,
        "speedup_high": paired.speedup_high,
        "rounds": float(len(paired.ratios)),
    }
    field = RETIMED if before_cut is None else CUT_TIMINGS
    if before_cut is not None:
        timing["cut"] = float(before_cut)
    field.write(study, {**field.read(study), str(record.number): timing})
    speed = study_speeds(study)[record.number]
    verdict = "measurably faster" if speed.measurably_faster else "not measurably faster"
    when = "" if before_cut is None else f" before the cut to rung {before_cut}"
    predicted = f", predicted {record.predicted_speedup:.2f}x" if before_cut and record.predicted_speedup else ""
    if speed.retimed and earlier.speedup is not None and not earlier.retimed:
        pooled = f"; it replaces the {earlier.speedup:.2f}x of its {_timings(earlier.timings)} in the search"
    else:
        pooled = f"; {speed.speedup:.2f}x over its {speed.timings} timings" if speed.timings > 1 else ""
    console.print(
        f"re-timed trial {record.number}{when}: {paired.speedup:.2f}x "
        f"(rounds {paired.speedup_low:.2f}-{paired.speedup_high:.2f}x{predicted}), {verdict} than the dense model"
        + pooled
    )


def _timings(count: int) -> str:
    return "timing" if count == 1 else f"{count} timings"


def measure_front_test_accuracy(study: optuna.Study, evaluator: Evaluator, console: Console) -> None:
    """Measure test accuracy once per Pareto member (recorded, so a rerun does not repeat it), and where the evaluator
    gives per-image correctness (:attr:`Metrics.correct`), the paired 95 % interval of its drop against the dense
    model on the same images (``TEST_DROP``)."""
    tests, drops = dict(TEST_ACCURACY.read(study)), dict(TEST_DROP.read(study))
    pending = [t for t in front_trials(study) if str(t.number) not in tests or str(t.number) not in drops]
    if not pending:
        return
    baseline = _test_metrics(evaluator, CompressionConfig(layers={}), None, "the dense model", console)
    for trial in pending:
        console.print(f"test split: trial {trial.number}")
        record = TrialRecord.of(trial)
        metrics = _test_metrics(
            evaluator, record.compression_config(), record.finetune_steps, f"trial {trial.number}", console
        )
        if metrics is None:
            continue
        tests[str(trial.number)] = metrics.accuracy
        if baseline is not None and baseline.correct is not None and metrics.correct is not None:
            drop = paired_drop(torch.as_tensor(baseline.correct), torch.as_tensor(metrics.correct))
            drops[str(trial.number)] = drop.to_dict()
            TEST_DROP.write(study, drops)
        TEST_ACCURACY.write(study, tests)


def _test_metrics(
    evaluator: Evaluator, config: CompressionConfig, steps: int | None, what: str, console: Console
) -> Metrics | None:
    """The test split's metrics of ``config`` as its trial was evaluated (a promotion's with its ``steps``)."""
    try:
        if steps is not None and isinstance(evaluator, MultiFidelity):
            return Metrics.coerce(evaluator, evaluator.evaluate_at(config, finetune_steps=steps, split="test"))
        return Metrics.coerce(evaluator, evaluator.evaluate(config, split="test"))
    except (RanksearchError, KeyboardInterrupt):
        raise
    except Exception as exc:
        console.print(f"test split: {what} failed ({type(exc).__name__}: {exc})")
        return None
