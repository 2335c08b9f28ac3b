"""What is cached between runs: the factor store's disk bound (least recently used out) and ``ranksearch cache``."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from ranksearch.cli import app
from ranksearch.techniques.cache import FactorStore

runner = CliRunner()
ENTRY = 64 * 1024  # floats per entry: 256 KiB on disk
DAY_S = 86_400


def factors(value: float) -> dict[str, torch.Tensor]:
    return {"u": torch.full((ENTRY,), float(value))}


def entry_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.pt"))


def test_the_disk_store_stays_under_its_bound_and_keeps_what_was_used(tmp_path: Path) -> None:
    one = entry_size(tmp_path.parent / f"{tmp_path.name}-probe")
    store = FactorStore(directory=tmp_path, disk_max_bytes=5 * one, persist_after_s=0.0)
    for key in range(4):
        store.get(f"k{key}", lambda key=key: factors(key))
        past = time.time() - 1000 + 100 * key  # written long ago, in key order
        os.utime(tmp_path / f"k{key}.pt", (past, past))
    store.clear()
    store.get("k0", lambda: pytest.fail("k0 is on disk"))  # a load marks it used: k1 is now the least recent
    for key in (4, 5):  # the sixth entry passes the bound: down to 80 %, the least recently used first
        store.get(f"k{key}", lambda key=key: factors(key))
        assert entry_bytes(tmp_path) <= 5 * one
    assert {p.stem for p in tmp_path.glob("*.pt")} == {"k0", "k3", "k4", "k5"}


def test_workers_sharing_the_directory_keep_it_near_the_bound(tmp_path: Path) -> None:
    one = entry_size(tmp_path.parent / f"{tmp_path.name}-probe")
    bound = 20 * one
    workers = [FactorStore(directory=tmp_path, disk_max_bytes=bound, persist_after_s=0.0) for _ in range(3)]
    for key in range(60):
        workers[key % 3].get(f"k{key}", lambda key=key: factors(key))
        assert entry_bytes(tmp_path) <= bound * (1 + 3 * FactorStore.RECOUNT_SHARE) + one


def test_an_entry_evicted_by_another_process_is_recomputed(tmp_path: Path) -> None:
    reader = FactorStore(directory=tmp_path, persist_after_s=0.0)
    reader.get("k", lambda: factors(1.0))
    reader.clear()
    (tmp_path / "k.pt").unlink()  # another worker's eviction
    computed = []
    got = reader.get("k", lambda: computed.append(1) or factors(2.0))
    assert computed and float(got["u"][0]) == 2.0


def entry_size(directory: Path) -> int:
    """The on-disk size of one entry, measured by writing one to ``directory``."""
    FactorStore(directory=directory, persist_after_s=0.0).get("probe", lambda: factors(0.0))
    return entry_bytes(directory)


def _cache_tree(root: Path) -> dict[str, Path]:
    """Two factor entries (one unused for 40 days), a baseline, a latency table and a sensitivity pass."""
    files = {
        "old": root / "cache" / "factors" / "old.pt",
        "new": root / "cache" / "factors" / "new.pt",
        "baseline": root / "cache" / "baselines" / "baseline-x.pt",
        "table": root / "results" / "latency-tables" / "latency-cpu.json",
        "sensitivity": root / "results" / "sensitivity" / "sensitivity-kl-x.json",
    }
    for path in files.values():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * 1_000_000)
    stale = time.time() - 40 * DAY_S
    os.utime(files["old"], (stale, stale))
    return files


def cache_cli(root: Path, *args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    env = {"RANKSEARCH_CACHE_DIR": str(root / "cache"), **(env or {})}
    result = runner.invoke(app, ["cache", "--results-dir", str(root / "results"), *args], env=env, terminal_width=250)
    return result.exit_code, result.stdout, result.stderr


def test_cache_shows_every_cache_with_its_size(tmp_path: Path) -> None:
    _cache_tree(tmp_path)
    code, out, _ = cache_cli(tmp_path)
    assert code == 0
    rows = {line.split("│")[1].strip(): line for line in out.splitlines() if line.count("│") == 8}
    assert set(rows) >= {"factors", "baselines", "latency-tables", "sensitivity"}
    assert "2.0 MB" in rows["factors"] and "4 GB" in rows["factors"] and "40.0 days ago" in rows["factors"]
    assert "1.0 MB" in rows["baselines"]


def test_clear_older_than_keeps_what_was_used_recently(tmp_path: Path) -> None:
    files = _cache_tree(tmp_path)
    code, out, _ = cache_cli(tmp_path, "--clear", "--older-than", "30")
    assert code == 0 and "factors: removed 1 files, 1.0 MB" in out, out
    assert [name for name, path in files.items() if not path.exists()] == ["old"]
    code, out, _ = cache_cli(tmp_path, "--clear", "--only", "factors")
    assert code == 0 and not files["new"].exists() and files["baseline"].exists()
    code, out, _ = cache_cli(tmp_path, "--clear")
    assert code == 0 and not any(path.exists() for path in files.values())


def test_clear_removes_what_killed_writers_left(tmp_path: Path) -> None:
    files = _cache_tree(tmp_path)
    stale = files["new"].parent / ".gone.pt.abc.tmp"
    fresh = files["new"].parent / ".writing.pt.def.tmp"
    for path in (stale, fresh):
        path.write_bytes(b"x" * 1000)
    os.utime(stale, (time.time() - 2 * 3600,) * 2)
    code, out, _ = cache_cli(tmp_path, "--clear", "--older-than", "30")
    assert code == 0 and not stale.exists() and fresh.exists(), out  # a write in progress is left alone


def test_trim_to_a_size_removes_the_least_recently_used(tmp_path: Path) -> None:
    files = _cache_tree(tmp_path)
    code, out, _ = cache_cli(tmp_path, "--to-gb", "0.0015", "--only", "factors")
    assert code == 0 and "factors: removed 1 files" in out, out
    assert not files["old"].exists() and files["new"].exists()


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--older-than", "3"], {}, "add --clear"),
        (["--clear", "--only", "weights"], {}, "--only 'weights': no such cache; choose from factors"),
        (["--clear", "--older-than", "-1"], {}, "--older-than -1.0: must be 0 or more days"),
        (["--clear", "--older-than", "nan"], {}, "--older-than nan: must be 0 or more days"),
        (["--to-gb", "inf"], {}, "--to-gb inf: must be 0 or more gigabytes"),
        (["--to-gb", "1", "--clear", "--older-than", "1"], {}, "pass one of them"),
        ([], {"RANKSEARCH_CACHE_MAX_GB": "lots"}, "RANKSEARCH_CACHE_MAX_GB='lots': not a size in GB"),
        ([], {"RANKSEARCH_CACHE_MAX_GB": "inf"}, "RANKSEARCH_CACHE_MAX_GB='inf': not a size in GB"),
    ],
)
def test_bad_cache_options_are_one_line(tmp_path: Path, args: list[str], env: dict[str, str], message: str) -> None:
    files = _cache_tree(tmp_path)
    code, _, err = cache_cli(tmp_path, *args, env=env)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and message in lines[0], err
    assert all(path.exists() for path in files.values())
