"""The cluster recipes in docs/recipes/: valid shell and YAML, and every ranksearch option they pass exists."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from ranksearch.cli import app

RECIPES = Path(__file__).parent.parent / "docs" / "recipes"


def options_of(command: str) -> set[str]:
    """The ``--options`` a ranksearch command's --help lists."""
    shown = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert shown.exit_code == 0, shown.output
    return set(re.findall(r"--[a-z][a-z-]*", shown.output))


def test_the_slurm_recipe_is_valid_bash_with_known_options() -> None:
    script = RECIPES / "slurm-workers.sh"
    if shutil.which("bash") is None:
        pytest.skip("no bash here")
    checked = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    text = script.read_text()
    assert "#SBATCH --array=" in text
    worker = text[text.index("srun ranksearch worker") :]
    assert set(re.findall(r"--[a-z][a-z-]*", worker)) <= options_of("worker")


def test_the_kubernetes_recipe_is_a_server_a_service_and_a_job_with_known_options() -> None:
    documents = list(yaml.safe_load_all((RECIPES / "kubernetes-workers.yaml").read_text()))
    assert [d["kind"] for d in documents] == ["Deployment", "Service", "Job"]
    server, service, job = documents
    serve = server["spec"]["template"]["spec"]["containers"][0]["command"]
    assert serve[:2] == ["ranksearch", "serve-storage"]
    assert {a for a in serve if a.startswith("--")} <= options_of("serve-storage")
    worker = job["spec"]["template"]["spec"]["containers"][0]["command"]
    assert worker[:2] == ["ranksearch", "worker"]
    assert {a for a in worker if a.startswith("--")} <= options_of("worker")
    port = service["spec"]["ports"][0]["port"]
    assert f"grpc://{service['metadata']['name']}:{port}" in worker
    assert server["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]
