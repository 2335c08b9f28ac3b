"""The recovery stage: front members fine-tuned for whole epochs after the search, tested on the full test split with
a paired interval against the dense model, recorded, saved and loaded back; ``ranksearch finetune``.

The tests run on the legacy fixture's trained CNN and study (``tests/fixtures/legacy``), on a smaller training split
than the study's where the study's data need not match (its fingerprint is checked by ``ranksearch finetune`` only).
"""

from __future__ import annotations

import io
import itertools
import shutil
from dataclasses import replace
from pathlib import Path

import optuna
import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from ranksearch.cli import app
from ranksearch.config import CompressionConfig
from ranksearch.data import make_loader
from ranksearch.errors import RanksearchError
from ranksearch.results import load_study
from ranksearch.results.record import RECOVERED, RECOVERED_VALIDATION, SETTINGS, TrialRecord, recovered_checkpoint
from ranksearch.study import RunContext, RunSettings, load_problem, recovery
from ranksearch.study.recovery import (
    RECOVERY_LR,
    RECOVERY_TARGET_PP,
    Recoverer,
    load_recovered,
    recorded_recovery,
    recover_front,
    recovery_plan,
)
from ranksearch.study.settings import RecoveryRecipe
from ranksearch.techniques.int8 import Int8Module
from ranksearch.training import DivergedError, TeacherCache, correct_predictions, finetune, warmup_cosine

QUIET = Console(file=io.StringIO())
RECORD_KEYS = {
    "epochs",
    "lr",
    "feature_weight",
    "steps",
    "seconds",
    "test_accuracy",
    "drop_pp",
    "low_pp",
    "high_pp",
    "images",
    "validation",
}


def context(study: optuna.Study, **changes: object) -> RunContext:
    """The study's problem on 2048 training images (32 steps an epoch), with ``changes`` to its settings."""
    settings = RunSettings.from_flat(SETTINGS.read(study), train_subset=2048, **changes)
    return load_problem(settings, torch.device("cpu"), QUIET)


def recoverer(study: optuna.Study, folder: Path) -> Recoverer:
    return Recoverer(study=study, context=context(study), directory=folder / "results" / "legacy", console=QUIET)


def refuse_to_finetune(*args: object, **kwargs: object) -> None:
    raise AssertionError("fine-tuned again")


def test_a_recovered_trial_beats_the_same_config_not_fine_tuned(legacy: Path) -> None:
    study = load_study("legacy")
    recover = recoverer(study, legacy)
    untuned = recover.recover(4, RecoveryRecipe(epochs=0))  # BatchNorm recalibrated only
    tuned = recover.recover(4, RecoveryRecipe(epochs=1))
    assert (untuned.steps, tuned.steps) == (0, 32)
    assert tuned.drop.images == untuned.drop.images == 10_000  # the full test split, not the search's 256 images
    # the paired intervals of the drop against the dense model are far apart
    assert tuned.test_accuracy > untuned.test_accuracy + 0.05
    assert tuned.drop.high_pp < untuned.drop.low_pp
    dense = recover.dense_correct().double().mean().item()
    assert tuned.drop.drop_pp == pytest.approx(100 * (dense - tuned.test_accuracy))
    assert tuned.drop.low_pp < tuned.drop.drop_pp < tuned.drop.high_pp
    # the whole validation split too, which the plan and export's rule read
    validation = recover.validation_loader().dataset
    assert tuned.validation is not None and tuned.validation.images == len(validation) > 256
    assert tuned.validation.high_pp < untuned.validation.low_pp
    dense_val = recover.dense_correct("validation").double().mean().item()
    assert dense_val > 0.5 and tuned.steering_drop == tuned.validation


