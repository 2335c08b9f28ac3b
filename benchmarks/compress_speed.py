"""Compression speed: first pass (decompositions computed) vs cached (factors sliced / reused).

Compresses every conv of ResNet-18 (trained weights with --checkpoint; the training-free
weights otherwise, which cost the same to factorize except for CP's convergence) and prints
per-technique medians, then the median time to apply a new random per-layer configuration
drawn from the same rank grid once every factorization is cached.

    python benchmarks/compress_speed.py [--threads 2] [--configs 20] [--checkpoint PATH]
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torchvision
from torch import nn

import ranksearch as rs
from ranksearch.techniques.cache import FactorStore

GRID = (0.125, 0.25, 0.5, 0.75)


def convs(model: nn.Module) -> dict[str, nn.Conv2d]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def applies(technique: str, layer: nn.Conv2d) -> bool:
    try:
        rs.cost_report(layer, technique, rank_for(technique, 0.5), (layer.in_channels, 8, 8))
    except rs.CompressionError:
        return False
    return True


def choices(layers: dict[str, nn.Conv2d]) -> dict[str, list[str]]:
    """The techniques that apply to each layer (e.g. grouped_svd needs channels its groups divide)."""
    return {name: [t for t in rs.list_techniques() if applies(t, layer)] for name, layer in layers.items()}


def rank_for(technique: str, fraction: float) -> float | None:
    return None if technique == "keep" else fraction


def options_for(technique: str, cp_iterations: int) -> dict[str, int]:
    return {"n_iter_max": cp_iterations} if technique == "cp" else {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--configs", type=int, default=20, help="random configurations timed after the first pass")
    parser.add_argument("--checkpoint", type=Path, help="trained ResNet-18 state_dict (10 classes)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--cp-iterations", type=int, default=25, help="CP-ALS sweeps (the default search spaces use 25)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = torchvision.models.resnet18(num_classes=10).eval()
    if args.checkpoint:
        model.load_state_dict(torch.load(args.checkpoint, map_location="cpu", weights_only=True))
    layers = convs(model)
    allowed = choices(layers)

    with tempfile.TemporaryDirectory() as cache_dir:
        store = FactorStore(directory=Path(cache_dir))
        rs.set_default_store(store)
        print(f"ResNet-18: {len(layers)} convs, rank grid {GRID}, torch threads {args.threads}\n")
        print(f"{'technique':<22}{'layers':>7}{'first pass s':>14}{'cached s/model':>16}{'cached ms/layer':>17}")
        for technique in rs.list_techniques():
            targets = [n for n in layers if technique in allowed[n]]
            start = time.perf_counter()
            for fraction in GRID:
                for name in targets:
                    rank = rank_for(technique, fraction)
                    rs.compress_layer(
                        layers[name], technique, rank, name=name, **options_for(technique, args.cp_iterations)
                    )
            first = time.perf_counter() - start
            timings = []
            for _ in range(5):
                fraction = random.choice(GRID)
                start = time.perf_counter()
                for name in targets:
                    rank = rank_for(technique, fraction)
                    rs.compress_layer(
                        layers[name], technique, rank, name=name, **options_for(technique, args.cp_iterations)
                    )
                timings.append(time.perf_counter() - start)
            cached = statistics.median(timings)
            print(f"{technique:<22}{len(targets):>7}{first:>14.2f}{cached:>16.3f}{1000 * cached / len(targets):>17.2f}")

        rng = random.Random(args.seed)
        timings = []
        for _ in range(args.configs):
            config = {"layers": {}}
            for name in layers:
                technique = rng.choice(allowed[name])
                config["layers"][name] = {
                    "technique": technique,
                    "rank": rank_for(technique, rng.choice(GRID)),
                    "options": options_for(technique, args.cp_iterations),
                }
            start = time.perf_counter()
            rs.apply_config(model, config)
            timings.append(time.perf_counter() - start)
        print(
            f"\nrandom per-layer configuration over all {len(layers)} convs (apply_config, cached): "
            f"median {statistics.median(timings):.3f} s, max {max(timings):.3f} s over {args.configs} configs"
        )
        print(f"store: {store.hits} memory hits, {store.disk_hits} disk hits, {store.misses} misses")


if __name__ == "__main__":
    main()
