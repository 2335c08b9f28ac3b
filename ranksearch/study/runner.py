"""The search: load the problem, open the study, run trials up to the budget, write the results."""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import optuna
import torch
from optuna.trial import TrialState
from rich.console import Console
from torch import nn

from ranksearch.compress import ModelCost, dense_model_cost, model_cost
from ranksearch.config import CompressionConfig
from ranksearch.data import DataSplits, load_dataset
from ranksearch.errors import RanksearchError
from ranksearch.evaluate.base import BaseEvaluator, checked_metrics
from ranksearch.evaluate.classification import ClassificationEvaluator
from ranksearch.evaluate.latency import resolve_device, torch_threads
from ranksearch.models import build_model, load_checkpoint, model_family
from ranksearch.results import BASELINE_KEY, TEST_ACCURACY_KEY, front_trials, write_results
from ranksearch.search import (
    LayerSlot,
    SearchSpace,
    config_to_params,
    default_space_path,
    record_input_shapes,
    sample_config,
    uniform_config,
)
from ranksearch.study.report import SearchProgress, print_summary
from ranksearch.study.settings import RunSettings, file_digest
from ranksearch.training import DEFAULT_RECIPE, train_baseline

ANCHORS = (("keep", None), ("svd", 0.5), ("tucker2", 0.5), ("svd", 0.25), ("tucker2", 0.25))
"""The baseline and uniform configurations every study starts with (where the space offers them)."""


@dataclass(frozen=True)
class RunContext:
    """What an evaluator named on the command line is built with."""

    settings: RunSettings
    model: nn.Module
    splits: DataSplits
    device: torch.device
    example: torch.Tensor
    input_shapes: dict[str, tuple[int, ...]]


@dataclass
class SearchResult:
    """A finished (or interrupted) search: the study and where its results are."""

    study: optuna.Study
    directory: Path
    baseline: dict[str, float]
    phase_seconds: dict[str, float] = field(default_factory=dict)


def run_search(
    settings: RunSettings, *, evaluator: BaseEvaluator | None = None, console: Console | None = None
) -> SearchResult:
    """Run (or resume and top up) the study ``settings`` describe; see the README for the pipeline."""
    console = console or Console(stderr=True)
    settings.validate()
    device = resolve_device(settings.device)
    space_path = settings.space or default_space_path(model_family(settings.model))
    space = SearchSpace.load(space_path)
    settings = replace(settings, space=Path(space_path), space_digest=file_digest(Path(space_path)))
    directory = settings.results_dir / settings.name()
    custom = _import_object(settings.evaluator, "--evaluator") if settings.evaluator and evaluator is None else None
    _check_writable(settings.results_dir)
    phases: dict[str, float] = {}
    with torch_threads(settings.threads), _quiet_optuna():
        start = time.perf_counter()
        context = load_problem(settings, device, console, phases)
        phases["load"] = time.perf_counter() - start - phases.get("baseline_training", 0.0)
        slots = space.layers(context.model, context.input_shapes)
        if not slots:
            raise RanksearchError(f"search space {space_path}: no searchable layer in {settings.model}; widen 'layers'")
        evaluator = evaluator or _make_evaluator(settings, context, custom)
        directory.mkdir(parents=True, exist_ok=True)
        study = _open_study(settings, directory)
        dense = dense_model_cost(context.model, context.example)
        baseline = _baseline(study, evaluator, dense, console)
        if not study.trials:
            _enqueue_anchors(study, slots, space.rank_multiple)
        objective = _objective(settings, evaluator, context, slots, space.rank_multiple, dense, baseline)
        layer_names = list(slots)
        try:
            _optimize(study, objective, settings, directory, layer_names, console)
            start = time.perf_counter()
            _test_front(study, evaluator, console)
            phases["test_front"] = time.perf_counter() - start
        finally:
            write_results(study, directory, layer_names=layer_names)
    result = SearchResult(study, directory, baseline, phases)
    print_summary(result, settings, console)
    return result


@contextmanager
def _quiet_optuna() -> Iterator[None]:
    """The progress bar reports trials; Optuna's per-trial log lines and experimental warnings would bury it."""
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            yield
    finally:
        optuna.logging.set_verbosity(verbosity)


def _check_writable(results_dir: Path) -> None:
    try:
        results_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=results_dir, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise RanksearchError(
            f"--results-dir {results_dir}: not writable ({exc.strerror}); pass a writable directory"
        ) from None


