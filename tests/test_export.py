"""Inspecting a study and exporting a choice: rules on a synthetic study, and the round trip on a tiny real one."""

from __future__ import annotations

import io
import json
import re
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import optuna
import pandas as pd
import pytest
import torch
from optuna.trial import TrialState, create_trial
from rich.console import Console
from torch import nn
from typer.testing import CliRunner

import ranksearch as rs
from ranksearch.cli import app
from ranksearch.compress import quantize_layers
from ranksearch.evaluate.classification import ClassificationEvaluator
from ranksearch.measure.latency import torch_threads
from ranksearch.results import front_trials, locate_study, record
from ranksearch.results.build import build_from_config
from ranksearch.results.export import export_config, export_trial
from ranksearch.results.select import select_trial
from ranksearch.results.show import show_rows, show_study
from ranksearch.study import load_problem

BUDGET = 7
"""The five anchors (baseline, uniform svd/tucker2 at 0.5 and 0.25) and two sampled trials."""


# --- a synthetic study: exact metrics, no training -------------------------------------------------------------------

BASELINE = {"accuracy": 0.90, "latency_ms": 10.0, "params": 1000, "macs": 5000}
MODEL_SPEC = {"name": "resnet18", "num_classes": 10, "in_channels": 1, "image_size": 28, "checkpoint": None}
# number: (accuracy, latency_ms, feasible); accuracy drop = 100 * (0.90 - accuracy) pp
SYNTHETIC = {
    0: (0.900, 10.0, True),  # the baseline
    1: (0.895, 8.0, True),  # drop 0.5
    2: (0.880, 5.0, True),  # drop 2.0
    3: (0.850, 3.0, True),  # drop 5.0
    4: (0.899, 2.0, False),  # fastest and accurate, but breaks the study's constraint
    5: (0.890, 6.0, True),  # drop 1.0
}


@pytest.fixture
def synthetic() -> optuna.Study:
    study = optuna.create_study(directions=["maximize", "minimize"], study_name="synthetic")
    record.BASELINE.write(study, BASELINE)
    record.MODEL.write(study, MODEL_SPEC)
    record.SETTINGS.write(study, {"model": "resnet18", "seed": 0})
    record.TEST_ACCURACY.write(study, {"2": 0.87})
    for number, (accuracy, latency, feasible) in SYNTHETIC.items():
        config = {"layers": {"layer1.0.conv1": {"technique": "svd", "rank": 0.5}}} if number else {"layers": {}}
        attrs = {
            "config": config,
            "accuracy": accuracy,
            "latency_ms": latency,
            "accuracy_drop_pp": 100 * (BASELINE["accuracy"] - accuracy),
            "speedup": BASELINE["latency_ms"] / latency,
            "params": 900,
            "macs": 4000,
        }
        study.add_trial(
            create_trial(
                values=[accuracy, latency], user_attrs=attrs, constraints={"latency": -1.0 if feasible else 1.0}
            )
        )
    study.add_trial(create_trial(state=TrialState.FAIL, user_attrs={"fail_reason": "FloatingPointError: nan"}))
    return study


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        ({"max_accuracy_drop": 1.0}, 5),  # fastest within 1 pp (trial 4 is faster but infeasible)
        ({"max_accuracy_drop": 2.5}, 2),
        ({"max_accuracy_drop": 100.0}, 3),
        ({"max_accuracy_drop": 0.0}, 0),  # only the baseline itself
        ({"max_latency_ms": 7.0}, 5),  # most accurate within 7 ms
        ({"max_latency_ms": 9.0}, 1),
        ({"max_latency_ms": 3.0}, 3),
        ({"max_accuracy_drop": 2.5, "max_latency_ms": 5.5}, 2),  # fastest within both
        ({"max_accuracy_drop": 5.0, "max_latency_ms": 7.0}, 3),
    ],
)
def test_select_by_rule(synthetic, rule, expected) -> None:
    assert select_trial(synthetic, **rule).number == expected


@pytest.mark.parametrize(
    ("rule", "closest", "needs"),
    [
        ({"max_latency_ms": 2.5}, 3, {"max_latency_ms": "3.000"}),
        ({"max_accuracy_drop": 2.0, "max_latency_ms": 4.0}, 2, {"max_latency_ms": "5.000"}),
        (
            {"max_accuracy_drop": 0.2, "max_latency_ms": 2.5},
            5,
            {"max_accuracy_drop": "1.00", "max_latency_ms": "6.000"},
        ),
    ],
)
def test_no_match_names_the_closest_trial_and_what_it_needs(synthetic, rule, closest, needs) -> None:
    with pytest.raises(rs.RanksearchError) as info:
        select_trial(synthetic, **rule)
    message = str(info.value)
    assert "\n" not in message and f"the closest, trial {closest} " in message
    for key, value in needs.items():
        assert f"--{key.replace('_', '-')} {value}" in message
    relaxed = {**rule, **{key: float(value) for key, value in needs.items()}}
    assert select_trial(synthetic, **relaxed).number == closest  # what it needs is enough


