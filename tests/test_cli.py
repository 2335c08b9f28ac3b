"""Bad input on the command line: one line naming the culprit and the fix, exit code 2, nothing written."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ranksearch.cli import app

runner = CliRunner()


def run_cli(tmp_path: Path, *args: str) -> tuple[int, str]:
    results = tmp_path / "results"
    base = ["run", "--results-dir", str(results), "--data-root", str(tmp_path / "data")]
    result = runner.invoke(app, [*base, *args], env={"RANKSEARCH_CACHE_DIR": str(tmp_path / "cache")})
    return result.exit_code, result.stderr


def no_results(tmp_path: Path) -> bool:
    results = tmp_path / "results"
    return not results.exists() or not any(p.is_file() for p in results.rglob("*"))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--budget", "0"], "--budget 0: must be a positive"),
        (["--sampler", "bayes"], "--sampler 'bayes' is unknown; choose one of tpe, nsga2, random, gp"),
        (["--device", "cuda"], "CUDA is not available here; use --device cpu"),
        (["--device", "tpu"], "--device 'tpu'"),
        (["--model", "resnet1800"], "resnet1800"),
        (["--dataset", "imagenet22k"], "imagenet22k"),
        (["--space", "missing.yaml"], "missing.yaml"),
        (["--study-name", "bad name!"], "--study-name 'bad name!'"),
        (["--max-accuracy-drop", "-1"], "--max-accuracy-drop -1.0: must be >= 0"),
        (["--max-zero-shot-drop", "-2"], "--max-zero-shot-drop -2.0: must be >= 0 percentage points"),
        (["--evaluator", "nowhere.module:Thing"], "--evaluator 'nowhere.module:Thing': cannot be loaded"),
        (["--fill-gaps", "--no-sensitivity"], "--fill-gaps: the gaps are filled with the knapsack's configs"),
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    if args[0] == "--device" and args[1] == "cuda":
        pytest.importorskip("torch")
        import torch

        if torch.cuda.is_available():
            pytest.skip("CUDA is available here")
    code, stderr = run_cli(tmp_path, *args)
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], stderr
    assert no_results(tmp_path)


def test_unreadable_checkpoint(tmp_path: Path) -> None:
    checkpoint = tmp_path / "weights.pt"
    checkpoint.write_bytes(b"not a checkpoint")
    code, stderr = run_cli(tmp_path, "--checkpoint", str(checkpoint))
    assert code == 2 and "weights.pt" in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert no_results(tmp_path)


def test_malformed_space(tmp_path: Path) -> None:
    space = tmp_path / "space.yaml"
    space.write_text("techniques:\n  spatial_conv: []\n")
    code, stderr = run_cli(tmp_path, "--space", str(space))
    assert code == 2 and "space.yaml" in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert no_results(tmp_path)


def test_unwritable_results_dir(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = runner.invoke(app, ["run", "--results-dir", str(blocker / "results")])
    assert result.exit_code == 2 and "not writable" in result.stderr and "a-file" in result.stderr


def test_console_script_prints_no_traceback(tmp_path: Path) -> None:
    exe = Path(sys.executable).with_name("ranksearch")
    done = subprocess.run(
        [str(exe), "run", "--budget", "-3", "--results-dir", str(tmp_path / "r")], capture_output=True, text=True
    )
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "error: --budget -3: must be a positive number of completed trials; pass e.g. --budget 50"
    )
    assert "Traceback" not in done.stderr + done.stdout


def test_techniques_lists_the_registry() -> None:
    result = runner.invoke(app, ["techniques"])
    assert result.exit_code == 0
    for name in ("svd", "tucker2", "cp", "spatial_tucker2"):
        assert name in result.stdout


def test_models_lists_names_spaces_and_weights() -> None:
    def rows(*pattern: str) -> dict[str, str]:
        result = runner.invoke(app, ["models", *pattern], terminal_width=200)
        assert result.exit_code == 0, result.output
        return {line.split("│")[1].strip(): line for line in result.stdout.splitlines() if line.count("│") == 4}

    containing = rows("resnet")  # a plain word: the names containing it
    assert {"resnet18", "resnet50", "wide_resnet50_2"} <= set(containing)
    assert "resnet.yaml" in containing["resnet18"] and "IMAGENET1K_V1" in containing["resnet18"]
    assert set(rows("resnet*")) == {n for n in containing if n.startswith("resnet")}  # a glob
    every = runner.invoke(app, ["models"], terminal_width=200).stdout
    assert "mobilenet.yaml" in every and "default.yaml" in every  # a family with no space of its own
    if importlib.util.find_spec("timm") or os.environ.get("CI"):  # the timm extra (CI installs it)
        timm = rows("timm:resnet18")
        assert "resnet.yaml" in timm["timm:resnet18"] and "DEFAULT" in timm["timm:resnet18"]


def test_the_unknown_model_error_points_to_a_command_that_exists() -> None:
    unknown = runner.invoke(app, ["run", "--model", "qqqqqq"])
    assert unknown.exit_code == 2 and "`ranksearch models`" in unknown.stderr, unknown.stderr
    result = runner.invoke(app, ["models", "qqqqqq"])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and "no model matches 'qqqqqq'" in lines[0], result.stderr


def _demo_study(results: Path) -> None:
    """results/demo/study.db holding one COMPLETE two-objective trial."""
    import optuna

    directory = results / "demo"
    directory.mkdir(parents=True)
    storage = f"sqlite:///{directory / 'study.db'}"
    study = optuna.create_study(study_name="demo", storage=storage, directions=["maximize", "minimize"])
    study.add_trial(optuna.trial.create_trial(values=[0.9, 3.0]))


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_dashboard_serves_the_study(tmp_path: Path) -> None:
    import json
    import time
    import urllib.request

    _demo_study(tmp_path / "results")
    port = _free_port()
    exe = Path(sys.executable).with_name("ranksearch")
    args = [str(exe), "dashboard", "demo", "--results-dir", str(tmp_path / "results"), "--port", str(port)]
    server = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline, body = time.monotonic() + 60, None
        while body is None and time.monotonic() < deadline and server.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5) as response:
                    body = json.load(response)
            except OSError:
                time.sleep(0.3)
        assert body is not None, server.stderr.read() if server.poll() is not None else "no answer in 60 s"
        (summary,) = body["study_summaries"]
        assert summary["study_name"] == "demo"
        assert len(summary["directions"]) == 2
    finally:
        server.terminate()
        _, stderr = server.communicate(timeout=30)
    assert f"http://127.0.0.1:{port}/dashboard/studies/" in stderr
    assert "Traceback" not in stderr


def test_dashboard_on_a_taken_port(tmp_path: Path) -> None:
    import socket

    _demo_study(tmp_path / "results")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = runner.invoke(
            app, ["dashboard", "demo", "--results-dir", str(tmp_path / "results"), "--port", str(port)]
        )
    assert result.exit_code == 2, result.output
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: dashboard at 127.0.0.1:") and "pass a free --port" in line, result.stderr


def test_dashboard_of_a_missing_study(tmp_path: Path) -> None:
    result = runner.invoke(app, ["dashboard", "nowhere", "--results-dir", str(tmp_path / "results")])
    assert result.exit_code == 2
    assert result.stderr.strip().startswith("error: study 'nowhere': no study.db"), result.stderr
