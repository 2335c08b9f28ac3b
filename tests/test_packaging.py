"""The wheel ships the search spaces, a non-editable install finds its default space, and its latency target server
runs without torch (about 15 s)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import sysconfig
import urllib.request
import zipfile
from pathlib import Path

import pytest

from ranksearch.util import file_digest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "setup.py", "README.md", "ranksearch", "search_spaces")

CHECK = """
import json, sys
import ranksearch
from ranksearch.search import SearchSpace, default_space_path
from ranksearch.util import file_digest
path = default_space_path("resnet18")
SearchSpace.load(path)
print(json.dumps({"package": ranksearch.__file__, "space": str(path), "digest": file_digest(path)}))
"""


def run(*args: str | Path, cwd: Path) -> str:
    done = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(map(str, args))} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel built from a copy of the sources (the build writes build/ and *.egg-info beside them)."""
    src, dist = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("dist")
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, src / name)
    pip = (sys.executable, "-m", "pip")
    run(*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index", "-w", dist, src, cwd=src)
    (built,) = dist.glob("ranksearch-*.whl")
    return built


def installed(wheel: Path, tmp_path: Path) -> tuple[Path, Path]:
    """The wheel installed into a fresh venv (not editable): the venv and its site-packages. torch and the other
    dependencies come from this environment, after the venv's own site-packages."""
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    run(
        sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index", wheel, cwd=tmp_path
    )
    site = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path).strip())
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv, site


def test_wheel_contains_every_module_and_search_space(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    spaces = sorted(p.name for p in (ROOT / "search_spaces").glob("*.yaml"))
    assert spaces, "no search spaces in the repository"
    missing = [f"ranksearch/search_spaces/{name}" for name in spaces if f"ranksearch/search_spaces/{name}" not in names]
    modules = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "ranksearch").rglob("*.py"))
    missing += [m for m in modules if m not in names]
    assert not missing, f"the wheel lacks {missing} (a package without __init__.py is left out)"


def test_installed_wheel_finds_its_default_space(wheel: Path, tmp_path: Path) -> None:
    """Installed into a fresh venv (not editable), the package reads the space it ships, not the repository's."""
    venv, site = installed(wheel, tmp_path)
    found = json.loads(run(venv / "bin" / "python", "-c", CHECK, cwd=tmp_path))

    assert Path(found["package"]).is_relative_to(site)
    assert Path(found["space"]) == site / "ranksearch" / "search_spaces" / "resnet.yaml"
    assert found["digest"] == file_digest(ROOT / "search_spaces" / "resnet.yaml")


def test_installed_wheel_serves_a_latency_target_without_torch(wheel: Path, tmp_path: Path) -> None:
    """`ranksearch-target` from the installed wheel, torch and optuna made unimportable (as on a board with only
    onnxruntime and numpy), starts and answers."""
    venv, site = installed(wheel, tmp_path)
    (site / "zz_no_torch.pth").write_text("import sys; sys.modules['torch'] = None; sys.modules['optuna'] = None\n")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [venv / "bin" / "ranksearch-target", "--host", "127.0.0.1", "--port", str(port), "--token", "t"]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        first = server.stdout.readline()  # type: ignore[union-attr]
        assert first.startswith("ranksearch target: onnxruntime"), first + server.communicate(timeout=5)[0]
        request = urllib.request.Request(f"http://127.0.0.1:{port}/info", headers={"Authorization": "Bearer t"})
        with urllib.request.urlopen(request, timeout=30) as answer:
            assert json.loads(answer.read())["server"] == "ranksearch-target"
    finally:
        server.kill()
        server.wait()
