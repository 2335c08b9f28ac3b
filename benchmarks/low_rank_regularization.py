"""Does a nuclear-norm-regularised baseline lose less accuracy at equal rank? Plain vs regularised training.

    python benchmarks/low_rank_regularization.py [--strength 5e-3] [--baseline-epochs N] [--threads 2]

Trains (or loads the cached) default baseline and one trained with the same recipe plus
``NuclearNormPenalty(strength)`` (``ranksearch run --baseline-nuclear-norm``), then for each
technique and fraction applies the same uniform rank to every searchable layer of both, by plain
weight decomposition, and measures validation accuracy after BatchNorm recalibration ("zero-shot")
and after a distillation fine-tune from its own baseline (``--finetune-steps``, the search's default).
"""

from __future__ import annotations

import argparse
import time

import torch
from rich.console import Console
from rich.table import Table

import ranksearch as rs
from ranksearch.data import make_loader
from ranksearch.evaluate import EvaluatorOptions
from ranksearch.models import model_family
from ranksearch.search import SearchSpace, default_space_path, uniform_config
from ranksearch.study import RunSettings, load_problem
from ranksearch.training import evaluate_accuracy, finetune, recalibrate_batchnorm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--strength", type=float, default=5e-3)
    parser.add_argument("--techniques", nargs="+", default=["svd", "tucker2"])
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5])
    parser.add_argument("--baseline-epochs", type=int, help="both baselines' epochs (default: the recipe's)")
    parser.add_argument("--finetune-steps", type=int, default=EvaluatorOptions.finetune_steps)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    console = Console()
    space = SearchSpace.load(default_space_path(model_family(args.model)))
    table = Table(title=f"{args.model}: val accuracy % at equal rank, plain vs nuclear-norm-regularised baseline")
    for column in ("technique", "fraction", "baseline", "base acc", "zero-shot", "drop pp", "fine-tuned", "drop pp"):
        table.add_column(column, justify="left" if column in ("technique", "baseline") else "right")
    baselines = {}
    for strength in (0.0, args.strength):
        settings = RunSettings.of(
            model=args.model, baseline_nuclear_norm=strength, baseline_epochs=args.baseline_epochs
        )
        context = load_problem(settings, torch.device("cpu"), console)
        val = make_loader(context.splits.val, batch_size=256, shuffle=False)
        train = make_loader(context.splits.train, batch_size=settings.evaluation.batch_size, shuffle=True, seed=0)
        accuracy = evaluate_accuracy(context.model, val, device="cpu")
        label = "plain" if strength == 0 else f"nuclear {strength:g}"
        console.print(f"{label}: val accuracy {100 * accuracy:.2f}%")
        baselines[label] = (context, val, train, accuracy, settings)
    for technique in args.techniques:
        for fraction in args.fractions:
            for label, (context, val, train, base, settings) in baselines.items():
                start = time.perf_counter()
                slots = space.layers(context.model, context.input_shapes)
                config = uniform_config(slots, technique, fraction, rank_multiple=space.rank_multiple)
                model = rs.apply_config(context.model, config)
                recalibrate_batchnorm(model, train, device="cpu", batches=settings.evaluation.calib_batches)
                zero_shot = evaluate_accuracy(model, val, device="cpu")
                finetune(
                    model,
                    context.model,
                    train,
                    device="cpu",
                    steps=args.finetune_steps,
                    lr=settings.evaluation.finetune_lr,
                )
                tuned = evaluate_accuracy(model, val, device="cpu")
                table.add_row(
                    technique,
                    f"{fraction:g}",
                    label,
                    f"{100 * base:.2f}",
                    f"{100 * zero_shot:.2f}",
                    f"{100 * (base - zero_shot):.2f}",
                    f"{100 * tuned:.2f}",
                    f"{100 * (base - tuned):.2f}",
                )
                console.log(f"{technique}@{fraction:g} {label}: {time.perf_counter() - start:.0f} s")
    console.print(table)


if __name__ == "__main__":
    main()
