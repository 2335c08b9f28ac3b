"""The Pareto plot's info: validation accuracy vs measured latency of every complete trial, the front highlighted."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from ranksearch.results.plots.rows import PlotInfo, StudyRows, format_number


@dataclass(frozen=True)
class Point:
    """One complete trial in the accuracy/latency plane."""

    trial: int
    accuracy: float
    latency: float
    """Relative to the dense model (1 / speedup), or milliseconds in studies of earlier releases."""
    feasible: bool
    anchor: str
    hover: tuple[str, ...]

    def label(self) -> str:
        """The anchor's name beside its marker (``svd@0.5``; the legend says "uniform")."""
        return self.anchor.removeprefix("uniform ")


@dataclass(frozen=True)
class ParetoInfo(PlotInfo):
    """Validation accuracy vs measured latency of every complete trial, the feasible front highlighted.

    Anchors (the baseline and the uniform configurations) are labelled; infeasible trials (a
    constraint > 0) are crosses; failed trials have no values and are counted in the legend.
    """

    name: ClassVar[str] = "pareto"
    study_name: str
    points: tuple[Point, ...]
    front: tuple[int, ...]
    """Trial numbers of the feasible Pareto front, fastest first."""
    failed: int
    accuracy_floor: float | None
    """Baseline accuracy minus ``--max-accuracy-drop``, when the study has that constraint."""
    latency_label: str

    def point(self, trial: int) -> Point:
        return next(p for p in self.points if p.trial == trial)

    def groups(self) -> dict[str, list[Point]]:
        """Disjoint marker groups, drawn in this order (later on top)."""
        front = set(self.front)
        plain = [p for p in self.points if p.trial not in front and not p.anchor]
        return {
            "feasible": [p for p in plain if p.feasible],
            "infeasible": [p for p in plain if not p.feasible],
            "front": [self.point(t) for t in self.front],
            "baseline": [p for p in self.points if p.anchor == "baseline"],
            "anchors": [p for p in self.points if p.anchor and p.anchor != "baseline"],
        }

    def label_position(self, point: Point, index: int) -> str:
        """Where an anchor's label goes: above or below (alternating), to the left of points in the slowest quarter."""
        latencies = [p.latency for p in self.points]
        low, high = min(latencies), max(latencies)
        side = "left" if high > low and point.latency > low + 0.75 * (high - low) else "right"
        return f"{'top' if index % 2 == 0 else 'bottom'} {side}"

    def title(self) -> str:
        infeasible = sum(not p.feasible for p in self.points)
        parts = [f"{len(self.points)} complete", f"{len(self.front)} on the front"]
        parts += [f"{infeasible} infeasible"] if infeasible else []
        parts += [f"{self.failed} failed"] if self.failed else []
        return f"Pareto front of {self.study_name} ({', '.join(parts)})"

    def legend(self) -> dict[str, str]:
        return {
            "feasible": "trial",
            "infeasible": "infeasible trial (constraint violated)",
            "front": "feasible Pareto front",
            "baseline": "baseline (no compression)",
            "anchors": "uniform anchor",
            "failed": f"failed trials: {self.failed} (no values)",
        }


def pareto_info(rows: StudyRows) -> ParetoInfo:
    drop = rows.settings.get("max_accuracy_drop")
    floor = None
    if drop is not None and "accuracy" in rows.baseline:
        floor = rows.baseline["accuracy"] - drop / 100
    front = {r["trial"]: r for r in rows.front}
    return ParetoInfo(
        study_name=rows.study_name,
        points=tuple(
            Point(
                trial=r["trial"],
                accuracy=r["accuracy"],
                latency=_plotted_latency(rows, r, front.get(r["trial"])),
                feasible=bool(r["feasible"]),
                anchor=r["anchor"] or "",
                hover=_hover(r, rows.layer_names, front.get(r["trial"])),
            )
            for r in rows.complete()
        ),
        front=tuple(r["trial"] for r in rows.front),
        failed=sum(r["state"] == "FAIL" for r in rows.trials),
        accuracy_floor=floor,
        latency_label=rows.latency_label(),
    )


def _plotted_latency(rows: StudyRows, row: Mapping[str, Any], member: Mapping[str, Any] | None) -> float:
    """Where a trial sits on the latency axis: its own timing, but a front member (``member``: its front row) at
    1 / its config's speedup pooled over all its timings, which the front was chosen by and the tables show (one
    trial's own timing can put a member behind a more accurate one)."""
    if rows.relative and member is not None and member.get("speedup"):
        return 1.0 / member["speedup"]
    return rows.latency(row)


def _hover(
    row: Mapping[str, Any], layer_names: Sequence[str], member: Mapping[str, Any] | None = None
) -> tuple[str, ...]:
    """Trial, metrics (``member``: its front row, whose pooled speedup is shown too) and the layers it compresses
    (keep layers counted, not listed)."""
    head = f"trial {row['trial']}" + (f" ({row['anchor']})" if row["anchor"] else "")
    if row.get("rung"):
        head += f" · rung {row['rung']}: promotes trial {row['promotes']}, {row['finetune_steps']} fine-tune steps"
    lines = [
        head + ("" if row["feasible"] else " · infeasible"),
        f"val accuracy {100 * row['accuracy']:.2f}% · latency {row['latency_ms']:.3f} ms",
        f"speedup {format_number(row['speedup'], '{:.2f}x')} · drop "
        f"{format_number(row['accuracy_drop_pp'], '{:+.2f} pp')} · params {format_number(row['params'], '{:,.0f}')}",
    ]
    if member is not None and member.get("speedup_timings", 1) > 1:
        lines.append(f"front: {member['speedup']:.2f}x over its config's {member['speedup_timings']} timings")
    labels = {name: row[f"layer:{name}"] for name in layer_names}
    changed = [f"{name}: {label}" for name, label in labels.items() if label != "keep"]
    kept = len(labels) - len(changed)
    return (*lines, *changed, f"{'all' if not changed else kept} {'other ' if changed else ''}layers keep")
