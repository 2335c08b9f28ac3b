"""The recovery stage: front members fine-tuned for real after the search, and tested on the full test split.

A search scores each config after a few distillation steps, which understates what the config reaches after the
fine-tune a user will run. After the search, :func:`recover_front` takes ``--final-top`` members of the front (first
a bisection for the fastest member that recovers within half a point, then a spread over the latency range:
:func:`recovery_plan`) and recovers each with a :class:`Recoverer`: the config applied
to the trained dense model, BatchNorm recalibrated, ``--final-epochs`` epochs of distillation from the dense model
(warm-up to ``--final-lr``, then cosine decay; its block outputs matched at ``--final-feature-weight`` besides its
logits), int8 layers quantized, then every validation and test image classified, and the accuracy drops against the
dense model on the same images given with their paired 95 % intervals: the validation drop is what the plan and
``export``'s accuracy rule go by, the test drop is reported and chooses nothing. Each result is recorded in the
study with its :class:`~ranksearch.study.settings.RecoveryRecipe` (:data:`~ranksearch.results.record.RECOVERED`, so a
rerun with the same recipe does not repeat it) and the model saved under ``results/<study>/recovered/trial-<N>.pt``
(:func:`load_recovered` loads it back). ``ranksearch finetune STUDY --trial N [--trial M ...]``
(:func:`recover_trials`) recovers any complete trials of a study.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ranksearch.compress import apply_config, quantize_layers
from ranksearch.config import CompressionConfig
from ranksearch.data import make_loader
from ranksearch.errors import RanksearchError
from ranksearch.evaluate.classification import calibration_batch
from ranksearch.measure.latency import torch_threads
from ranksearch.results import load_study, study_directory
from ranksearch.results.build import build_from_config
from ranksearch.results.confidence import DropEstimate, paired_drop
from ranksearch.results.export import export_config
from ranksearch.results.front import compresses_nothing, front_with_speeds
from ranksearch.results.record import (
    MODEL,
    RECOVERED,
    RECOVERED_FOLDER,
    RECOVERED_VALIDATION,
    SETTINGS,
    TrialRecord,
    recovered_checkpoint,
)
from ranksearch.study.problem import RunContext, check_fingerprint, load_problem, load_splits, problem_fingerprint
from ranksearch.study.settings import RecoveryRecipe, RecoverySpec, RunSettings
from ranksearch.training import (
    DivergedError,
    TeacherCache,
    correct_predictions,
    finetune,
    recalibrate_batchnorm,
    stage_names,
)
from ranksearch.util import atomic_open, describe

__all__ = [
    "RECOVERY_LR",
    "RECOVERY_TARGET_PP",
    "WARMUP_FRACTION",
    "RecoveredTrial",
    "Recoverer",
    "RecoveryPlan",
    "load_recovered",
    "load_study_problem",
    "recorded_recipe",
    "recorded_recovery",
    "recover_front",
    "recover_trials",
    "recovery_plan",
]

RECOVERY_LR = RecoverySpec.final_lr
"""The peak learning rate of a recovery fine-tune (``--final-lr``'s default)."""
WARMUP_FRACTION = 0.05
"""The share of a recovery's steps over which the learning rate rises linearly to its peak (at least one step)."""
RECOVERY_TARGET_PP = 0.5
"""The recovery stage looks for the fastest front member that recovers within this many validation points of the
dense model (:func:`recovery_plan`)."""
CHECKPOINT_FORMAT = "ranksearch-recovered/1"
"""The ``format`` entry of a recovered model's file (:func:`load_recovered`)."""


@dataclass(frozen=True)
class RecoveredTrial:
    """One trial after the recovery fine-tune: its test accuracy on the full test split and its drop against the
    dense model on the same images, its drop on the whole validation split (None: recovered by a release that did
    not measure it), with where the model was saved."""

    trial: int
    recipe: RecoveryRecipe
    steps: int
    seconds: float
    test_accuracy: float
    drop: DropEstimate
    checkpoint: Path
    validation: DropEstimate | None = None

    @property
    def steering_drop(self) -> DropEstimate:
        """The drop :func:`recovery_plan` goes by: on the validation split, or on the test split for a recovery
        recorded before validation was measured (so a stage begun by an earlier release resumes as it began)."""
        return self.drop if self.validation is None else self.validation

    def to_dict(self) -> dict[str, Any]:
        """The study's :data:`~ranksearch.results.record.RECOVERED` entry."""
        return {
            "epochs": self.recipe.epochs,
            "lr": self.recipe.lr,
            "feature_weight": self.recipe.feature_weight,
            "steps": self.steps,
            "seconds": self.seconds,
            "test_accuracy": self.test_accuracy,
            **self.drop.to_dict(),
            "checkpoint": str(self.checkpoint),
            **({} if self.validation is None else {RECOVERED_VALIDATION: self.validation.to_dict()}),
        }

    @classmethod
    def from_dict(cls, trial: int, stored: Mapping[str, Any], *, directory: Path | None = None) -> RecoveredTrial:
        """A recorded recovery (``directory``: the study's results directory, where its model is looked for too, as
        :func:`~ranksearch.results.record.recovered_checkpoint` says)."""
        return cls(
            trial=trial,
            recipe=recorded_recipe(stored),
            steps=int(stored["steps"]),
            seconds=float(stored["seconds"]),
            test_accuracy=float(stored["test_accuracy"]),
            drop=DropEstimate.from_dict(stored),
            checkpoint=recovered_checkpoint(stored, directory),
            validation=DropEstimate.from_dict(stored[RECOVERED_VALIDATION]) if RECOVERED_VALIDATION in stored else None,
        )

    def summary(self) -> str:
        """``trial 5: test accuracy 81.20%, drop 1.10 pp [0.80, 1.40] on 10000 images (2 epochs at peak lr 0.03,
        features matched at 10, 842 steps, 95 s)``"""
        validation = "" if self.validation is None else f"; validation drop {self.validation.label()}"
        return (
            f"trial {self.trial}: test accuracy {self.test_accuracy:.2%}, drop {self.drop.label()} on "
            f"{self.drop.images} images{validation} ({self.recipe.describe()}, {self.steps} steps, "
            f"{self.seconds:.0f} s)"
        )


class Recoverer:
    """Recovers trials of one study on its loaded problem (see the module).

    The full validation and test splits, the dense model's per-image correctness on them and the calibration batch
    are shared by every trial it recovers, and so are the dense model's outputs per training batch (its logits and
    block outputs) where a ``teacher_cache`` is given: pass one where several trials are to be recovered. Models are
    saved under ``directory / "recovered"``.
    """

    def __init__(
        self,
        *,
        study: optuna.Study,
        context: RunContext,
        directory: Path,
        console: Console | None = None,
        teacher_cache: TeacherCache | None = None,
    ) -> None:
        self.study = study
        self.context = context
        self.directory = directory
        self.console = console or Console(stderr=True)
        settings = context.settings
        self.options = settings.evaluation
        self.seed = settings.problem.seed
        self.test = _full_test_split(context)
        splits = context.splits
        self.validation = splits.val if splits.full_val is None else splits.full_val
        self._calib = calibration_batch(
            context.splits.train, batch_size=self.options.batch_size, batches=self.options.calib_batches, seed=self.seed
        ).to(context.device)
        self._dense_correct: dict[str, torch.Tensor] = {}
        self.teacher_cache = teacher_cache

    def recover(self, trial: int, recipe: RecoveryRecipe) -> RecoveredTrial:
        """Trial ``trial`` recovered by ``recipe``, recorded and saved; one already recovered so is read back, not
        repeated."""
        frozen = _complete_trial(self.study, trial)
        done = recorded_recovery(self.study, trial, recipe, directory=self.directory)
        if done is not None:
            return done
        start = time.perf_counter()
        config = TrialRecord.of(frozen).compression_config()
        model, steps, device = self.finetuned(config, recipe, label=f"recovering trial {trial}")
        correct = correct_predictions(model, self.test_loader(), device=device)
        drop = paired_drop(self.dense_correct(), correct)
        validation = paired_drop(
            self.dense_correct("validation"), correct_predictions(model, self.validation_loader(), device=device)
        )
        checkpoint = (self.directory / RECOVERED_FOLDER / f"trial-{trial}.pt").resolve()
        result = RecoveredTrial(
            trial=trial,
            recipe=recipe,
            steps=steps,
            seconds=time.perf_counter() - start,
            test_accuracy=correct.double().mean().item(),
            drop=drop,
            checkpoint=checkpoint,
            validation=validation,
        )
        _save_recovered(model, export_config(self.study, frozen), checkpoint, recovery=result.to_dict())
        recovered = dict(RECOVERED.read(self.study))
        recovered[str(trial)] = result.to_dict()
        RECOVERED.write(self.study, recovered)
        return result

    def dense_correct(self, split: Literal["test", "validation"] = "test") -> torch.Tensor:
        """Whether the dense model classifies each image of ``split`` right (measured once per split)."""
        if split not in self._dense_correct:
            loader = self.test_loader() if split == "test" else self.validation_loader()
            self._dense_correct[split] = correct_predictions(self.context.model, loader, device=self.context.device)
        return self._dense_correct[split]

    def finetuned(
        self,
        config: CompressionConfig,
        recipe: RecoveryRecipe,
        *,
        label: str,
        seed: int | None = None,
        start: nn.Module | None = None,
    ) -> tuple[nn.Module, int, torch.device]:
        """``config`` applied to the dense model, BatchNorm recalibrated, distilled as ``recipe`` says (the outputs
        of :func:`~ranksearch.training.stage_names` matched at its feature weight), its int8 layers quantized (on the
        latency device, a CPU, where they run); with the number of fine-tuning steps and the device the model is on.
        ``seed`` (default: the study's) seeds the shuffling and augmentation; ``label`` heads the progress bar.
        ``start``: a model of ``config`` to distil further instead (a recovered one, as :func:`load_recovered` gives
        it; its BatchNorm is not recalibrated), a second warm-up and decay; ``config`` must have no int8 layer."""
        context, options = self.context, self.options
        seed = self.seed if seed is None else seed
        float_config, int8_layers = config.split_int8()
        if start is not None and int8_layers:
            raise RanksearchError(
                f"{label}: its config has int8 layers ({', '.join(int8_layers)}), which a recovered model holds "
                "quantized and cannot train further; recover it from the dense model instead"
            )
        with torch.random.fork_rng(devices=[]):  # augmentation draws from the global RNG: seeded, and left as it was
            torch.manual_seed(seed)
            model = apply_config(context.model, float_config, calib_inputs=self._calib) if start is None else start
            model = model.to(context.device)
            train = make_loader(context.splits.train, batch_size=options.batch_size, shuffle=True, seed=seed)
            if start is None:
                recalibrate_batchnorm(model, train, device=context.device, batches=options.calib_batches)
            steps = recipe.epochs * len(train)
            epochs = f"{recipe.epochs} epoch{'s' * (recipe.epochs != 1)}"
            with _progress_bar(f"{label} ({epochs})", self.console) as update:
                finetune(
                    model,
                    context.model,
                    train,
                    device=context.device,
                    steps=steps,
                    lr=recipe.lr,
                    warmup_steps=max(1, round(steps * WARMUP_FRACTION)),
                    stages=stage_names(context.model),  # the dense model's: a compressed layer is a block
                    feature_weight=recipe.feature_weight,
                    teacher_cache=self.teacher_cache,
                    progress=update,
                )
        model.eval()
        if not int8_layers:
            return model, steps, context.device
        timing = context.timing_device
        quantize_layers(model.to(timing), int8_layers, self._calib.to(timing))
        return model, steps, timing

    def test_loader(self) -> DataLoader:
        """The full test split in order, as every recovery is tested on."""
        return make_loader(self.test, batch_size=256, shuffle=False)

    def validation_loader(self) -> DataLoader:
        """The whole validation split in order, as every recovery is validated on."""
        return make_loader(self.validation, batch_size=256, shuffle=False)


def recorded_recovery(
    study: optuna.Study, trial: int, recipe: RecoveryRecipe, *, directory: Path | None = None
) -> RecoveredTrial | None:
    """Trial ``trial``'s recovery by ``recipe`` as the study recorded it (``directory`` as in
    :meth:`RecoveredTrial.from_dict`); None when not done."""
    stored = RECOVERED.read(study).get(str(trial))
    if stored is None or recorded_recipe(stored) != recipe:
        return None
    return RecoveredTrial.from_dict(trial, stored, directory=directory)


def recorded_recipe(stored: Mapping[str, Any]) -> RecoveryRecipe:
    """The recipe of a recorded recovery (one recorded before recoveries matched features: logits only)."""
    return RecoveryRecipe(
        epochs=int(stored["epochs"]), lr=float(stored["lr"]), feature_weight=float(stored.get("feature_weight", 0.0))
    )


def _full_test_split(context: RunContext) -> Dataset:
    """The run's test split with every image (the search tests on ``--eval-subset`` of them)."""
    if context.settings.problem.eval_subset is None:
        return context.splits.test
    return load_splits(context.settings, eval_subset=None).test


def _complete_trial(study: optuna.Study, number: int) -> FrozenTrial:
    """Trial ``number`` of ``study``, which must be complete and compress something."""
    trials = study.get_trials(deepcopy=False)
    name = study.study_name
    if not 0 <= number < len(trials):
        raise RanksearchError(
            f"--trial {number}: study {name!r} has trials 0 to {len(trials) - 1}; list them with "
            f"`ranksearch show {name} --all`"
        )
    trial = trials[number]
    record = TrialRecord.of(trial)
    if trial.state != TrialState.COMPLETE or not record.config:
        reason = f" ({record.reason})" if record.reason else ""
        raise RanksearchError(
            f"--trial {number}: trial {number} of study {name!r} is {trial.state.name}{reason}, not complete; "
            f"pick a complete one from `ranksearch show {name} --all`"
        )
    if compresses_nothing(record):
        raise RanksearchError(
            f"--trial {number}: trial {number} of study {name!r} compresses nothing (every layer kept); "
            "pick a compressed trial"
        )
    return trial


@dataclass(frozen=True)
class RecoveryPlan:
    """Where the recovery stage stands: the members recovered so far, in the order :func:`recovery_plan` takes them,
    and the next one to recover (None: the stage is done)."""

    recovered: tuple[RecoveredTrial, ...]
    next: TrialRecord | None


def recovery_plan(
    study: optuna.Study,
    top: int,
    recipe: RecoveryRecipe,
    *,
    failed: Collection[int] = (),
    directory: Path | None = None,
) -> RecoveryPlan:
    """The recovery stage's ``top`` front members that compress something, replayed from the recoveries the study
    recorded with this ``recipe`` (``failed``: members whose recovery failed, counted and not retried; ``directory``:
    the study's results directory, where their models are looked for, as in :meth:`RecoveredTrial.from_dict`).

    The search's short fine-tunes understate the fast end most, so the plan looks for the fastest member that
    recovers within :data:`RECOVERY_TARGET_PP` points of the dense model (on the validation split:
    :attr:`RecoveredTrial.steering_drop`): the fastest member first, then a
    bisection of the front (by speed) between the slowest member found outside and the fastest found within, where
    none found within stands for one past the slowest member (so the slowest, the most accurate, is recovered only
    if every faster member tried misses); then, one at a time, the member whose speedup (pooled over its timings)
    is farthest from those taken (docs/search.md, "The recovery's bisection").
    """
    trials, speeds = front_with_speeds(study)
    speedups = {t.number: speeds[t.number].speedup for t in trials}
    members = sorted(
        (r for r in map(TrialRecord.of, trials) if not compresses_nothing(r) and speedups[r.number] is not None),
        key=lambda r: (speedups[r.number], r.number),
        reverse=True,
    )
    if not members:
        return RecoveryPlan(recovered=(), next=None)
    within: dict[int, bool] = {}  # by index into members, fastest first
    recovered: list[RecoveredTrial] = []
    while len(within) < min(top, len(members)):
        # one past the slowest member stands for "within" until a member is: the bisection reaches the slowest
        fastest_within = min((i for i, ok in within.items() if ok), default=len(members))
        slowest_outside = max((i for i, ok in within.items() if not ok and i < fastest_within), default=-1)
        if not within:
            pick = 0
        elif fastest_within - slowest_outside > 1:
            pick = (slowest_outside + fastest_within) // 2
        else:
            pick = max(
                (i for i in range(len(members)) if i not in within),
                key=lambda i: min(abs(speedups[members[i].number] - speedups[members[j].number]) for j in within),
            )
        number = members[pick].number
        if number in failed:
            within[pick] = False
            continue
        result = recorded_recovery(study, number, recipe, directory=directory)
        if result is None:
            return RecoveryPlan(recovered=tuple(recovered), next=members[pick])
        within[pick] = result.steering_drop.drop_pp <= RECOVERY_TARGET_PP
        recovered.append(result)
    return RecoveryPlan(recovered=tuple(recovered), next=None)


def recover_front(
    study: optuna.Study, context: RunContext, *, directory: Path, console: Console
) -> list[RecoveredTrial]:
    """The recovery stage of a run (its ``--final-top`` and ``--final-*`` recipe): the members of
    :func:`recovery_plan` recovered one at a time (those recovered so already are read back), models saved under
    ``directory / "recovered"``; the results in the plan's order. A trial whose recovery fails is reported and
    skipped; nothing is done with ``--final-epochs 0``."""
    spec = context.settings.recovery
    if spec.final_epochs == 0:
        return []
    recoverer: Recoverer | None = None
    failed: set[int] = set()
    while True:
        plan = recovery_plan(study, spec.final_top, spec.recipe, failed=failed, directory=directory)
        if plan.next is None:
            return list(plan.recovered)
        number = plan.next.number
        recoverer = recoverer or Recoverer(
            study=study, context=context, directory=directory, console=console, teacher_cache=TeacherCache()
        )
        try:
            result = recoverer.recover(number, spec.recipe)
        except (RanksearchError, KeyboardInterrupt):
            raise
        except Exception as exc:
            console.print(f"recovery: trial {number} failed ({describe(exc)})", soft_wrap=True)
            failed.add(number)
            continue
        console.print(f"recovered {result.summary()}", soft_wrap=True)


def recover_trials(
    ref: str | Path,
    *,
    trials: Sequence[int],
    recipe: RecoveryRecipe,
    results_dir: Path = Path("results"),
    storage: str | None = None,
    trust_checkpoint: bool = False,
    console: Console | None = None,
) -> list[RecoveredTrial]:
    """``ranksearch finetune``: recover the trials ``trials`` of the study ``ref`` (as in
    :func:`~ranksearch.results.load_study`) in turn on the study's problem, rebuilt from its stored settings
    (:func:`load_study_problem`; ``trust_checkpoint`` as ``--trust-checkpoint`` says, never the study's); print each
    one's test accuracy, drop and checkpoint. Every trial is checked before the first is fine-tuned; several share
    the dense model's outputs per training batch (:class:`~ranksearch.training.TeacherCache`)."""
    console = console or Console(stderr=True)
    if recipe.epochs < 1:
        raise RanksearchError(f"--epochs {recipe.epochs}: must be 1 or more; pass e.g. --epochs 2")
    recipe.validate(prefix="--")
    study = load_study(ref, results_dir=results_dir, storage=storage)
    numbers = list(dict.fromkeys(trials))
    for number in numbers:
        _complete_trial(study, number)
    directory = study_directory(ref, name=study.study_name, results_dir=results_dir)
    done = {number: recorded_recovery(study, number, recipe, directory=directory) for number in numbers}
    missing = [number for number, result in done.items() if result is None]
    recoverer: Recoverer | None = None
    results = []
    with ExitStack() as stack:
        for number in numbers:
            result = done[number]
            if result is None:
                if recoverer is None:
                    context = load_study_problem(study, console, trust_checkpoint=trust_checkpoint)
                    stack.enter_context(torch_threads(context.settings.infra.threads))
                    cache = TeacherCache() if len(missing) > 1 else None
                    recoverer = Recoverer(
                        study=study, context=context, directory=directory, console=console, teacher_cache=cache
                    )
                try:
                    result = recoverer.recover(number, recipe)
                except DivergedError as exc:
                    raise RanksearchError(f"trial {number}: {exc}, e.g. --lr {recipe.lr / 10:g}") from None
            console.print(f"recovered {result.summary()}", soft_wrap=True)
            console.print(
                f"model: {result.checkpoint} (load it with ranksearch.study.recovery.load_recovered)", soft_wrap=True
            )
            results.append(result)
    return results


def load_study_problem(study: optuna.Study, console: Console, *, trust_checkpoint: bool = False) -> RunContext:
    """The problem ``study`` was measured on, rebuilt from its stored settings and trained weights; its weights and
    data must be the study's (their fingerprint). ``trust_checkpoint``: as in
    :func:`ranksearch.models.load_checkpoint`."""
    name = study.study_name
    if not SETTINGS.stored(study):
        raise RanksearchError(f"study {name!r} has no recorded settings; start it with `ranksearch run` first")
    recorded = SETTINGS.read(study)
    checkpoint = recorded.get("checkpoint") or MODEL.read(study).get("checkpoint")
    settings = RunSettings.from_flat(recorded, checkpoint=checkpoint, workers=1, trust_checkpoint=trust_checkpoint)
    context = load_problem(settings, settings.infra.devices()[0], console)
    check_fingerprint(study, problem_fingerprint(context.model, context.splits), checkpoint=context.checkpoint)
    return context


def _save_recovered(model: nn.Module, config: CompressionConfig, path: Path, *, recovery: Mapping[str, Any]) -> None:
    """``model`` (``config`` applied and fine-tuned) saved atomically as :func:`load_recovered` reads it: its
    config with the model section, its state_dict, and what its recovery measured."""
    payload = {
        "format": CHECKPOINT_FORMAT,
        "config": config.to_dict(),
        "state_dict": model.state_dict(),
        "recovery": dict(recovery),
    }
    try:
        with atomic_open(path, "wb") as handle:
            torch.save(payload, handle)
    except OSError as exc:
        raise RanksearchError(f"{path}: cannot be written ({exc.strerror}); make its directory writable") from None


def load_recovered(path: str | Path) -> nn.Module:
    """A recovered model saved by the recovery stage or ``ranksearch finetune``, in eval mode on the CPU.

    The model is rebuilt from the config's ``model`` section (its ``name`` must build here, as for
    :func:`~ranksearch.results.build.build_from_config`) with the config's structure, then given the saved weights.
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():  # torch's deprecation notices on rebuilding int8 tensors are noise here
            warnings.simplefilter("ignore", UserWarning)
            saved = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise RanksearchError(f"{path}: no such file; pass a results/<study>/recovered/trial-<N>.pt file") from None
    except Exception as exc:
        raise RanksearchError(f"{path}: unreadable ({describe(exc)}); pass a file the recovery stage wrote") from None
    if not isinstance(saved, dict) or saved.get("format") != CHECKPOINT_FORMAT:
        raise RanksearchError(f"{path}: not a recovered model; pass a results/<study>/recovered/trial-<N>.pt file")
    config = CompressionConfig.from_dict(saved["config"])
    # The structure only: every weight, statistic and int8 scale comes from the file (data-aware layers differ from
    # the others in how their factors were computed, not in their shape).
    structure = replace(config, layers={name: replace(c, data_aware=False) for name, c in config.layers.items()})
    spec = config.model
    example = torch.randn(
        2, int(spec["in_channels"]), int(spec["image_size"]), int(spec["image_size"]),
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    model = build_from_config(structure, init="random", calib_inputs=example)
    model.load_state_dict(saved["state_dict"])
    return model.eval()


@contextmanager
def _progress_bar(label: str, console: Console) -> Iterator[Callable[[int, int], None]]:
    """A transient progress bar with an ETA on a terminal (elsewhere, where it would leave a blank line, none); the
    block gets its ``update(done, total)``."""
    columns = (TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task(label, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)
