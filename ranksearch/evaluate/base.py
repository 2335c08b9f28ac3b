"""The evaluator protocol: score one compression configuration."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Literal

from ranksearch.config import CompressionConfig
from ranksearch.errors import RanksearchError

Split = Literal["val", "test"]
REQUIRED_KEYS = ("accuracy", "latency_ms")


class BaseEvaluator(ABC):
    """Compresses the trained model as ``config`` says, and measures it.

    :meth:`evaluate` returns at least ``accuracy`` (a fraction in [0, 1], higher is better) and
    ``latency_ms`` (lower is better); any other numeric entries are recorded with the trial
    (``time_<phase>_s`` entries make up the time-per-phase breakdown; ``reference_latency_ms``, the
    uncompressed model's latency measured right beside the compressed one's, makes the speedup a
    ratio of two measurements taken under the same machine load). The search calls it with
    ``split="val"``; ``split="test"`` is used once at the end, for the Pareto front only, and
    must rebuild the same model as the ``"val"`` call did for that config. Raise an exception
    to fail a trial (its message is recorded as the reason); the search goes on. Raise
    :class:`ranksearch.errors.Rejected` to cut a hopeless config short: the trial is pruned with its
    reason and counts towards the budget.

    Pass an instance to :func:`ranksearch.run_search`, or name a class on the command line
    (``--evaluator package.module:Class``): it is then built as ``Class(context=context)`` with
    the run's :class:`ranksearch.study.RunContext`.
    """

    @abstractmethod
    def evaluate(self, config: CompressionConfig, *, split: Split = "val") -> Mapping[str, float]:
        """Metrics of the model compressed by ``config``, measured on ``split``."""


def checked_metrics(evaluator: BaseEvaluator, metrics: object) -> dict[str, float]:
    """The evaluator's metrics as floats; missing keys or non-numbers are the evaluator's bug."""
    name = type(evaluator).__name__
    if not isinstance(metrics, Mapping):
        raise RanksearchError(f"evaluator {name} returned {type(metrics).__name__}; return a dict with {REQUIRED_KEYS}")
    missing = [key for key in REQUIRED_KEYS if key not in metrics]
    if missing:
        raise RanksearchError(
            f"evaluator {name} returned keys {sorted(metrics)} without {missing}; return at least {list(REQUIRED_KEYS)}"
        )
    out: dict[str, float] = {}
    for key, value in metrics.items():
        try:
            out[str(key)] = float(value)
        except (TypeError, ValueError):
            raise RanksearchError(f"evaluator {name} returned non-numeric {key}={value!r}; return numbers") from None
    if not all(math.isfinite(out[k]) for k in REQUIRED_KEYS):
        raise FloatingPointError(f"non-finite metrics: accuracy={out['accuracy']}, latency_ms={out['latency_ms']}")
    return out