def test_select_by_number(synthetic) -> None:
    assert select_trial(synthetic, trial=4).number == 4  # an explicit choice may be infeasible
    with pytest.raises(rs.RanksearchError, match=r"^--trial 6: trial 6 of study 'synthetic' is FAIL \(Float.*nan\)"):
        select_trial(synthetic, trial=6)
    with pytest.raises(rs.RanksearchError, match=r"--trial 42: study 'synthetic' has no such trial \(trials: 0\.\.6\)"):
        select_trial(synthetic, trial=42)


@pytest.mark.parametrize(
    ("selector", "message"),
    [
        ({}, "no trial chosen; pass --trial N"),
        ({"trial": 1, "max_latency_ms": 5.0}, "--trial 1 and a rule"),
        ({"max_accuracy_drop": -1.0}, "--max-accuracy-drop -1.0: must be >= 0"),
        ({"max_latency_ms": 0.0}, "--max-latency-ms 0.0: must be positive"),
    ],
)
def test_bad_selectors(synthetic, selector, message) -> None:
    with pytest.raises(rs.RanksearchError, match=re.escape(message)):
        select_trial(synthetic, **selector)


def test_rules_on_a_study_without_feasible_trials() -> None:
    study = optuna.create_study(directions=["maximize", "minimize"], study_name="empty")
    with pytest.raises(rs.RanksearchError, match="study 'empty' has no complete feasible trial yet"):
        select_trial(study, max_accuracy_drop=1.0)


def test_export_records_model_metrics_and_provenance(synthetic, tmp_path) -> None:
    config = export_config(synthetic, select_trial(synthetic, trial=2))
    assert config.model == MODEL_SPEC
    assert config.layers == {"layer1.0.conv1": rs.LayerChoice("svd", 0.5)}
    meta = config.meta
    assert (meta["study"], meta["trial"], meta["storage"]) == ("synthetic", 2, None)
    assert meta["metrics"]["test_accuracy"] == 0.87 and meta["metrics"]["latency_ms"] == 5.0
    assert meta["metrics"]["accuracy_drop_pp"] == pytest.approx(2.0)
    assert meta["baseline"] == BASELINE and meta["settings"]["model"] == "resnet18"
    assert set(meta["versions"]) == {"ranksearch", "torch", "torchvision", "optuna"}
    assert datetime.fromisoformat(meta["exported"]).tzinfo is not None
    url = "postgresql+psycopg2://search:s3cret@db.example:5432/studies"
    hidden = export_config(synthetic, select_trial(synthetic, trial=2), storage_url=url).meta["storage"]
    assert hidden == "postgresql+psycopg2://search:***@db.example:5432/studies"

    def undated(c: rs.CompressionConfig) -> rs.CompressionConfig:
        return replace(c, meta={k: v for k, v in c.meta.items() if k != "exported"})

    for name in ("c.yaml", "c.yml", "c.json"):
        path = export_trial(synthetic, trial=2, out=tmp_path / name, console=Console(file=io.StringIO()))
        assert undated(rs.CompressionConfig.load(path)) == undated(config)
    assert (tmp_path / "c.json").read_text().startswith("{")
    assert (tmp_path / "c.yaml").read_text().startswith("version: 1")
    assert not list(tmp_path.glob(".*.tmp"))


def test_export_refuses_bad_output_and_studies_without_a_model(synthetic, tmp_path) -> None:
    with pytest.raises(rs.RanksearchError, match=r"--out .*c\.txt: use a file name ending in \.yaml, \.yml, \.json"):
        export_trial(synthetic, trial=2, out=tmp_path / "c.txt")
    (tmp_path / "a-file").write_text("")
    with pytest.raises(rs.RanksearchError, match=r"a-file/c\.yaml: cannot be written"):
        export_trial(synthetic, trial=2, out=tmp_path / "a-file" / "c.yaml")
    record.MODEL.write(synthetic, {})
    with pytest.raises(rs.RanksearchError, match=r"does not record its model.*rerun its `ranksearch run`"):
        export_config(synthetic, synthetic.trials[2])


def test_build_from_config_needs_a_model_section() -> None:
    with pytest.raises(rs.RanksearchError, match="'model' section lacks in_channels, image_size"):
        build_from_config({"model": {"name": "resnet18", "num_classes": 10}, "layers": {}})


