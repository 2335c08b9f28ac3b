"""How well does the per-layer latency lookup table predict a whole model's measured latency?

    python benchmarks/latency_table.py [--model resnet18] [--configs 30] [--threads 2] [--seed 0]

Builds (or loads from <results-dir>/latency-tables/) the table for the model's default search space on
this CPU, then for the baseline, the uniform anchors and ``--configs`` random configurations
(technique, rank and int8 drawn uniformly per layer, as the sampler's random start does) builds
the compressed model with random factors (latency does not depend on their values), predicts its
latency as the search does (the table refitted on the configs measured before it) and measures it
(the dense model timed beside it), and prints predicted vs measured ms and the error, also of the
predicted speedup applied to the dense timing beside it (the table's error without the machine's drift).
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

import ranksearch as rs
from ranksearch.config import CompressionConfig, LayerChoice
from ranksearch.models import model_family
from ranksearch.search import SearchSpace, default_space_path, uniform_config
from ranksearch.search.latency_table import Observation, prediction_errors
from ranksearch.search.space import LayerSlot
from ranksearch.study import RunSettings, load_problem
from ranksearch.study.prepared import ANCHORS, build_latency_table


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
    start = time.perf_counter()
    table = build_latency_table(settings, context, slots, space.rank_multiple, console)
    variant_count = sum(len(times) for times in table.layer_ms.values())
    console.print(
        f"table: {variant_count} variants of {len(slots)} layers in {time.perf_counter() - start:.0f} s; "
        f"dense layers {table.dense_layers_ms:.3f} ms of {table.predict(CompressionConfig(layers={})):.3f} ms"
    )
    rng = random.Random(args.seed)
    configs = {
        "baseline" if technique == "keep" else f"uniform {technique}@{fraction}": uniform_config(
            slots, technique, fraction, rank_multiple=space.rank_multiple
        )
        for technique, fraction in ANCHORS
    }
    for i in range(args.configs):
        layers = {name: _random_choice(slot, rng) for name, slot in slots.items()}
        configs[f"random {i}"] = CompressionConfig(layers=layers, rank_multiple=space.rank_multiple)
    calib = context.example.repeat(8, 1, 1, 1)
    out = Table(
        title=f"{args.model}: predicted vs measured latency, batch {len(context.example)}, {args.threads} threads"
    )
    for column in ("config", "int8 layers", "predicted ms", "measured ms", "error %", "error beside %"):
        out.add_column(column, justify="left" if column == "config" else "right")
    predicted, beside, measured = [], [], []
    observations: list[Observation] = []
    for label, config in configs.items():
        model = rs.apply_config(context.model, config, init="random", calib_inputs=calib)
        # as in the search: predicted from the table refitted on the configs measured so far, then
        # measured with the dense model timed beside it
        current = table.fitted(observations)
        guess = current.predict(config)
        speedup = current.predict(CompressionConfig(layers={})) / guess
        reference = rs.measure_latency(context.model, context.example, device=device, threads=args.threads).median_ms
        latency = rs.measure_latency(model, context.example, device=device, threads=args.threads).median_ms
        observations.append(Observation(config, latency, reference))
        predicted.append(guess)
        beside.append(reference / speedup)
        measured.append(latency)
        int8 = sum(choice.int8 for choice in config.layers.values())
        out.add_row(
            label,
            str(int8),
            f"{guess:.3f}",
            f"{latency:.3f}",
            f"{100 * (guess - latency) / latency:+.1f}",
            f"{100 * (beside[-1] - latency) / latency:+.1f}",
        )
    console.print(out)
    for what, guesses in (("predicted", predicted), ("predicted speedup x dense timed beside", beside)):
        errors = prediction_errors(guesses, measured)
        console.print(
            f"{what}: error over {len(configs)} configs median {errors['median_pct']:.1f} %, "
            f"max {errors['max_pct']:.1f} %"
        )


def _random_choice(slot: LayerSlot, rng: random.Random) -> LayerChoice:
    technique = rng.choice(slot.techniques)
    ranks = slot.ranks[technique]
    rank = rng.choice(ranks) if ranks else None
    return LayerChoice(technique, rank, slot.int8 and rng.random() < 0.5, False, dict(slot.options[technique]))


if __name__ == "__main__":
    main()
