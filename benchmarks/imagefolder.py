"""Image folders streamed from disk: memory against the number of images, and decoding throughput.

    python benchmarks/imagefolder.py [--size 224] [--counts 400 1600] [--workers 0 1 2] [--repeats 3]
    python benchmarks/imagefolder.py --pipeline [--size 224]
    python benchmarks/imagefolder.py --run-memory 2000 20000 [--size 224]

Sample folders are written with ``ranksearch sample-folder`` (Fashion-MNIST upscaled into colour, JPEG); every
measurement runs in a fresh process.

- Default: the folder scan (cold, then cached) and one pass over the training split in batches of 64 with 0, 1 or 2
  decoding processes: the loading process's peak resident memory (its own, without the decoding processes', which
  hold a batch or two each), the images decoded per second (median of the repeats, interleaved) and what the same
  images would take held in memory as uint8 tensors.
- ``--pipeline``: does the loader keep up with fine-tuning? resnet18 distilled at 224 px (the search's fine-tune,
  batch 32, 2 threads) on batches decoded beforehand (what the model consumes), on the streaming loader with the
  default decoding processes (what the pipeline delivers while training shares the cores), and the loader alone.
- ``--run-memory COUNTS``: the peak resident memory of a whole ``ranksearch run`` (resnet18, 224 px, the same
  training and evaluation subsets, budget 2, no screens) on folders of COUNTS images: what grows with the folder is
  the file table, the index lists and the scan.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

CLASSES = 10
BATCH = 64
PIPELINE_BATCH = 32


def measure(folder: Path, workers: int) -> dict[str, float]:
    """In this (fresh) process: scan the folder, then decode one pass over its training split."""
    import torch

    from ranksearch.data import load_dataset, make_loader

    torch.set_num_threads(1)
    start = time.perf_counter()
    splits = load_dataset(f"imagefolder:{folder}", root=folder.parent / "data", loader_workers=workers)
    scan_s = time.perf_counter() - start
    images = 0
    start = time.perf_counter()
    for batch, _ in make_loader(splits.train, batch_size=BATCH, shuffle=True, seed=0):
        images += len(batch)
    decode_s = time.perf_counter() - start
    return {
        "scan_s": scan_s,
        "images": images,
        "images_per_s": images / decode_s,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "side": splits.image_size,
    }


def pipeline(folder: Path, steps: int) -> dict[str, float]:
    """In this (fresh) process: fine-tuning's images/s on decoded batches and on the streaming loader, and the
    loader's images/s alone."""
    import copy
    import itertools

    import torch

    from ranksearch.data import load_dataset, make_loader
    from ranksearch.models import build_model
    from ranksearch.training import finetune

    torch.set_num_threads(2)
    splits = load_dataset(f"imagefolder:{folder}", root=folder.parent / "data")
    student = build_model("resnet18", num_classes=splits.num_classes, in_channels=3, image_size=splits.image_size)
    teacher = copy.deepcopy(student).eval()
    loader = make_loader(splits.train, batch_size=PIPELINE_BATCH, shuffle=True, seed=0)
    decoded = list(itertools.islice(loader, steps + 1))

    def rate(source: object, count: int) -> float:
        start = time.perf_counter()
        finetune(copy.deepcopy(student), teacher, source, device="cpu", steps=count, lr=0.01)  # type: ignore[arg-type]
        return count * PIPELINE_BATCH / (time.perf_counter() - start)

    rate(decoded, 1)  # warm-up: first-call allocations and oneDNN's kernel choice
    consumed = rate(decoded[1:], steps)
    delivered = rate(make_loader(splits.train, batch_size=PIPELINE_BATCH, shuffle=True, seed=1), steps)
    start = time.perf_counter()
    images = sum(
        len(batch)
        for batch, _ in itertools.islice(
            make_loader(splits.train, batch_size=PIPELINE_BATCH, shuffle=True, seed=2), steps
        )
    )
    alone = images / (time.perf_counter() - start)
    workers = getattr(splits.train, "loader_workers", 0)
    return {"consumed": consumed, "delivered": delivered, "loader_alone": alone, "workers": workers}


