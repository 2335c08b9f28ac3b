"""The default evaluator: compress, recalibrate BatchNorm, distil briefly, then measure accuracy and latency."""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ranksearch.compress import apply_config, quantize_layers
from ranksearch.config import CompressionConfig
from ranksearch.data import DataSplits, make_loader
from ranksearch.errors import RanksearchError
from ranksearch.evaluate.base import (
    Divergence,
    DivergenceScorer,
    Evaluator,
    LayerTiming,
    Metrics,
    MultiFidelity,
    PairedTiming,
    Split,
    ZeroShotScorer,
)
from ranksearch.measure.backends import latency_backend
from ranksearch.measure.deployed import fold_batchnorm
from ranksearch.measure.remote import RemoteTarget
from ranksearch.measure.timers import ModuleTimer
from ranksearch.measure.timing import PairedLatency
from ranksearch.training import TeacherCache, correct_predictions, evaluate_accuracy, finetune, recalibrate_batchnorm
from ranksearch.training.loop import channels_last

ZERO_SHOT_IMAGES = 512
"""Validation images of the zero-shot check (early rejection): two batches."""

DIVERGENCE_IMAGES = 2048
"""Validation images of the output divergence (the per-layer sensitivity pass): eight batches."""


@dataclass(frozen=True, kw_only=True)
class EvaluatorOptions:
    """How the built-in evaluator measures a config (the ``ranksearch run`` options of the same names)."""

    finetune_steps: int = 60
    finetune_lr: float = 0.01
    batch_size: int = 128
    calib_batches: int = 4
    latency_backend: str = "torch"
    latency_batch: int = 1
    fold_batchnorm: bool = True
    """Time models in their deployed form: BatchNorm folded into the layer before it (dense and compressed alike)."""
    target: str | None = None
    """A remote target, ``http://HOST:PORT`` (``ranksearch target serve`` on the device): ONNX exports are timed
    there, in ONNX Runtime (``latency_backend="onnxruntime"``), the token read from ``$RANKSEARCH_TARGET_TOKEN``."""

    def validate(self) -> None:
        """One-line errors for values that cannot work."""
        backend = latency_backend(self.latency_backend)  # an unknown name lists the others
        if self.target is not None:
            RemoteTarget.from_url(self.target)  # a malformed address is named before anything runs
            if not backend.remote:
                raise RanksearchError(
                    f"--target {self.target} times ONNX exports in ONNX Runtime, not --latency-backend "
                    f"{self.latency_backend}; pass --latency-backend onnxruntime, or leave it out"
                )
        positive = {
            "--finetune-lr": self.finetune_lr,
            "--batch-size": self.batch_size,
            "--calib-batches": self.calib_batches,
            "--latency-batch": self.latency_batch,
        }
        for option, value in positive.items():
            if value <= 0:
                raise RanksearchError(f"{option} {value}: must be positive; pass a number above 0 or leave it out")
        if self.finetune_steps < 0:
            raise RanksearchError(
                f"--finetune-steps {self.finetune_steps}: must be 0 or more; pass 0 to skip fine-tuning, e.g. 60"
            )


@dataclass
class _Recalibrated:
    """A config's model after BatchNorm recalibration, kept from the zero-shot check for the evaluation after it."""

    config: CompressionConfig
    model: nn.Module
    train: DataLoader
    phases: dict[str, float]
    zero_shot_accuracy: float


class _Deployed(NamedTuple):
    """A config's model as it is timed, and how many BatchNorms were folded into it."""

    model: nn.Module
    folded: int
    float_model: nn.Module | None = None
    """With int8 layers and ONNX Runtime: the model before quantization, on the latency device, which the int8
    export is checked against (:func:`~ranksearch.measure.onnx.export_onnx`)."""


@dataclass
class _Finetuned:
    """A promotion's fine-tuned model and its timing, kept for the test split (see ``evaluate_at``)."""

    config: CompressionConfig
    steps: int
    model: nn.Module
    device: torch.device
    """Where ``model`` is scored (the latency device for a model with int8 layers)."""
    paired: PairedLatency
    backend_extra: dict[str, float]


