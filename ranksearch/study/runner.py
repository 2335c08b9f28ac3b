"""The search: prepare it, run trials up to the budget (here or in worker processes), write the results."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import optuna
from rich.console import Console

from ranksearch.errors import RanksearchError
from ranksearch.evaluate import Evaluator
from ranksearch.measure.backends import target_note
from ranksearch.measure.latency import torch_threads
from ranksearch.models import model_family
from ranksearch.results import untrained_baseline, write_results
from ranksearch.results.plots import write_plots_or_warn
from ranksearch.results.record import MODEL, PHASES
from ranksearch.search import default_space_path
from ranksearch.study.budget import optimize_to_budget, trial_counts
from ranksearch.study.front import confirm_front_speedups, measure_front_test_accuracy
from ranksearch.study.objective import Objective
from ranksearch.study.prepared import PreparedSearch, evaluator_factory
from ranksearch.study.problem import load_space
from ranksearch.study.progress import SearchProgress, print_summary, quiet_optuna
from ranksearch.study.promotion import run_promotions
from ranksearch.study.recovery import recover_front
from ranksearch.study.result import SearchResult
from ranksearch.study.settings import RunSettings
from ranksearch.study.storage import check_existing_study, open_study, storage_url
from ranksearch.study.workers import run_local_workers
from ranksearch.util import file_digest


def run_search(
    settings: RunSettings, *, evaluator: Evaluator | None = None, console: Console | None = None
) -> SearchResult:
    """Run (or resume and top up) the study ``settings`` describe; see the README for the pipeline."""
    console = console or Console(stderr=True)
    settings.validate()
    if evaluator is not None and settings.infra.workers > 1:
        raise RanksearchError("--workers: worker processes cannot share an evaluator object; pass --evaluator NAME")
    settings = settings.with_worker_threads()
    timing_device = settings.infra.devices()[1]
    shipped = settings.search.space is None
    space_path = Path(settings.search.space or default_space_path(model_family(settings.problem.model)))
    space = load_space(space_path, timing_device, console, backend=settings.evaluation.latency_backend)
    settings = settings.replace(space=space_path, space_digest=file_digest(space_path))
    directory = settings.infra.results_dir / settings.name()
    factory = evaluator_factory(settings) if evaluator is None else lambda _: evaluator
    _check_writable(settings.infra.results_dir)
    check_existing_study(settings, directory)
    phases: dict[str, float] = {}
    with torch_threads(settings.infra.threads), quiet_optuna():

        def create_study() -> optuna.Study:
            directory.mkdir(parents=True, exist_ok=True)
            return open_study(settings, directory)

        search, study = PreparedSearch.prepare(
            settings, factory, space=space, open_study=create_study, console=console, phases=phases
        )
        note = target_note(
            settings.evaluation.latency_backend,
            timing_device=settings.infra.timing_device,
            input_shape=tuple(search.context.example.shape),
        )
        if note is not None:
            console.print(note)
        if shipped:
            generic = " (generic: no shipped file for this model's family)" if space_path.stem == "default" else ""
            console.print(f"search space: {space_path.name}{generic}; pass --space FILE for another")
        MODEL.write(study, search.context.model_spec())
        if (warning := untrained_baseline(study)) is not None:
            console.print(f"[yellow]{warning}[/]")
        if not study.trials:
            search.enqueue_starts(study)
        layer_names = list(search.slots)
        try:
            _optimize(search, study, directory, layer_names, console)
            start = time.perf_counter()
            _promote(search, study, directory, layer_names, console)
            phases["promotion"] = time.perf_counter() - start
            start = time.perf_counter()
            confirm_front_speedups(study, search.evaluator, console)
            phases["retime_front"] = time.perf_counter() - start
            start = time.perf_counter()
            measure_front_test_accuracy(study, search.evaluator, console)
            phases["test_front"] = time.perf_counter() - start
            start = time.perf_counter()
            recover_front(study, search.context, directory=directory, console=console)
            phases["recovery"] = time.perf_counter() - start
        finally:
            write_results(study, directory, layer_names=layer_names)
            earlier = PHASES.read(study)
            PHASES.write(study, {**earlier, **{name: earlier.get(name, 0.0) + s for name, s in phases.items()}})
            write_plots_or_warn(study, directory, console)
    result = SearchResult(study, directory, search.baseline, phases)
    print_summary(result, console)
    return result


def _check_writable(results_dir: Path) -> None:
    try:
        results_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=results_dir, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise RanksearchError(
            f"--results-dir {results_dir}: not writable ({exc.strerror}); pass a writable directory"
        ) from None


def _optimize(
    search: PreparedSearch, study: optuna.Study, directory: Path, layer_names: list[str], console: Console
) -> None:
    """Run trials here (or in ``--workers`` local processes) until the budget is complete."""
    settings = search.settings
    with SearchProgress(study, settings, console) as progress:

        def refresh() -> None:
            write_results(study, directory, layer_names=layer_names)
            progress.update()

        if settings.infra.workers == 1:
            optimize_to_budget(
                study,
                Objective(search),
                before_trial=search.fill_gap,
                budget=settings.search.budget,
                timeout=settings.search.timeout,
                after_trial=refresh,
                heartbeat=settings.infra.heartbeat,
                console=console,
            )
            return
        run_local_workers(
            study,
            settings,
            storage=storage_url(settings, directory),
            checkpoint=search.context.checkpoint,
            refresh=refresh,
            console=console,
        )


def _promote(
    search: PreparedSearch, study: optuna.Study, directory: Path, layer_names: list[str], console: Console
) -> None:
    """The promotion rungs after the budget (:func:`~ranksearch.study.promotion.run_promotions`), in this process;
    none when the budget is not complete (``--timeout`` ended the search)."""
    settings = search.settings.search
    if trial_counts(study)["spent"] < settings.budget:
        return
    run_promotions(
        study,
        Objective(search),
        search.evaluator,
        steps=settings.promotion_steps,
        fraction=settings.promote_fraction,
        budget=settings.budget,
        console=console,
        after_trial=lambda: write_results(study, directory, layer_names=layer_names),
        heartbeat=search.settings.infra.heartbeat,
    )
