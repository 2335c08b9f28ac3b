"""The per-layer heatmap's info: what each front member does to each searched layer."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from ranksearch.config import CompressionConfig, LayerChoice
from ranksearch.errors import USER_ERRORS
from ranksearch.results.plots.rows import PlotInfo, StudyRows, format_number

SHORT_NAMES = {
    "keep": "keep",
    "svd": "SVD",
    "spatial_svd": "sSVD",
    "tucker2": "TK2",
    "cp": "CP",
    "depthwise_separable": "DW",
    "grouped_svd": "gSVD",
    "spatial_tucker2": "sTK2",
}
"""Heatmap cell text per technique; a technique not listed shows its own name."""

PARAMS_MEASURE = "parameters kept (share of the dense layer)"
RANK_MEASURE = "kept rank fraction (keep = 1)"


@dataclass(frozen=True)
class LayersInfo(PlotInfo):
    """What each front member does to each searched layer.

    Rows are the searched layers in model order, columns the front members fastest first. The
    colour is the share of the dense layer's parameters its replacement keeps (``keep`` = 1),
    from the cost model on the architecture the study's model spec rebuilds: parameter counts
    depend on layer shapes only, so a freshly built model (no weights, no data) is enough and
    techniques compare on one scale (``tucker2`` at rank 0.25 keeps about 12% of a 3x3 conv).
    Where the model cannot be rebuilt here (no spec recorded, a custom model not importable),
    the colour falls back to the *rank fraction* in the config (the mean over rank dimensions;
    an absolute int rank has none and is grey), and ``measure`` says which one is shown. Cell
    text is the technique's short name and the config's rank, then ``int8`` for int8 layers.
    """

    name: ClassVar[str] = "layers"
    study_name: str
    layers: tuple[str, ...]
    trials: tuple[int, ...]
    columns: tuple[str, ...]
    value: tuple[tuple[float | None, ...], ...]
    """``value[layer][member]``: the colour, a fraction in [0, 1] (``None``: unknown)."""
    measure: str
    text: tuple[tuple[str, ...], ...]
    labels: tuple[tuple[str, ...], ...]
    """The choice labels, as in the ``layer:<name>`` columns of ``trials.csv``."""

    def title(self) -> str:
        return f"Per-layer choices of the {len(self.trials)} front members of {self.study_name}"

    def key(self) -> str:
        """What the short names in the cells stand for (those that appear)."""
        shown = {text.split()[0] for row in self.text for text in row}
        return " · ".join(
            f"{short} = {name}" for name, short in SHORT_NAMES.items() if short in shown and short != name
        )


def layers_info(rows: StudyRows) -> LayersInfo:
    members = [r["trial"] for r in rows.front]
    by_number = {r["trial"]: r for r in rows.trials}
    kept = layer_param_shares(rows.model_spec, {t: rows.configs[t] for t in members})
    value, text, labels = [], [], []
    for name in rows.layer_names:
        choices = [rows.configs[t].layers.get(name, LayerChoice("keep")) for t in members]
        if kept is None:
            value.append(tuple(kept_fraction(c) for c in choices))
        else:
            value.append(tuple(kept[t].get(name, 1.0) for t in members))
        text.append(tuple(cell_text(c) for c in choices))
        labels.append(tuple(by_number[t][f"layer:{name}"] for t in members))
    return LayersInfo(
        study_name=rows.study_name,
        layers=tuple(rows.layer_names),
        trials=tuple(members),
        columns=tuple(f"#{r['trial']} · {format_number(r['speedup'], '{:.2f}x')}" for r in rows.front),
        value=tuple(value),
        measure=RANK_MEASURE if kept is None else PARAMS_MEASURE,
        text=tuple(text),
        labels=tuple(labels),
    )


def layer_param_shares(
    spec: Mapping[str, Any] | None, configs: Mapping[int, CompressionConfig]
) -> dict[int, dict[str, float]] | None:
    """Per trial and configured layer, the replacement's parameters over the dense layer's.

    Counted by the cost model on the architecture ``spec`` (the study's model spec) rebuilds;
    ``None`` when there is no spec or the model cannot be rebuilt here.
    """
    if not spec or not configs:
        return None
    import torch

    from ranksearch.compress import cost_report
    from ranksearch.models import build_model
    from ranksearch.search import record_input_shapes

    try:
        size, channels = int(spec["image_size"]), int(spec["in_channels"])
        model = build_model(spec["name"], num_classes=int(spec["num_classes"]), in_channels=channels, image_size=size)
        shapes = record_input_shapes(model, torch.zeros(1, channels, size, size))
        modules = dict(model.named_modules())
        return {
            trial: {
                name: cost_report(
                    modules[name],
                    c.technique,
                    c.rank,
                    shapes[name],
                    rank_multiple=config.rank_multiple,
                    **c.options,
                ).param_ratio
                for name, c in config.layers.items()
            }
            for trial, config in configs.items()
        }
    except (*USER_ERRORS, KeyError):  # no such model or layer here: the caller falls back to rank fractions
        return None


def cell_text(choice: LayerChoice) -> str:
    """``keep``, ``TK2 .25`` (rank fraction), ``SVD r64`` (absolute rank); then a line ``int8`` if int8."""
    text = SHORT_NAMES.get(choice.technique, choice.technique)
    if choice.rank is not None:
        ranks = choice.rank if isinstance(choice.rank, tuple) else (choice.rank,)
        shown = [f"{r:.3g}".lstrip("0") if isinstance(r, float) else f"r{r}" for r in ranks]
        text += " " + "/".join(shown)
    return text + ("\nint8" if choice.int8 else "")


def kept_fraction(choice: LayerChoice) -> float | None:
    """1.0 for keep; the rank fraction (mean over rank dimensions); None for absolute or missing ranks."""
    if choice.technique == "keep":
        return 1.0
    ranks = choice.rank if isinstance(choice.rank, tuple) else (choice.rank,)
    if not ranks or any(isinstance(r, bool) or not isinstance(r, float) for r in ranks):
        return None
    return sum(ranks) / len(ranks)
