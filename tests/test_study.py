"""The end-to-end search on a tiny problem: real Fashion-MNIST subset, real training, real latency."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import optuna
import pandas as pd
import pytest
import torch
from conftest import tiny_settings
from optuna.trial import TrialState

import ranksearch as rs
from ranksearch.errors import RanksearchError
from ranksearch.measure.timers import TorchTimer
from ranksearch.models import build_model
from ranksearch.results import front_trials
from ranksearch.results.record import PHASES, TrialRecord, records
from ranksearch.search import SearchSpace, config_to_params, record_input_shapes
from ranksearch.search.latency_table import LatencyTable, variants
from ranksearch.study import RunSettings, run_search
from ranksearch.study.objective import observations
from ranksearch.study.progress import latency_prediction

pytestmark = pytest.mark.timeout(900)  # each test runs a search (the first one also trains the baseline)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_cache) -> Iterator[Path]:
    """The module's directory; the session's tiny baseline cache is set before any module-scoped run uses it."""
    path = tmp_path_factory.mktemp("study")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RANKSEARCH_CACHE_DIR", str(tiny_cache))
        yield path


def counted(study: optuna.Study) -> int:
    """The trials that count towards the budget (promotions do not)."""
    return sum(t.counts_toward_budget for t in records(study))


@pytest.fixture(scope="module")
def first_run(workdir):
    settings = tiny_settings(workdir)
    return settings, run_search(settings)


def test_study_reaches_the_budget(first_run) -> None:
    settings, result = first_run
    assert counted(result.study) == settings.search.budget  # promotions come on top of the budget
    anchors = [t.user_attrs.get("anchor") for t in result.study.trials[:3]]
    assert anchors[0] == "baseline" and all(anchors)
    baseline_trial = result.study.trials[0]
    assert baseline_trial.user_attrs["config"]["layers"] == {} or all(
        c["technique"] == "keep" for c in baseline_trial.user_attrs["config"]["layers"].values()
    )


def test_speedup_is_measured_against_the_dense_model_timed_beside_it(first_run) -> None:
    _, result = first_run
    for trial in result.study.get_trials(states=(TrialState.COMPLETE,)):
        attrs = trial.user_attrs
        assert attrs["reference_latency_ms"] > 0
        if trial.number == 0:  # the dense model against itself: exactly 1
            assert attrs["speedup"] == 1.0
        else:
            assert attrs["speedup"] == pytest.approx(attrs["reference_latency_ms"] / attrs["latency_ms"])


def test_results_files_agree_with_the_storage(first_run) -> None:
    _, result = first_run
    trials = pd.read_csv(result.directory / "trials.csv")
    assert list(trials["trial"]) == [t.number for t in result.study.trials]
    pareto = json.loads((result.directory / "pareto.json").read_text())
    front = {t.number for t in front_trials(result.study)}
    assert {m["trial"] for m in pareto["front"]} == front
    assert all(m["test_accuracy"] is not None for m in pareto["front"])
    assert pareto["baseline"]["params"] > 0
    arithmetic = pareto["time_per_arithmetic"]  # speedup / MAC reduction over the compressed members, if any
    assert arithmetic is None or 0 < arithmetic["min"] <= arithmetic["median"] <= arithmetic["max"]
    assert not list(result.directory.glob(".*.tmp"))


def test_every_front_config_reapplies_to_a_fresh_model(first_run) -> None:
    _, result = first_run
    pareto = json.loads((result.directory / "pareto.json").read_text())
    for member in pareto["front"]:
        model = build_model("resnet18", num_classes=10, in_channels=1, image_size=28)
        float_config = rs.CompressionConfig.from_dict(member["config"]).split_int8()[0]
        compressed = rs.apply_config(model, float_config, calib_inputs=torch.randn(4, 1, 28, 28))
        assert sum(p.numel() for p in compressed.parameters()) == member["params"]


def test_rerun_resumes_and_tops_up(first_run, workdir) -> None:
    settings, result = first_run
    more = tiny_settings(workdir, budget=settings.search.budget + 2)
    again = run_search(more)
    assert again.study.study_name == result.study.study_name
    assert counted(again.study) == settings.search.budget + 2


def test_study_recorded_before_a_setting_existed_resumes_with_its_default(first_run, workdir) -> None:
    _, result = first_run
    identity = dict(result.study.user_attrs["identity"])
    del identity["latency_backend"]
    result.study.set_user_attr("identity", identity)
    complete = counted(result.study)
    again = run_search(tiny_settings(workdir, budget=complete))
    assert counted(again.study) == complete
    with pytest.raises(rs.RanksearchError, match="exists with latency_backend='torch', not 'onnxruntime'"):
        run_search(tiny_settings(workdir, budget=complete, latency_backend="onnxruntime"))


def test_study_with_other_settings_is_refused(first_run, workdir) -> None:
    with pytest.raises(rs.RanksearchError, match="exists with finetune_steps=3, not 5"):
        run_search(tiny_settings(workdir, finetune_steps=5))


def test_constraints_mark_infeasible_trials(workdir) -> None:
    settings = tiny_settings(workdir, budget=6, max_latency_ms=1e-6, study_name="constrained", latency_table=False)
    result = run_search(settings)
    assert result.study.best_trials == []
    assert all(t.constraints for t in result.study.get_trials(states=(TrialState.COMPLETE,)))


def slowest_config(settings: RunSettings, study: optuna.Study) -> tuple[rs.CompressionConfig, dict[str, object]]:
    """The config of each searched layer's slowest variant, as the screens see it (the run's latency table refitted on
    ``study``'s trials), and its trial params. The table is rebuilt from its cache: nothing is timed."""
    model = build_model("resnet18", num_classes=10, in_channels=1, image_size=28).eval()
    example = torch.zeros(1, 1, 28, 28)  # the run's latency batch: one image
    shapes = record_input_shapes(model, example)
    space = SearchSpace.load(settings.search.space)
    slots = space.layers(model, shapes)
    (cache,) = (settings.infra.results_dir / "latency-tables").glob("latency-cpu-*-threads1-torch*.json")
    before = cache.read_bytes()
    cpu, multiple = torch.device("cpu"), space.rank_multiple
    timer = TorchTimer(device=cpu, threads=1)
    table = LatencyTable.build(model, slots, shapes, example, timer=timer, rank_multiple=multiple, cache_file=cache)
    assert cache.read_bytes() == before, "variants timed anew: the table is not the run's"
    fitted = table.fitted(observations(study))  # what the resumed run's first trial, this one, is predicted with
    layers = {
        name: max(variants(slot), key=lambda v, name=name: fitted.variant_ms(name, v)) for name, slot in slots.items()
    }
    config = rs.CompressionConfig(layers=layers, rank_multiple=multiple)
    assert fitted.speedup(config) < 1, f"predicted {fitted.speedup(config):.2f}x the dense model"
    return config, config_to_params(config, slots)


