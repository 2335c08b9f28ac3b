"""The search progress plot's info: the front's hypervolume and the best speedup within budget, trial by trial."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ranksearch.results.hypervolume import hypervolume_2d
from ranksearch.results.plots.rows import PlotInfo, StudyRows


@dataclass(frozen=True)
class ProgressInfo(PlotInfo):
    """How the search improved, after each complete trial (x: trial number).

    Hypervolume: the area the feasible front dominates in the (accuracy up, latency down)
    plane up to a fixed reference point, (lowest accuracy of any complete trial, 1.1 x the
    highest latency); fixed for the whole run, so the curve never decreases. Units are
    accuracy (a fraction) x the latency objective (relative to the dense model, or ms in studies of
    earlier releases). Best speedup: the highest speedup among trials whose accuracy drop is within
    the accuracy budget (``--max-accuracy-drop``, else 1 pp) and that were faster than the dense
    model in every timed round (or are the dense model).
    """

    name: ClassVar[str] = "progress"
    study_name: str
    trials: tuple[int, ...]
    hypervolume: tuple[float, ...]
    reference: tuple[float, float]
    """(accuracy, latency objective)."""
    speedup: tuple[float | None, ...]
    within_budget: tuple[bool, ...]
    best_speedup: tuple[float | None, ...]
    budget_pp: float
    relative: bool
    """Whether the latency objective is relative to the dense model (else milliseconds: earlier releases)."""

    def title(self) -> str:
        return f"Search progress of {self.study_name} ({len(self.trials)} complete trials)"

    def hypervolume_label(self) -> str:
        return f"hypervolume (accuracy × {'relative latency' if self.relative else 'ms'})"

    def reference_label(self) -> str:
        latency = f"{self.reference[1]:.3f}{' x the dense latency' if self.relative else ' ms'}"
        return f"feasible front vs reference (accuracy {100 * self.reference[0]:.2f}%, {latency})"

    def speedup_label(self) -> str:
        return f"best speedup within {self.budget_pp:g} pp"


def progress_info(rows: StudyRows) -> ProgressInfo:
    complete = rows.complete()
    reference = (
        min((r["accuracy"] for r in complete), default=0.0),
        1.1 * max((rows.latency(r) for r in complete), default=0.0),
    )
    budget = rows.accuracy_budget_pp()
    hypervolume, best_speedup, within_budget = [], [], []
    feasible: list[tuple[float, float]] = []
    best = None
    for r in complete:
        if r["feasible"]:
            feasible.append((r["accuracy"], rows.latency(r)))
        hypervolume.append(hypervolume_2d(feasible, reference))
        drop, speedup, low = r["accuracy_drop_pp"], r["speedup"], r.get("speedup_low")
        faster = speedup is not None and (speedup == 1.0 or (speedup > 1.0 and (low is None or low > 1.0)))
        within = drop is not None and faster and drop <= budget
        if within:
            best = speedup if best is None else max(best, speedup)
        within_budget.append(within)
        best_speedup.append(best)
    return ProgressInfo(
        study_name=rows.study_name,
        trials=tuple(r["trial"] for r in complete),
        hypervolume=tuple(hypervolume),
        reference=reference,
        speedup=tuple(r["speedup"] for r in complete),
        within_budget=tuple(within_budget),
        best_speedup=tuple(best_speedup),
        budget_pp=budget,
        relative=rows.relative,
    )
