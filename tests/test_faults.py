"""A baseline training killed mid-way leaves no cache entry; the next run trains and caches it."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

TRAIN = """
import sys
from pathlib import Path

import torch
from torch import nn

from ranksearch.data import load_dataset
from ranksearch.training import Recipe, train_baseline

torch.set_num_threads(1)
torch.manual_seed(0)
layers = [nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 784, 10)]
model = nn.Sequential(*layers)
splits = load_dataset("fashion_mnist", root=sys.argv[2], train_subset=2048, eval_subset=256)
recipe = Recipe(epochs=4, batch_size=32, lr=0.05)
_, meta = train_baseline(model, splits, recipe, device="cpu", cache_dir=Path(sys.argv[1]), key_parts={"model": "cnn"})
print("cached:", meta["cached"])
"""


def test_baseline_training_killed_mid_way_leaves_no_cache_entry(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    command = [sys.executable, "-c", TRAIN, str(cache), str(tmp_path / "data")]
    training = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in training.stdout:
        if "epoch 1/4" in line:
            training.send_signal(signal.SIGKILL)
            break
    assert training.wait() == -signal.SIGKILL, "training ended before it was killed"
    assert not cache.exists() or not list(cache.iterdir())

    trained = subprocess.run(command, capture_output=True, text=True)
    assert trained.returncode == 0 and "cached: False" in trained.stdout, trained.stdout[-2000:]
    (entry,) = cache.iterdir()
    assert entry.name.startswith("baseline-") and entry.suffix == ".pt"
    reused = subprocess.run(command, capture_output=True, text=True)
    assert reused.returncode == 0 and "cached: True" in reused.stdout, reused.stdout[-2000:]