def test_latency_table_predicts_every_trial_and_rejects_slow_configs(first_run, workdir) -> None:
    """Every trial is predicted; a sampled config predicted slower than the dense model (the slowest one, queued
    on a resumed run) is pruned before evaluation, and those predicted faster are evaluated."""
    settings, result = first_run
    slowest, params = slowest_config(settings, result.study)
    result.study.enqueue_trial(params)
    complete = len(result.study.get_trials(states=(TrialState.COMPLETE,)))
    later_stages_off = {"promote_steps": "0", "final_epochs": 0}  # the screens are what this rerun checks
    study = run_search(tiny_settings(workdir, budget=complete + 1, **later_stages_off)).study
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert all(t.user_attrs["predicted_latency_ms"] > 0 for t in complete)
    pruned = study.get_trials(states=(TrialState.PRUNED,))
    assert slowest.to_dict() in [t.user_attrs["config"] for t in pruned]
    for trial in pruned:  # the speedup the table predicted, against its own dense prediction
        assert trial.user_attrs["fail_reason"].startswith("rejected before evaluation: predicted")
        assert "slower than the uncompressed model" in trial.user_attrs["fail_reason"]
        assert trial.user_attrs["predicted_speedup"] < 1
    # the screens judged only the sampler's own trials: anchors, warm starts and promotions (of an anchor predicted
    # slower than the dense model, say) face the hard limits alone
    sampled = [t for t in complete if not TrialRecord.passes_soft_screens(t.user_attrs)]
    assert sampled and all(t.user_attrs["predicted_speedup"] >= 1 for t in sampled)
    prediction = latency_prediction(study)
    assert prediction is not None and prediction["count"] == len(complete)
    assert 0 <= prediction["median_pct"] <= prediction["max_pct"]
    trials = pd.read_csv(result.directory / "trials.csv")
    assert trials["predicted_latency_ms"].notna().sum() >= len(complete)


def test_latency_bound_below_every_config_stops_with_one_line(workdir) -> None:
    settings = tiny_settings(workdir, budget=3, max_latency_ms=1e-6, study_name="impossible")
    with pytest.raises(RanksearchError, match=r"configs in a row rejected before evaluation.*--max-latency-ms 1e-06"):
        run_search(settings)


class RaisingEvaluator(rs.BaseEvaluator):
    def __init__(self, *, fail_every: int) -> None:
        self.calls = 0
        self.fail_every = fail_every

    def evaluate(self, config, *, split="val"):
        self.calls += 1
        if self.calls % self.fail_every == 0:
            raise FloatingPointError("loss diverged (nan)")
        return {"accuracy": 0.5, "latency_ms": 1.0 + len(config.layers) / 100}


def test_failed_trials_are_recorded_and_the_search_goes_on(workdir) -> None:
    settings = tiny_settings(workdir, budget=5, study_name="failing")
    result = run_search(settings, evaluator=RaisingEvaluator(fail_every=3))
    failed = result.study.get_trials(states=(TrialState.FAIL,))
    assert failed and all("diverged" in t.user_attrs["fail_reason"] for t in failed)
    assert len(result.study.get_trials(states=(TrialState.COMPLETE,))) == 5


