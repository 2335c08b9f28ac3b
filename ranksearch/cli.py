"""The ``ranksearch`` command line: each command parses options and calls one library function."""

from __future__ import annotations

import functools
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer
from rich.console import Console

from ranksearch.errors import USER_ERRORS, RanksearchError
from ranksearch.evaluate.classification import EvaluatorOptions
from ranksearch.study.settings import InfraSpec, ProblemSpec, RecoveryRecipe, RecoverySpec, SearchSpec

app = typer.Typer(
    help="Automated per-layer rank search for compressing CNNs with low-rank approximation.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
F = TypeVar("F", bound=Callable[..., object])


def user_errors(command: F) -> F:
    """Bad input -> one line on stderr and exit code 2; Ctrl-C -> exit code 130; never a traceback."""

    @functools.wraps(command)
    def wrapper(*args: object, **kwargs: object) -> object:
        try:
            return command(*args, **kwargs)
        except USER_ERRORS as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            print("interrupted: completed trials are kept; rerun the same command to resume", file=sys.stderr)
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def _console(*, stderr: bool) -> Console:
    """As wide as the terminal (or 160 columns when piped to a file)."""
    return Console(stderr=stderr, width=shutil.get_terminal_size((160, 24)).columns)


TrustCheckpoint = Annotated[
    bool,
    typer.Option(
        help="load a checkpoint holding more than tensors (a whole pickled model): it can run code, so only "
        "for files you trust"
    ),
]
StudyRef = Annotated[str, typer.Argument(help="study name (under --results-dir or in --storage) or its results/ dir")]
ResultsDir = Annotated[Path, typer.Option(help="where results/<study>/ is")]
Storage = Annotated[
    str | None,
    typer.Option(help="Optuna storage URL holding the study, or grpc://HOST:PORT of `ranksearch serve-storage`"),
]


@app.command()
@user_errors
def run(
    model: Annotated[
        str, typer.Option(help="torchvision name, timm:NAME, path/file.py:factory or package.module:factory")
    ] = ProblemSpec.model,
    dataset: Annotated[
        str, typer.Option(help="fashion_mnist, mnist, cifar10, cifar100 or imagefolder:PATH")
    ] = ProblemSpec.dataset,
    budget: Annotated[
        int, typer.Option(help="trials to evaluate, complete or rejected at zero shot (a rerun resumes and tops up)")
    ] = SearchSpec.budget,
    timeout: Annotated[
        float | None, typer.Option(help="stop after this many seconds of searching")
    ] = SearchSpec.timeout,
    space: Annotated[
        Path | None, typer.Option(help="search space YAML (default: the model family's)")
    ] = SearchSpec.space,
    sampler: Annotated[str, typer.Option(help="tpe, nsga2, random or gp")] = SearchSpec.sampler,
    seed: Annotated[int, typer.Option(help="seed for data split, sampler and fine-tuning")] = ProblemSpec.seed,
    device: Annotated[
        str, typer.Option(help="cpu, cuda or mps: where models are fine-tuned and scored")
    ] = InfraSpec.device,
    latency_device: Annotated[
        str | None,
        typer.Option(help="where latency is measured (default: --device), e.g. --device cuda --latency-device cpu"),
    ] = InfraSpec.latency_device,
    threads: Annotated[int | None, typer.Option(help="torch threads (default: torch's choice)")] = InfraSpec.threads,
    latency_backend: Annotated[
        str | None,
        typer.Option(
            help="torch (eager), compile: torch.compile (inductor, CPU, no int8), or onnxruntime: time each trial's "
            "ONNX export in ONNX Runtime (CPU) (default: torch; onnxruntime with --target)"
        ),
    ] = None,
    target: Annotated[
        str | None,
        typer.Option(
            help="time on a remote device: http://HOST:PORT of `ranksearch target serve` there "
            "(token in $RANKSEARCH_TARGET_TOKEN)"
        ),
    ] = EvaluatorOptions.target,
    latency_batch: Annotated[
        int, typer.Option(help="batch size of the latency measurement")
    ] = EvaluatorOptions.latency_batch,
    fold_batchnorm: Annotated[
        bool,
        typer.Option(
            "--fold-batchnorm/--no-fold-batchnorm",
            help="time models as deployed, BatchNorm folded into the layer before it (dense and compressed alike)",
        ),
    ] = EvaluatorOptions.fold_batchnorm,
    latency_table: Annotated[
        bool,
        typer.Option(
            "--latency-table/--no-latency-table",
            help="time each layer variant once; reject configs predicted slower than the dense model "
            "or over --max-latency-ms before evaluating them",
        ),
    ] = SearchSpec.latency_table,
    sensitivity: Annotated[
        bool,
        typer.Option(
            "--sensitivity/--no-sensitivity",
            help="measure each layer variant's zero-shot accuracy drop once (cached); drop ranks hopeless "
            "alone and start from greedy equal-sensitivity configs",
        ),
    ] = SearchSpec.sensitivity,
    early_reject: Annotated[
        bool,
        typer.Option(
            "--early-reject/--no-early-reject",
            help="prune a config before fine-tuning when its zero-shot accuracy is hopeless",
        ),
    ] = SearchSpec.early_reject,
    max_zero_shot_drop: Annotated[
        float,
        typer.Option(
            help="zero-shot accuracy drop (points) beyond which a config, or one layer's variant, is hopeless"
        ),
    ] = SearchSpec.max_zero_shot_drop,
    finetune_steps: Annotated[int, typer.Option(help="distillation steps per trial")] = EvaluatorOptions.finetune_steps,
    finetune_lr: Annotated[float, typer.Option(help="fine-tuning learning rate")] = EvaluatorOptions.finetune_lr,
    batch_size: Annotated[int, typer.Option(help="training batch size")] = EvaluatorOptions.batch_size,
    calib_batches: Annotated[
        int, typer.Option(help="batches for BatchNorm/int8/data-aware calibration")
    ] = EvaluatorOptions.calib_batches,
    eval_subset: Annotated[int | None, typer.Option(help="validation images per trial")] = ProblemSpec.eval_subset,
    train_subset: Annotated[
        int | None, typer.Option(help="use only this many training images")
    ] = ProblemSpec.train_subset,
    val_fraction: Annotated[
        float, typer.Option(help="share of the training set held out for validation")
    ] = ProblemSpec.val_fraction,
    baseline_epochs: Annotated[
        int | None, typer.Option(help="override the baseline recipe's epochs")
    ] = ProblemSpec.baseline_epochs,
    baseline_nuclear_norm: Annotated[
        float, typer.Option(help="train the baseline with this low-rank (nuclear-norm) penalty; 0 is off")
    ] = ProblemSpec.baseline_nuclear_norm,
    max_accuracy_drop: Annotated[
        float | None, typer.Option(help="constraint: accuracy drop in points")
    ] = SearchSpec.max_accuracy_drop,
    max_latency_ms: Annotated[float | None, typer.Option(help="constraint: latency in ms")] = SearchSpec.max_latency_ms,
    warm_starts: Annotated[
        str,
        typer.Option(
            help="configs that start the study after the anchors (with --sensitivity): knapsack solutions over "
            "latency budgets (knapsack), those and the greedy equal-sensitivity levels (knapsack+greedy), the greedy "
            "levels alone (greedy), or none"
        ),
    ] = SearchSpec.warm_starts,
    fill_gaps: Annotated[
        bool,
        typer.Option(
            help="after the warm starts, give each trial the knapsack config in the widest gap of the measured "
            "front, while one is left, instead of the sampler's"
        ),
    ] = SearchSpec.fill_gaps,
    promote_steps: Annotated[
        str,
        typer.Option(
            help="after the budget, re-evaluate the best --promote-fraction with these longer fine-tunes, rung by "
            "rung (comma-separated steps; 0 is off)"
        ),
    ] = SearchSpec.promote_steps,
    promote_fraction: Annotated[
        float, typer.Option(help="share of each rung promoted to the next")
    ] = SearchSpec.promote_fraction,
    final_epochs: Annotated[
        int, typer.Option(help="after the search, fine-tune --final-top front members this many epochs; 0 is off")
    ] = RecoverySpec.final_epochs,
    final_top: Annotated[
        int,
        typer.Option(help="front members fine-tuned after the search, bisecting for the fastest within 0.5 points"),
    ] = RecoverySpec.final_top,
    final_lr: Annotated[
        float, typer.Option(help="peak learning rate of each --final-epochs fine-tune (warm-up, then cosine decay)")
    ] = RecoverySpec.final_lr,
    final_feature_weight: Annotated[
        float,
        typer.Option(help="weight of matching the uncompressed model's block outputs in each recovery; 0: logits only"),
    ] = RecoverySpec.final_feature_weight,
    storage: Annotated[
        str | None, typer.Option(help="Optuna storage URL (default: SQLite under results)")
    ] = InfraSpec.storage,
    workers: Annotated[
        int, typer.Option(help="local worker processes sharing the study (threads split among them)")
    ] = InfraSpec.workers,
    heartbeat: Annotated[
        int, typer.Option(help="seconds between a trial's heartbeats; one silent for 3 is failed and retried")
    ] = InfraSpec.heartbeat,
    study_name: Annotated[str | None, typer.Option(help="default: <model>-<dataset>-<space>")] = SearchSpec.study_name,
    results_dir: Annotated[Path, typer.Option(help="where results/<study>/ goes")] = InfraSpec.results_dir,
    checkpoint: Annotated[Path | None, typer.Option(help="trained weights (a state_dict)")] = ProblemSpec.checkpoint,
    trust_checkpoint: TrustCheckpoint = ProblemSpec.trust_checkpoint,
    weights: Annotated[
        str | None,
        typer.Option(
            help="pretrained weights name, downloaded (with --checkpoint: only how images are preprocessed); "
            "image folders are preprocessed as the weights expect"
        ),
    ] = ProblemSpec.weights,
    image_size: Annotated[
        int | None,
        typer.Option(help="imagefolder: crop side in pixels (default: the images' own size, or the weights')"),
    ] = ProblemSpec.image_size,
    data_root: Annotated[Path, typer.Option(help="dataset directory")] = ProblemSpec.data_root,
    download: Annotated[bool, typer.Option(help="download the dataset when online")] = ProblemSpec.download,
    evaluator: Annotated[str | None, typer.Option(help="custom evaluator, package.module:Class")] = InfraSpec.evaluator,
) -> None:
    """Search per-layer compression configurations; write the Pareto front under results/<study>/."""
    from ranksearch.study import RunSettings, run_search

    settings = RunSettings(
        problem=ProblemSpec(
            model=model,
            dataset=dataset,
            checkpoint=checkpoint,
            trust_checkpoint=trust_checkpoint,
            weights=weights,
            image_size=image_size,
            data_root=data_root,
            download=download,
            train_subset=train_subset,
            eval_subset=eval_subset,
            val_fraction=val_fraction,
            seed=seed,
            baseline_epochs=baseline_epochs,
            baseline_nuclear_norm=baseline_nuclear_norm,
        ),
        evaluation=EvaluatorOptions(
            finetune_steps=finetune_steps,
            finetune_lr=finetune_lr,
            batch_size=batch_size,
            calib_batches=calib_batches,
            latency_backend=latency_backend or ("onnxruntime" if target else EvaluatorOptions.latency_backend),
            latency_batch=latency_batch,
            target=target,
            fold_batchnorm=fold_batchnorm,
        ),
        search=SearchSpec(
            budget=budget,
            timeout=timeout,
            space=space,
            sampler=sampler,
            latency_table=latency_table,
            sensitivity=sensitivity,
            early_reject=early_reject,
            max_zero_shot_drop=max_zero_shot_drop,
            max_accuracy_drop=max_accuracy_drop,
            max_latency_ms=max_latency_ms,
            study_name=study_name,
            warm_starts=warm_starts,
            fill_gaps=fill_gaps,
            promote_steps=promote_steps,
            promote_fraction=promote_fraction,
        ),
        recovery=RecoverySpec(
            final_epochs=final_epochs, final_top=final_top, final_lr=final_lr, final_feature_weight=final_feature_weight
        ),
        infra=InfraSpec(
            device=device,
            latency_device=latency_device,
            threads=threads,
            storage=storage,
            workers=workers,
            heartbeat=heartbeat,
            results_dir=results_dir,
            evaluator=evaluator,
        ),
    )
    run_search(settings, console=_console(stderr=True))


@app.command()
@user_errors
def techniques() -> None:
    """List the registered compression techniques."""
    from rich.table import Table

    from ranksearch.techniques import get_technique, list_techniques

    table = Table("technique", "replacement", "rank", "exact at full rank", "data-aware")
    for name in list_techniques():
        t = get_technique(name)
        table.add_row(
            name,
            t.summary,
            ", ".join(t.rank_names) or "—",
            "yes" if t.exact_at_full_rank else "no",
            "yes" if t.data_aware_capable else "no",
        )
    _console(stderr=False).print(table)


@app.command("sample-folder")
@user_errors
def sample_folder(
    path: Annotated[Path, typer.Argument(help="where train/CLASS/*.jpg and test/CLASS/*.jpg are written")],
    size: Annotated[int, typer.Option(help="image side in pixels")] = 224,
    train_per_class: Annotated[int, typer.Option(help="training images per class")] = 300,
    test_per_class: Annotated[int, typer.Option(help="test images per class")] = 60,
    classes: Annotated[int, typer.Option(help="classes (2 to 10)")] = 10,
    data_root: Annotated[Path, typer.Option(help="where Fashion-MNIST is read from")] = ProblemSpec.data_root,
) -> None:
    """Write an RGB image folder to try --dataset imagefolder:PATH offline (Fashion-MNIST, upscaled into colour)."""
    from ranksearch.data.sample import write_sample_folder

    written = write_sample_folder(
        path,
        data_root=data_root,
        size=size,
        train_per_class=train_per_class,
        test_per_class=test_per_class,
        classes=classes,
    )
    _console(stderr=False).print(
        f"wrote {written['train']} training and {written['test']} test images under {path}; "
        f"search it with --dataset imagefolder:{path}"
    )


@app.command()
@user_errors
def models(
    pattern: Annotated[
        str | None,
        typer.Argument(help="shell-style pattern (resnet*) or a word the names contain; timm:PATTERN lists timm's"),
    ] = None,
) -> None:
    """List the models --model can name: their search space and pretrained --weights."""
    from rich.table import Table

    from ranksearch.models import find_models
    from ranksearch.search import default_space_path

    table = Table("model", "search space", "--weights")
    for entry in find_models(pattern):
        table.add_row(entry.name, default_space_path(entry.family).name, ", ".join(entry.weights) or "—")
    console = _console(stderr=False)
    console.print(table)
    console.print("also: path/to/file.py:factory or package.module:factory (see README)")


@app.command()
@user_errors
def show(
    study: StudyRef,
    all_trials: Annotated[bool, typer.Option("--all", help="every trial, not only the Pareto front")] = False,
    fmt: Annotated[str, typer.Option("--format", help="table, csv or json (csv/json on stdout)")] = "table",
    results_dir: ResultsDir = Path("results"),
    storage: Storage = None,
) -> None:
    """Show a study's Pareto front (or every trial): accuracy, drop and speedup against the baseline."""
    from ranksearch.results import load_study
    from ranksearch.results.show import show_study

    loaded = load_study(study, results_dir=results_dir, storage=storage)
    show_study(loaded, all_trials=all_trials, fmt=fmt, console=_console(stderr=False))


@app.command()
@user_errors
def export(
    study: StudyRef,
    trial: Annotated[int | None, typer.Option(help="the trial with this number")] = None,
    max_accuracy_drop: Annotated[
        float | None, typer.Option(help="the fastest trial within this val accuracy drop (points)")
    ] = None,
    max_latency_ms: Annotated[float | None, typer.Option(help="the most accurate trial within this latency")] = None,
    confident: Annotated[
        bool,
        typer.Option(
            help="--max-accuracy-drop holds with 95 % confidence (the upper end of the recovered validation drop's "
            "interval; recovered trials only)"
        ),
    ] = False,
    out: Annotated[Path | None, typer.Option(help=".yaml/.yml/.json (default: <study>-trial<N>.yaml)")] = None,
    results_dir: ResultsDir = Path("results"),
    storage: Storage = None,
) -> None:
    """Export one trial's config with its model spec and provenance (both rules: fastest within both)."""
    from ranksearch.results import load_study, locate_study, study_directory
    from ranksearch.results.export import export_trial

    loaded = load_study(study, results_dir=results_dir, storage=storage)
    url, name = locate_study(study, results_dir=results_dir, storage=storage)
    export_trial(
        loaded,
        trial=trial,
        max_accuracy_drop=max_accuracy_drop,
        max_latency_ms=max_latency_ms,
        confident=confident,
        out=out,
        storage_url=url,
        directory=study_directory(study, name=name, results_dir=results_dir),
        console=_console(stderr=True),
    )


@app.command()
@user_errors
def apply(
    config: Annotated[Path, typer.Option(help="an exported config (`ranksearch export`)")],
    out: Annotated[Path, typer.Option(help="the compressed model, whole (torch.load(path, weights_only=False))")],
    checkpoint: Annotated[
        Path | None, typer.Option(help="the uncompressed model's weights (default: the config's)")
    ] = None,
    onnx: Annotated[Path | None, typer.Option(help="also write a single-file ONNX model here")] = None,
    latency_backend: Annotated[
        list[str] | None,
        typer.Option(
            help="time both models here, repeatable: torch, onnxruntime or compile (default: the search's, and "
            "onnxruntime with --onnx)"
        ),
    ] = None,
    threads: Annotated[
        int | None, typer.Option(help="threads of the latency measurement (default: the search's)")
    ] = None,
    batch: Annotated[
        int | None, typer.Option(help="batch size of the ONNX check and latency measurement (default: the search's)")
    ] = None,
    dataset: Annotated[str | None, typer.Option(help="int8/data-aware calibration data (default: the study's)")] = None,
    data_root: Annotated[Path | None, typer.Option(help="dataset directory (default: the study's)")] = None,
    trust_checkpoint: TrustCheckpoint = False,
) -> None:
    """Compress trained weights as a config says; save the model (and ONNX); time it beside the uncompressed model."""
    from ranksearch.results.apply import apply_to_checkpoint

    apply_to_checkpoint(
        config,
        checkpoint,
        out,
        onnx=onnx,
        backends=latency_backend,
        threads=threads,
        batch=batch,
        dataset=dataset,
        data_root=data_root,
        trust_checkpoint=trust_checkpoint,
        console=_console(stderr=False),
    )


@app.command()
@user_errors
def finetune(
    study: StudyRef,
    trial: Annotated[
        list[int],
        typer.Option(
            help="a complete trial to fine-tune (`ranksearch show STUDY --all`); repeat for several, which share "
            "the uncompressed model's outputs"
        ),
    ],
    epochs: Annotated[
        int, typer.Option(help="epochs of distillation from the uncompressed model")
    ] = RecoverySpec.final_epochs,
    lr: Annotated[
        float, typer.Option(help="peak learning rate (linear warm-up, then cosine decay to 0)")
    ] = RecoverySpec.final_lr,
    feature_weight: Annotated[
        float, typer.Option(help="weight of matching the uncompressed model's block outputs; 0: logits only")
    ] = RecoverySpec.final_feature_weight,
    results_dir: ResultsDir = Path("results"),
    storage: Storage = None,
    trust_checkpoint: TrustCheckpoint = False,
) -> None:
    """Fine-tune trials for real; measure them on the validation and test splits; save them in
    results/STUDY/recovered/."""
    from ranksearch.study.recovery import recover_trials

    recover_trials(
        study,
        trials=trial,
        recipe=RecoveryRecipe(epochs=epochs, lr=lr, feature_weight=feature_weight),
        results_dir=results_dir,
        storage=storage,
        trust_checkpoint=trust_checkpoint,
        console=_console(stderr=True),
    )


@app.command()
@user_errors
def worker(
    study: Annotated[str, typer.Argument(help="the study's name, as `ranksearch run` printed it")],
    storage: Annotated[
        str | None, typer.Option(help="storage URL or grpc://HOST:PORT (default: SQLite under results)")
    ] = None,
    results_dir: ResultsDir = Path("results"),
    threads: Annotated[int | None, typer.Option(help="torch threads (default: the study's)")] = None,
    data_root: Annotated[
        Path | None, typer.Option(help="this machine's dataset directory (default: the study's)")
    ] = None,
    checkpoint: Annotated[
        Path | None, typer.Option(help="this machine's copy of the study's trained weights (default: its path)")
    ] = None,
    space: Annotated[Path | None, typer.Option(help="this machine's copy of the study's search space")] = None,
    trust_checkpoint: TrustCheckpoint = False,
) -> None:
    """Join a study from this machine: run its trials (its model, data, space, baseline) until the budget is met."""
    from ranksearch.study.workers import join_study

    join_study(
        study,
        storage=storage,
        results_dir=results_dir,
        threads=threads,
        data_root=data_root,
        checkpoint=checkpoint,
        space=space,
        trust_checkpoint=trust_checkpoint,
        console=_console(stderr=True),
    )


target_app = typer.Typer(
    help="Remote latency targets: time models on the device they will run on.", no_args_is_help=True
)
app.add_typer(target_app, name="target")


@target_app.command("serve")
@user_errors
def target_serve(
    host: Annotated[str, typer.Option(help="the address to listen on (0.0.0.0: every interface)")] = "0.0.0.0",
    port: Annotated[int, typer.Option(help="the port to listen on")] = 8765,
    token: Annotated[
        str | None,
        typer.Option(help="the token searches must send (default: $RANKSEARCH_TARGET_TOKEN, else a new one, printed)"),
    ] = None,
    threads: Annotated[int | None, typer.Option(help="ONNX Runtime threads (default: every core)")] = None,
    max_upload_mb: Annotated[float, typer.Option(help="refuse models larger than this")] = 512,
) -> None:
    """Serve this device as a latency target: searches elsewhere time their ONNX models here with --target."""
    from ranksearch.measure.target_server import ServerOptions, resolve_token, serve

    resolved, generated = resolve_token(token)
    options = ServerOptions(host=host, port=port, token=resolved, threads=threads, max_upload_mb=max_upload_mb)
    serve(options, generated_token=generated, announce=lambda text: print(text, flush=True))


@app.command("serve-storage")
@user_errors
def serve_storage(
    storage: Annotated[str, typer.Option(help="the database holding the studies (postgresql://..., sqlite:///...)")],
    host: Annotated[str, typer.Option(help="the address to listen on (0.0.0.0: every interface)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="the port to listen on")] = 13000,
) -> None:
    """Serve a study database to workers over gRPC: they join with --storage grpc://HOST:PORT, no driver or password."""
    from ranksearch.study.storage import serve_storage as serve

    serve(storage, host=host, port=port, console=_console(stderr=True))


@app.command()
@user_errors
def cache(
    clear: Annotated[
        bool, typer.Option(help="remove cached files (with --older-than: only those unused as long)")
    ] = False,
    older_than: Annotated[
        float | None, typer.Option(help="with --clear: only files not used for this many days")
    ] = None,
    to_gb: Annotated[
        float | None, typer.Option(help="trim each cache to this many GB, least recently used first")
    ] = None,
    only: Annotated[
        list[str] | None,
        typer.Option(help="the caches to clear or trim: factors, baselines, latency-tables, sensitivity"),
    ] = None,
    results_dir: ResultsDir = Path("results"),
) -> None:
    """Show what is cached between runs (size, last use, limit); clear or trim it."""
    from rich.table import Table

    from ranksearch.study.cache import cache_areas, clear_caches

    console = _console(stderr=False)
    if clear or to_gb is not None:
        for area, files, freed in clear_caches(results_dir, only=only or (), older_than_days=older_than, to_gb=to_gb):
            console.print(f"{area.name}: removed {files} files, {freed / 1e6:.1f} MB ({area.directory})")
    elif older_than is not None or only:
        raise RanksearchError("--older-than and --only say what to remove; add --clear (or --to-gb GB to trim)")
    table = Table("cache", "files", "size", "limit", "least recently used", "a miss costs", "where")
    for area in cache_areas(results_dir):
        used = "—" if area.least_recent is None else f"{(time.time() - area.least_recent) / 86400:.1f} days ago"
        limit = "—" if area.limit_bytes is None else f"{area.limit_bytes / 1e9:g} GB"
        table.add_row(
            area.name,
            str(len(area.files)),
            f"{area.size / 1e6:.1f} MB",
            limit,
            used,
            area.rebuilt_by,
            str(area.directory),
        )
    console.print(table)
    console.print("limit: RANKSEARCH_CACHE_MAX_GB; place: RANKSEARCH_CACHE_DIR (factors, baselines), --results-dir")


@app.command()
@user_errors
def dashboard(
    study: StudyRef,
    host: Annotated[str, typer.Option(help="address to listen on (127.0.0.1: this machine only)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on")] = 8080,
    results_dir: ResultsDir = Path("results"),
    storage: Storage = None,
) -> None:
    """Serve optuna-dashboard, a live view of the study (needs the dashboard extra)."""
    from ranksearch.results.dashboard import serve_dashboard

    serve_dashboard(
        study, results_dir=results_dir, storage=storage, host=host, port=port, console=_console(stderr=True)
    )


@app.command()
@user_errors
def plot(study: StudyRef, results_dir: ResultsDir = Path("results"), storage: Storage = None) -> None:
    """(Re)write a study's plots (Pareto front, per-layer choices, progress) as PNG and offline HTML."""
    from ranksearch.results.plots import plot_study

    for path in plot_study(study, results_dir=results_dir, storage=storage):
        print(path)


@app.command()
@user_errors
def report(
    study: StudyRef,
    out: Annotated[Path | None, typer.Option(help="the HTML file (default: report.html in the study's dir)")] = None,
    results_dir: ResultsDir = Path("results"),
    storage: Storage = None,
) -> None:
    """Write one self-contained HTML report: settings, baseline, front, plots, per-layer choices, time."""
    from ranksearch.results.html_report import report_study

    print(report_study(study, results_dir=results_dir, storage=storage, out=out))


if __name__ == "__main__":
    app()
