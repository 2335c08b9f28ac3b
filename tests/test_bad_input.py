"""Bad input, answered: every case goes through the real CLI and ends with exit code 2 (130 for Ctrl-C),
one line naming the culprit and the fix, no traceback, and nothing half-written under results/."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import optuna
import pandas as pd
import pytest
import torch
from conftest import require_tool, space_yaml
from optuna.trial import TrialState
from typer.testing import CliRunner

import ranksearch as rs
from ranksearch.cli import app
from ranksearch.models import build_model
from ranksearch.results import load_study

TINY = [
    *("--model", "resnet18", "--train-subset", "512", "--eval-subset", "256", "--baseline-epochs", "1"),
    *("--finetune-steps", "3", "--batch-size", "64", "--calib-batches", "1", "--threads", "1"),
    *("--no-sensitivity", "--no-early-reject"),
    *("--promote-steps", "0", "--final-epochs", "0"),  # bad input is checked without the stages after the budget
]
SPACE = space_yaml(
    layers={"include": ["layer4.*"], "types": ["Conv2d"]},
    techniques={"spatial_conv": ["keep", "svd"], "pointwise_conv": ["keep", "svd"]},
    int8=False,
    data_aware=False,
)
NEXT_TRIAL_S = 120.0
"""How long the Ctrl-C test waits, after the first trial completed, for the next one to start."""
EVALUATORS = """
import ranksearch as rs


class Raises(rs.BaseEvaluator):
    def __init__(self, *, context):
        self.context = context

    def evaluate(self, config, *, split="val"):
        raise ConnectionError("metrics server at 10.0.0.9 refused the connection")


class RaisesOnTrials(Raises):
    def evaluate(self, config, *, split="val"):
        if not config.layers:  # the baseline
            return {"accuracy": 0.9, "latency_ms": 1.0}
        return super().evaluate(config, split=split)


class WrongKeys(Raises):
    def evaluate(self, config, *, split="val"):
        return {"acc": 0.9, "ms": 1.0}
"""


@dataclass(frozen=True)
class Workspace:
    """Shared by the module: the data, the baseline cache (trained once), HOME and the search space."""

    root: Path

    @property
    def env(self) -> dict[str, str]:
        home = self.root / "home"
        return {
            "RANKSEARCH_CACHE_DIR": str(self.root / "cache"),
            "HOME": str(home),
            "XDG_CACHE_HOME": str(home / ".cache"),
            "MPLCONFIGDIR": str(home / "mpl"),
        }

    @property
    def space(self) -> Path:
        return self.root / "tiny.yaml"

    def args(self, results: Path, *extra: str) -> list[str]:
        data = str(self.root / "data")
        return ["run", *TINY, "--space", str(self.space), "--data-root", data, "--results-dir", str(results), *extra]


@dataclass(frozen=True)
class Outcome:
    code: int
    stdout: str
    stderr: str


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    ws = Workspace(tmp_path_factory.mktemp("bad-input"))
    ws.space.write_text(SPACE)
    return ws


def cli(ws: Workspace, *args: str) -> Outcome:
    """``ranksearch ARGS`` in this process."""
    result = CliRunner().invoke(app, list(args), env=ws.env)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # an escaped exception would have printed a traceback
    return Outcome(result.exit_code, result.stdout, result.stderr)


def run(ws: Workspace, results: Path, *extra: str) -> Outcome:
    return cli(ws, *ws.args(results, *extra))


def run_process(ws: Workspace, args: list[str], **popen: object) -> subprocess.Popen[str]:
    """``ranksearch ARGS`` as a child process, the real console script."""
    env = {**os.environ, **ws.env, "PYTHONPATH": str(ws.root)}
    exe = Path(sys.executable).with_name("ranksearch")
    pipe = subprocess.PIPE
    return subprocess.Popen([str(exe), *args], env=env, text=True, stdout=pipe, stderr=pipe, **popen)


def answered(outcome: Outcome, *culprit: str, code: int = 2, alone: bool = True) -> str:
    """The error line, after checking it is one line with the culprit and a fix, the last on stderr, and
    (``alone``) the only one; no traceback anywhere."""
    assert outcome.code == code, outcome
    assert "Traceback" not in outcome.stdout + outcome.stderr, outcome
    lines = outcome.stderr.strip().splitlines()
    assert lines, outcome
    line = lines[-1]
    assert line.startswith("interrupted: " if code == 130 else "error: "), outcome
    assert [x for x in lines if x.startswith(("error:", "interrupted:"))] == [line], outcome
    if alone:
        assert len(lines) == 1, outcome
    assert "; " in line, f"no fix after '; ' in {line!r}"
    for part in culprit:
        assert part in line, f"{part!r} not in {line!r}"
    return line


def assert_nothing_written(results: Path) -> None:
    """No file and no study directory (the writability check may leave the empty results dir itself)."""
    assert not results.exists() or not any(results.iterdir()), sorted(results.rglob("*"))


def assert_empty_study(results: Path) -> None:
    """The study was created, then stopped before its first trial: a sound database and no other file."""
    (directory,) = results.iterdir()
    assert [p.name for p in directory.iterdir() if not p.name.startswith("study.db-")] == ["study.db"]
    assert load_study(directory).trials == []


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file's bytes, and a SQLite database as its rows: opening a database to read it may checkpoint its
    write-ahead log into the file, which changes the bytes of ``study.db`` and its ``-wal``/``-shm`` files but
    not what they hold."""
    files = {}
    for path in sorted(directory.rglob("*")):
        if not path.is_file() or path.name.endswith(("-wal", "-shm")):
            continue
        if path.suffix == ".db":
            with contextlib.closing(sqlite3.connect(path)) as connection:
                files[str(path.relative_to(directory))] = "\n".join(connection.iterdump()).encode()
        else:
            files[str(path.relative_to(directory))] = path.read_bytes()
    return files