class ClassificationEvaluator(Evaluator, ZeroShotScorer, DivergenceScorer, LayerTiming, PairedTiming, MultiFidelity):
    """Top-1 accuracy after a short knowledge-distillation fine-tune, and measured latency.

    For each configuration: apply its low-rank part to a copy of the trained ``model`` (data-aware layers calibrated
    on ``calib_batches`` training batches) -> recalibrate BatchNorm statistics -> fine-tune ``finetune_steps`` steps,
    distilling from the uncompressed model -> the deployed form: a copy with BatchNorm folded into the layer before it
    (with ``fold_batchnorm``, in the dense and the compressed model alike), on ``latency_device`` (default ``device``:
    a model fine-tuned on a GPU is timed on a CPU), its int8 layers quantized there (post-training, scales from the
    calibration batches) -> median latency of batch ``latency_batch`` (before the model runs any other batch size)
    by ``latency_backend`` (:mod:`ranksearch.measure.backends`: eager torch, ONNX Runtime on the model's ONNX export,
    here or on the remote ``target``, or torch.compile; what each backend records is returned with the metrics,
    e.g. ``onnx_max_abs_error`` or ``compile_graph_breaks``); the uncompressed model is timed in rounds alternating with
    it (``reference_latency_ms``; each round's speedup gives ``speedup_low`` / ``speedup_high``), so the speedup
    compares measurements under the same load -> accuracy on ``split`` (``val``: the validation images kept by
    ``--eval-subset``; ``full_val``: all of them; at most ``eval_batches`` batches), with each image's correctness
    (:attr:`Metrics.correct`). Data order and initial state are seeded, so the same configuration gives the same
    model on ``split="test"`` as it did on ``"val"``. A model with int8 layers is scored in its deployed form, where
    it was timed (int8 kernels run on CPU only); any other is scored as fine-tuned, on ``device``.

    Its zero-shot score (:class:`~ranksearch.evaluate.ZeroShotScorer`) is the accuracy after recalibration, on the
    first ``zero_shot_images`` validation images; a config scored right before it is evaluated is not
    built twice. Its output divergence (:class:`~ranksearch.evaluate.DivergenceScorer`), the per-layer sensitivity,
    compares the recalibrated model's outputs with the uncompressed model's on the first ``divergence_images``
    validation images.
    """

    scores_full_val = True
    KEEP_FINETUNED = 16
    """How many promoted models (fine-tuned longer than the configured steps) are kept for the test split."""

    def __init__(
        self,
        *,
        model: nn.Module,
        splits: DataSplits,
        device: torch.device,
        latency_device: torch.device | None = None,
        options: EvaluatorOptions | None = None,
        threads: int | None = None,
        eval_batches: int | None = None,
        zero_shot_images: int = ZERO_SHOT_IMAGES,
        divergence_images: int = DIVERGENCE_IMAGES,
        seed: int = 0,
    ) -> None:
        self.options = options or EvaluatorOptions()
        self.options.validate()
        self.model = model.to(device).eval()
        self.splits = splits
        self.device = device
        self.latency_device = device if latency_device is None else latency_device
        self._references: dict[bool, nn.Module | None] = {}  # the uncompressed model as timed, by folded or not
        self.threads = threads
        self.eval_batches = eval_batches
        self.seed = seed
        count = min(zero_shot_images, len(splits.val))
        self.zero_shot_set = splits.val.subset(torch.arange(count))
        self._zero_shot_baseline: float | None = None
        self.divergence_set = splits.val.subset(torch.arange(min(divergence_images, len(splits.val))))
        self._dense_log_probs: torch.Tensor | None = None  # the uncompressed model's outputs on the divergence set
        self._recalibrated: _Recalibrated | None = None
        self._finetuned: list[_Finetuned] = []
        self._teacher_outputs = TeacherCache()  # the seeded fine-tuning batches repeat every trial
        calib = calibration_batch(
            splits.train, batch_size=self.options.batch_size, batches=self.options.calib_batches, seed=seed
        )
        self._calib = calib.to(device)
        self.example = self._calib[: self.options.latency_batch].to(self.latency_device).clone()
        self.target = RemoteTarget.from_url(self.options.target) if self.options.target else None
        if self.target is not None:
            self.target.info()  # an unreachable target, or a refused token, stops the run before any trial
        self.backend = latency_backend(self.options.latency_backend)(
            device=self.latency_device, threads=self.threads, target=self.target
        )

    def layer_timer(self) -> ModuleTimer:
        """Layers timed as trials are, by the latency backend (here or on the remote target)."""
        return self.backend.layer_timer()

    def evaluate(self, config: CompressionConfig, *, split: Split = "val") -> Metrics:
        """The metrics of ``config`` (see the class)."""
        return self.evaluate_at(config, finetune_steps=self.options.finetune_steps, split=split)

    def evaluate_at(self, config: CompressionConfig, *, finetune_steps: int, split: Split = "val") -> Metrics:
        """The metrics of ``config`` after ``finetune_steps`` fine-tuning steps (a promotion's longer fine-tune).

        A model fine-tuned longer than the configured steps (a promotion) is kept, the last
        :attr:`KEEP_FINETUNED` of them, with its timing: the front's test-split evaluation reuses it, as the
        same seeded fine-tune would rebuild the same model (measured: 592 s of a default run's 59 minutes went to
        fine-tuning the front's promotions again)."""
        dataset = self._dataset(split)  # an unknown split fails before any work
        kept = self._kept(config, finetune_steps) if split == "test" else None
        if kept is not None:
            phases: dict[str, float] = {}
            with _phase(phases, "accuracy"):
                correct = self._correct(kept.model, dataset, device=kept.device)
            return self._metrics(correct, kept.paired, {**kept.backend_extra, "reused_model": 1.0}, phases)
        recalibrated, self._recalibrated = self._recalibrated, None
        if recalibrated is not None and recalibrated.config == config:
            model, train, phases = recalibrated.model, recalibrated.train, dict(recalibrated.phases)
            extra = {"zero_shot_accuracy": recalibrated.zero_shot_accuracy}
        else:
            torch.manual_seed(self.seed)
            model, train, phases = self._recalibrate(config)
            extra = {}
        options = self.options
        if train is not None and finetune_steps > 0 and _trainable(model):
            with _phase(phases, "finetune"):
                finetune(
                    model,
                    self.model,
                    train,
                    device=self.device,
                    steps=finetune_steps,
                    lr=options.finetune_lr,
                    teacher_cache=self._teacher_outputs,
                )
        int8_layers = config.split_int8()[1]
        with _phase(phases, "quantize" if int8_layers else "latency"):
            deployed = self._deployed(model.eval(), int8_layers)
        # Latency first: a quantized (oneDNN) conv tunes itself to the first batch size it runs, and one
        # first run on evaluation batches of 256 leaves it 2-3x slower at batch 1 from then on.
        with _phase(phases, "latency"):
            paired, backend_extra = self._paired_latency(deployed)
        scored, device = model, self.device
        if int8_layers:  # scored as it is saved and recovered: quantized, BatchNorm not folded, where int8 runs
            with _phase(phases, "quantize"):
                scored = deployed.model if not deployed.folded else self._on_latency_device(model, int8_layers)
            device = self.latency_device
        if finetune_steps > options.finetune_steps:
            self._keep(_Finetuned(config, finetune_steps, scored, device, paired, backend_extra))
        with _phase(phases, "accuracy"):
            correct = self._correct(scored, dataset, device=device)
        return self._metrics(correct, paired, {**backend_extra, **extra}, phases)

    def _kept(self, config: CompressionConfig, steps: int) -> _Finetuned | None:
        return next((k for k in self._finetuned if k.config == config and k.steps == steps), None)

    def _keep(self, finetuned: _Finetuned) -> None:
        self._finetuned = [k for k in self._finetuned if (k.config, k.steps) != (finetuned.config, finetuned.steps)]
        self._finetuned = [*self._finetuned, finetuned][-self.KEEP_FINETUNED :] if self.KEEP_FINETUNED > 0 else []

    def _correct(self, model: nn.Module, dataset: Dataset, *, device: torch.device) -> torch.Tensor:
        loader = make_loader(dataset, batch_size=256, shuffle=False)
        return correct_predictions(model, loader, device=device, max_batches=self.eval_batches)

    def _deployed(self, model: nn.Module, int8_layers: list[str]) -> _Deployed:
        """``model`` as it is timed: its deployed form (a copy with BatchNorm folded, when :meth:`_folds`) on the
        latency device, its ``int8_layers`` quantized (:meth:`_on_latency_device`)."""
        float_model = None
        if int8_layers and self.backend.float_model_for_int8:
            float_model = model if self.latency_device == self.device else copy.deepcopy(model).to(self.latency_device)
        if not self._folds():
            if float_model is model:  # quantized in place below
                float_model = copy.deepcopy(model)
            return _Deployed(self._on_latency_device(model, int8_layers), folded=0, float_model=float_model)
        folded = fold_batchnorm(model)
        deployed = self._on_latency_device(folded.model, int8_layers, copied=True)
        return _Deployed(deployed, folded=folded.folded, float_model=float_model)

    def _on_latency_device(self, model: nn.Module, int8_layers: list[str], *, copied: bool = False) -> nn.Module:
        """``model`` on the latency device (a copy when it trains elsewhere, unless ``copied`` already), its
        ``int8_layers`` quantized there (in place)."""
        if self.latency_device != self.device:
            model = (model if copied else copy.deepcopy(model)).to(self.latency_device)
        if int8_layers:
            quantize_layers(model, int8_layers, self._calib.to(self.latency_device))
        return model

    def _folds(self) -> bool:
        """Whether models are timed with BatchNorm folded: with ``fold_batchnorm``, when the uncompressed model folds
        (one that cannot be traced is timed unfolded, and every config with it, in the same form)."""
        return self.options.fold_batchnorm and self._reference(folded=True) is not None

    def _reference(self, *, folded: bool) -> nn.Module | None:
        """The uncompressed model timed beside a config timed in the same form (BatchNorm ``folded`` or not), on the
        latency device, made once; None for ``folded`` when it does not fold."""
        if folded not in self._references:
            if folded:
                dense = fold_batchnorm(self.model)
                reference = self._on_latency_device(dense.model, [], copied=True).eval() if dense.folded else None
            else:
                reference = self._on_latency_device(self.model, []).eval()
            self._references[folded] = reference
        return self._references[folded]

    @staticmethod
    def _metrics(
        correct: torch.Tensor, paired: PairedLatency, extra: dict[str, float], phases: dict[str, float]
    ) -> Metrics:
        latency = paired.candidate
        return Metrics(
            accuracy=correct.sum().item() / max(len(correct), 1),
            latency_ms=latency.median_ms,
            reference_latency_ms=paired.reference.median_ms,
            extra={
                "images": float(len(correct)),
                "latency_p10_ms": latency.p10_ms,
                "latency_p90_ms": latency.p90_ms,
                "latency_spread": latency.spread,
                **paired.summary(),
                **extra,
                **{f"time_{name}_s": seconds for name, seconds in phases.items()},
            },
            correct=correct.tolist(),
        )

    def _dataset(self, split: Split) -> Dataset:
        full_val = self.splits.val if self.splits.full_val is None else self.splits.full_val
        datasets = {"val": self.splits.val, "full_val": full_val, "test": self.splits.test}
        if split not in datasets:
            raise ValueError(f"split {split!r}: not one of {', '.join(datasets)}")
        return datasets[split]

    def time_beside_dense(self, config: CompressionConfig, *, rounds: int, target_seconds: float) -> PairedLatency:
        """``config`` applied (int8 layers quantized, not fine-tuned: timing does not depend on the weights' values)
        and timed beside the uncompressed model as :meth:`evaluate` times it, in ``rounds`` rounds."""
        float_config, int8_layers = config.split_int8()
        model = apply_config(self.model, float_config, calib_inputs=self._calib).to(self.device).eval()
        return self._paired_latency(self._deployed(model, int8_layers), rounds=rounds, target_seconds=target_seconds)[0]

    def zero_shot_accuracy(self, config: CompressionConfig) -> float:
        """Accuracy of ``config`` applied in float with BatchNorm recalibrated, not fine-tuned, on the first
        ``zero_shot_images`` validation images: the cheap signal of sensitivity and early rejection."""
        torch.manual_seed(self.seed)
        model, train, phases = self._recalibrate(config)
        with _phase(phases, "zero_shot"):
            accuracy = self._zero_shot(model)
        if train is not None:
            self._recalibrated = _Recalibrated(config, model, train, phases, accuracy)
        return accuracy

    def zero_shot_baseline(self) -> float:
        """The uncompressed model's accuracy on the zero-shot images."""
        if self._zero_shot_baseline is None:
            self._zero_shot_baseline = self._zero_shot(self.model)
        return self._zero_shot_baseline

    def zero_shot_key(self) -> dict[str, object]:
        return {
            "calib_batches": self.options.calib_batches,
            "batch_size": self.options.batch_size,
            "seed": self.seed,
            "images": len(self.zero_shot_set),
        }

    def output_divergence(self, config: CompressionConfig) -> Divergence:
        """``config`` applied in float with BatchNorm recalibrated (as for its zero-shot accuracy), not fine-tuned:
        the mean KL divergence of its softmax outputs from the uncompressed model's, and its accuracy, on the first
        ``divergence_images`` validation images. Leaves the global RNG as it was.

        Validation images, not training images: unaugmented and held out like the images the search's accuracy is
        measured on (on its training images the model is confident and right, which understates the damage), so a
        drop in points means what an early rejection's does; the first ones, so that a small validation split
        serves too (the zero-shot images are among them).
        """
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            model = self._recalibrate(config)[0]
            if self._dense_log_probs is None:
                self._dense_log_probs = self._log_probs(self.model)[0]
            log_probs, labels = self._log_probs(model)
        kl = torch.nn.functional.kl_div(log_probs, self._dense_log_probs, reduction="sum", log_target=True)
        accuracy = (log_probs.argmax(1) == labels).sum().item() / max(len(labels), 1)
        return Divergence(kl=max(kl.item() / max(len(labels), 1), 0.0), accuracy=accuracy)

    def divergence_key(self) -> dict[str, object]:
        return {
            "calib_batches": self.options.calib_batches,
            "batch_size": self.options.batch_size,
            "seed": self.seed,
            "divergence_images": len(self.divergence_set),
        }

    def _recalibrate(self, config: CompressionConfig) -> tuple[nn.Module, DataLoader | None, dict[str, float]]:
        """``config``'s float part applied to a copy of the model, BatchNorm recalibrated (unless all kept), with
        the seeded training loader (fine-tuning continues it) and the time per phase."""
        phases: dict[str, float] = {}
        with _phase(phases, "apply"):
            model = apply_config(self.model, config.split_int8()[0], calib_inputs=self._calib).to(self.device)
        if all(choice.technique == "keep" for choice in config.layers.values()):
            return model, None, phases
        train = make_loader(self.splits.train, batch_size=self.options.batch_size, shuffle=True, seed=self.seed)
        with _phase(phases, "recalibrate"):
            recalibrate_batchnorm(model, train, device=self.device, batches=self.options.calib_batches)
        return model, train, phases

    def _zero_shot(self, model: nn.Module) -> float:
        """Accuracy on the zero-shot images, leaving the global RNG as it was (a DataLoader draws its base seed
        from it), so that fine-tuning after a zero-shot check trains the model a fresh evaluation trains."""
        loader = make_loader(self.zero_shot_set, batch_size=256, shuffle=False)
        with torch.random.fork_rng(devices=[]):
            return evaluate_accuracy(model, loader, device=self.device)

    def _log_probs(self, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """``model``'s log-softmax outputs on the divergence images (eval mode, batches of 256) and their labels."""
        outputs, labels = [], []
        model.eval()
        with channels_last(model, self.device), torch.inference_mode():  # weights converted outside inference mode
            for images, targets in make_loader(self.divergence_set, batch_size=256, shuffle=False):
                outputs.append(torch.log_softmax(model(images.to(self.device)).float(), dim=1))
                labels.append(targets.to(self.device))
        return torch.cat(outputs), torch.cat(labels)

    def _paired_latency(
        self, deployed: _Deployed, *, rounds: int = 4, target_seconds: float = 0.5
    ) -> tuple[PairedLatency, dict[str, float]]:
        """A config's ``deployed`` model timed beside the uncompressed model in the same form, in alternating rounds,
        by the latency backend (:meth:`~ranksearch.measure.backends.LatencyBackend.time_beside`), with what the
        backend records and, with ``fold_batchnorm``, how many BatchNorms were folded (``batchnorm_folded``)."""
        model, reference = deployed.model, self._reference(folded=deployed.folded > 0)
        assert reference is not None, "a config is folded only when the uncompressed model folds (_folds)"
        folded = {"batchnorm_folded": float(deployed.folded)} if self.options.fold_batchnorm else {}
        timed = self.backend.time_beside(
            reference,
            model,
            self.example,
            rounds=rounds,
            target_seconds=target_seconds,
            float_model=deployed.float_model,
        )
        return timed.paired, {**timed.extra, **folded}


def calibration_batch(dataset: Dataset, *, batch_size: int, batches: int, seed: int) -> torch.Tensor:
    """The first ``batches`` shuffled (seeded) training batches as one tensor: calibration and latency inputs.

    Augmentation draws from the global torch RNG, so it is seeded too (in a forked RNG): the batch is
    the same whatever ran before, and an exported trial re-evaluates to its recorded accuracy.
    """
    loader = make_loader(dataset, batch_size=batch_size, shuffle=True, seed=seed)
    images = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for batch, _ in loader:
            images.append(batch)
            if len(images) == batches:
                break
    return torch.cat(images)


def _trainable(model: nn.Module) -> bool:
    return any(p.requires_grad for p in model.parameters())


@contextmanager
def _phase(phases: dict[str, float], name: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        phases[name] = phases.get(name, 0.0) + time.perf_counter() - start
