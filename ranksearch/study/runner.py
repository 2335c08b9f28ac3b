"""The search: load the problem, open the study, run trials up to the budget, write the results."""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import json
import logging
import math
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import optuna
import torch
from optuna.trial import TrialState
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn

from ranksearch.compress import ModelCost, dense_model_cost, layer_cost, model_cost
from ranksearch.config import CompressionConfig, LayerChoice
from ranksearch.data import DataSplits, load_dataset
from ranksearch.errors import RanksearchError, Rejected
from ranksearch.evaluate.base import BaseEvaluator, Split, checked_metrics
from ranksearch.evaluate.classification import ClassificationEvaluator
from ranksearch.measure.latency import resolve_device, torch_threads
from ranksearch.models import build_model, load_checkpoint, model_family
from ranksearch.results import (
    BASELINE_KEY,
    MODEL_KEY,
    PHASES_KEY,
    SETTINGS_KEY,
    STORAGE_FILE,
    TEST_ACCURACY_KEY,
    front_trials,
    write_results,
)
from ranksearch.results.plots import write_plots_or_warn
from ranksearch.search import (
    LayerSlot,
    SearchSpace,
    config_to_params,
    default_space_path,
    record_input_shapes,
    sample_config,
    uniform_config,
)
from ranksearch.search.latency_table import LatencyTable, Observation, cache_name, variant_key
from ranksearch.search.sensitivity import Sensitivity, measure_sensitivity
from ranksearch.study.report import SearchProgress, print_summary
from ranksearch.study.settings import RunSettings, file_digest
from ranksearch.study.storage import (
    REJECTED_AT_ZERO_SHOT,
    check_fingerprint,
    open_storage,
    optimize_to_budget,
    problem_fingerprint,
)
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
    checkpoint: Path | None = None
    """The file holding ``model``'s trained weights: ``--checkpoint`` or the cached baseline."""

    def model_spec(self) -> dict[str, object]:
        """How to rebuild ``model``: the ``build_model`` arguments and its weights file (an export's ``model``)."""
        return {
            "name": self.settings.model,
            "num_classes": self.splits.num_classes,
            "in_channels": self.splits.in_channels,
            "image_size": self.splits.image_size,
            "checkpoint": None if self.checkpoint is None else str(self.checkpoint),
        }


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
    if evaluator is not None and settings.workers > 1:
        raise RanksearchError("--workers: worker processes cannot share an evaluator object; pass --evaluator NAME")
    if settings.workers > 1 and settings.threads is None:  # the workers share the cores; the baseline is timed alike
        settings = replace(settings, threads=max(1, len(os.sched_getaffinity(0)) // settings.workers))
    device = resolve_device(settings.device)
    space_path = settings.space or default_space_path(model_family(settings.model))
    space = load_space(space_path, device, console)
    settings = replace(settings, space=Path(space_path), space_digest=file_digest(Path(space_path)))
    directory = settings.results_dir / settings.name()
    custom = _import_object(settings.evaluator, "--evaluator") if settings.evaluator and evaluator is None else None
    _check_writable(settings.results_dir)
    _check_existing_study(settings, directory)
    phases: dict[str, float] = {}
    with torch_threads(settings.threads), _quiet_optuna():
        start = time.perf_counter()
        context = load_problem(settings, device, console, phases, space=space)
        phases["load"] = time.perf_counter() - start - phases.get("baseline_training", 0.0)
        slots = space.layers(context.model, context.input_shapes)
        if not slots:
            raise RanksearchError(f"search space {space_path}: no searchable layer in {settings.model}; widen 'layers'")
        evaluator = evaluator or _make_evaluator(settings, context, custom)
        directory.mkdir(parents=True, exist_ok=True)
        study = _open_study(settings, directory)
        fingerprint = problem_fingerprint(context.model, context.splits)
        check_fingerprint(study, fingerprint, checkpoint=context.checkpoint)
        study.set_user_attr(MODEL_KEY, context.model_spec())
        dense = dense_model_cost(context.model, context.example)
        baseline = _baseline(study, evaluator, dense, console)
        table = latency_table(settings, context, slots, space.rank_multiple, evaluator, console, phases)
        sensitivity = layer_sensitivity(
            settings, context, slots, space.rank_multiple, evaluator, console, fingerprint, phases, table
        )
        if not study.trials:
            _enqueue_anchors(study, slots, space.rank_multiple)
            if sensitivity is not None:
                _enqueue_greedy(
                    study, slots, space.rank_multiple, sensitivity, _variant_cost(context, space.rank_multiple, table)
                )
        objective = _objective(
            settings, evaluator, context, slots, space.rank_multiple, dense, baseline, table, sensitivity
        )
        layer_names = list(slots)
        try:
            _optimize(study, objective, settings, context, directory, layer_names, console)
            start = time.perf_counter()
            _test_front(study, evaluator, console)
            phases["test_front"] = time.perf_counter() - start
        finally:
            write_results(study, directory, layer_names=layer_names)
            study.set_user_attr(PHASES_KEY, phases)
            write_plots_or_warn(study, directory, console)
    result = SearchResult(study, directory, baseline, phases)
    print_summary(result, settings, console)
    return result


def load_space(path: str | Path, device: torch.device, console: Console) -> SearchSpace:
    """The search space at ``path``; int8 is left out on a GPU (its kernels run on CPU only)."""
    space = SearchSpace.load(path)
    if device.type != "cpu" and space.int8:
        console.print(f"int8: its kernels run on CPU only; not searched on {device.type}")
        space = replace(space, int8=False)
    return space


@contextmanager
def _quiet_optuna() -> Iterator[None]:
    """The progress bar reports trials; Optuna's per-trial log lines and experimental warnings would bury it.

    Its "Trial N failed" warnings repeat the line printed per failed trial (with a traceback after Ctrl-C).
    """
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    optimize_logger = logging.getLogger("optuna.study._optimize")
    optimize_logger.addFilter(_not_a_failed_trial)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            yield
    finally:
        optimize_logger.removeFilter(_not_a_failed_trial)
        optuna.logging.set_verbosity(verbosity)


def _not_a_failed_trial(record: logging.LogRecord) -> bool:
    message = record.getMessage()
    return not (message.startswith("Trial ") and " failed with " in message)


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
    settings: RunSettings,
    device: torch.device,
    console: Console,
    phases: dict[str, float] | None = None,
    *,
    space: SearchSpace | None = None,
) -> RunContext:
    """The data splits and the trained model (from ``--checkpoint`` or the cached baseline) of a run.

    ``space``'s layer patterns are checked on the built model before any weights are loaded or trained.
    """
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
    if space is not None:
        space.check_layers(model)
    if settings.checkpoint is not None:
        model = load_checkpoint(model, settings.checkpoint)
        checkpoint = Path(settings.checkpoint)
    else:
        recipe = replace(
            DEFAULT_RECIPE,
            epochs=settings.baseline_epochs or DEFAULT_RECIPE.epochs,
            nuclear_norm=settings.baseline_nuclear_norm,
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
        checkpoint = Path(info["path"])
    model = model.to(device).eval()
    _check_weights(model, settings)
    example = splits.val[0][0].unsqueeze(0).repeat(settings.latency_batch, 1, 1, 1).to(device)
    return RunContext(
        settings, model, splits, device, example, record_input_shapes(model, example), checkpoint.resolve()
    )


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
            raise RanksearchError(
                f"--evaluator {settings.evaluator}: construction failed ({_reason(exc)}); "
                "make Class(*, context) build without raising"
            ) from None
        if not isinstance(evaluator, BaseEvaluator):
            raise RanksearchError(
                f"--evaluator {settings.evaluator}: not a ranksearch.BaseEvaluator; derive the class from it"
            )
        return evaluator
    return ClassificationEvaluator.from_settings(
        settings, model=context.model, splits=context.splits, device=context.device
    )


def _import_object(spec: str, option: str) -> type:
    module_name, _, attr = spec.rpartition(":")
    if not module_name or not attr:
        raise RanksearchError(f"{option} {spec!r}: no ':Name'; pass 'package.module:Name' or 'path/file.py:Name'")
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
    except Exception as exc:  # the module is user code: whatever its import raises is reported, not raised
        raise RanksearchError(
            f"{option} {spec!r}: cannot be loaded ({_reason(exc)}); check that the module imports "
            "(on PYTHONPATH, or a path ending in .py) and defines the name"
        ) from None


def _storage_url(settings: RunSettings, directory: Path) -> str:
    return settings.storage or f"sqlite:///{(directory / STORAGE_FILE).resolve()}"


def _check_existing_study(settings: RunSettings, directory: Path) -> None:
    """Before anything is loaded: ``--storage`` opens (an unreachable server fails now), and a study of this
    name there was run with the same settings."""
    if settings.storage is None and not (directory / STORAGE_FILE).is_file():
        return
    try:
        storage = open_storage(_storage_url(settings, directory), heartbeat=settings.heartbeat)
        study_id = storage.get_study_id_from_name(settings.name())
    except KeyError:
        return
    except Exception as exc:  # sqlalchemy and driver errors: malformed or unreachable URLs, unreadable files
        raise _storage_error(settings, directory, exc) from None
    _check_identity(settings, storage.get_study_user_attrs(study_id).get("identity"))


def _open_study(settings: RunSettings, directory: Path) -> optuna.Study:
    database = directory / STORAGE_FILE
    new_database = settings.storage is None and not database.exists()
    try:
        study = optuna.create_study(
            storage=open_storage(_storage_url(settings, directory), heartbeat=settings.heartbeat),
            sampler=_sampler(settings),
            study_name=settings.name(),
            directions=["maximize", "minimize"],
            load_if_exists=True,
        )
    except Exception as exc:  # sqlalchemy and driver errors: malformed or unreachable URLs, a full disk
        if new_database:
            _remove_database(database)
        raise _storage_error(settings, directory, exc) from None
    recorded = study.user_attrs.get("identity")
    _check_identity(settings, recorded)
    if recorded is None:
        study.set_metric_names(["accuracy", "latency_ms"])
        study.set_user_attr("identity", settings.identity())
    study.set_user_attr(SETTINGS_KEY, settings.to_dict())  # the latest budget and timeout, for workers to follow
    return study


def _check_identity(settings: RunSettings, recorded: dict[str, object] | None) -> None:
    identity = settings.identity()
    if recorded is None:
        return
    recorded = {**RunSettings.default_identity(), **recorded}  # keys added since the study was made
    if recorded == identity:
        return
    key = next(k for k in {**recorded, **identity} if recorded.get(k) != identity.get(k))
    raise RanksearchError(
        f"study {settings.name()!r} exists with {key}={recorded.get(key)!r}, not {identity.get(key)!r}; "
        "rerun with the same settings or pass --study-name for a new study"
    )


def _storage_error(settings: RunSettings, directory: Path, exc: Exception) -> RanksearchError:
    if settings.storage is None:
        return RanksearchError(
            f"{directory / STORAGE_FILE}: cannot be opened or written ({_reason(exc.__cause__ or exc)}); "
            "check that its disk has room and is writable, or pass another --results-dir"
        )
    if isinstance(exc, ImportError):
        return RanksearchError(
            f"--storage {settings.storage}: no database driver for it ({_reason(exc.__cause__ or exc)}); "
            "install one (pip install 'ranksearch[dist]' for postgresql+psycopg2://) and name it in the URL"
        )
    return RanksearchError(
        f"--storage {settings.storage}: cannot be opened ({_reason(exc)}); "
        "check the URL (dialect+driver://user:password@host:port/database) and that the server is up"
    )


def _remove_database(database: Path) -> None:
    """A SQLite database this run created but could not set up (a full disk), with its folder if left empty."""
    for path in (database, *(database.with_name(database.name + s) for s in ("-wal", "-shm", "-journal"))):
        path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        database.parent.rmdir()


def _reason(exc: BaseException) -> str:
    """``Type: message``, first line only."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


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
    metrics, test = (_baseline_metrics(evaluator, split) for split in ("val", "test"))
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


def _baseline_metrics(evaluator: BaseEvaluator, split: Split) -> dict[str, float]:
    """The uncompressed model's metrics: an evaluator failing on it can score nothing, so the run stops."""
    try:
        return checked_metrics(evaluator, evaluator.evaluate(CompressionConfig(layers={}), split=split))
    except (RanksearchError, KeyboardInterrupt):
        raise
    except Exception as exc:
        raise RanksearchError(
            f"evaluator {type(evaluator).__name__} failed on the uncompressed model ({_reason(exc)}); "
            "fix the evaluator or its settings, then rerun"
        ) from None


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


def _enqueue_greedy(
    study: optuna.Study,
    slots: dict[str, LayerSlot],
    rank_multiple: int,
    sensitivity: Sensitivity,
    cost: Callable[[str, LayerChoice], float],
) -> None:
    """Warm starts: the greedy equal-sensitivity configs (those that differ from the anchors)."""
    queued = {  # a waiting trial's params are its fixed params
        tuple(sorted((t.params or t.system_attrs.get("fixed_params", {})).items()))
        for t in study.get_trials(deepcopy=False)
    }
    for level, config in sensitivity.greedy_configs(slots, cost, rank_multiple=rank_multiple).items():
        params = config_to_params(config, slots)
        if tuple(sorted(params.items())) not in queued:
            study.enqueue_trial(params, user_attrs={"warm_start": f"greedy, each layer <= {level:g} pp alone"})


def _variant_cost(
    context: RunContext, rank_multiple: int, table: LatencyTable | None
) -> Callable[[str, LayerChoice], float]:
    """What the greedy configs minimise per layer: the table's time where there is one, else MACs."""
    if table is not None:
        return lambda name, choice: table.layer_ms[name][variant_key(choice)]
    modules = dict(context.model.named_modules())

    def macs(name: str, choice: LayerChoice) -> float:
        shape = context.input_shapes[name]
        cost = layer_cost(
            modules[name], choice.technique, choice.rank, shape, rank_multiple=rank_multiple, **choice.options
        )
        return float(cost.macs)

    return macs


def layer_sensitivity(
    settings: RunSettings,
    context: RunContext,
    slots: dict[str, LayerSlot],
    rank_multiple: int,
    evaluator: BaseEvaluator,
    console: Console,
    fingerprint: dict[str, str],
    phases: dict[str, float] | None = None,
    table: LatencyTable | None = None,
) -> Sensitivity | None:
    """Each layer variant's zero-shot accuracy drop alone (cached under ``results/sensitivity/``) when
    ``--sensitivity`` is on and the built-in evaluator runs the search; otherwise None. ``fingerprint``
    (:func:`problem_fingerprint` of the run's model and data) keys the cache. With a latency ``table``,
    only variants faster than their dense layer are measured."""
    if not (settings.sensitivity and isinstance(evaluator, ClassificationEvaluator)):
        return None
    start = time.perf_counter()
    key = json.dumps(
        [
            fingerprint,
            settings.space_digest,
            rank_multiple,
            evaluator.calib_batches,
            evaluator.batch_size,
            evaluator.seed,
            len(evaluator.zero_shot_set),
        ]
    )
    cache_file = (
        settings.results_dir
        / "sensitivity"
        / f"sensitivity-{hashlib.blake2b(key.encode(), digest_size=8).hexdigest()}.json"
    )
    columns = (TextColumn("sensitivity"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("sensitivity", total=None)
        sensitivity = measure_sensitivity(
            context.model,
            slots,
            context.input_shapes,
            zero_shot=evaluator.zero_shot_accuracy,
            baseline_accuracy=evaluator.zero_shot_baseline(),
            hopeless=settings.max_zero_shot_drop,
            rank_multiple=rank_multiple,
            worth=None if table is None else table.faster_than_dense,
            cache_file=cache_file,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
        )
    seconds = time.perf_counter() - start
    if phases is not None:
        phases["sensitivity"] = seconds
    drops = [d for layer in sensitivity.drops.values() for d in layer.values()]
    hopeless = sum(d > settings.max_zero_shot_drop for d in drops)
    console.print(
        f"sensitivity: {len(drops)} layer variants of {len(slots)} layers ready in {seconds:.0f} s; "
        f"{hopeless} hopeless alone (zero-shot drop over {settings.max_zero_shot_drop:g} points) are not evaluated"
    )
    return sensitivity


def latency_table(
    settings: RunSettings,
    context: RunContext,
    slots: dict[str, LayerSlot],
    rank_multiple: int,
    evaluator: BaseEvaluator,
    console: Console,
    phases: dict[str, float] | None = None,
) -> LatencyTable | None:
    """The per-layer latency table (built once per device, threads and torch version, cached under
    ``results/latency-tables/``) when ``--latency-table`` is on and the built-in evaluator times models in
    torch on this machine; otherwise None (a custom evaluator may time them anywhere)."""
    if not (
        settings.latency_table
        and isinstance(evaluator, ClassificationEvaluator)
        and evaluator.latency_backend == "torch"
    ):
        return None
    start = time.perf_counter()
    table = build_latency_table(settings, context, slots, rank_multiple, console)
    seconds = time.perf_counter() - start
    if phases is not None:
        phases["latency_table"] = seconds
    variants = sum(len(times) for times in table.layer_ms.values())
    console.print(f"latency table: {variants} layer variants of {len(slots)} layers ready in {seconds:.0f} s")
    return table


def build_latency_table(
    settings: RunSettings, context: RunContext, slots: dict[str, LayerSlot], rank_multiple: int, console: Console
) -> LatencyTable:
    """:meth:`LatencyTable.build` for a run's model and slots, with a progress bar, cached under
    ``settings.results_dir / "latency-tables"``."""
    columns = (TextColumn("latency table"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("latency table", total=None)
        return LatencyTable.build(
            context.model,
            slots,
            context.input_shapes,
            context.example,
            device=context.device,
            threads=settings.threads,
            rank_multiple=rank_multiple,
            cache_file=settings.results_dir / "latency-tables" / cache_name(context.device, settings.threads),
            progress=lambda done, total: bar.update(task, completed=done, total=total),
        )


MAX_REJECTED_IN_A_ROW = 100


def _objective(
    settings: RunSettings,
    evaluator: BaseEvaluator,
    context: RunContext,
    slots: dict[str, LayerSlot],
    rank_multiple: int,
    dense: ModelCost,
    baseline: dict[str, float],
    table: LatencyTable | None = None,
    sensitivity: Sensitivity | None = None,
) -> Callable[[optuna.Trial], tuple[float, float] | float]:
    rejected_in_a_row = 0

    def reject(trial: optuna.Trial, reason: str | None) -> None:
        """Prune the trial before evaluation when there is a ``reason``; stop a run that rejects everything."""
        nonlocal rejected_in_a_row
        if reason is None:
            rejected_in_a_row = 0
            return
        rejected_in_a_row += 1
        trial.set_user_attr("fail_reason", f"rejected before evaluation: {reason}")
        if rejected_in_a_row >= MAX_REJECTED_IN_A_ROW:
            raise RanksearchError(
                f"{rejected_in_a_row} configs in a row rejected before evaluation (last: {reason}); "
                "raise --max-latency-ms or --max-zero-shot-drop, widen the search space, "
                "or pass --no-latency-table / --no-sensitivity"
            )
        raise optuna.TrialPruned(reason)

    def hopeless_variant(config: CompressionConfig) -> str | None:
        if sensitivity is None:
            return None
        hit = sensitivity.hopeless_layer(config, settings.max_zero_shot_drop)
        if hit is None:
            return None
        name, drop = hit
        choice = config.layers[name]
        return (
            f"layer {name}: {choice.technique}@{choice.rank} alone drops zero-shot accuracy "
            f"{'beyond' if math.isinf(drop) else f'{drop:.1f} points, over'} --max-zero-shot-drop "
            f"{settings.max_zero_shot_drop:g}"
        )

    def predicted_too_slow(trial: optuna.Trial, config: CompressionConfig, protected: bool) -> str | None:
        """A config the table predicts over --max-latency-ms, or (anchors and warm starts aside) slower than
        the dense model.

        The table is refitted on every complete trial so far (:meth:`LatencyTable.fitted`): their
        latencies relative to the dense model timed beside each, scaled by the median of those dense
        timings, which follows the machine's state.
        """
        if table is None:
            return None
        current = table.fitted(_observations(trial.study))
        dense_ms = current.predict(CompressionConfig(layers={}))
        predicted = current.predict(config)
        trial.set_user_attr("predicted_latency_ms", predicted)
        trial.set_user_attr("predicted_speedup", dense_ms / predicted)
        if settings.max_latency_ms is not None and predicted > settings.max_latency_ms:
            return f"predicted {predicted:.3f} ms, over --max-latency-ms {settings.max_latency_ms:g}"
        if predicted > dense_ms and not protected:
            return f"predicted {predicted:.3f} ms, slower than the uncompressed model's {dense_ms:.3f} ms"
        return None

    def evaluate(trial: optuna.Trial, config: CompressionConfig, protected: bool) -> Mapping[str, float]:
        """The evaluator's metrics; a zero-shot rejection (anchors and warm starts are never rejected) prunes
        the trial, which still counts towards the budget, with the time it saved."""
        try:
            if isinstance(evaluator, ClassificationEvaluator):
                return evaluator.evaluate(config, split="val", early_reject=not protected)
            return evaluator.evaluate(config, split="val")
        except Rejected as exc:
            for key, value in exc.metrics.items():
                trial.set_user_attr(key, value)
            trial.set_user_attr("seconds_saved", _time_saved(trial.study))
            trial.set_user_attr("fail_reason", f"rejected at zero shot: {exc}")
            trial.set_user_attr(REJECTED_AT_ZERO_SHOT, True)
            raise optuna.TrialPruned(str(exc)) from None

    def objective(trial: optuna.Trial) -> tuple[float, float] | float:
        config = sample_config(trial, slots, rank_multiple=rank_multiple)
        cost = model_cost(context.model, config, context.input_shapes, dense=dense)
        trial.set_user_attr("config", config.to_dict())
        for key, value in {"params": cost.params, "macs": cost.macs, "size_bytes": cost.size_bytes}.items():
            trial.set_user_attr(key, value)
        protected = "anchor" in trial.user_attrs or "warm_start" in trial.user_attrs
        reject(trial, predicted_too_slow(trial, config, protected) or (None if protected else hopeless_variant(config)))
        try:
            metrics = checked_metrics(evaluator, evaluate(trial, config, protected))
        except (RanksearchError, KeyboardInterrupt, optuna.TrialPruned):
            raise
        except Exception as exc:  # a failed trial is recorded with its reason; the search goes on
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
            trial.set_user_attr("fail_reason", reason)
            return math.nan
        drop_pp = 100.0 * (baseline["accuracy"] - metrics["accuracy"])
        speedup = metrics.get("reference_latency_ms", baseline["latency_ms"]) / metrics["latency_ms"]
        for key, value in {**metrics, "accuracy_drop_pp": drop_pp, "speedup": speedup}.items():
            trial.set_user_attr(key, value)
        if settings.max_accuracy_drop is not None:
            trial.set_constraint("accuracy_drop", drop_pp - settings.max_accuracy_drop)
        if settings.max_latency_ms is not None:
            trial.set_constraint("latency", metrics["latency_ms"] - settings.max_latency_ms)
        return metrics["accuracy"], metrics["latency_ms"]

    return objective


SKIPPED_PHASES = ("time_finetune_s", "time_quantize_s", "time_latency_s", "time_accuracy_s")
"""The evaluator phases a zero-shot rejection skips."""


def _time_saved(study: optuna.Study) -> float:
    """The median time complete trials spent in the phases a zero-shot rejection skips (0 before any)."""
    spent = [
        sum(t.user_attrs.get(key, 0.0) for key in SKIPPED_PHASES)
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if "time_finetune_s" in t.user_attrs
    ]
    return statistics.median(spent) if spent else 0.0


def _observations(study: optuna.Study) -> list[Observation]:
    return [
        Observation(
            CompressionConfig.from_dict(t.user_attrs["config"]),
            t.user_attrs["latency_ms"],
            t.user_attrs["reference_latency_ms"],
        )
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if "reference_latency_ms" in t.user_attrs
    ]


def _optimize(
    study: optuna.Study,
    objective: Callable[[optuna.Trial], tuple[float, float] | float],
    settings: RunSettings,
    context: RunContext,
    directory: Path,
    layer_names: list[str],
    console: Console,
) -> None:
    """Run trials here (or in ``settings.workers`` local processes) until the budget is complete."""
    with SearchProgress(study, settings, console) as progress:

        def refresh() -> None:
            write_results(study, directory, layer_names=layer_names)
            progress.update()

        if settings.workers == 1:
            optimize_to_budget(
                study, objective, budget=settings.budget, timeout=settings.timeout, after_trial=refresh, console=console
            )
            return
        from ranksearch.study.workers import run_local_workers  # workers.py builds on this module

        run_local_workers(
            study,
            settings,
            storage=_storage_url(settings, directory),
            checkpoint=context.checkpoint,
            refresh=refresh,
            console=console,
        )


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
