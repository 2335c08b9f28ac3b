"""Studies written by the previous release (commit bf18b5c, ``tests/fixtures/legacy``) keep working, and the same
seeded study gives the same trials: configs, states and reasons.

The fixture holds that release's ``results/legacy/study.db``, the tiny model it searched (``tinynet.py``), its
trained weights (``tiny.pt``), its space, and its trial table (``trials.json``); ``make_fixture.py`` says how
they were made. Paths in the stored settings are relative: each test runs in a copy of the folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
from conftest import LEGACY
from optuna.trial import TrialState
from typer.testing import CliRunner

import ranksearch as rs
from ranksearch.cli import app
from ranksearch.results import load_study
from ranksearch.results.record import SETTINGS, Outcome, StudyRecord, records
from ranksearch.study import RunSettings, run_search

OLD_TRIALS = json.loads((LEGACY / "trials.json").read_text())


def recorded_settings(**changes: object) -> RunSettings:
    """The settings the previous release stored with the study, as this release reads them (with this release's
    promotion and recovery stages scaled to the fixture: a few steps, one epoch)."""
    study = load_study("legacy")
    stages = {"promote_steps": "4,8", "final_epochs": 1, "final_top": 2}
    return RunSettings.from_flat(SETTINGS.read(study), **{**stages, **changes})


def test_the_old_study_opens_with_its_records(legacy: Path) -> None:
    study = load_study("legacy")
    record = StudyRecord.of(study)
    assert record.baseline["accuracy"] == pytest.approx(0.7265625)
    assert set(record.test_accuracy) == {"0", "2", "3", "4", "5"}
    outcomes = [t.outcome for t in records(study)]
    assert outcomes.count(Outcome.COMPLETE) == 17
    assert outcomes.count(Outcome.REJECTED_AT_ZERO_SHOT) == 3
    assert outcomes.count(Outcome.SCREENED) == len(OLD_TRIALS) - 20
    assert sum(t.counts_toward_budget for t in records(study)) == 20


def test_the_old_study_shows_exports_plots_and_reports(legacy: Path) -> None:
    runner = CliRunner()
    shown = runner.invoke(app, ["show", "legacy", "--format", "json"])
    assert shown.exit_code == 0, shown.output
    front = json.loads(shown.stdout)["rows"]
    assert [row["trial"] for row in front] == [4, 2, 3, 5, 0]
    every = runner.invoke(app, ["show", "legacy", "--all", "--format", "csv"])
    assert every.exit_code == 0 and every.stdout.count("\n") == len(OLD_TRIALS) + 1
    exported = runner.invoke(app, ["export", "legacy", "--trial", "5", "--out", "trial5.yaml"])
    assert exported.exit_code == 0, exported.output
    config = rs.CompressionConfig.load("trial5.yaml")
    assert config.to_dict()["layers"] == OLD_TRIALS[5]["user_attrs"]["config"]["layers"]
    assert config.model["name"] == "tinynet.py:tiny"
    plotted = runner.invoke(app, ["plot", "legacy"])
    assert plotted.exit_code == 0, plotted.output
    assert (legacy / "results" / "legacy" / "pareto.png").stat().st_size > 10_000
    reported = runner.invoke(app, ["report", "legacy"])
    assert reported.exit_code == 0, reported.output
    assert "legacy" in (legacy / "results" / "legacy" / "report.html").read_text()


@pytest.mark.timeout(600)
def test_the_old_study_resumes(legacy: Path) -> None:
    result = run_search(recorded_settings(budget=22))
    trials = records(result.study)
    assert sum(t.counts_toward_budget for t in trials) == 22
    old = {t["number"]: t for t in OLD_TRIALS}
    for trial in trials[: len(OLD_TRIALS)]:  # the old trials are kept as they were
        assert trial.state.name == old[trial.number]["state"]
        assert trial.reason == old[trial.number]["user_attrs"].get("fail_reason", "")
    assert all(t.state != TrialState.RUNNING for t in trials)


@pytest.mark.timeout(600)
def test_the_same_seeded_study_gives_the_same_anchors(legacy: Path) -> None:
    """The anchors (baseline and uniform configs, enqueued first) give the same configs, states, costs and
    accuracies as the previous release (its ``trials.json``).

    Later trials differ by design: this release's latency objective is the speedup against the dense model timed
    beside each candidate (the previous release's was milliseconds), and its warm starts come from the sensitivity
    x latency knapsack, so the sampler proposes other configs."""
    result = run_search(recorded_settings(results_dir=Path("again")))
    new = result.study.get_trials(deepcopy=False)
    old_anchors = [t for t in OLD_TRIALS if t["user_attrs"].get("anchor")]
    assert len(old_anchors) >= 4
    for trial, old in zip(new, old_anchors, strict=False):
        attrs, old_attrs = trial.user_attrs, old["user_attrs"]
        where = f"trial {trial.number}"
        assert trial.number == old["number"] and trial.state.name == old["state"], where
        assert trial.params == old["params"], where
        assert attrs["config"] == old_attrs["config"], where
        for key in ("anchor", "params", "macs", "accuracy"):
            assert attrs.get(key) == old_attrs.get(key), f"{where}: {key}"
    assert sum(t.counts_toward_budget for t in records(result.study)) == sum(
        t["state"] == "COMPLETE" or bool(t["user_attrs"].get("rejected_at_zero_shot")) for t in OLD_TRIALS
    )
    checked = [t for t in new if "zero_shot_accuracy" in t.user_attrs and t.state == TrialState.COMPLETE]
    assert checked  # early rejection still runs on the sampler's proposals
    assert optuna.load_study(study_name="legacy", storage="sqlite:///again/legacy/study.db").user_attrs["baseline"][
        "accuracy"
    ] == pytest.approx(0.7265625)
