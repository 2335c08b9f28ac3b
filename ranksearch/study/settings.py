"""The settings of one search run, grouped by concern and validated before anything is loaded or written.

:class:`RunSettings` holds five frozen specs: the problem (model, data, weights), the evaluation (the built-in
evaluator's :class:`~ranksearch.evaluate.EvaluatorOptions`), the search (budget, space, sampler, screens,
constraints), the recovery stage after it (which front members are fine-tuned for real, and how long) and the
infrastructure (device, threads, storage, workers, results). Each option of
``ranksearch run`` is one field of one spec, under the option's name; :meth:`RunSettings.of` builds the
settings from those names, and :meth:`RunSettings.to_flat` stores them by those names.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from types import UnionType
from typing import Any, ClassVar, Union, get_args, get_origin, get_type_hints

import torch

from ranksearch.errors import RanksearchError
from ranksearch.evaluate.classification import EvaluatorOptions
from ranksearch.measure.backends import latency_backend
from ranksearch.measure.latency import resolve_device
from ranksearch.util import cache_limit_bytes, digest

SAMPLERS = ("tpe", "nsga2", "random", "gp")
WARM_STARTS = ("knapsack", "knapsack+greedy", "greedy", "none")


@dataclass(frozen=True, kw_only=True)
class ProblemSpec:
    """What is compressed: the model, its trained weights and the data."""

    model: str = "resnet18"
    dataset: str = "fashion_mnist"
    checkpoint: Path | None = None
    trust_checkpoint: bool = False
    """Unpickle a checkpoint holding more than tensors (a whole model): it can run code (see ``load_checkpoint``)."""
    weights: str | None = None
    image_size: int | None = None
    """An image folder's crop side (None: the images' own size, or the pretrained weights')."""
    data_root: Path = Path("data")
    download: bool = False
    train_subset: int | None = None
    eval_subset: int | None = 5000
    val_fraction: float = 0.1
    seed: int = 0
    baseline_epochs: int | None = None
    baseline_nuclear_norm: float = 0.0

    IDENTITY: ClassVar[tuple[str, ...]] = (
        "model",
        "dataset",
        "checkpoint",
        "weights",
        "image_size",
        "eval_subset",
        "train_subset",
        "val_fraction",
        "seed",
        "baseline_nuclear_norm",
    )

    def validate(self) -> None:
        _positive(
            {"--eval-subset": self.eval_subset, "--train-subset": self.train_subset, "--image-size": self.image_size},
            {"--baseline-epochs": self.baseline_epochs},
        )
        if self.image_size is not None and not self.dataset.startswith("imagefolder:"):
            raise RanksearchError(
                f"--image-size {self.image_size}: {self.dataset} is used at its own size; "
                "--image-size applies to imagefolder:PATH"
            )
        if self.baseline_nuclear_norm < 0:
            raise RanksearchError(
                f"--baseline-nuclear-norm {self.baseline_nuclear_norm}: must be 0 (off) or more; pass e.g. 1e-4"
            )
        if not 0 < self.val_fraction < 1:
            raise RanksearchError(
                f"--val-fraction {self.val_fraction}: must be between 0 and 1 (exclusive); pass e.g. 0.1"
            )


