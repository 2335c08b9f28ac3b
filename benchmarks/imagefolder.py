"""Image folders streamed from disk: memory against the number of images, and decoding throughput by worker count.

    python benchmarks/imagefolder.py [--size 224] [--counts 400 1600] [--workers 0 1 2] [--repeats 3]

For each folder size, a sample folder (``ranksearch sample-folder``, Fashion-MNIST upscaled into colour, JPEG) is
written, then each measurement runs in a fresh process: the folder scan (cold, then cached), and one pass over the
training split in batches of 64 with 0, 1 or 2 decoding processes. Prints the loading process's peak resident
memory (its own, without the decoding processes', which hold one batch each), the images decoded per second
(median of the repeats, interleaved) and what the same images would take held in memory as uint8 tensors.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--counts", type=int, nargs="+", default=[400, 1600], help="training images per folder")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--measure", nargs=2, metavar=("FOLDER", "WORKERS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(Path(args.measure[0]), int(args.measure[1]))))
        return
    from ranksearch.data.sample import write_sample_folder

    work = Path(tempfile.mkdtemp(prefix="imagefolder-bench-"))
    env = {**os.environ, "RANKSEARCH_CACHE_DIR": str(work / "cache")}
    folders = {}
    for count in args.counts:
        folder = work / f"photos-{count}"
        write_sample_folder(
            folder,
            data_root=work / "data",
            size=args.size,
            train_per_class=count // CLASSES,
            test_per_class=max(1, count // CLASSES // 5),
        )
        folders[count] = folder

    def run(count: int, workers: int) -> dict[str, float]:
        command = [sys.executable, __file__, "--measure", str(folders[count]), str(workers)]
        done = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
        return json.loads(done.stdout.strip().splitlines()[-1])

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
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