class WrongKeysEvaluator(rs.BaseEvaluator):
    def evaluate(self, config, *, split="val"):
        return {"acc": 1.0}


def test_evaluator_with_wrong_keys_is_a_user_error(workdir) -> None:
    with pytest.raises(rs.RanksearchError, match="without \\['accuracy', 'latency_ms'\\]"):
        run_search(tiny_settings(workdir, study_name="wrong-keys"), evaluator=WrongKeysEvaluator())


def test_storage_url_is_used(workdir) -> None:
    url = f"sqlite:///{workdir / 'elsewhere.db'}"
    result = run_search(
        tiny_settings(workdir, budget=2, storage=url, study_name="remote"), evaluator=RaisingEvaluator(fail_every=99)
    )
    assert optuna.load_study(study_name="remote", storage=url).user_attrs["baseline"]
    assert len(result.study.trials) >= 2


TRAINED = Path(__file__).parent / "fixtures" / "legacy"
"""A small CNN with trained weights (the legacy fixture's): zero-shot drops mean something on it, and it trains
nothing (the tiny ResNet-18's 1-epoch baseline is near chance, and retraining is not bitwise reproducible)."""


def test_sensitivity_warm_starts_and_zero_shot_rejection(workdir) -> None:
    """With --max-zero-shot-drop 8 on a trained model: knapsack warm starts are queued after the anchors;
    configs using a variant hopeless alone are pruned before any evaluation; hopeless configs are rejected at zero
    shot, before fine-tuning, and count towards the budget; a rerun reuses the cached sensitivity, and a config
    with every layer at its smallest SVD, queued on the rerun, is pruned before fine-tuning."""
    settings = tiny_settings(
        workdir,
        model=f"{TRAINED / 'tinynet.py'}:tiny",
        checkpoint=TRAINED / "tiny.pt",
        space=TRAINED / "space.yaml",
        train_subset=4096,
        sampler="random",
        latency_table=False,
        budget=20,
        study_name="sensitive",
        sensitivity=True,
        early_reject=True,
        max_zero_shot_drop=8.0,
    )
    result = run_search(settings)
    trials = result.study.trials
    warm = [t for t in trials if "warm_start" in t.user_attrs]
    assert warm and min(t.number for t in warm) > max(t.number for t in trials if "anchor" in t.user_attrs)
    caches = list((settings.infra.results_dir / "sensitivity").glob("sensitivity-*.json"))
    assert len(caches) == 1
    before = (caches[0].stat().st_ino, caches[0].read_bytes())  # a rewrite (atomic: a new file) changes the inode
    harsh = rs.CompressionConfig(layers={name: rs.LayerChoice("svd", 0.25) for name in ("conv1", "conv2", "conv3")})
    model = build_model(settings.problem.model, num_classes=10, in_channels=1, image_size=28)
    slots = SearchSpace.load(settings.search.space).layers(model, record_input_shapes(model, torch.zeros(1, 1, 28, 28)))
    first_run = len(result.study.trials)
    result.study.enqueue_trial(config_to_params(harsh, slots))
    again = run_search(settings.replace(budget=21))
    stored = PHASES.read(again.study)  # summed over both runs; each run's summary shows its own
    assert stored["load"] == pytest.approx(result.phase_seconds["load"] + again.phase_seconds["load"])
    assert stored["sensitivity"] == pytest.approx(
        result.phase_seconds["sensitivity"] + again.phase_seconds["sensitivity"]
    )
    assert (caches[0].stat().st_ino, caches[0].read_bytes()) == before  # nothing new measured (reading marks it used)
    trials = again.study.trials
    queued = trials[first_run]  # the rerun's first trial: the one queued
    assert queued.user_attrs["config"]["layers"] == harsh.to_dict()["layers"]
    rejected = [t for t in trials if t.user_attrs.get("rejected_at_zero_shot")]
    hopeless = [t for t in trials if "alone drops" in t.user_attrs.get("fail_reason", "")]
    assert rejected and hopeless
    assert queued.number in [t.number for t in rejected + hopeless]
    assert counted(again.study) == 21  # complete (not promotions) and rejected at zero shot
    for trial in rejected:
        assert trial.state == TrialState.PRUNED and "anchor" not in trial.user_attrs
        assert trial.user_attrs["fail_reason"].startswith("rejected at zero shot")
        assert trial.user_attrs["zero_shot_accuracy"] >= 0 and trial.user_attrs["seconds_saved"] >= 0
        assert "time_finetune_s" not in trial.user_attrs
    for trial in hopeless:
        assert trial.state == TrialState.PRUNED and "anchor" not in trial.user_attrs
        assert trial.user_attrs["fail_reason"].startswith("rejected before evaluation: layer")
        assert "zero_shot_accuracy" not in trial.user_attrs and "time_finetune_s" not in trial.user_attrs