@dataclass(frozen=True, kw_only=True)
class SearchSpec:
    """How the search runs: its budget, space, sampler, screens and constraints."""

    budget: int = 50
    timeout: float | None = None
    space: Path | None = None
    space_digest: str = ""
    """The digest of the space file (set by the run; part of the study's identity)."""
    sampler: str = "tpe"
    latency_table: bool = True
    sensitivity: bool = True
    early_reject: bool = True
    max_zero_shot_drop: float = 10.0
    max_accuracy_drop: float | None = None
    max_latency_ms: float | None = None
    study_name: str | None = None
    warm_starts: str = "knapsack+greedy"
    """Which sensitivity-based configs start the study after the anchors: the knapsack solutions over a sweep of
    latency budgets and the equal-sensitivity greedy levels (the default since 2026-12-05: over three seeds its best
    recovered member within half a point was faster than the knapsack's alone in each, docs/search.md), the
    knapsack solutions alone, the greedy levels alone (earlier releases), or none."""
    fill_gaps: bool = False
    """After the warm starts, give each trial, while one is left, the knapsack config in the widest gap of the
    measured front instead of the sampler's (:mod:`ranksearch.study.gaps`)."""
    promote_steps: str = "300"
    """Fine-tune steps of the promotion rungs after the budget, comma-separated ("0": no promotion). One rung by
    default: in a default run (2026-11-29) rungs of 300 then 1,500 steps took 1,215 s of 3,557, the 1,500-step rung
    alone ~600 s for 2 configs, more steps than the recovery stage's 2 epochs then (842) gave each of its configs."""
    promote_fraction: float = 0.2
    """The share of each rung promoted to the next."""

    IDENTITY: ClassVar[tuple[str, ...]] = ("space_digest",)

    @property
    def promotion_steps(self) -> tuple[int, ...]:
        """:attr:`promote_steps` as numbers (empty: no promotion)."""
        parts = [part.strip() for part in self.promote_steps.split(",") if part.strip()]
        try:
            steps = tuple(int(part) for part in parts)
        except ValueError:
            steps = ()
        else:
            if steps == (0,):
                return ()
            if steps and steps[0] > 0 and all(b > a for a, b in itertools.pairwise(steps)):
                return steps
        raise RanksearchError(
            f"--promote-steps {self.promote_steps!r}: not increasing positive fine-tune steps per rung; pass e.g. "
            "300,1500, or 0 for no promotion"
        )

    def validate(self) -> None:
        if self.budget <= 0:
            raise RanksearchError(
                f"--budget {self.budget}: must be a positive number of completed trials; pass e.g. --budget 50"
            )
        if self.sampler not in SAMPLERS:
            raise RanksearchError(f"--sampler {self.sampler!r} is unknown; choose one of {', '.join(SAMPLERS)}")
        _positive({"--timeout": self.timeout, "--max-latency-ms": self.max_latency_ms})
        if self.max_zero_shot_drop < 0:
            raise RanksearchError(
                f"--max-zero-shot-drop {self.max_zero_shot_drop}: must be >= 0 percentage points; "
                "pass e.g. 10, or --no-early-reject"
            )
        if self.max_accuracy_drop is not None and self.max_accuracy_drop < 0:
            raise RanksearchError(
                f"--max-accuracy-drop {self.max_accuracy_drop}: must be >= 0 percentage points; pass e.g. 1.0"
            )
        if self.warm_starts not in WARM_STARTS:
            raise RanksearchError(
                f"--warm-starts {self.warm_starts!r} is unknown; choose one of {', '.join(WARM_STARTS)}"
            )
        if self.fill_gaps and not self.sensitivity:
            raise RanksearchError(
                "--fill-gaps: the gaps are filled with the knapsack's configs, which need the sensitivity pass; "
                "drop --no-sensitivity or --fill-gaps"
            )
        if self.promotion_steps and not 0 < self.promote_fraction <= 1:
            raise RanksearchError(
                f"--promote-fraction {self.promote_fraction}: must be above 0 and at most 1; pass e.g. 0.2"
            )
        if self.study_name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.study_name):
            raise RanksearchError(f"--study-name {self.study_name!r}: use letters, digits, '.', '_' and '-' only")


@dataclass(frozen=True, kw_only=True)
class RecoverySpec:
    """The recovery stage after the search: ``final_top`` front members (a bisection of the front for the fastest
    that recovers within half a point, then spread over the latency range), each
    fine-tuned for ``final_epochs`` epochs at peak learning rate ``final_lr`` and tested on the full test split (see
    :mod:`ranksearch.study.recovery`). Not part of the study's identity: it reads the front, it does not change what
    the search measures."""

    final_epochs: int = 3
    """Epochs of distillation per recovered member; 0 turns the stage off. A third epoch brought a config with 6.6x
    fewer MACs 0.25 validation points closer to the dense model than two (docs/search.md, "The recovery's third
    epoch"); the dense model's outputs shared by the members pay for most of it."""
    final_top: int = 4
    """How many front members are recovered."""
    final_lr: float = 0.03
    """The peak learning rate of each recovery fine-tune (a linear warm-up, then cosine decay to 0); chosen on
    validation accuracy by ``benchmarks/recovery_recipe.py`` (docs/search.md, "The recovery's learning rate")."""
    final_feature_weight: float = 10.0
    """How much each recovery fine-tune weighs matching the dense model's block outputs besides its logits (0:
    logits only); docs/search.md, "Matching the dense model's features"."""

    @property
    def recipe(self) -> RecoveryRecipe:
        """How each member is recovered."""
        return RecoveryRecipe(epochs=self.final_epochs, lr=self.final_lr, feature_weight=self.final_feature_weight)

    def validate(self) -> None:
        self.recipe.validate()
        if self.final_top <= 0:
            raise RanksearchError(
                f"--final-top {self.final_top}: must be positive; pass e.g. 4, or --final-epochs 0 to skip recovery"
            )