def test_a_recovered_model_distils_further_unless_it_holds_int8_layers(legacy: Path) -> None:
    study = load_study("legacy")
    recover = recoverer(study, legacy)
    untuned = recover.recover(4, RecoveryRecipe(epochs=0))  # BatchNorm recalibrated only
    start = load_recovered(untuned.checkpoint)
    config = TrialRecord.of(study.trials[4]).compression_config()
    model, steps, _ = recover.finetuned(config, RecoveryRecipe(epochs=1), label="trial 4 further", start=start)
    assert model is start and steps == 32
    accuracy = correct_predictions(model, recover.test_loader(), device="cpu").double().mean().item()
    assert accuracy > untuned.test_accuracy + 0.05  # as far as one epoch from the dense model goes (above)
    with_int8 = TrialRecord.of(study.trials[7]).compression_config()
    with pytest.raises(RanksearchError, match=r"trial 7: its config has int8 layers \(conv1, conv2\)"):
        recover.finetuned(
            with_int8, RecoveryRecipe(epochs=1), label="trial 7", start=load_recovered(untuned.checkpoint)
        )


def test_a_recovery_is_recorded_saved_loads_back_and_is_not_repeated(
    legacy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    study = load_study("legacy")
    recover = recoverer(study, legacy)
    result = recover.recover(7, RecoveryRecipe(epochs=1))  # int8 layers: quantized after the fine-tune
    stored = RECOVERED.read(load_study("legacy"))
    assert set(stored) == {"7"} and set(stored["7"]) >= RECORD_KEYS
    assert stored["7"]["epochs"] == 1 and stored["7"]["images"] == 10_000
    assert stored["7"]["validation"] == result.validation.to_dict()
    assert stored["7"]["feature_weight"] == RecoveryRecipe(epochs=1).feature_weight > 0
    checkpoint = (legacy / "results" / "legacy" / "recovered" / "trial-7.pt").resolve()
    assert stored["7"]["checkpoint"] == str(checkpoint) == str(result.checkpoint)
    assert list(checkpoint.parent.iterdir()) == [checkpoint]  # no temporary file left beside it

    model = load_recovered(checkpoint)
    assert sum(isinstance(m, Int8Module) for m in model.modules()) == 2  # conv1 and conv2
    test = make_loader(recover.test, batch_size=256, shuffle=False)
    assert correct_predictions(model, test, device="cpu").double().mean().item() == stored["7"]["test_accuracy"]

    written = checkpoint.stat().st_mtime_ns
    monkeypatch.setattr(recovery, "finetune", refuse_to_finetune)
    assert recoverer(load_study("legacy"), legacy).recover(7, RecoveryRecipe(epochs=1)) == result  # read back
    assert checkpoint.stat().st_mtime_ns == written
    with pytest.raises(AssertionError, match="fine-tuned again"):  # another number of epochs is another recovery
        recover.recover(7, RecoveryRecipe(epochs=2))
    with pytest.raises(AssertionError, match="fine-tuned again"):  # so is another feature weight
        recover.recover(7, RecoveryRecipe(epochs=1, feature_weight=0.0))
    assert RECOVERED.read(load_study("legacy"))["7"] == stored["7"]


def test_the_recovery_stage_recovers_its_plan_once(legacy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    study = load_study("legacy")
    directory = legacy / "results" / "legacy"
    off = context(study, final_epochs=0)
    assert recover_front(study, off, directory=directory, console=QUIET) == []
    assert not RECOVERED.stored(study) and not (directory / "recovered").exists()

    # as releases before --final-lr recovered: at 0.01, logits only
    earlier = context(study, final_epochs=1, final_top=2, final_lr=0.01, final_feature_weight=0.0)
    results = recover_front(study, earlier, directory=directory, console=QUIET)
    # the front is 4, 2, 3, 5 and the dense 0, fastest first: the fastest (4), then, were it outside half a point,
    # halfway between it and one past the slowest (3), else the farthest in speed (the slowest, 5)
    second = 5 if results[0].steering_drop.drop_pp <= RECOVERY_TARGET_PP else 3
    assert [(r.trial, r.recipe.lr) for r in results] == [(4, 0.01), (second, 0.01)]
    assert set(RECOVERED.read(study)) == {"4", str(second)}
    assert sorted(p.name for p in (directory / "recovered").iterdir()) == sorted(["trial-4.pt", f"trial-{second}.pt"])
    written = (directory / "recovered" / "trial-4.pt").stat().st_mtime_ns

    stage = context(study, final_epochs=1, final_top=2)  # today's default recipe: another recovery
    again = recover_front(study, stage, directory=directory, console=QUIET)
    second = 5 if again[0].steering_drop.drop_pp <= RECOVERY_TARGET_PP else 3
    assert [(r.trial, r.recipe) for r in again] == [(4, stage.settings.recovery.recipe), (second, again[0].recipe)]
    assert again[0].recipe == RecoveryRecipe(epochs=1, lr=RECOVERY_LR) and RECOVERY_LR != 0.01
    assert {RECOVERED.read(study)[str(r.trial)]["lr"] for r in again} == {RECOVERY_LR}
    assert (directory / "recovered" / "trial-4.pt").stat().st_mtime_ns != written
    monkeypatch.setattr(recovery, "finetune", refuse_to_finetune)
    assert recover_front(study, stage, directory=directory, console=QUIET) == again


def test_ranksearch_finetune_recovers_a_trial_and_reads_it_back_on_a_rerun(legacy: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["finetune", "legacy", "--trial", "5", "--epochs", "1"])
    assert result.exit_code == 0, result.output
    stored = RECOVERED.read(load_study("legacy"))["5"]
    assert stored["epochs"] == 1 and stored["steps"] == 64  # the study's own training split: 4096 images
    line = f"recovered trial 5: test accuracy {stored['test_accuracy']:.2%}, drop {stored['drop_pp']:.2f} pp"
    assert line in result.stderr
    assert f"model: {stored['checkpoint']}" in result.stderr
    assert Path(stored["checkpoint"]).is_file()
    again = runner.invoke(app, ["finetune", "legacy", "--trial", "5", "--epochs", "1"])
    assert again.exit_code == 0 and again.stderr == result.stderr
    assert RECOVERED.read(load_study("legacy"))["5"] == stored

    # the results directory moved (or copied to another machine): the model is found where the study now is
    moved = legacy / "elsewhere" / "legacy"
    shutil.move(legacy / "results" / "legacy", moved)
    assert not Path(stored["checkpoint"]).exists()
    found = (moved / "recovered" / "trial-5.pt").resolve()
    third = runner.invoke(app, ["finetune", str(moved), "--trial", "5", "--epochs", "1"])
    assert third.exit_code == 0, third.output
    assert f"model: {found} (load it" in third.stderr
    exported = runner.invoke(app, ["export", str(moved), "--trial", "5", "--out", "trial-5.yaml"])
    assert exported.exit_code == 0, exported.output
    assert CompressionConfig.load("trial-5.yaml").meta["recovered"]["checkpoint"] == str(found)
    assert f"recovered model: {found}" in exported.stderr
    confident = runner.invoke(
        app, ["export", str(moved), "--max-accuracy-drop", "100", "--confident", "--out", "confident.yaml"]
    )
    assert confident.exit_code == 0, confident.output  # the one trial with a recovered interval
    assert CompressionConfig.load("confident.yaml").meta["trial"] == 5
    assert "the rule (validation drop <= 100 pp with 95 % confidence) read the validation split" in confident.stderr
    assert RECOVERED.read(load_study(moved))["5"] == stored  # the record keeps where the model was saved


def test_ranksearch_finetune_of_several_trials_shares_the_dense_models_outputs(
    legacy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    caches: list[tuple[TeacherCache, int]] = []  # each fine-tune's cache and how many batches it held at the start

    def finetune_noting_the_cache(*args: object, teacher_cache: TeacherCache | None = None, **kwargs: object) -> object:
        assert teacher_cache is not None
        caches.append((teacher_cache, len(teacher_cache)))
        return finetune(*args, teacher_cache=teacher_cache, **kwargs)

    monkeypatch.setattr(recovery, "finetune", finetune_noting_the_cache)
    runner = CliRunner()
    result = runner.invoke(app, ["finetune", "legacy", "--trial", "4", "--trial", "5", "--trial", "4", "--epochs", "1"])
    assert result.exit_code == 0, result.output
    # one fine-tune a trial; the second runs on the batches the first ran the dense model on (64 steps of each)
    assert len(caches) == 2 and caches[0][0] is caches[1][0] and [held for _, held in caches] == [0, 64]
    assert len(caches[1][0]) == 64  # the second found every batch there: no teacher pass
    stored = RECOVERED.read(load_study("legacy"))
    assert set(stored) == {"4", "5"}
    lines = [line for line in result.stderr.splitlines() if line.startswith(("recovered", "model: "))]
    assert [line.split(":")[0] for line in lines] == ["recovered trial 4", "model", "recovered trial 5", "model"]

    monkeypatch.setattr(recovery, "finetune", refuse_to_finetune)
    again = runner.invoke(app, ["finetune", "legacy", "--trial", "5", "--trial", "4", "--epochs", "1"])
    assert again.exit_code == 0, again.output  # both read back, in the order asked
    assert [line.split(":")[0] for line in again.stderr.splitlines() if line.startswith("recovered")] == [
        "recovered trial 5",
        "recovered trial 4",
    ]
    bad = runner.invoke(app, ["finetune", "legacy", "--trial", "4", "--trial", "8", "--epochs", "2"])
    assert bad.exit_code == 2 and "--trial 8: trial 8 of study 'legacy' is PRUNED" in bad.stderr
    assert RECOVERED.read(load_study("legacy")) == stored  # checked before anything was fine-tuned


def test_ranksearch_finetune_reports_the_trials_done_before_one_that_diverges(
    legacy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = itertools.count()

    def second_diverges(*args: object, **kwargs: object) -> object:
        if next(calls) == 1:
            raise DivergedError("distillation fine-tuning at step 3: loss is nan")
        return finetune(*args, **kwargs)

    monkeypatch.setattr(recovery, "finetune", second_diverges)
    result = CliRunner().invoke(app, ["finetune", "legacy", "--trial", "4", "--trial", "5", "--epochs", "1"])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("recovered trial 4: ") and lines[1].startswith("model: ")
    assert lines[-1].startswith("error: trial 5: distillation fine-tuning at step 3: loss is nan, e.g. --lr 0.003")
    assert set(RECOVERED.read(load_study("legacy"))) == {"4"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nosuch", "--trial", "5"], "study 'nosuch': no study.db in results/nosuch"),
        (["legacy", "--trial", "99"], "--trial 99: study 'legacy' has trials 0 to 38"),
        (["legacy", "--trial", "8"], "--trial 8: trial 8 of study 'legacy' is PRUNED (rejected before evaluation"),
        (["legacy", "--trial", "0"], "--trial 0: trial 0 of study 'legacy' compresses nothing"),
        (["legacy", "--trial", "5", "--epochs", "0"], "--epochs 0: must be 1 or more; pass e.g. --epochs 2"),
        (["legacy", "--trial", "5", "--lr", "0"], "--lr 0.0: must be positive"),
        (
            ["legacy", "--trial", "5", "--feature-weight", "-1"],
            "--feature-weight -1.0: must be 0 (logits only) or more",
        ),
    ],
)
def test_ranksearch_finetune_bad_input_is_one_line_exit_2(legacy: Path, args: list[str], message: str) -> None:
    result = CliRunner().invoke(app, ["finetune", *args])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert not (legacy / "results" / "legacy" / "recovered").exists()
    assert not RECOVERED.stored(load_study("legacy"))


def synthetic_front() -> optuna.Study:
    """A study whose front is the dense model (speedup 1) and eight compressed trials from 1.2x (0.1 points below
    the dense model) to 3.2x (6 points below), plus a dominated trial."""
    study = optuna.create_study(directions=["maximize", "minimize"])
    members = [(1.0, 0.0), (1.2, 0.1), (1.4, 0.5), (1.6, 0.9), (1.8, 1.3), (2.0, 2.0), (2.4, 3.0), (2.8, 4.5)]
    members += [(3.2, 6.0), (1.1, 5.0)]
    for number, (speedup, drop) in enumerate(members):
        technique = "keep" if number == 0 else "svd"
        accuracy = 0.9 - drop / 100
        attrs = {
            "config": {"version": 1, "layers": {"conv": {"technique": technique, "rank": 0.5}}},
            "accuracy": accuracy,
            "latency_ms": 10.0 / speedup,
            "speedup": speedup,
            "accuracy_drop_pp": drop,
        }
        study.add_trial(optuna.trial.create_trial(values=[accuracy, 10.0 / speedup], user_attrs=attrs))
    return study


RECIPE = RecoveryRecipe(epochs=2)


def record_recovery(study: optuna.Study, trial: int, drop_pp: float, validation_pp: float | None = None) -> None:
    """Record trial ``trial`` as recovered by :data:`RECIPE` to ``drop_pp`` test points below the dense model (and
    ``validation_pp`` validation points; None: as releases that did not measure it recorded it)."""
    stored = dict(RECOVERED.read(study))
    stored[str(trial)] = {
        "epochs": RECIPE.epochs,
        "lr": RECIPE.lr,
        "feature_weight": RECIPE.feature_weight,
        "steps": 842,
        "seconds": 60.0,
        "test_accuracy": 0.9 - drop_pp / 100,
        "drop_pp": drop_pp,
        "low_pp": drop_pp - 0.3,
        "high_pp": drop_pp + 0.3,
        "images": 10_000,
        "checkpoint": f"trial-{trial}.pt",
    }
    if validation_pp is not None:
        stored[str(trial)][RECOVERED_VALIDATION] = {
            "drop_pp": validation_pp,
            "low_pp": validation_pp - 0.3,
            "high_pp": validation_pp + 0.3,
            "images": 6_000,
        }
    RECOVERED.write(study, stored)


def plan(study: optuna.Study, top: int, **kwargs: object) -> tuple[list[int], int | None]:
    """The trials recovered so far in the plan's order, and the next one to recover."""
    found = recovery_plan(study, top, RECIPE, **kwargs)  # type: ignore[arg-type]
    return [r.trial for r in found.recovered], None if found.next is None else found.next.number


def test_the_plan_bisects_the_front_for_the_fastest_member_within_half_a_point() -> None:
    study = synthetic_front()  # compressed members, fastest first: trials 8 (3.2x), 7, 6, 5, 4, 3, 2, 1 (1.2x)
    assert plan(study, 4) == ([], 8)  # the fastest first
    record_recovery(study, 8, 2.0)
    assert plan(study, 4) == ([8], 4)  # 2 points down; then halfway between it and one past the slowest (1.8x)
    assert plan(study, 1) == ([8], None)  # ... within --final-top
    record_recovery(study, 4, 0.3)
    assert plan(study, 4) == ([8, 4], 6)  # within half a point: halfway between 3.2x and 1.8x (2.4x)
    record_recovery(study, 6, 0.9)
    assert plan(study, 4) == ([8, 4, 6], 5)  # outside: between 2.4x and 1.8x (2.0x)
    record_recovery(study, 5, 0.4)
    assert plan(study, 4) == ([8, 4, 6, 5], None)  # the fastest within half a point, found in four recoveries
    assert plan(study, 5)[1] == 1  # then the farthest from those taken: the slowest (1.2x)
    record_recovery(study, 1, 0.1)
    # a failed member counts as outside: with 1.8x failed the bisection goes to the slower half (1.4x) ...
    assert plan(study, 4, failed={4}) == ([8], 2)
    # ... and the most accurate is recovered once every faster member tried misses
    assert plan(study, 4, failed={4, 2}) == ([8, 1], None)
    record_recovery(study, 3, 0.2)  # recovered by `ranksearch finetune`, not in the plan: not in it
    assert plan(study, 4) == ([8, 4, 6, 5], None)
    for other in (replace(RECIPE, lr=0.1), replace(RECIPE, feature_weight=0.0)):  # recoveries by another recipe
        found = recovery_plan(study, 4, other)  # are other ones
        assert found.recovered == () and found.next is not None and found.next.number == 8
    assert plan(optuna.create_study(directions=["maximize", "minimize"]), 4) == ([], None)


def test_the_plan_steers_by_the_validation_drop_where_the_recovery_measured_it() -> None:
    study = synthetic_front()
    record_recovery(study, 8, 0.2, validation_pp=2.0)  # within on test, outside on validation: outside
    assert plan(study, 4) == ([8], 4)
    record_recovery(study, 4, 0.8, validation_pp=0.3)  # outside on test, within on validation: within
    assert plan(study, 4) == ([8, 4], 6)
    found = recovery_plan(study, 4, RECIPE).recovered
    assert found[1].validation is not None and found[1].steering_drop.drop_pp == 0.3 and found[1].drop.drop_pp == 0.8
    assert "; validation drop 0.30 pp [0.00, 0.60]" in found[1].summary()


def test_the_plan_finds_the_models_of_a_moved_study_in_its_directory(tmp_path: Path) -> None:
    study = synthetic_front()
    record_recovery(study, 8, 2.0)  # recorded as "trial-8.pt", a path that is not there
    moved = tmp_path / "recovered" / "trial-8.pt"
    moved.parent.mkdir()
    moved.write_bytes(b"model")
    assert recovery_plan(study, 4, RECIPE).recovered[0].checkpoint == Path("trial-8.pt")
    assert recovery_plan(study, 4, RECIPE, directory=tmp_path).recovered[0].checkpoint == moved.resolve()


def test_a_recovery_recorded_before_features_were_matched_reads_back_as_logits_only() -> None:
    study = synthetic_front()
    record_recovery(study, 8, 2.0)
    entry = {key: value for key, value in RECOVERED.read(study)["8"].items() if key != "feature_weight"}
    RECOVERED.write(study, {"8": entry})  # as releases before --final-feature-weight recorded it
    assert recorded_recovery(study, 8, RECIPE) is None  # today's default matches features: not that recovery
    earlier = recorded_recovery(study, 8, replace(RECIPE, feature_weight=0.0))
    assert earlier is not None and earlier.recipe == replace(RECIPE, feature_weight=0.0) and earlier.drop.drop_pp == 2.0
    assert "features matched" not in earlier.summary() and "2 epochs at peak lr 0.03," in earlier.summary()


def test_the_member_beside_the_fastest_is_recovered_when_the_fastest_misses_half_a_point() -> None:
    # a search's front (seed 1, 2026-12-01): the fastest member (4.70x, 1.60 points down at 300 steps) recovered to
    # 0.85 points; the rule of earlier releases (the most accurate, the fastest within 1 point on validation, the
    # fastest, the farthest) then took 3.64x and 2.91x, and never recovered 4.26x (1.18 points down at 300 steps)
    study = optuna.create_study(directions=["maximize", "minimize"])
    members = [(1.0, 0.0), (1.38, 0.06), (2.91, 0.10), (3.64, 0.12), (4.26, 1.18), (4.70, 1.60)]
    for speedup, drop in members:
        technique = "keep" if speedup == 1.0 else "tucker2"
        attrs = {
            "config": {"version": 1, "layers": {"conv": {"technique": technique, "rank": 0.5}}},
            "accuracy": 0.92 - drop / 100,
            "latency_ms": 4.0 / speedup,
            "speedup": speedup,
            "accuracy_drop_pp": drop,
        }
        study.add_trial(optuna.trial.create_trial(values=[0.92 - drop / 100, 4.0 / speedup], user_attrs=attrs))
    for trial, recovered_drop in [(5, 0.85), (1, -0.09), (3, 0.14)]:
        record_recovery(study, trial, recovered_drop)
    assert plan(study, 4) == ([5, 3], 4)  # the bisection from the fastest reaches 3.64x, then 4.26x


def test_a_recovered_model_is_where_it_was_saved_or_else_in_the_studys_directory(tmp_path: Path) -> None:
    saved, moved = tmp_path / "results" / "s" / "recovered" / "trial-3.pt", tmp_path / "moved" / "s"
    saved.parent.mkdir(parents=True)
    saved.touch()
    stored = {"checkpoint": str(saved)}
    assert recovered_checkpoint(stored, moved) == saved  # still there: where it was saved, wherever the study is
    assert recovered_checkpoint(stored, None) == saved
    shutil.move(tmp_path / "results" / "s", moved)
    assert recovered_checkpoint(stored, moved) == (moved / "recovered" / "trial-3.pt").resolve()
    assert recovered_checkpoint(stored, None) == saved  # no directory to look in: the recorded path, stale
    assert recovered_checkpoint(stored, tmp_path / "other") == saved  # nor is it there


def test_the_recovery_schedule_warms_up_then_decays_to_zero() -> None:
    factors = [warmup_cosine(step, steps=100, warmup=5) for step in range(100)]
    assert factors[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert all(a >= b for a, b in itertools.pairwise(factors[4:])) and factors[-1] < 1e-3