@pytest.fixture(scope="module")
def study(ws: Workspace) -> Path:
    """A finished tiny study (it also trains and caches the baseline the other runs reuse)."""
    results = ws.root / "results"
    outcome = run(ws, results, "--budget", "2", "--study-name", "done")
    assert outcome.code == 0, outcome
    return results


# -- options, checked before anything is loaded -------------------------------------------------------


BAD_OPTIONS = [
    (["--model", "resnet1800"], ["'resnet1800'", "did you mean"]),
    (["--dataset", "imagenet22k"], ["'imagenet22k'", "fashion_mnist"]),
    (["--sampler", "bayes"], ["--sampler 'bayes'", "tpe, nsga2, random, gp"]),
    (["--device", "tpu"], ["--device 'tpu'", "use cpu, cuda or mps"]),
    (["--latency-device", "cuda"], ["--latency-device cuda", "use --latency-device cpu"]),
    (["--budget", "0"], ["--budget 0"]),
    (["--budget", "-3"], ["--budget -3"]),
    (["--finetune-steps", "-1"], ["--finetune-steps -1"]),
    (["--threads", "0"], ["--threads 0"]),
    (["--max-accuracy-drop", "-0.5"], ["--max-accuracy-drop -0.5"]),
    (["--val-fraction", "1.5"], ["--val-fraction 1.5"]),
    (["--val-fraction", "0"], ["--val-fraction 0.0"]),
    (["--dataset", "imagefolder:missing/path"], ["missing/path", "imagefolder:PATH"]),
    (["--image-size", "64"], ["--image-size 64", "applies to imagefolder:PATH"]),
    (["--dataset", "imagefolder:x", "--image-size", "0"], ["--image-size 0"]),
    (["--storage", "not-a-url"], ["--storage not-a-url"]),
    (["--evaluator", "nowhere.module:Thing"], ["--evaluator 'nowhere.module:Thing'"]),
    (["--promote-steps", "300,100"], ["--promote-steps '300,100'", "300,1500"]),
    (["--promote-steps", "5", "--promote-fraction", "0"], ["--promote-fraction 0.0"]),
    (["--final-epochs", "-1"], ["--final-epochs -1"]),
    (["--final-epochs", "1", "--final-top", "0"], ["--final-top 0"]),
    (["--final-lr", "-0.1"], ["--final-lr -0.1"]),
    (["--final-feature-weight", "nan"], ["--final-feature-weight nan"]),
]


@pytest.mark.parametrize(("args", "culprit"), BAD_OPTIONS, ids=[" ".join(args) for args, _ in BAD_OPTIONS])
def test_bad_option(ws: Workspace, tmp_path: Path, args: list[str], culprit: list[str]) -> None:
    results = tmp_path / "results"
    answered(run(ws, results, *args), *culprit)
    assert_nothing_written(results)


