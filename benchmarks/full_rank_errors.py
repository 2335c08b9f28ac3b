"""Full-rank error of every registered technique against the dense layer it replaces (float64).

    python benchmarks/full_rank_errors.py

Prints, per technique, the worst relative output error over the conformance cases (the same
cases ``tests/test_techniques.py`` checks), and for CP, the error at its break-even rank.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ranksearch as rs
from tests.test_techniques import CASES, full_rank, make_layer, supported


def main() -> None:
    rs.set_default_store(rs.FactorStore())
    print(f"{'technique':<22}{'cases':>6}{'max rel. error':>16}{'median':>12}  exact at full rank")
    for technique in rs.list_techniques():
        errors = []
        for case in CASES:
            layer, x = make_layer(case)
            if not supported(technique, layer):
                continue
            module = rs.compress_layer(layer, technique, full_rank(technique, layer))
            with torch.no_grad():
                errors.append(((module(x) - layer(x)).norm() / layer(x).norm()).item())
        exact = "yes" if rs.get_technique(technique).exact_at_full_rank else "no (CP, break-even rank)"
        median = sorted(errors)[len(errors) // 2]
        print(f"{technique:<22}{len(errors):>6}{max(errors):>16.2e}{median:>12.2e}  {exact}")


if __name__ == "__main__":
    main()