@dataclass(frozen=True, kw_only=True)
class RecoveryRecipe:
    """How one member is recovered: ``epochs`` epochs of distillation from the dense model (0: BatchNorm
    recalibrated only) at peak learning rate ``lr``, matching its block outputs at ``feature_weight`` besides its
    logits. A recovery is recorded with its recipe, and read back only for the same one."""

    epochs: int
    lr: float = RecoverySpec.final_lr
    feature_weight: float = RecoverySpec.final_feature_weight

    def validate(self, *, prefix: str = "--final-") -> None:
        """Each value checked, named by its option: ``prefix`` + ``epochs``, ``lr``, ``feature-weight``."""
        if self.epochs < 0:
            raise RanksearchError(f"{prefix}epochs {self.epochs}: must be 0 (no recovery stage) or more; pass e.g. 2")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise RanksearchError(f"{prefix}lr {self.lr}: must be positive; pass e.g. {RecoverySpec.final_lr}")
        if not (math.isfinite(self.feature_weight) and self.feature_weight >= 0):
            raise RanksearchError(
                f"{prefix}feature-weight {self.feature_weight}: must be 0 (logits only) or more; pass e.g. "
                f"{RecoverySpec.final_feature_weight:g}"
            )

    def describe(self) -> str:
        """``2 epochs at peak lr 0.03, features matched at 10``"""
        features = f", features matched at {self.feature_weight:g}" if self.feature_weight > 0 else ""
        return f"{self.epochs} epoch{'s' * (self.epochs != 1)} at peak lr {self.lr:g}{features}"


@dataclass(frozen=True, kw_only=True)
class InfraSpec:
    """Where it runs: device, threads, storage, workers, and where results go."""

    device: str = "cpu"
    """Where models are fine-tuned and scored."""
    latency_device: str | None = None
    """Where latency is measured (None: ``device``), e.g. ``cuda`` for training and ``cpu`` for timing."""
    threads: int | None = None
    storage: str | None = None
    workers: int = 1
    heartbeat: int = 10
    results_dir: Path = Path("results")
    evaluator: str | None = None
    """A custom evaluator class, ``package.module:Class`` or ``path/file.py:Class`` (default: the built-in)."""

    IDENTITY: ClassVar[tuple[str, ...]] = ("device", "latency_device", "evaluator")

    @property
    def timing_device(self) -> str:
        """Where latency is measured: ``latency_device``, or ``device`` when it is not given."""
        return self.latency_device or self.device

    def devices(self) -> tuple[torch.device, torch.device]:
        """Where models are fine-tuned and where latency is measured, resolved (a device missing here is a one-line
        error naming its option)."""
        device = resolve_device(self.device)
        if self.latency_device is None:
            return device, device
        return device, resolve_device(self.latency_device, option="--latency-device")

    def validate(self) -> None:
        _positive({"--threads": self.threads, "--workers": self.workers, "--heartbeat": self.heartbeat})
        cache_limit_bytes()  # a malformed $RANKSEARCH_CACHE_MAX_GB is named before anything runs


EVALUATION_IDENTITY = (
    "latency_backend",
    "latency_batch",
    "fold_batchnorm",
    "target",
    "finetune_steps",
    "finetune_lr",
    "batch_size",
    "calib_batches",
)
"""The evaluator options that define what a study measures."""

BEFORE_THEIR_OPTION = {"fold_batchnorm": False}
"""What a study made before an option existed measured, by option name (where that is not the option's default)."""


