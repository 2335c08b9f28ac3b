"""The evaluator contract: score one compression configuration; optional capabilities the search asks for."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from ranksearch.config import CompressionConfig
from ranksearch.errors import RanksearchError
from ranksearch.measure.timers import ModuleTimer
from ranksearch.measure.timing import PairedLatency

Split = Literal["val", "full_val", "test"]
"""Where metrics are measured: the validation images a trial is scored on (``val``, possibly a subset of the
validation split: ``--eval-subset``), the whole validation split (``full_val``: promotions to upper rungs), or test."""
REQUIRED_KEYS = ("accuracy", "latency_ms")


@dataclass(frozen=True)
class Metrics:
    """What an evaluator measured for one configuration.

    ``accuracy`` is a fraction in [0, 1] (higher is better), ``latency_ms`` a latency (lower is better).
    ``reference_latency_ms`` is the uncompressed model's latency measured right beside the compressed one's, so
    the speedup is a ratio of two measurements taken under the same machine load. ``extra`` holds any other
    numbers, recorded with the trial (``time_<phase>_s`` entries make up the time-per-phase breakdown).
    """

    accuracy: float
    latency_ms: float
    reference_latency_ms: float | None = None
    extra: Mapping[str, float] = field(default_factory=dict)
    correct: Sequence[bool] | None = field(default=None, repr=False, compare=False)
    """Optional: whether each image of the split was classified right, in the split's order (not recorded with the
    trial). With it, the test accuracy of a front member gets a paired confidence interval against the baseline's."""

    def as_dict(self) -> dict[str, float]:
        """The flat mapping recorded with a trial."""
        out = {"accuracy": self.accuracy, "latency_ms": self.latency_ms}
        if self.reference_latency_ms is not None:
            out["reference_latency_ms"] = self.reference_latency_ms
        return {**out, **self.extra}

    def speedup(self, baseline_latency_ms: float) -> float:
        """The reference latency measured beside this one (or the baseline's) over this latency."""
        reference = self.reference_latency_ms if self.reference_latency_ms is not None else baseline_latency_ms
        return reference / self.latency_ms

    @classmethod
    def coerce(cls, evaluator: object, value: object) -> Metrics:
        """``value`` as :class:`Metrics`: an evaluator may also return a mapping with at least ``accuracy`` and
        ``latency_ms``. A wrong type or key is the evaluator's bug (a :class:`RanksearchError`); non-finite
        accuracy or latency fails the trial (:class:`FloatingPointError`)."""
        name = type(evaluator).__name__
        raw = value.as_dict() if isinstance(value, Metrics) else value
        if not isinstance(raw, Mapping):
            raise RanksearchError(
                f"evaluator {name} returned {type(raw).__name__}; return ranksearch.Metrics or a dict with "
                f"{list(REQUIRED_KEYS)}"
            )
        missing = [key for key in REQUIRED_KEYS if key not in raw]
        if missing:
            raise RanksearchError(
                f"evaluator {name} returned keys {sorted(raw)} without {missing}; return at least {list(REQUIRED_KEYS)}"
            )
        numbers: dict[str, float] = {}
        for key, number in raw.items():
            try:
                numbers[str(key)] = float(number)
            except (TypeError, ValueError):
                raise RanksearchError(
                    f"evaluator {name} returned non-numeric {key}={number!r}; return numbers"
                ) from None
        if not all(math.isfinite(numbers[k]) for k in REQUIRED_KEYS):
            raise FloatingPointError(
                f"non-finite metrics: accuracy={numbers['accuracy']}, latency_ms={numbers['latency_ms']}"
            )
        accuracy, latency = numbers.pop("accuracy"), numbers.pop("latency_ms")
        correct = value.correct if isinstance(value, Metrics) else None
        return cls(accuracy, latency, numbers.pop("reference_latency_ms", None), numbers, correct=correct)


