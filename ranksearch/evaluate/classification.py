"""The default evaluator: compress, recalibrate BatchNorm, distil briefly, then measure accuracy and latency."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils.data import Dataset

from ranksearch.compress import apply_config, quantize_layers
from ranksearch.config import CompressionConfig
from ranksearch.data import DataSplits, make_loader
from ranksearch.errors import RanksearchError, Rejected
from ranksearch.evaluate.base import BaseEvaluator, Split
from ranksearch.measure.latency import LATENCY_BACKENDS, Latency, measure_latency_pair
from ranksearch.training import evaluate_accuracy, finetune, recalibrate_batchnorm

if TYPE_CHECKING:
    from ranksearch.study.settings import RunSettings

ZERO_SHOT_IMAGES = 512
"""Validation images of the zero-shot check (early rejection, per-layer sensitivity): two batches."""


class ClassificationEvaluator(BaseEvaluator):
    """Top-1 accuracy after a short knowledge-distillation fine-tune, and measured latency.

    For each configuration: apply its low-rank part to a copy of the trained ``model`` (data-aware
    layers calibrated on ``calib_batches`` training batches) -> recalibrate BatchNorm statistics
    -> fine-tune ``finetune_steps`` steps, distilling from the uncompressed model -> quantize the
    int8 layers (post-training, scales from the calibration batches) -> median latency of batch
    ``latency_batch`` on ``device`` (before the model runs any other batch size), or with
    ``latency_backend="onnxruntime"`` of the model exported to a temporary ONNX file, in ONNX Runtime
    on CPU (the export's max abs error against torch is returned as ``onnx_max_abs_error``); the
    uncompressed model is timed right before it (``reference_latency_ms``), so the speedup compares
    two measurements under the same load -> accuracy on the validation split (at most
    ``eval_batches`` batches). Data
    order and initial state are seeded, so the same configuration gives the same model on
    ``split="test"`` as it did on ``"val"``.
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        splits: DataSplits,
        device: torch.device,
        finetune_steps: int = 100,
        finetune_lr: float = 0.01,
        batch_size: int = 128,
        calib_batches: int = 4,
        eval_batches: int | None = None,
        latency_batch: int = 1,
        latency_threads: int | None = None,
        latency_backend: str = "torch",
        max_zero_shot_drop: float | None = None,
        zero_shot_images: int = ZERO_SHOT_IMAGES,
        seed: int = 0,
    ) -> None:
        self.model = model.to(device).eval()
        self.splits = splits
        self.device = device
        self.finetune_steps = finetune_steps
        self.finetune_lr = finetune_lr
        self.batch_size = batch_size
        self.calib_batches = calib_batches
        self.eval_batches = eval_batches
        self.latency_threads = latency_threads
        self.latency_backend = latency_backend
        self.max_zero_shot_drop = max_zero_shot_drop
        self.seed = seed
        count = min(zero_shot_images, len(splits.val))
        self.zero_shot_set = torch.utils.data.Subset(splits.val, range(count))
        self._zero_shot_baseline: float | None = None
        self._teacher_logits: dict[bytes, torch.Tensor] = {}  # the seeded fine-tuning batches repeat every trial
        if latency_backend not in LATENCY_BACKENDS:
            raise RanksearchError(
                f"latency backend {latency_backend!r} is unknown; use {' or '.join(LATENCY_BACKENDS)}"
            )
        calib = calibration_batch(splits.train, batch_size=batch_size, batches=calib_batches, seed=seed)
        self._calib = calib.to(device)
        self.example = self._calib[:latency_batch].clone()

    @classmethod
    def from_settings(
        cls, settings: RunSettings, *, model: nn.Module, splits: DataSplits, device: torch.device
    ) -> ClassificationEvaluator:
        """The evaluator a run with ``settings`` uses, on ``model`` and ``splits``."""
        return cls(
            model=model,
            splits=splits,
            device=device,
            finetune_steps=settings.finetune_steps,
            finetune_lr=settings.finetune_lr,
            batch_size=settings.batch_size,
            calib_batches=settings.calib_batches,
            latency_batch=settings.latency_batch,
            latency_threads=settings.threads,
            latency_backend=settings.latency_backend,
            max_zero_shot_drop=settings.max_zero_shot_drop if settings.early_reject else None,
            seed=settings.seed,
        )

    def evaluate(
        self, config: CompressionConfig, *, split: Split = "val", early_reject: bool = False
    ) -> Mapping[str, float]:
        """The metrics of ``config`` (see the class); with ``early_reject`` and ``max_zero_shot_drop`` set, a
        config whose zero-shot accuracy falls more than that many points below the uncompressed model's
        raises :class:`~ranksearch.errors.Rejected` before it is fine-tuned."""
        phases: dict[str, float] = {}
        extra: dict[str, float] = {}
        torch.manual_seed(self.seed)
        float_config, int8_layers = config.split_int8()
        with _phase(phases, "apply"):
            model = apply_config(self.model, float_config, calib_inputs=self._calib).to(self.device)
        if any(choice.technique != "keep" for choice in config.layers.values()):
            train = make_loader(self.splits.train, batch_size=self.batch_size, shuffle=True, seed=self.seed)
            with _phase(phases, "recalibrate"):
                recalibrate_batchnorm(model, train, device=self.device, batches=self.calib_batches)
            if early_reject and self.max_zero_shot_drop is not None:
                with _phase(phases, "zero_shot"):
                    extra["zero_shot_accuracy"] = self._zero_shot(model)
                drop = 100.0 * (self.zero_shot_baseline() - extra["zero_shot_accuracy"])
                if drop > self.max_zero_shot_drop:
                    raise Rejected(
                        f"zero-shot accuracy {100 * extra['zero_shot_accuracy']:.2f} %, {drop:.1f} points below "
                        f"the uncompressed model's (--max-zero-shot-drop {self.max_zero_shot_drop:g})",
                        metrics={**extra, **{f"time_{name}_s": seconds for name, seconds in phases.items()}},
                    )
            if self.finetune_steps > 0 and _trainable(model):
                with _phase(phases, "finetune"):
                    finetune(
                        model,
                        self.model,
                        train,
                        device=self.device,
                        steps=self.finetune_steps,
                        lr=self.finetune_lr,
                        teacher_cache=self._teacher_logits,
                    )
        if int8_layers:
            with _phase(phases, "quantize"):
                quantize_layers(model.eval(), int8_layers, self._calib)
        # Latency first: a quantized (oneDNN) conv tunes itself to the first batch size it runs, and one
        # first run on evaluation batches of 256 leaves it 2-3x slower at batch 1 from then on.
        with _phase(phases, "latency"):
            reference, latency, backend_extra = self._latencies(model)
        dataset = self.splits.val if split == "val" else self.splits.test
        with _phase(phases, "accuracy"):
            loader = make_loader(dataset, batch_size=256, shuffle=False)
            accuracy = evaluate_accuracy(model, loader, device=self.device, max_batches=self.eval_batches)
        return {
            "accuracy": accuracy,
            "latency_ms": latency.median_ms,
            "reference_latency_ms": reference.median_ms,
            "latency_p10_ms": latency.p10_ms,
            "latency_p90_ms": latency.p90_ms,
            "latency_spread": latency.spread,
            **backend_extra,
            **extra,
            **{f"time_{name}_s": seconds for name, seconds in phases.items()},
        }

    def zero_shot_accuracy(self, config: CompressionConfig) -> float:
        """Accuracy of ``config`` applied in float with BatchNorm recalibrated, not fine-tuned, on the first
        ``zero_shot_images`` validation images: the cheap signal of sensitivity and early rejection."""
        torch.manual_seed(self.seed)
        model = apply_config(self.model, config.split_int8()[0], calib_inputs=self._calib).to(self.device)
        train = make_loader(self.splits.train, batch_size=self.batch_size, shuffle=True, seed=self.seed)
        recalibrate_batchnorm(model, train, device=self.device, batches=self.calib_batches)
        return self._zero_shot(model)

    def zero_shot_baseline(self) -> float:
        """The uncompressed model's accuracy on the zero-shot images."""
        if self._zero_shot_baseline is None:
            self._zero_shot_baseline = self._zero_shot(self.model)
        return self._zero_shot_baseline

    def _zero_shot(self, model: nn.Module) -> float:
        loader = make_loader(self.zero_shot_set, batch_size=256, shuffle=False)
        return evaluate_accuracy(model, loader, device=self.device)

    def _latencies(self, model: nn.Module) -> tuple[Latency, Latency, dict[str, float]]:
        """The uncompressed model's latency and ``model``'s (in torch: timed in alternating rounds), and with
        ONNX Runtime the export's max abs error against torch (``onnx_max_abs_error``)."""
        if self.latency_backend == "torch":
            pair = measure_latency_pair(
                self.model, model, self.example, device=self.device, threads=self.latency_threads
            )
            return *pair, {}
        reference, _ = self._latency(self.model)
        return reference, *self._latency(model)

    def _latency(self, model: nn.Module) -> tuple[Latency, dict[str, float]]:
        """ONNX Runtime's latency of ``model``'s export and the export's max abs error against torch."""
        from ranksearch.measure.onnx import export_onnx, onnxruntime_latency

        try:
            with tempfile.TemporaryDirectory(prefix="ranksearch-onnx-") as tmp:
                exported = export_onnx(model, self.example, Path(tmp) / "model.onnx")
                latency = onnxruntime_latency(exported.path, self.example, threads=self.latency_threads)
        except RanksearchError as exc:  # a wrong export fails this trial, not the search
            raise RuntimeError(str(exc)) from None
        return latency, {"onnx_max_abs_error": exported.max_abs_error}


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