@dataclass(frozen=True, kw_only=True)
class RunSettings:
    """Everything ``ranksearch run`` takes, by concern."""

    problem: ProblemSpec = field(default_factory=ProblemSpec)
    evaluation: EvaluatorOptions = field(default_factory=EvaluatorOptions)
    search: SearchSpec = field(default_factory=SearchSpec)
    recovery: RecoverySpec = field(default_factory=RecoverySpec)
    infra: InfraSpec = field(default_factory=InfraSpec)

    @classmethod
    def of(cls, **options: Any) -> RunSettings:
        """Settings from ``ranksearch run``'s option names (``model=``, ``budget=`` ...), the rest default."""
        return cls().replace(**options)

    def replace(self, **options: Any) -> RunSettings:
        """These settings with the options named changed (each goes to the spec it belongs to)."""
        grouped: dict[str, dict[str, Any]] = {}
        for name, value in options.items():
            if name not in _OWNER:
                raise TypeError(f"RunSettings has no option {name!r}")
            grouped.setdefault(_OWNER[name], {})[name] = _coerce(name, value)
        return replace(self, **{group: replace(getattr(self, group), **values) for group, values in grouped.items()})

    def validate(self) -> None:
        """Cheap checks of the values alone (files and names are checked when loaded)."""
        for group in _GROUPS:
            getattr(self, group).validate()
        rungs = self.search.promotion_steps
        if rungs and rungs[0] <= self.evaluation.finetune_steps:
            raise RanksearchError(
                f"--promote-steps {self.search.promote_steps}: the first rung must fine-tune longer than "
                f"--finetune-steps {self.evaluation.finetune_steps}; pass larger steps, or 0 for no promotion"
            )
        backend = latency_backend(self.evaluation.latency_backend)
        timing = self.infra.timing_device
        if backend.cpu_only and not timing.startswith("cpu"):
            option = "--latency-device" if self.infra.latency_device else "--device"
            raise RanksearchError(
                f"--latency-backend {backend.name} times on CPU, not {option} {timing}; "
                "use --latency-device cpu or --latency-backend torch"
            )
        backend.check_installed()

    def with_worker_threads(self) -> RunSettings:
        """With ``--workers N`` and no ``--threads``: the cores split among the workers (the baseline timed alike)."""
        if self.infra.workers > 1 and self.infra.threads is None:
            return self.replace(threads=max(1, len(os.sched_getaffinity(0)) // self.infra.workers))
        return self

    def name(self) -> str:
        """The study name: given, or ``<model>-<dataset>-<space>``."""
        if self.search.study_name:
            return self.search.study_name
        stem = self.search.space.stem if self.search.space else "space"
        model = self.problem.model
        if model.startswith("timm:"):
            model = model.replace(":", "-", 1)
        elif ":" in model:
            model = Path(model.split(":")[0]).stem
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{model}-{self.problem.dataset}-{stem}")

    def identity(self) -> dict[str, object]:
        """What defines the problem and the evaluation, by option name: a study resumed with other values is refused."""
        flat = self.to_flat()
        if flat["latency_device"] == flat["device"]:  # timing where it trains, as a study without the option did
            flat["latency_device"] = None
        return {key: flat[key] for key in IDENTITY}

    def identity_digest(self) -> str:
        return digest(self.identity())

    @staticmethod
    def recorded_identity(recorded: Mapping[str, object]) -> dict[str, object]:
        """A study's recorded identity completed with what it measured before an option existed: the option's
        default, or its :data:`BEFORE_THEIR_OPTION` value."""
        return {**RunSettings().identity(), **BEFORE_THEIR_OPTION, **recorded}

    def to_flat(self) -> dict[str, object]:
        """JSON-able settings by option name (how a study stores them)."""
        return {key: _jsonable(value) for group in _GROUPS for key, value in asdict(getattr(self, group)).items()}

    @classmethod
    def from_flat(cls, recorded: Mapping[str, object], **changes: object) -> RunSettings:
        """Settings stored by :meth:`to_flat` (options this version lacks are dropped), with ``changes`` applied.
        Whether to trust a checkpoint is never read back: whoever loads the settings decides (``changes``)."""
        values = {name: value for name, value in recorded.items() if name in _OWNER and name not in _NOT_INHERITED}
        return cls.of(**{**BEFORE_THEIR_OPTION, **values, **changes})


_GROUPS = ("problem", "evaluation", "search", "recovery", "infra")
_SPECS: dict[str, type] = {
    "problem": ProblemSpec,
    "evaluation": EvaluatorOptions,
    "search": SearchSpec,
    "recovery": RecoverySpec,
    "infra": InfraSpec,
}
_OWNER = {f.name: group for group, spec in _SPECS.items() for f in fields(spec)}
_NOT_INHERITED = frozenset({"trust_checkpoint"})
"""Option name -> the spec that holds it (names are unique across specs)."""
_PATHS = {
    name
    for spec in _SPECS.values()
    for name, hint in get_type_hints(spec).items()
    if hint is Path or (get_origin(hint) in (Union, UnionType) and Path in get_args(hint))
}
IDENTITY = (*ProblemSpec.IDENTITY, *SearchSpec.IDENTITY, *InfraSpec.IDENTITY, *EVALUATION_IDENTITY)


def _coerce(name: str, value: object) -> object:
    """Stored paths come back as strings."""
    return Path(value) if name in _PATHS and isinstance(value, str) else value


def _positive(*groups: Mapping[str, float | None]) -> None:
    for group in groups:
        for option, value in group.items():
            if value is not None and value <= 0:
                raise RanksearchError(f"{option} {value}: must be positive; pass a number above 0 or leave it out")


def _jsonable(value: object) -> object:
    return str(value) if isinstance(value, Path) else json.loads(json.dumps(value, default=str))