class Evaluator(ABC):
    """Compresses the trained model as ``config`` says, and measures it.

    The search calls :meth:`evaluate` with ``split="val"``; ``split="test"`` is used once at the end, for the
    Pareto front only, and must rebuild the same model as the ``"val"`` call did for that config.
    What an exception means (see :mod:`ranksearch.errors`): a :class:`~ranksearch.errors.RanksearchError` stops
    the search (bad settings); :class:`~ranksearch.errors.Rejected` prunes the trial with its reason (it counts
    towards the budget); any other exception fails the trial with its message as the reason, and the search goes on.

    Optional capabilities: derive also from :class:`ZeroShotScorer` to get early rejection and the per-layer
    sensitivity pass, from :class:`DivergenceScorer` to get that pass measured as output divergence (and its
    knapsack warm starts), from :class:`LayerTiming` (or, for torch timings on this machine,
    :class:`LocalTorchTiming`) to get the per-layer latency table, and from :class:`PairedTiming` to get borderline
    front members timed again beside the dense model.

    Pass an instance to :func:`ranksearch.run_search`, or name a class on the command line
    (``--evaluator package.module:Class``): it is then built as ``Class(context=context)`` with the run's
    :class:`ranksearch.study.RunContext`.
    """

    @abstractmethod
    def evaluate(self, config: CompressionConfig, *, split: Split = "val") -> Metrics | Mapping[str, float]:
        """Metrics of the model compressed by ``config``, measured on ``split``: ``"val"`` or ``"test"`` (and
        ``"full_val"`` only for a :class:`MultiFidelity` evaluator that sets ``scores_full_val``)."""


BaseEvaluator = Evaluator
"""The name of :class:`Evaluator` in the first release."""


class ZeroShotScorer(ABC):
    """Capability: a cheap accuracy of a config without fine-tuning, for early rejection and per-layer sensitivity."""

    @abstractmethod
    def zero_shot_accuracy(self, config: CompressionConfig) -> float:
        """Accuracy of ``config`` applied without fine-tuning (e.g. with BatchNorm recalibrated)."""

    @abstractmethod
    def zero_shot_baseline(self) -> float:
        """The uncompressed model's accuracy measured the same way."""

    @abstractmethod
    def zero_shot_key(self) -> dict[str, object]:
        """What defines the scores besides the model, data and space (keys the sensitivity cache)."""


@dataclass(frozen=True)
class Divergence:
    """How far a config's outputs are from the uncompressed model's, on the same images."""

    kl: float
    """Mean KL(uncompressed softmax || compressed softmax) of the logits, in nats per image."""
    accuracy: float
    """The compressed model's accuracy on those images."""


class DivergenceScorer(ABC):
    """Capability: a config's output divergence from the uncompressed model without fine-tuning, for a per-layer
    sensitivity that adds up over layers (the sensitivity pass prefers it to :class:`ZeroShotScorer`'s accuracy)."""

    @abstractmethod
    def output_divergence(self, config: CompressionConfig) -> Divergence:
        """``config`` applied without fine-tuning (e.g. with BatchNorm recalibrated), compared with the uncompressed
        model; the empty config is the uncompressed model (``kl`` 0, the baseline accuracy on the same images)."""

    @abstractmethod
    def divergence_key(self) -> dict[str, object]:
        """What defines the divergences besides the model, data and space (keys the sensitivity cache)."""


class LocalTorchTiming(ABC):
    """Capability: the evaluator times models in torch on this machine, as the per-layer latency table does."""

    @property
    @abstractmethod
    def times_local_torch(self) -> bool:
        """Whether latency is measured in torch on this machine (so a table of layer timings predicts it)."""


class LayerTiming(ABC):
    """Capability: time one layer where the evaluator times whole models (torch, ONNX Runtime, a remote target), so
    that a per-layer latency table predicts its latencies. It supersedes :class:`LocalTorchTiming`."""

    @abstractmethod
    def layer_timer(self) -> ModuleTimer:
        """The timer of the evaluator's latency target (:mod:`ranksearch.measure.timers`)."""


class PairedTiming(ABC):
    """Capability: time a config's model again beside the uncompressed one, so that a front member's speedup can be
    confirmed with more rounds than a trial spends."""

    @abstractmethod
    def time_beside_dense(self, config: CompressionConfig, *, rounds: int, target_seconds: float) -> PairedLatency:
        """``config``'s model (as evaluated; its weights need not be fine-tuned) and the uncompressed model, timed in
        ``rounds`` alternating rounds over ``target_seconds`` in all, as the evaluation times them."""


class MultiFidelity(ABC):
    """Capability: evaluate a config with a longer fine-tune, so that promising trials can be promoted to higher
    rungs (successive halving over the fine-tune budget). An evaluator that sets :attr:`scores_full_val` has its
    promotions measured on ``split="full_val"``, the whole validation split, and compared with the uncompressed
    model's ``evaluate(dense, split="full_val")``; others are given ``"val"`` throughout."""

    scores_full_val: ClassVar[bool] = False
    """Whether :meth:`evaluate_at` and ``evaluate`` take ``split="full_val"``."""

    @abstractmethod
    def evaluate_at(self, config: CompressionConfig, *, finetune_steps: int, split: Split = "val") -> Metrics:
        """:meth:`Evaluator.evaluate` with ``finetune_steps`` fine-tuning steps instead of the configured number."""
