"""Run settings by concern: each option belongs to one spec, defaults are defined once, stored settings come back."""

from __future__ import annotations

import dataclasses
import inspect
import json
from pathlib import Path

import pytest

from ranksearch.cli import run
from ranksearch.errors import RanksearchError
from ranksearch.evaluate import ClassificationEvaluator, EvaluatorOptions
from ranksearch.study.settings import (
    IDENTITY,
    InfraSpec,
    ProblemSpec,
    RecoveryRecipe,
    RecoverySpec,
    RunSettings,
    SearchSpec,
)

SPECS = (ProblemSpec, EvaluatorOptions, SearchSpec, RecoverySpec, InfraSpec)


def test_every_run_option_is_one_field_of_one_spec_with_the_same_default() -> None:
    fields = [f for spec in SPECS for f in dataclasses.fields(spec)]
    names = [f.name for f in fields]
    assert len(names) == len(set(names)), "an option name in two specs"
    options = inspect.signature(run).parameters
    assert set(options) == set(names) - {"space_digest"}
    for f in fields:
        if f.name == "latency_backend":  # left out: the spec's default (torch), or onnxruntime with --target
            assert options[f.name].default is None and f.default == "torch"
        elif f.name in options:
            assert options[f.name].default == f.default, f"--{f.name}: the CLI's default is not the spec's"


def test_the_evaluator_defaults_are_the_run_defaults() -> None:
    init = inspect.signature(ClassificationEvaluator.__init__).parameters
    assert init["options"].default is None  # EvaluatorOptions() then: no second set of defaults
    assert "finetune_steps" not in init


def test_options_go_to_their_spec_and_unknown_ones_are_refused() -> None:
    settings = RunSettings.of(model="resnet50", finetune_steps=5, budget=3, threads=2, final_epochs=1)
    assert settings.problem.model == "resnet50" and settings.evaluation.finetune_steps == 5
    assert settings.search.budget == 3 and settings.infra.threads == 2 and settings.recovery.final_epochs == 1
    assert settings.replace(budget=4).search.budget == 4 and settings.search.budget == 3
    with pytest.raises(TypeError, match="no option 'budgett'"):
        RunSettings.of(budgett=3)


def test_stored_settings_round_trip_by_option_name() -> None:
    settings = RunSettings.of(space=Path("s.yaml"), checkpoint=Path("w.pt"), results_dir=Path("out"), seed=3)
    stored = json.loads(json.dumps(settings.to_flat()))
    assert stored["space"] == "s.yaml" and stored["seed"] == 3
    assert RunSettings.from_flat(stored) == settings  # paths come back as paths
    assert RunSettings.from_flat({**stored, "option_of_a_later_release": 1}, budget=9).search.budget == 9


def test_settings_stored_before_the_recovery_stage_load_with_its_defaults() -> None:
    recovery = RecoverySpec(final_epochs=5, final_top=1, final_lr=0.05, final_feature_weight=3.0)
    stored = RunSettings(recovery=recovery).to_flat()
    older = {name: value for name, value in stored.items() if not name.startswith("final_")}
    assert RunSettings.from_flat(older).recovery == RecoverySpec()
    assert RunSettings.from_flat(stored).recovery == recovery
    assert recovery.recipe == RecoveryRecipe(epochs=5, lr=0.05, feature_weight=3.0)


def test_identity_is_what_defines_the_problem_and_the_evaluation() -> None:
    settings = RunSettings.of()
    assert set(settings.identity()) == set(IDENTITY)
    assert settings.replace(budget=99, workers=3, timeout=5.0).identity_digest() == settings.identity_digest()
    recovery = {"final_epochs": 0, "final_top": 9, "final_lr": 0.1, "final_feature_weight": 0.0}
    assert settings.replace(**recovery).identity_digest() == settings.identity_digest()
    for change in ({"finetune_steps": 5}, {"model": "resnet50"}, {"space_digest": "x"}, {"device": "cuda"}):
        assert settings.replace(**change).identity_digest() != settings.identity_digest(), change


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"budget": 0}, "--budget 0: must be a positive number"),
        ({"sampler": "grid"}, "--sampler 'grid' is unknown"),
        ({"latency_backend": "tvm"}, "--latency-backend 'tvm' is unknown; choose torch, onnxruntime or compile"),
        ({"finetune_steps": -1}, "--finetune-steps -1: must be 0 or more"),
        ({"batch_size": 0}, "--batch-size 0: must be positive"),
        ({"threads": 0}, "--threads 0: must be positive"),
        ({"val_fraction": 1.0}, "--val-fraction 1.0: must be between 0 and 1"),
        ({"max_zero_shot_drop": -1.0}, "--max-zero-shot-drop -1.0: must be >= 0"),
        ({"study_name": "a b"}, "--study-name 'a b': use letters"),
        ({"final_epochs": -1}, "--final-epochs -1: must be 0"),
        ({"final_top": 0}, "--final-top 0: must be positive"),
        ({"final_lr": 0.0}, "--final-lr 0.0: must be positive; pass e.g. 0.03"),
        ({"final_feature_weight": -1.0}, "--final-feature-weight -1.0: must be 0 .logits only. or more; pass e.g. 10"),
        ({"latency_backend": "onnxruntime", "device": "cuda"}, "times on CPU, not --device cuda"),
        ({"latency_backend": "compile", "device": "cuda"}, "--latency-backend compile times on CPU, not --device cuda"),
    ],
)
def test_bad_values_are_one_line_errors(options: dict[str, object], message: str) -> None:
    with pytest.raises(RanksearchError, match=message.replace("(", r"\(")):
        RunSettings.of(**options).validate()


@pytest.mark.parametrize(
    ("model", "name"),
    [
        ("resnet18", "resnet18-fashion_mnist-resnet"),
        ("timm:resnet18", "timm-resnet18-fashion_mnist-resnet"),
        ("models/mine.py:build", "mine-fashion_mnist-resnet"),
    ],
)
def test_the_default_study_name_names_the_model(model: str, name: str) -> None:
    assert RunSettings.of(model=model, space=Path("spaces/resnet.yaml")).name() == name


def test_trust_in_a_checkpoint_is_never_read_back_from_a_study() -> None:
    stored = json.loads(json.dumps(RunSettings.of(trust_checkpoint=True).to_flat()))
    assert RunSettings.from_flat(stored).problem.trust_checkpoint is False  # a worker or finetune decides itself
    assert RunSettings.from_flat(stored, trust_checkpoint=True).problem.trust_checkpoint is True