def test_show_formats_on_the_synthetic_study(synthetic) -> None:
    out = io.StringIO()
    show_study(synthetic, fmt="csv", out=out)
    front = pd.read_csv(io.StringIO(out.getvalue()))
    assert list(front["trial"]) == [3, 2, 5, 1, 0]  # the feasible front, fastest first
    assert list(front["speedup"]) == pytest.approx([10 / 3, 2.0, 10 / 6, 1.25, 1.0])
    assert list(front["accuracy_drop_pp"]) == pytest.approx([5.0, 2.0, 1.0, 0.5, 0.0])
    assert front.set_index("trial")["test_accuracy"].get(2) == 0.87
    assert list(front["layer:layer1.0.conv1"]) == ["svd@0.5"] * 4 + ["keep"]
    out = io.StringIO()
    show_study(synthetic, all_trials=True, fmt="json", out=out)
    document = json.loads(out.getvalue())
    assert document["study"] == "synthetic" and document["baseline"] == BASELINE
    rows = document["rows"]
    assert [r["trial"] for r in rows] == list(range(7))
    assert [r["front"] for r in rows] == [True, True, True, True, False, True, False]
    assert rows[6]["state"] == "FAIL" and rows[6]["accuracy"] is None and "nan" in rows[6]["fail_reason"]
    console = Console(file=io.StringIO(), width=200)
    show_study(synthetic, console=console)
    table = console.file.getvalue()
    assert "synthetic: Pareto front, 5 trials, fastest first" in table and "baseline: val acc 90.00%" in table
    assert "3.33x" in table and "+5.00" in table and "87.00" in table
    with pytest.raises(rs.RanksearchError, match="--format 'xml' is unknown; choose one of table, csv, json"):
        show_study(synthetic, fmt="xml")


# --- the round trip on a tiny real study ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real(tiny_search):
    """The session's finished tiny study (real Fashion-MNIST subset, real training and latency) and its settings."""
    settings, result = tiny_search
    return settings, result.study


def structure(model: nn.Module) -> dict[str, object]:
    """Module types per name, then every state entry's shape (quantized weights dequantized)."""
    modules = {name: type(m).__name__ for name, m in model.named_modules()}
    state = {
        key: tuple(value.shape) if isinstance(value, torch.Tensor) else repr(value)
        for key, value in model.state_dict().items()
    }
    return {"modules": modules, "state": state}


def same_state(a: nn.Module, b: nn.Module) -> bool:
    def plain(value: object) -> object:
        return value.dequantize() if isinstance(value, torch.Tensor) and value.is_quantized else value

    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        torch.equal(plain(sa[k]), plain(sb[k])) if isinstance(sa[k], torch.Tensor) else sa[k] == sb[k] for k in sa
    )


def choose(study: optuna.Study, which: str) -> optuna.trial.FrozenTrial:
    compressed = [
        t
        for t in study.get_trials(states=(TrialState.COMPLETE,))
        if any(c["technique"] != "keep" for c in layers_of(t))
    ]
    if which == "front":
        # the most accurate compressed front member (or compressed trial, should latency noise under CPU load
        # leave only the baseline on the front)
        front = {t.number for t in front_trials(study)}
        return max(compressed, key=lambda t: (t.number in front, t.user_attrs["accuracy"]))
    # the sampled trial with the most int8 and data-aware layers (anchors have none)
    return max(compressed, key=lambda t: sum(c.get("int8", 0) + c.get("data_aware", 0) for c in layers_of(t)))


def layers_of(trial: optuna.trial.FrozenTrial) -> list[dict]:
    return list(trial.user_attrs["config"]["layers"].values())


