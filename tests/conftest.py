"""Test-wide settings: tiny tensors run fastest (and steadiest on a busy 2-core machine) on one thread."""

import torch

torch.set_num_threads(1)
