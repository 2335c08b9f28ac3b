"""Which zero-shot proxy orders configs as fine-tuning does? Kendall's tau of three proxies against fine-tuned accuracy.

    python benchmarks/proxy_correlation.py [--model resnet18] [--checkpoint FILE] [--space FILE] [--configs 24]
        [--finetune-steps 60] [--threads 2] [--seed 0] [--results-dir results/proxy-correlation] [--out FILE]

On the model's problem as ``ranksearch run`` sets it up (the trained baseline, or ``--checkpoint``; the model's
default search space, or ``--space``; the built-in evaluator), the latency table and the sensitivity pass are
built as the search builds them (cached under the results directory). Then, for up to
``--configs`` configs (the uniform anchors, the knapsack warm starts, the greedy equal-sensitivity configs, then
random configs: each layer kept with a probability drawn per config, else a random float variant not hopeless
alone; fewer where the space has fewer), it measures:

- ``sum KL``: the summed per-layer KL divergence of each layer's variant alone (2048 validation images): the
  knapsack's cost;
- ``sum drop 512``: the summed per-layer zero-shot accuracy drops on the 512 zero-shot images (the proxy before it);
- ``zero-shot drop``: the whole config's zero-shot accuracy drop on those 512 images (what early rejection uses);
- ``fine-tuned drop``: the validation accuracy drop after the evaluator's fine-tune (``--finetune-steps``).

Per-layer values missing from the sensitivity pass (variants beyond hopeless, or slower than the dense layer, as
the uniform anchors use) are measured. It prints the values per config and Kendall's tau-b of each proxy against the
fine-tuned drop (1: the same order), and writes both to ``--out`` (JSON). ``--seed`` draws the random configs; the
problem (data split, baseline, evaluator) keeps its default seed, so its cached baseline is reused.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import optuna
import torch
from rich.console import Console
from rich.table import Table
from scipy.stats import kendalltau

from ranksearch.config import CompressionConfig, LayerChoice
from ranksearch.evaluate import ClassificationEvaluator
from ranksearch.models import model_family
from ranksearch.search import default_space_path, uniform_config
from ranksearch.search.knapsack import knapsack_configs
from ranksearch.search.latency_table import variant_key
from ranksearch.search.sensitivity import Sensitivity, float_variants
from ranksearch.study import PreparedSearch, RunSettings
from ranksearch.study.prepared import ANCHORS
from ranksearch.study.problem import load_space
from ranksearch.util import atomic_write_text, file_digest

PROXIES = {
    "sum KL": "summed per-layer KL divergence (2048 images)",
    "sum drop 512": "summed per-layer zero-shot drop, points (512 images)",
    "zero-shot drop": "whole-config zero-shot drop, points (512 images)",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--checkpoint", type=Path, help="trained weights (default: the cached or trained baseline)")
    parser.add_argument("--space", type=Path, help="search space YAML (default: the model's shipped space)")
    parser.add_argument("--configs", type=int, default=24)
    parser.add_argument("--finetune-steps", type=int, default=60)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0, help="draws the random configs")
    parser.add_argument("--results-dir", type=Path, default=Path("results/proxy-correlation"))
    parser.add_argument("--out", type=Path, help="also write the table and the taus to this JSON file")
    args = parser.parse_args()
    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    console = Console()
    space_path = args.space or default_space_path(model_family(args.model))
    settings = RunSettings.of(
        model=args.model,
        checkpoint=args.checkpoint,
        threads=args.threads,
        finetune_steps=args.finetune_steps,
        results_dir=args.results_dir,
        space=space_path,
        space_digest=file_digest(space_path),
    )
    search, _ = PreparedSearch.prepare(
        settings,
        space=load_space(space_path, torch.device(settings.infra.device), console),
        open_study=lambda: optuna.create_study(study_name="proxy-correlation"),
        console=console,
    )
    evaluator, sensitivity = search.evaluator, search.sensitivity
    assert isinstance(evaluator, ClassificationEvaluator) and sensitivity is not None
    seconds = {"prepare": time.perf_counter() - start}
    configs = _configs(search, sensitivity, args.configs, random.Random(args.seed))
    per_layer = _PerLayer(evaluator, sensitivity, rank_multiple=search.rank_multiple)
    cost = search.variant_cost()
    dense_cost = sum(cost(name, LayerChoice("keep")) for name in search.slots)
    zero_shot_baseline, baseline = evaluator.zero_shot_baseline(), search.baseline["accuracy"]
    rows = []
    for i, (label, config) in enumerate(configs.items(), start=1):
        tick = time.perf_counter()
        layers = [(name, choice) for name, choice in config.layers.items() if choice.technique != "keep"]
        row = {
            "config": label,
            "compressed layers": len(layers),
            "layer cost %": 100 * sum(cost(name, choice) for name, choice in config.layers.items()) / dense_cost,
            "sum KL": sum(per_layer.kl(name, choice) for name, choice in layers),
            "sum drop 512": sum(per_layer.drop(name, choice) for name, choice in layers),
        }
        seconds["per-layer proxies"] = seconds.get("per-layer proxies", 0.0) + time.perf_counter() - tick
        tick = time.perf_counter()
        row["zero-shot drop"] = 100 * (zero_shot_baseline - evaluator.zero_shot_accuracy(config))
        seconds["zero-shot"] = seconds.get("zero-shot", 0.0) + time.perf_counter() - tick
        tick = time.perf_counter()
        row["fine-tuned drop"] = 100 * (baseline - evaluator.evaluate(config, split="val").accuracy)
        seconds["fine-tune and measure"] = seconds.get("fine-tune and measure", 0.0) + time.perf_counter() - tick
        rows.append(row)
        console.print(
            f"{i}/{len(configs)} {label}: sum KL {row['sum KL']:.3f}, sum drop {row['sum drop 512']:.1f}, "
            f"zero-shot drop {row['zero-shot drop']:.1f}, fine-tuned drop {row['fine-tuned drop']:.2f}"
        )
    taus = {}
    for proxy in PROXIES:
        tau, p_value = kendalltau([r[proxy] for r in rows], [r["fine-tuned drop"] for r in rows])
        taus[proxy] = {"tau": float(tau), "p_value": float(p_value)}
    seconds["total"] = time.perf_counter() - start
    _print(args, rows, taus, seconds, console)
    if args.out is not None:
        report = {
            "command": " ".join(["python", *sys.argv]),
            "model": args.model,
            "finetune_steps": args.finetune_steps,
            "threads": args.threads,
            "seed": args.seed,
            "baseline_val_accuracy": baseline,
            "zero_shot_baseline": zero_shot_baseline,
            "rows": rows,
            "kendall_tau": taus,
            "seconds": seconds,
        }
        atomic_write_text(args.out, json.dumps(report, indent=2))
        console.print(f"wrote {args.out}")


class _PerLayer:
    """Each layer variant's KL divergence and 512-image zero-shot drop alone, measured once each; the KL divergence
    from the sensitivity pass where it has a finite one."""

    def __init__(self, evaluator: ClassificationEvaluator, sensitivity: Sensitivity, *, rank_multiple: int) -> None:
        self.evaluator = evaluator
        self.sensitivity = sensitivity
        self.rank_multiple = rank_multiple
        self._kl: dict[tuple[str, str], float] = {}
        self._drop: dict[tuple[str, str], float] = {}

    def kl(self, name: str, choice: LayerChoice) -> float:
        key = (name, variant_key(choice))
        if key not in self._kl:
            known = self.sensitivity.penalty(name, choice)
            if known is None or not math.isfinite(known):
                known = self.evaluator.output_divergence(
                    CompressionConfig(layers={name: choice}, rank_multiple=self.rank_multiple)
                ).kl
            self._kl[key] = known
        return self._kl[key]

    def drop(self, name: str, choice: LayerChoice) -> float:
        key = (name, variant_key(choice))
        if key not in self._drop:
            accuracy = self.evaluator.zero_shot_accuracy(
                CompressionConfig(layers={name: choice}, rank_multiple=self.rank_multiple)
            )
            self._drop[key] = 100 * (self.evaluator.zero_shot_baseline() - accuracy)
        return self._drop[key]


def _configs(
    search: PreparedSearch, sensitivity: Sensitivity, count: int, rng: random.Random
) -> dict[str, CompressionConfig]:
    """The first ``count`` distinct configs that compress a layer (the baseline is left out: every proxy puts it
    first) of: the uniform anchors, the knapsack warm starts, the greedy configs, then random configs (as many as
    ``100 * count`` draws find)."""
    slots, multiple, cost = search.slots, search.rank_multiple, search.variant_cost()
    max_drop = search.settings.search.max_zero_shot_drop
    listed = {
        f"uniform {technique}@{fraction}": uniform_config(slots, technique, fraction, rank_multiple=multiple)
        for technique, fraction in ANCHORS
        if technique != "keep"
    }
    starts = knapsack_configs(sensitivity, slots, cost, rank_multiple=multiple, max_drop=max_drop)
    listed |= {f"knapsack, budget {100 * budget:.1f} %": config for budget, config in starts.items()}
    greedy = sensitivity.greedy_configs(slots, cost, rank_multiple=multiple)
    listed |= {f"greedy {level:g} pp": config for level, config in greedy.items()}
    options = {
        name: [c for c in float_variants(slot) if sensitivity.drop(name, c) <= max_drop] or [LayerChoice("keep")]
        for name, slot in slots.items()
    }
    out: dict[str, CompressionConfig] = {}
    for label, config in listed.items():
        if len(out) < count and config not in out.values() and _compresses(config):
            out[label] = config
    for _ in range(100 * count):
        if len(out) == count:
            break
        kept = rng.random()
        layers = {
            name: LayerChoice("keep") if rng.random() < kept else rng.choice(usable) for name, usable in options.items()
        }
        config = CompressionConfig(layers=layers, rank_multiple=multiple)
        if config not in out.values() and _compresses(config):
            out[f"random {len(out)}"] = config
    return out


def _compresses(config: CompressionConfig) -> bool:
    return any(choice.technique != "keep" for choice in config.layers.values())


def _print(
    args: argparse.Namespace,
    rows: list[dict[str, object]],
    taus: dict[str, dict[str, float]],
    seconds: dict[str, float],
    console: Console,
) -> None:
    table = Table(title=f"{args.model}: zero-shot proxies and the drop after {args.finetune_steps} fine-tuning steps")
    for column in rows[0]:
        table.add_column(column, justify="left" if column == "config" else "right")
    for row in rows:
        table.add_row(*(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row.values()))
    console.print(table)
    summary = Table(title=f"Kendall's tau-b against the fine-tuned drop, {len(rows)} configs")
    for column in ("proxy", "what", "tau", "p-value"):
        summary.add_column(column, justify="left" if column in ("proxy", "what") else "right")
    for proxy, what in PROXIES.items():
        summary.add_row(proxy, what, f"{taus[proxy]['tau']:.3f}", f"{taus[proxy]['p_value']:.2g}")
    console.print(summary)
    console.print(", ".join(f"{name} {value:.0f} s" for name, value in seconds.items()))


if __name__ == "__main__":
    main()
