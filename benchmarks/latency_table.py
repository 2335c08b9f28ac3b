"""How well does the per-layer latency lookup table predict a whole model's measured latency, with its layers timed
inside the model (the default for eager torch) and with each timed alone?

    python benchmarks/latency_table.py [--model resnet18] [--configs 30] [--threads 2] [--seed 0]

Builds (or loads from <results-dir>/latency-tables/) both tables for the model's default search space on this CPU,
in the deployed form the search times (BatchNorm folded). Then, for the uniform anchors and ``--configs`` random
configurations (technique, rank and int8 drawn uniformly per layer, as the sampler's random start does), it builds
the model as a trial does (random factors, since latency does not depend on their values; BatchNorm folded; int8
layers quantized last), times it beside the dense model in alternating rounds, and predicts its speedup with each
table as the search does: refitted on the configs measured before it. The error is that of the predicted speedup
applied to the dense model timed beside the config, in percent of the config's measured latency (the table's error
without the machine's drift), overall and for configs with and without int8 layers.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

import ranksearch as rs
from ranksearch.compress import quantize_layers
from ranksearch.config import CompressionConfig, LayerChoice
from ranksearch.measure.deployed import fold_batchnorm
from ranksearch.measure.latency import measure_speedup
from ranksearch.measure.timers import ModuleTimer, TorchTimer
from ranksearch.models import model_family
from ranksearch.search import SearchSpace, default_space_path, uniform_config
from ranksearch.search.latency_table import LatencyTable, Observation
from ranksearch.search.space import LayerSlot
from ranksearch.study import RunSettings, load_problem
from ranksearch.study.prepared import ANCHORS, build_latency_table


class AloneTimer(ModuleTimer):
    """Eager torch with each layer variant timed alone (the table before in-model timing)."""

    def __init__(self, timer: TorchTimer) -> None:
        self.timer = timer

    def median_ms(self, module: nn.Module, inputs: torch.Tensor, **timing: Any) -> float:
        return self.timer.median_ms(module, inputs, **timing)

    def slug(self) -> str:
        return self.timer.slug()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--configs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results-dir", type=Path, default=Path("results"), help="its latency-tables/ is the cache")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    console = Console()
    device = torch.device("cpu")
    settings = RunSettings.of(model=args.model, threads=args.threads, results_dir=args.results_dir)
    context = load_problem(settings, device, console)
    space = SearchSpace.load(default_space_path(model_family(args.model)))
    slots = space.layers(context.model, context.input_shapes)
    in_model = TorchTimer(device=device, threads=args.threads)
    tables: dict[str, LatencyTable] = {}
    for label, timer in (("in model", in_model), ("alone", AloneTimer(in_model))):
        start = time.perf_counter()
        tables[label] = build_latency_table(settings, context, slots, space.rank_multiple, timer, console)
        console.print(f"table timed {label}: {time.perf_counter() - start:.0f} s (0 when cached)")
    configs = {
        "baseline" if technique == "keep" else f"uniform {technique}@{fraction}": uniform_config(
            slots, technique, fraction, rank_multiple=space.rank_multiple
        )
        for technique, fraction in ANCHORS
    }
    rng = random.Random(args.seed)
    for i in range(args.configs):
        layers = {name: _random_choice(slot, rng) for name, slot in slots.items()}
        configs[f"random {i}"] = CompressionConfig(layers=layers, rank_multiple=space.rank_multiple)
    dense = fold_batchnorm(context.model).model.eval()
    calib = context.example.repeat(8, 1, 1, 1)
    out = Table(
        title=f"{args.model}: predicted vs measured speedup, batch {len(context.example)}, {args.threads} threads"
    )
    for column in (
        "config",
        "int8 layers",
        "measured",
        *(f"{label}" for label in tables),
        *(f"err {label} %" for label in tables),
    ):
        out.add_column(column, justify="left" if column == "config" else "right")
    observations: list[Observation] = []
    errors: dict[str, list[tuple[bool, float]]] = {label: [] for label in tables}
    as_built: dict[str, list[float]] = {label: [] for label in tables}  # never refitted
    for label, config in configs.items():
        float_part, int8_layers = config.split_int8()
        model = fold_batchnorm(rs.apply_config(context.model, float_part, init="random", calib_inputs=calib)).model
        if int8_layers:  # as the evaluator: quantized after folding, before the model runs any batch
            quantize_layers(model, int8_layers, calib)
        paired = measure_speedup(dense, model.eval(), context.example, device=device, threads=args.threads)
        predicted = {}
        for name, table in tables.items():
            current = table.fitted(observations)  # as in the search: refitted on the configs measured before it
            predicted[name] = current.speedup(config)
            beside = paired.reference.median_ms / predicted[name]
            built = table.predict(config) / table.predict(CompressionConfig(layers={})) * paired.reference.median_ms
            as_built[name].append(100 * abs(built - paired.candidate.median_ms) / paired.candidate.median_ms)
            errors[name].append(
                (bool(int8_layers), 100 * (beside - paired.candidate.median_ms) / paired.candidate.median_ms)
            )
        observations.append(Observation(config, paired.candidate.median_ms, paired.reference.median_ms))
        out.add_row(
            label,
            str(len(int8_layers)),
            f"{paired.speedup:.2f}x",
            *(f"{predicted[name]:.2f}x" for name in tables),
            *(f"{errors[name][-1][1]:+.1f}" for name in tables),
        )
    console.print(out)
    summary = Table(title="latency error of the predicted speedup x the dense model timed beside (% of measured)")
    columns = ("median |error|", "max |error|", "median error, int8", "median error, float", "median |error| as built")
    for column in ("table", "configs", *columns):
        summary.add_column(column, justify="left" if column == "table" else "right")
    for name, rows in errors.items():
        absolute = [abs(e) for _, e in rows]
        int8 = [e for has, e in rows if has] or [float("nan")]
        float_only = [e for has, e in rows if not has] or [float("nan")]
        summary.add_row(
            name,
            str(len(rows)),
            f"{statistics.median(absolute):.1f}",
            f"{max(absolute):.1f}",
            f"{statistics.median(int8):+.1f}",
            f"{statistics.median(float_only):+.1f}",
            f"{statistics.median(as_built[name]):.1f}",
        )
    console.print(summary)


def _random_choice(slot: LayerSlot, rng: random.Random) -> LayerChoice:
    technique = rng.choice(slot.techniques)
    ranks = slot.ranks[technique]
    rank = rng.choice(ranks) if ranks else None
    return LayerChoice(technique, rank, slot.int8 and rng.random() < 0.5, False, dict(slot.options[technique]))


if __name__ == "__main__":
    main()