def load_problem(
    settings: RunSettings, device: torch.device, console: Console, phases: dict[str, float] | None = None
) -> RunContext:
    """The data splits and the trained model (from ``--checkpoint`` or the cached baseline) of a run."""
    splits = load_dataset(
        settings.dataset,
        root=settings.data_root,
        val_fraction=settings.val_fraction,
        seed=settings.seed,
        download=settings.download,
        train_subset=settings.train_subset,
        eval_subset=settings.eval_subset,
    )
    model = build_model(
        settings.model,
        num_classes=splits.num_classes,
        in_channels=splits.in_channels,
        image_size=splits.image_size,
        weights=settings.weights,
    )
    if settings.checkpoint is not None:
        model = load_checkpoint(model, settings.checkpoint)
    else:
        recipe = (
            DEFAULT_RECIPE if settings.baseline_epochs is None else DEFAULT_RECIPE.with_epochs(settings.baseline_epochs)
        )
        start = time.perf_counter()
        model, info = train_baseline(
            model,
            splits,
            recipe,
            device=device,
            cache_dir=_cache_dir() / "baselines",
            key_parts={
                "model": settings.model,
                "dataset": settings.dataset,
                "weights": settings.weights,
                "train_subset": settings.train_subset,
                "val_fraction": settings.val_fraction,
                "seed": settings.seed,
            },
        )
        if phases is not None:
            phases["baseline_training"] = time.perf_counter() - start
        if info.get("cached"):
            console.print(f"baseline: reusing the trained {settings.model} from the cache")
    model = model.to(device).eval()
    _check_weights(model, settings)
    example = splits.val[0][0].unsqueeze(0).repeat(settings.latency_batch, 1, 1, 1).to(device)
    return RunContext(settings, model, splits, device, example, record_input_shapes(model, example))


def _check_weights(model: nn.Module, settings: RunSettings) -> None:
    for name, param in model.named_parameters():
        if not torch.isfinite(param).all():
            source = settings.checkpoint or "the baseline"
            raise RanksearchError(f"{source}: parameter {name} holds NaN/inf; retrain or pass a healthy checkpoint")


def _cache_dir() -> Path:
    return Path(os.environ.get("RANKSEARCH_CACHE_DIR") or Path.home() / ".cache" / "ranksearch")


def _make_evaluator(settings: RunSettings, context: RunContext, custom: type | None) -> BaseEvaluator:
    if custom is not None:
        try:
            evaluator = custom(context=context)
        except Exception as exc:
            raise RanksearchError(f"--evaluator {settings.evaluator}: construction failed: {exc}") from None
        if not isinstance(evaluator, BaseEvaluator):
            raise RanksearchError(f"--evaluator {settings.evaluator}: must subclass ranksearch.BaseEvaluator")
        return evaluator
    return ClassificationEvaluator(
        model=context.model,
        splits=context.splits,
        device=context.device,
        finetune_steps=settings.finetune_steps,
        finetune_lr=settings.finetune_lr,
        batch_size=settings.batch_size,
        calib_batches=settings.calib_batches,
        latency_batch=settings.latency_batch,
        latency_threads=settings.threads,
        seed=settings.seed,
    )


def _import_object(spec: str, option: str) -> type:
    module_name, _, attr = spec.rpartition(":")
    if not module_name or not attr:
        raise RanksearchError(f"{option} {spec!r}: expected 'package.module:Name' or 'path/file.py:Name'")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            loader_spec = importlib.util.spec_from_file_location(path.stem, path)
            if loader_spec is None or not path.exists():
                raise FileNotFoundError(module_name)
            module = importlib.util.module_from_spec(loader_spec)
            loader_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
        return getattr(module, attr)
    except (ImportError, FileNotFoundError, AttributeError, SyntaxError) as exc:
        raise RanksearchError(f"{option} {spec!r}: cannot be loaded ({type(exc).__name__}: {exc})") from None


def _storage(settings: RunSettings, directory: Path) -> str | optuna.storages.BaseStorage:
    return settings.storage or f"sqlite:///{(directory / 'study.db').resolve()}"


def _open_study(settings: RunSettings, directory: Path) -> optuna.Study:
    sampler = _sampler(settings)
    try:
        study = optuna.create_study(
            storage=_storage(settings, directory),
            sampler=sampler,
            study_name=settings.name(),
            directions=["maximize", "minimize"],
            load_if_exists=True,
        )
    except (ValueError, ImportError, optuna.exceptions.OptunaError) as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise RanksearchError(
            f"--storage {settings.storage or directory}: cannot open the study ({first_line})"
        ) from None
    except Exception as exc:  # sqlalchemy errors for unreachable or malformed URLs
        first_line = str(exc).splitlines()[0]
        raise RanksearchError(f"--storage {settings.storage}: cannot open the study ({first_line})") from None
    recorded = study.user_attrs.get("identity")
    identity = settings.identity()
    if recorded is None:
        study.set_metric_names(["accuracy", "latency_ms"])
        study.set_user_attr("identity", identity)
        study.set_user_attr("settings", settings.to_dict())
    elif recorded != identity:
        key = next(k for k in identity if recorded.get(k) != identity[k])
        raise RanksearchError(
            f"study {settings.name()!r} exists with {key}={recorded.get(key)!r}, not {identity[key]!r}; "
            "rerun with the same settings or pass --study-name for a new study"
        )
    return study


def _sampler(settings: RunSettings) -> optuna.samplers.BaseSampler:
    seed = settings.seed
    if settings.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, n_startup_trials=10)
    if settings.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=20)
    if settings.sampler == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=10)
    return optuna.samplers.RandomSampler(seed=seed)