def test_cuda_without_cuda(ws: Workspace, tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    results = tmp_path / "results"
    answered(run(ws, results, "--device", "cuda"), "--device cuda", "use --device cpu")
    assert_nothing_written(results)


def test_unreachable_storage_fails_fast(ws: Workspace, tmp_path: Path) -> None:
    require_tool("psycopg2")
    results = tmp_path / "results"
    start = time.monotonic()
    outcome = run(ws, results, "--storage", "postgresql+psycopg2://nobody@127.0.0.1:1/x")
    answered(outcome, "--storage postgresql+psycopg2://nobody@127.0.0.1:1/x", "Connection refused", "server is up")
    assert time.monotonic() - start < 30  # before the data and the model are loaded
    assert_nothing_written(results)


def test_storage_without_its_driver(ws: Workspace, tmp_path: Path) -> None:
    if importlib.util.find_spec("psycopg") is not None:
        pytest.skip("psycopg, SQLAlchemy's default PostgreSQL driver, is installed")
    results = tmp_path / "results"
    outcome = run(ws, results, "--storage", "postgresql://nobody@127.0.0.1:1/x")
    answered(outcome, "--storage postgresql://", "no database driver", "'psycopg'", "postgresql+psycopg2://")
    assert_nothing_written(results)


def test_unwritable_results_dir(ws: Workspace, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    answered(run(ws, blocker / "results"), "--results-dir", "a-file", "not writable")
    assert blocker.read_text() == ""


# -- search spaces ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "culprit"),
    [
        ("layers: {include: ['*']}\ntechniques: {spatial_conv: [keep, svd]}\nrankz: [0.5]\n", ["rankz", "'ranks'"]),
        ("techniques: {spatial_conv: [keep, svd]}\nranks: [0.5, 1.5]\n", ["ranks[1]", "1.5", "(0, 1]"]),
        ("techniques: {spatial_conv: []}\nranks: [0.5]\n", ["techniques.spatial_conv", "non-empty"]),
        ("techniques: {spatial_conv: [keep, svdd]}\nranks: [0.5]\n", ["techniques.spatial_conv[1]", "'svdd'"]),
        ("techniques: {spatial_conv: [keep, svd]\nranks: [0.5]\n", ["not valid YAML"]),
        ("layers: {include: ['layer9.*']}\ntechniques: {spatial_conv: [keep, svd]}\nranks: [0.5]\n", ["'layer9.*'"]),
    ],
    ids=["unknown key", "rank above 1.0", "empty technique list", "unknown technique", "invalid YAML", "no layer"],
)
def test_bad_search_space(ws: Workspace, tmp_path: Path, text: str, culprit: list[str]) -> None:
    space = tmp_path / "space.yaml"
    space.write_text(text)
    results = tmp_path / "results"
    answered(run(ws, results, "--space", str(space)), "space.yaml", *culprit)
    assert_nothing_written(results)


# -- checkpoints --------------------------------------------------------------------------------------


def resnet18_state() -> dict[str, torch.Tensor]:
    return build_model("resnet18", num_classes=10, in_channels=1, image_size=28).state_dict()


def test_corrupt_checkpoint(ws: Workspace, tmp_path: Path) -> None:
    checkpoint = tmp_path / "weights.pt"
    torch.save(resnet18_state(), checkpoint)
    checkpoint.write_bytes(checkpoint.read_bytes()[:100_000])  # a truncated copy
    results = tmp_path / "results"
    answered(run(ws, results, "--checkpoint", str(checkpoint)), "weights.pt", "unreadable")
    assert_nothing_written(results)


def test_model_factory_that_raises(ws: Workspace, tmp_path: Path) -> None:
    (tmp_path / "mine.py").write_text(
        "def build(num_classes):\n    raise RuntimeError('weights not found\\nat line 2')\n"
    )
    results = tmp_path / "results"
    outcome = run(ws, results, "--model", f"{tmp_path / 'mine.py'}:build")
    answered(outcome, "mine.py:build", "RuntimeError: weights not found", "fix the factory")
    assert_nothing_written(results)


def test_whole_pickled_model_needs_trust(ws: Workspace, tmp_path: Path) -> None:
    checkpoint = tmp_path / "whole.pt"
    torch.save(build_model("resnet18", num_classes=10, in_channels=1, image_size=28), checkpoint)
    results = tmp_path / "results"
    answered(run(ws, results, "--checkpoint", str(checkpoint)), "whole.pt", "ResNet", "any code", "--trust-checkpoint")
    assert_nothing_written(results)


def test_checkpoint_of_another_architecture(ws: Workspace, tmp_path: Path) -> None:
    checkpoint = tmp_path / "mobilenet.pt"
    torch.save(build_model("mobilenet_v3_small", num_classes=10, in_channels=1, image_size=28).state_dict(), checkpoint)
    results = tmp_path / "results"
    answered(run(ws, results, "--checkpoint", str(checkpoint)), "mobilenet.pt", "does not fit", "--model")
    assert_nothing_written(results)


def test_nan_weights(ws: Workspace, tmp_path: Path) -> None:
    state = resnet18_state()
    state["layer2.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    checkpoint = tmp_path / "nan.pt"
    torch.save(state, checkpoint)
    results = tmp_path / "results"
    answered(run(ws, results, "--checkpoint", str(checkpoint)), "nan.pt", "layer2.0.conv1.weight", "NaN")
    assert_nothing_written(results)


# -- configs for another architecture -----------------------------------------------------------------

MOBILENET_CONFIG = {"layers": {"features.2.block.0.0": {"technique": "svd", "rank": 0.5}}}


def test_config_for_another_architecture_api() -> None:
    model = build_model("resnet18", num_classes=10, in_channels=1, image_size=28)
    with pytest.raises(rs.CompressionError, match=r"'features\.2\.block\.0\.0'.*ResNet"):
        rs.apply_config(model, MOBILENET_CONFIG)


def test_config_for_another_architecture_cli(ws: Workspace, tmp_path: Path) -> None:
    checkpoint = tmp_path / "resnet18.pt"
    torch.save(resnet18_state(), checkpoint)
    model = {"name": "resnet18", "num_classes": 10, "in_channels": 1, "image_size": 28}
    config = tmp_path / "mobilenet-config.json"
    config.write_text(json.dumps({**MOBILENET_CONFIG, "model": model}))
    out = tmp_path / "out" / "compressed.pt"
    outcome = cli(ws, "apply", "--config", str(config), "--checkpoint", str(checkpoint), "--out", str(out))
    answered(outcome, "features.2.block.0.0")
    assert not out.parent.exists() or not any(out.parent.iterdir())


# -- existing studies, evaluators, interrupts, full disks ----------------------------------------------


def test_study_name_clash(ws: Workspace, study: Path) -> None:
    before = snapshot(study)
    outcome = run(ws, study, "--budget", "2", "--study-name", "done", "--finetune-steps", "5")
    answered(outcome, "'done'", "finetune_steps=3, not 5", "--study-name")
    assert snapshot(study) == before


@pytest.fixture
def evaluators(ws: Workspace, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> str:
    """A module of custom evaluators, importable by a fresh name."""
    name = f"evaluators_{request.node.name.replace('-', '_').replace('[', '_').rstrip(']')}"
    (ws.root / f"{name}.py").write_text(EVALUATORS)
    monkeypatch.syspath_prepend(str(ws.root))
    return name


def test_evaluator_that_raises(ws: Workspace, tmp_path: Path, evaluators: str) -> None:
    results = tmp_path / "results"
    outcome = run(ws, results, "--evaluator", f"{evaluators}:Raises")
    answered(outcome, "evaluator Raises failed on the uncompressed model", "ConnectionError", "10.0.0.9", alone=False)
    assert_empty_study(results)


def test_evaluator_that_raises_on_every_trial(ws: Workspace, tmp_path: Path, evaluators: str) -> None:
    results = tmp_path / "results"
    outcome = run(ws, results, "--budget", "3", "--evaluator", f"{evaluators}:RaisesOnTrials")
    answered(outcome, "10 trials failed in a row", "10.0.0.9", alone=False)
    directory = next(results.iterdir())
    study = load_study(directory)
    assert [t.state for t in study.trials] == [TrialState.FAIL] * 10
    trials = pd.read_csv(directory / "trials.csv")
    assert list(trials["state"]) == [t.state.name for t in study.trials]
    assert all("ConnectionError" in reason for reason in trials["fail_reason"][1:])
    assert not list(results.rglob("*.tmp"))


def test_evaluator_with_wrong_keys(ws: Workspace, tmp_path: Path, evaluators: str) -> None:
    results = tmp_path / "results"
    outcome = run(ws, results, "--evaluator", f"{evaluators}:WrongKeys")
    answered(outcome, "evaluator WrongKeys", "['acc', 'ms']", "accuracy", alone=False)
    assert_empty_study(results)


@pytest.mark.timeout(600)  # over its own waits: NEXT_TRIAL_S, then 300 s for the child to stop
def test_ctrl_c_mid_trial_keeps_completed_trials(ws: Workspace, tmp_path: Path, study: Path) -> None:
    results = tmp_path / "results"
    # As at a terminal: a job started in the background of a non-interactive shell (CI) inherits SIGINT ignored.
    default_sigint = functools.partial(signal.signal, signal.SIGINT, signal.SIG_DFL)
    proc = run_process(ws, ws.args(results, "--budget", "50", "--study-name", "interrupted"), preexec_fn=default_sigint)
    lines = []
    for line in proc.stderr:  # a line per completed trial, as stderr is not a terminal
        lines.append(line)
        if line.startswith("trials 1/50"):
            break
    else:
        pytest.fail(f"the run ended before its first trial: {''.join(lines)}")
    storage = f"sqlite:///{results / 'interrupted' / 'study.db'}"
    running: list[int] = []
    deadline = time.monotonic() + NEXT_TRIAL_S
    while not running:  # the next trial has started
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()  # ended by itself (a no-op then), or stuck
            rest = proc.communicate()[1]
            pytest.fail(f"no trial started within {NEXT_TRIAL_S:.0f} s (exit code {proc.returncode}): {rest[-2000:]}")
        time.sleep(0.2)
        trials = optuna.load_study(study_name="interrupted", storage=storage).get_trials(deepcopy=False)
        running = [t.number for t in trials if t.state == TrialState.RUNNING]
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=300)
    answered(Outcome(proc.returncode, stdout, "".join(lines) + stderr), "rerun the same command", code=130, alone=False)
    trials = optuna.load_study(study_name="interrupted", storage=storage).trials
    # The interrupted trial is closed (FAIL), never left running; if Python swallowed the interrupt inside a
    # finalizer, the trial completes and the run stops right after it.
    assert trials[running[0]].state in (TrialState.FAIL, TrialState.COMPLETE)
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    complete = [t.number for t in trials if t.state == TrialState.COMPLETE]
    assert complete and max(complete) <= running[0]
    table = pd.read_csv(results / "interrupted" / "trials.csv")
    assert list(table["trial"]) == [t.number for t in trials]
    assert list(table[table["state"] == "COMPLETE"]["trial"]) == complete
    assert not list(results.rglob("*.tmp"))


def limit_file_size(limit: int) -> Callable[[], None]:
    """For a child process: writes past ``limit`` bytes fail with EFBIG, as on a full disk (SIGXFSZ would kill it)."""

    def limit_in_child() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return limit_in_child


@pytest.mark.timeout(600)  # over its own 300 s wait for the child
def test_disk_full_when_the_study_is_created(ws: Workspace, tmp_path: Path, study: Path) -> None:
    results = tmp_path / "results"
    proc = run_process(ws, ws.args(results, "--budget", "2"), preexec_fn=limit_file_size(16_384))
    stdout, stderr = proc.communicate(timeout=300)
    answered(Outcome(proc.returncode, stdout, stderr), "study.db", "disk I/O error", "has room", alone=False)
    assert_nothing_written(results)


@pytest.mark.timeout(600)  # over its own 300 s wait for the child
def test_disk_full_while_writing_results(ws: Workspace, tmp_path: Path, study: Path) -> None:
    directory = tmp_path / "done"
    shutil.copytree(study / "done", directory)
    before = snapshot(directory)
    proc = run_process(ws, ["plot", str(directory)], preexec_fn=limit_file_size(1_000_000))  # plotly.js is larger
    stdout, stderr = proc.communicate(timeout=300)
    answered(Outcome(proc.returncode, stdout, stderr), "pareto.html", "File too large", "free disk space")
    after = snapshot(directory)
    assert {k: v for k, v in after.items() if k.endswith(".html")} == {
        k: v for k, v in before.items() if k.endswith(".html")
    }
    assert not list(directory.glob(".*.tmp"))
