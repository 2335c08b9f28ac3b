"""Train a baseline with a recipe (default: DEFAULT_RECIPE) and print epochs, time per epoch, val and test accuracy.

python benchmarks/baseline_recipe.py                      # resnet18 on Fashion-MNIST, 2 threads
python benchmarks/baseline_recipe.py --epochs 2 --lr 0.1   # override recipe fields
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time
from pathlib import Path

import torch

from ranksearch.compress import dense_model_cost
from ranksearch.data import load_dataset
from ranksearch.models import build_model
from ranksearch.training import DEFAULT_RECIPE, train_baseline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--dataset", default="fashion_mnist")
    parser.add_argument("--data-root", default=str(Path.home() / ".cache" / "ranksearch" / "data"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--train-subset", type=int, default=None)
    for field in dataclasses.fields(DEFAULT_RECIPE):
        default = getattr(DEFAULT_RECIPE, field.name)
        flag = f"--{field.name.replace('_', '-')}"
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        else:
            parser.add_argument(flag, type=type(default), default=default)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    recipe = dataclasses.replace(
        DEFAULT_RECIPE, **{f.name: getattr(args, f.name) for f in dataclasses.fields(DEFAULT_RECIPE)}
    )

    splits = load_dataset(args.dataset, root=args.data_root, train_subset=args.train_subset)
    model = build_model(
        args.model, num_classes=splits.num_classes, in_channels=splits.in_channels, image_size=splits.image_size
    )
    example = torch.zeros(1, splits.in_channels, splits.image_size, splits.image_size)
    macs = dense_model_cost(model, example).macs
    print(f"model {args.model}: {macs / 1e6:.1f} MMACs/image; {args.dataset}: {len(splits.train)} train images")
    print(f"recipe {recipe}")
    started, cpu_started = time.perf_counter(), time.process_time()
    with tempfile.TemporaryDirectory() as cache:
        _, meta = train_baseline(
            model, splits, recipe, device="cpu", cache_dir=Path(cache), key_parts={"model": args.model}
        )
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    for row in meta["history"]:
        print(f"epoch {row['epoch']}: loss {row['loss']:.4f}  val acc {row['val_accuracy']:.4f}")
    per_epoch = meta["train_time_s"] / recipe.epochs
    print(
        f"epochs {recipe.epochs}  time/epoch {per_epoch:.1f} s  train time {meta['train_time_s']:.1f} s  "
        f"wall {wall:.1f} s  val acc {meta['val_accuracy']:.4f}  test acc {meta['test_accuracy']:.4f}"
    )
    print(f"process CPU time {cpu:.1f} s over {wall:.1f} s wall with {args.threads} thread(s)")
    print("load average (1/5/15 min): {:.2f} {:.2f} {:.2f}; CPUs: {}".format(*os.getloadavg(), os.cpu_count()))


if __name__ == "__main__":
    main()