def _baseline(study: optuna.Study, evaluator: BaseEvaluator, dense: ModelCost, console: Console) -> dict[str, float]:
    recorded = study.user_attrs.get(BASELINE_KEY)
    if recorded:
        return dict(recorded)
    console.print("baseline: measuring the uncompressed model")
    metrics = checked_metrics(evaluator, evaluator.evaluate(CompressionConfig(layers={})))
    test = checked_metrics(evaluator, evaluator.evaluate(CompressionConfig(layers={}), split="test"))
    baseline = {
        "accuracy": metrics["accuracy"],
        "test_accuracy": test["accuracy"],
        "latency_ms": metrics["latency_ms"],
        "params": dense.params,
        "macs": dense.macs,
        "size_bytes": dense.size_bytes,
    }
    study.set_user_attr(BASELINE_KEY, baseline)
    return baseline


def _enqueue_anchors(study: optuna.Study, slots: dict[str, LayerSlot], rank_multiple: int) -> None:
    seen = set()
    for technique, fraction in ANCHORS:
        config = uniform_config(slots, technique, fraction, rank_multiple=rank_multiple)
        params = config_to_params(config, slots)
        key = tuple(sorted(params.items()))
        if key in seen:
            continue
        seen.add(key)
        label = "baseline" if technique == "keep" else f"uniform {technique}@{fraction}"
        study.enqueue_trial(params, user_attrs={"anchor": label})


def _objective(
    settings: RunSettings,
    evaluator: BaseEvaluator,
    context: RunContext,
    slots: dict[str, LayerSlot],
    rank_multiple: int,
    dense: ModelCost,
    baseline: dict[str, float],
) -> Callable[[optuna.Trial], tuple[float, float] | float]:
    def objective(trial: optuna.Trial) -> tuple[float, float] | float:
        config = sample_config(trial, slots, rank_multiple=rank_multiple)
        cost = model_cost(context.model, config, context.input_shapes, dense=dense)
        trial.set_user_attr("config", config.to_dict())
        for key, value in {"params": cost.params, "macs": cost.macs, "size_bytes": cost.size_bytes}.items():
            trial.set_user_attr(key, value)
        try:
            metrics = checked_metrics(evaluator, evaluator.evaluate(config, split="val"))
        except (RanksearchError, KeyboardInterrupt):
            raise
        except Exception as exc:  # a failed trial is recorded with its reason; the search goes on
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
            trial.set_user_attr("fail_reason", reason)
            return math.nan
        drop_pp = 100.0 * (baseline["accuracy"] - metrics["accuracy"])
        speedup = baseline["latency_ms"] / metrics["latency_ms"]
        for key, value in {**metrics, "accuracy_drop_pp": drop_pp, "speedup": speedup}.items():
            trial.set_user_attr(key, value)
        if settings.max_accuracy_drop is not None:
            trial.set_constraint("accuracy_drop", drop_pp - settings.max_accuracy_drop)
        if settings.max_latency_ms is not None:
            trial.set_constraint("latency", metrics["latency_ms"] - settings.max_latency_ms)
        return metrics["accuracy"], metrics["latency_ms"]

    return objective


def completed(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


def _optimize(
    study: optuna.Study,
    objective: Callable[[optuna.Trial], tuple[float, float] | float],
    settings: RunSettings,
    directory: Path,
    layer_names: list[str],
    console: Console,
) -> None:
    deadline = None if settings.timeout is None else time.monotonic() + settings.timeout
    failures_in_a_row = 0
    with SearchProgress(study, settings, console) as progress:
        while completed(study) < settings.budget:
            if deadline is not None and time.monotonic() >= deadline:
                console.print(f"--timeout {settings.timeout:g}s reached after {completed(study)} completed trials")
                break
            study.optimize(objective, n_trials=1)
            last = study.trials[-1]
            if last.state == TrialState.FAIL:
                failures_in_a_row += 1
                console.print(f"trial {last.number} failed: {last.user_attrs.get('fail_reason', 'see the log')}")
                if failures_in_a_row >= max(10, settings.budget // 2):
                    raise RanksearchError(
                        f"{failures_in_a_row} trials failed in a row (last: {last.user_attrs.get('fail_reason')}); "
                        "fix the cause and rerun to resume"
                    )
            else:
                failures_in_a_row = 0
            write_results(study, directory, layer_names=layer_names)
            progress.update()


def _test_front(study: optuna.Study, evaluator: BaseEvaluator, console: Console) -> None:
    """Measure test accuracy once per Pareto member (recorded, so a rerun does not repeat it)."""
    tests = dict(study.user_attrs.get(TEST_ACCURACY_KEY, {}))
    pending = [t for t in front_trials(study) if str(t.number) not in tests]
    for trial in pending:
        console.print(f"test split: trial {trial.number}")
        config = CompressionConfig.from_dict(trial.user_attrs["config"])
        try:
            tests[str(trial.number)] = checked_metrics(evaluator, evaluator.evaluate(config, split="test"))["accuracy"]
        except (RanksearchError, KeyboardInterrupt):
            raise
        except Exception as exc:
            console.print(f"test split: trial {trial.number} failed ({type(exc).__name__}: {exc})")
        study.set_user_attr(TEST_ACCURACY_KEY, tests)