@pytest.mark.parametrize("which", ["front", "int8_and_data_aware"])
def test_exported_config_rebuilds_the_trial(real, tmp_path, which) -> None:
    settings, study = real
    trial = choose(study, which)
    layers = layers_of(trial)
    if which == "int8_and_data_aware":
        assert any(c.get("int8") for c in layers) and any(c.get("data_aware") for c in layers)

    path = export_trial(study, trial=trial.number, out=tmp_path / "choice.yaml", console=Console(file=io.StringIO()))
    config = rs.CompressionConfig.load(path)
    checkpoint = config.model["checkpoint"]
    assert Path(checkpoint).is_file() and config.meta["trial"] == trial.number
    assert config.meta["metrics"]["params"] == trial.user_attrs["params"]
    on_front = trial.number in {t.number for t in front_trials(study)}
    assert ("test_accuracy" in config.meta["metrics"]) == on_front  # measured for front members only

    # the study's own problem: its data splits and the trained model it compressed
    context = load_problem(settings, torch.device("cpu"), Console(file=io.StringIO()))
    calib = torch.stack([context.splits.train[i][0] for i in range(16)])
    float_config, int8_layers = config.split_int8()
    trial_model = quantize_layers(rs.apply_config(context.model, float_config, calib_inputs=calib), int8_layers, calib)

    rebuilt = build_from_config(path, checkpoint=checkpoint, calib_inputs=calib)
    assert structure(rebuilt) == structure(trial_model)
    assert same_state(rebuilt, trial_model)
    fresh = build_from_config(replace(config, layers={}), checkpoint=checkpoint)
    assert structure(rs.apply_config(fresh, path, calib_inputs=calib)) == structure(rebuilt)  # a plain config too
    float_model = build_from_config(float_config, checkpoint=checkpoint, calib_inputs=calib)
    assert sum(p.numel() for p in float_model.parameters()) == trial.user_attrs["params"]

    # the trial's evaluator pipeline (recalibrate, fine-tune, int8, evaluate), same seed, on the fresh baseline
    evaluator = ClassificationEvaluator(
        model=fresh,
        splits=context.splits,
        device=torch.device("cpu"),
        options=settings.evaluation,
        threads=settings.infra.threads,
        seed=settings.problem.seed,
    )
    steps = trial.user_attrs.get("finetune_steps", settings.evaluation.finetune_steps)  # a promotion's are its own
    assert config.meta.get("finetune_steps", settings.evaluation.finetune_steps) == steps
    split = "full_val" if trial.user_attrs.get("rung") else "val"  # promotions are scored on the whole split
    with torch_threads(settings.infra.threads):
        metrics = evaluator.evaluate_at(config, finetune_steps=steps, split=split)
    assert metrics.accuracy == trial.user_attrs["accuracy"]


def test_show_rows_of_the_real_study(real) -> None:
    _, study = real
    front = show_rows(study)
    assert [r["trial"] for r in front] == [t.number for t in front_trials(study)]
    assert [r["speedup"] for r in front] == sorted((r["speedup"] for r in front), reverse=True)  # fastest first
    assert all(r["test_accuracy"] is not None for r in front)
    assert len(show_rows(study, all_trials=True)) == len(study.trials) >= BUDGET


cli = CliRunner()


def test_cli_show_and_export(real, tmp_path) -> None:
    settings, study = real
    where = ["--results-dir", str(settings.infra.results_dir)]
    result = cli.invoke(app, ["show", study.study_name, "--format", "csv", *where])
    assert result.exit_code == 0, result.stderr
    assert list(pd.read_csv(io.StringIO(result.stdout))["trial"]) == [t.number for t in front_trials(study)]
    result = cli.invoke(app, ["show", str(settings.infra.results_dir / study.study_name), "--all", "--format", "json"])
    assert result.exit_code == 0 and len(json.loads(result.stdout)["rows"]) == len(study.trials), result.stderr
    result = cli.invoke(app, ["show", study.study_name, "--all", *where])
    assert result.exit_code == 0 and f"{study.study_name}: all {len(study.trials)} trials" in result.stdout
    out = tmp_path / "fast.json"
    result = cli.invoke(app, ["export", study.study_name, "--max-accuracy-drop", "100", "--out", str(out), *where])
    if any(t.number != 0 for t in front_trials(study)):  # trial 0 is the dense model
        expected = select_trial(study, max_accuracy_drop=100.0).number
    else:  # timed under load, nothing was measurably faster than the dense model: the rule refuses to export
        assert result.exit_code == 2 and "measurably faster than the dense model" in result.stderr
        assert not out.exists()
        expected = 1
        result = cli.invoke(app, ["export", study.study_name, "--trial", "1", "--out", str(out), *where])
    assert result.exit_code == 0, result.stderr
    exported = rs.CompressionConfig.load(out)
    assert exported.meta["trial"] == expected
    assert f"wrote {out}: trial {exported.meta['trial']}" in result.stderr.replace("\n", "")
    assert exported.meta["storage"] == locate_study(study.study_name, results_dir=settings.infra.results_dir)[0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["show", "nope"], "study 'nope': no study.db in"),
        (["export", "nope", "--trial", "0"], "study 'nope': no study.db in"),
        (["export", "STUDY", "--trial", "999"], "--trial 999: study 'STUDY' has no such trial"),
        (["export", "STUDY"], "no trial chosen"),
        (["show", "STUDY", "--format", "xml"], "--format 'xml' is unknown"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2(real, args, message) -> None:
    settings, study = real
    args = [a.replace("STUDY", study.study_name) for a in args]
    message = message.replace("STUDY", study.study_name)
    result = cli.invoke(app, [*args, "--results-dir", str(settings.infra.results_dir)])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert message in lines[0], lines[0]
