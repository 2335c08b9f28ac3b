"""Output approximation vs weight approximation: zero-shot accuracy drop at equal rank on a trained model.

    python benchmarks/data_aware.py [--model resnet18] [--fractions 0.25 0.5] [--threads 2]

Trains (or loads the cached) baseline, then for svd, spatial_svd and tucker2 applies the same
uniform rank to every searchable layer twice, once decomposing the weights and once with
``data_aware=True`` (calibrated on training images), recalibrates BatchNorm and measures the
validation accuracy with no fine-tuning.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch
from rich.console import Console

import ranksearch as rs
from ranksearch.data import make_loader
from ranksearch.models import model_family
from ranksearch.search import SearchSpace, default_space_path, uniform_config
from ranksearch.study import RunSettings, load_problem
from ranksearch.training import evaluate_accuracy, recalibrate_batchnorm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5])
    parser.add_argument("--calib-images", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    console = Console()
    settings = RunSettings.of(model=args.model, eval_subset=5000)
    context = load_problem(settings, torch.device("cpu"), console)
    space = SearchSpace.load(default_space_path(model_family(args.model)))
    slots = space.layers(context.model, context.input_shapes)
    train = make_loader(context.splits.train, batch_size=128, shuffle=True, seed=0)
    batches: list[torch.Tensor] = []
    for images, _ in train:
        batches.append(images)
        if sum(len(b) for b in batches) >= args.calib_images:
            break
    calib = torch.cat(batches)
    val = make_loader(context.splits.val, batch_size=256, shuffle=False)
    base = evaluate_accuracy(context.model, val, device="cpu")
    console.print(f"{args.model}: baseline val accuracy {100 * base:.2f}% ({len(slots)} searchable layers)")
    console.print(f"{'technique':<12}{'fraction':>9}{'plain drop pp':>15}{'data-aware drop pp':>20}{'seconds':>9}")
    for technique in ("svd", "spatial_svd", "tucker2"):
        for fraction in args.fractions:
            drops, start = [], time.perf_counter()
            for data_aware in (False, True):
                config = uniform_config(slots, technique, fraction, rank_multiple=space.rank_multiple)
                layers = {
                    name: replace(choice, data_aware=data_aware and choice.technique != "keep")
                    for name, choice in config.layers.items()
                }
                model = rs.apply_config(context.model, replace(config, layers=layers), calib_inputs=calib)
                recalibrate_batchnorm(model, train, device="cpu", batches=8)
                drops.append(100 * (base - evaluate_accuracy(model, val, device="cpu")))
            seconds = time.perf_counter() - start
            console.print(f"{technique:<12}{fraction:>9}{drops[0]:>15.2f}{drops[1]:>20.2f}{seconds:>9.1f}")


if __name__ == "__main__":
    main()