def run_memory(folder: Path, work: Path) -> dict[str, float]:
    """In this (fresh) process: one ``ranksearch run`` on ``folder`` as a child, its peak resident memory."""
    study = folder.name
    command = [
        *(sys.executable, "-m", "ranksearch.cli", "run", "--model", "resnet18", "--dataset", f"imagefolder:{folder}"),
        *("--budget", "2", "--baseline-epochs", "1", "--finetune-steps", "2", "--batch-size", "16", "--threads", "2"),
        *("--train-subset", "256", "--eval-subset", "128", "--promote-steps", "0", "--final-epochs", "0"),
        *("--no-latency-table", "--no-sensitivity", "--study-name", study, "--results-dir", str(work / "results")),
        *("--data-root", str(work / "data")),
    ]
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    seconds = time.perf_counter() - start
    return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--counts", type=int, nargs="+", default=[400, 1600], help="training images per folder")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pipeline", action="store_true", help="fine-tuning's consumption against the loader")
    parser.add_argument("--steps", type=int, default=8, help="--pipeline: fine-tune steps per measurement")
    parser.add_argument("--run-memory", type=int, nargs="+", metavar="COUNT", help="a whole run's peak memory")
    parser.add_argument("--measure", nargs=2, metavar=("FOLDER", "WORKERS"), help=argparse.SUPPRESS)
    parser.add_argument("--measure-pipeline", metavar="FOLDER", help=argparse.SUPPRESS)
    parser.add_argument("--measure-run", nargs=2, metavar=("FOLDER", "WORK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(Path(args.measure[0]), int(args.measure[1]))))
        return
    if args.measure_pipeline:
        print(json.dumps(pipeline(Path(args.measure_pipeline), args.steps)))
        return
    if args.measure_run:
        print(json.dumps(run_memory(Path(args.measure_run[0]), Path(args.measure_run[1]))))
        return
    from ranksearch.data.sample import write_sample_folder

    work = Path(tempfile.mkdtemp(prefix="imagefolder-bench-"))
    env = {**os.environ, "RANKSEARCH_CACHE_DIR": str(work / "cache")}

    def folder_of(count: int) -> Path:
        folder = work / f"photos-{count}"
        write_sample_folder(
            folder,
            data_root=work / "data",
            size=args.size,
            train_per_class=count // CLASSES,
            test_per_class=max(1, count // CLASSES // 5),
        )
        return folder

    def fresh(*flags: str) -> dict[str, float]:
        done = subprocess.run([sys.executable, __file__, *flags], capture_output=True, text=True, check=True, env=env)
        return json.loads(done.stdout.strip().splitlines()[-1])

    console = Console(width=160)
    if args.pipeline:
        result = fresh("--measure-pipeline", str(folder_of(1600)), "--steps", str(args.steps))
        console.print(
            f"resnet18 fine-tuning at {args.size} px, batch {PIPELINE_BATCH}, 2 threads, {args.steps} steps: "
            f"consumes {result['consumed']:.1f} images/s from decoded batches, reaches {result['delivered']:.1f} "
            f"images/s on the streaming loader ({result['workers']:.0f} decoding process(es)); the loader alone "
            f"delivers {result['loader_alone']:.0f} images/s"
        )
        return
    if args.run_memory:
        table = Table(
            "images in the folder", "peak RSS MB of the run", "run s", title=f"ranksearch run at {args.size} px"
        )
        for count in args.run_memory:
            result = fresh("--measure-run", str(folder_of(count)), str(work))
            table.add_row(
                str(count + max(1, count // CLASSES // 5) * CLASSES),
                f"{result['peak_rss_mb']:.0f}",
                f"{result['seconds']:.0f}",
            )
        console.print(table)
        return
    folders = {count: folder_of(count) for count in args.counts}

    def run(count: int, workers: int) -> dict[str, float]:
        return fresh("--measure", str(folders[count]), str(workers))

    cold = {count: run(count, 0)["scan_s"] for count in args.counts}  # the first scan of each folder
    results: dict[tuple[int, int], list[dict[str, float]]] = {}
    for _ in range(args.repeats):
        for count in args.counts:
            for workers in args.workers:
                results.setdefault((count, workers), []).append(run(count, workers))
    table = Table(
        "images decoded per pass (full batches)",
        "side px",
        "decoding processes",
        "scan s (cold / cached)",
        "peak RSS MB (loading process)",
        "images/s (median, min-max)",
        "in memory as uint8 MB",
        title=f"imagefolder at {args.size} px, batches of {BATCH}, {args.repeats} repeats, torch threads 1",
    )
    for (count, workers), rows in results.items():
        rates = [r["images_per_s"] for r in rows]
        images = int(rows[0]["images"])
        side = int(rows[0]["side"])
        table.add_row(
            str(images),
            str(side),
            str(workers),
            f"{cold[count]:.2f} / {statistics.median(r['scan_s'] for r in rows):.2f}",
            f"{statistics.median(r['peak_rss_mb'] for r in rows):.0f}",
            f"{statistics.median(rates):.0f} ({min(rates):.0f}-{max(rates):.0f})",
            f"{images * 3 * side * side / 1e6:.0f}",
        )
    console.print(table)


if __name__ == "__main__":
    main()
