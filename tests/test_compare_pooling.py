"""The benchmark's pooling of side-by-side re-timings (``benchmarks/compare.py --pool``): each member's speedup is the
median over the distinct re-timings of it, on one host and target, and a re-timing held by several files counts once."""

from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import asdict, replace
from pathlib import Path
from types import ModuleType

import pytest

COMPARE = Path(__file__).resolve().parents[1] / "benchmarks" / "compare.py"
HOST = "AMD EPYC family 25 model 17"


@pytest.fixture(scope="module")
def compare() -> ModuleType:
    spec = importlib.util.spec_from_file_location("compare_benchmark", COMPARE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module's annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def outcome(compare: ModuleType, method: str, speedups: dict[int, float], **fields: object) -> object:
    front = [
        compare.Point(
            trial=trial,
            speedup=speedup,
            test_accuracy=0.9,
            drop_high_pp=0.5,
            params=1000 + trial,
            macs=2000 + trial,
            searched_accuracy=0.88,
        )
        for trial, speedup in speedups.items()
    ]
    values = {
        "method": method,
        "seed": 0,
        "evaluated": 50,
        "seconds": 100.0,
        "front": front,
        "dense_test_accuracy": 0.92,
        "dense_params": 10_000,
        "dense_macs": 20_000,
        "front_size": len(front),
        "not_faster": 0,
        "host": HOST,
        **fields,
    }
    return compare.Outcome(**values)


def retiming(compare: ModuleType, session: str, speedups: dict[int, float], fastest: float | None, host: str = HOST):
    return compare.Retiming(session=session, host=host, speedups=tuple(speedups.items()), fastest_uniform=fastest)


def test_members_take_the_median_of_their_distinct_retimings(compare: ModuleType) -> None:
    first = retiming(compare, "a", {57: 3.6, 63: 3.0}, 3.8)
    here = outcome(compare, "ranksearch", {57: 3.6, 63: 3.0}, retimings=[first])
    second = retiming(compare, "b", {57: 2.7, 63: 3.3}, 3.4)
    third = retiming(compare, "c", {57: 3.5}, None)  # a re-timing without the uniform sweep, nor trial 63
    elsewhere = retiming(compare, "d", {57: 9.9, 63: 9.9}, 9.9, host="Intel Xeon")
    earlier = [
        outcome(compare, "ranksearch", {57: 2.7, 63: 3.3}, retimings=[first, second]),
        outcome(compare, "ranksearch", {57: 3.5}, retimings=[third, second]),  # the same re-timing in two files
        outcome(compare, "ranksearch", {57: 9.9, 63: 9.9}, retimings=[elsewhere]),
        outcome(compare, "nsga2", {57: 1.0}, retimings=[retiming(compare, "e", {57: 1.0}, 1.0)]),  # another method
    ]
    skipped = compare.pool_retimings([here], earlier, source="earlier.json")
    assert [r.session for r in here.retimings] == ["a", "b", "c"]
    assert {p.trial: p.speedup for p in here.front} == {57: 3.5, 63: pytest.approx(3.15)}
    assert here.fastest_uniform == pytest.approx(3.6)  # the median of the two re-timings that timed the sweep
    assert skipped == ["ranksearch, seed 0: a re-timing on Intel Xeon"]


def test_other_configs_under_the_same_trial_numbers_end_the_run(compare: ModuleType) -> None:
    here = outcome(compare, "ranksearch", {57: 3.6}, retimings=[retiming(compare, "a", {57: 3.6}, None)])
    other = outcome(compare, "ranksearch", {57: 3.0}, retimings=[retiming(compare, "b", {57: 3.0}, None)])
    other.front[0] = replace(other.front[0], macs=1)
    with pytest.raises(SystemExit, match="trials \\[57\\] are other configs there"):
        compare.pool_retimings([here], [other], source="earlier.json")


def test_a_retiming_written_before_retimings_were_recorded_reads_back_as_one(compare: ModuleType) -> None:
    """Files from before the record hold one re-timing's speedups; every method re-timed in that session shares its
    seed and sweep spread, so two methods' copies of it are one re-timing."""
    legacy = []
    for method, speedups in (("ranksearch", {63: 3.62}), ("uniform", {16: 3.82})):
        data = asdict(outcome(compare, method, speedups, fastest_uniform=3.82, extra={"retimed_spread_pct": 20.9}))
        del data["retimings"]
        legacy.append(compare.Outcome.from_json(json.loads(json.dumps(data))))
    sessions = {r.session for o in legacy for r in o.retimings}
    assert len(sessions) == 1
    assert legacy[0].retimings[0].speedup_of(63) == 3.62
    assert legacy[0].retimings[0].fastest_uniform == 3.82
    unretimed = asdict(outcome(compare, "random", {5: 1.4}))
    del unretimed["retimings"]
    assert compare.Outcome.from_json(unretimed).retimings == []
    round_trip = compare.Outcome.from_json(json.loads(json.dumps(asdict(legacy[0]))))
    assert round_trip.retimings == legacy[0].retimings
