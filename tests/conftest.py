"""What every test shares: one thread for tiny tensors, a fresh factor store per test, the tiny problem (its
search space, its settings, one baseline trained per session and one finished search the read-only tests share),
and the tools and optional packages some tests need (skipped when missing here, a failure under CI).

Test modules import the helpers by name (``from conftest import require_tool, space_yaml, tiny_settings``); the
fixtures are requested by name or apply by themselves.
"""

from __future__ import annotations

import importlib.util
import io
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import yaml
from pgcluster import postgres_bindir
from rich.console import Console

import ranksearch as rs
from ranksearch.data import load_dataset
from ranksearch.evaluate import ClassificationEvaluator, EvaluatorOptions
from ranksearch.models import build_model, load_checkpoint
from ranksearch.study import RunSettings, SearchResult, run_search

os.environ.pop("COLUMNS", None)  # pytest-xdist's workers get COLUMNS=80: print as wide as a plain run (160 when piped)
torch.set_num_threads(1)  # tiny tensors run fastest (and steadiest on a busy 2-core machine) on one thread
rs.set_default_store(rs.FactorStore())  # module-scoped fixtures run before factor_store: never the user's cache either


@pytest.fixture(autouse=True)
def factor_store() -> rs.FactorStore:
    """A fresh in-memory factor store for each test: no factors carried over from another test, none written to
    the user's cache. Request it by name to read its hit and miss counts."""
    store = rs.FactorStore()
    rs.set_default_store(store)
    return store


# -- running in parallel (pytest-xdist: `make test` runs `pytest -n 2 --dist loadscope`) ----------------------------

SHARED_SEARCH_MODULES = frozenset({"test_export", "test_front", "test_plots", "test_promotion", "test_report"})
"""The modules that read the session's one tiny search (:func:`tiny_search`): one group, so it runs once."""

LONGEST_FIRST = ("test_workers", "tiny search", "test_study", "test_deploy", "test_bad_input", "test_legacy")
"""The groups that take longest on one core, started first so that neither worker is left alone with one at the end."""


def _parallel_group(module_path: str) -> str:
    """The group a test module's path (``tests/test_x.py``) runs in: its own, or the tiny search's."""
    module = Path(module_path).stem
    return "tiny search" if module in SHARED_SEARCH_MODULES else module


@pytest.hookimpl(optionalhook=True)  # a plain run (`-p no:xdist`) has no such hook
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """pytest-xdist's scheduling by module (``--dist loadscope``), with the modules of the tiny search one unit: each
    unit runs whole in one worker, so its module fixtures (and the session's tiny search) are built once. (xdist's
    own ``xdist_group`` marks went unheeded with pytest 9.2 and xdist 3.8: the tests of one group ran on both.)"""
    from xdist.scheduler import LoadScopeScheduling

    class ModuleGroups(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _parallel_group(nodeid.split("::", 1)[0])

    return ModuleGroups(config, log)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A test of the shared tiny search may be the one that runs it: 900 s. On a pytest-xdist worker the longest
    groups come first (the scheduler hands out units in this order); a plain run keeps its order."""
    for item in items:
        if "tiny_search" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.timeout(900))  # after the test's own marks: one of its own still wins
    if not hasattr(config, "workerinput"):
        return
    order = {group: rank for rank, group in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: order.get(_parallel_group(str(item.path)), len(order)))


# -- the tiny problem's search space --------------------------------------------------------------------------------

TINY_SPACE: dict[str, object] = {
    "layers": {"include": ["layer*"], "types": ["Conv2d"]},
    "techniques": {"spatial_conv": ["keep", "svd", "tucker2", "spatial_svd"], "pointwise_conv": ["keep", "svd"]},
    "ranks": [0.25, 0.5],
    "int8": True,
    "data_aware": True,
}
"""The search space of the tiny search (ResNet-18 on a Fashion-MNIST subset) that the end-to-end tests run."""


TRAINED = Path(__file__).parent / "fixtures" / "legacy"
"""A small CNN with trained weights (the legacy fixture's)."""


def trained_tiny_evaluator(
    options: EvaluatorOptions,
    *,
    latency_device: torch.device | None = None,
    wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
) -> ClassificationEvaluator:
    """The trained tiny CNN (``wrap``-ped, if given) in the built-in evaluator on 512 Fashion-MNIST training images,
    on CPU with one thread, timed on ``latency_device``."""
    splits = load_dataset(
        "fashion_mnist", root=Path("data"), val_fraction=0.1, seed=0, train_subset=512, eval_subset=256
    )
    model = build_model(f"{TRAINED / 'tinynet.py'}:tiny", num_classes=10, in_channels=1, image_size=28)
    model = load_checkpoint(model, TRAINED / "tiny.pt")
    return ClassificationEvaluator(
        model=model if wrap is None else wrap(model),
        splits=splits,
        device=torch.device("cpu"),
        latency_device=latency_device,
        options=options,
        threads=1,
    )


def convnet(width: int) -> torch.nn.Module:
    """A small seeded CNN on 3-channel images whose middle conv has ``width`` channels in and out: nets of two widths
    differ in MACs by the square of their ratio (what latency backends must time as faster)."""
    torch.manual_seed(0)
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(width, 10),
    ).eval()


def space_yaml(**changes: object) -> str:
    """:data:`TINY_SPACE` as a search-space YAML file's text, with the top-level keys in ``changes`` replaced."""
    unknown = set(changes) - set(TINY_SPACE)
    assert not unknown, f"not a top-level key of the tiny space: {sorted(unknown)}"
    return yaml.safe_dump({**TINY_SPACE, **changes}, sort_keys=False)


def tiny_settings(workdir: Path, *, space_text: str | None = None, **changes: object) -> RunSettings:
    """The tiny problem's settings (ResNet-18, a 512-image Fashion-MNIST subset, a 1-epoch baseline, 3 fine-tuning
    steps, 7 trials: the 5 anchors and 2 sampled; promotion rungs of 6 and 12 steps for half of each rung; one
    recovery epoch for 2 front members), its space (``space_text``, default :func:`space_yaml`) and results under
    ``workdir``, with ``changes``."""
    space = workdir / "tiny.yaml"
    space.write_text(space_text or space_yaml())
    values: dict[str, object] = dict(
        model="resnet18",
        budget=7,
        space=space,
        train_subset=512,
        eval_subset=256,
        baseline_epochs=1,
        finetune_steps=3,
        promote_steps="6,12",
        promote_fraction=0.5,
        final_epochs=1,
        final_top=2,
        sensitivity=False,
        early_reject=False,
        batch_size=64,
        calib_batches=1,
        threads=1,
        fold_batchnorm=False,  # timed as trained, as the tiny search's expectations were set; folding: test_deployed
        results_dir=workdir / "results",
        data_root=workdir / "data",
        seed=0,
    )
    return RunSettings.of(**{**values, **changes})


LEGACY = Path(__file__).parent / "fixtures" / "legacy"
"""A study, trained weights and trial table written by the previous release (see its make_fixture.py)."""


@pytest.fixture
def legacy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A copy of the legacy fixture folder as the working directory (its stored paths are relative)."""
    folder = tmp_path / "legacy"
    shutil.copytree(LEGACY, folder, ignore=shutil.ignore_patterns("__pycache__", "make_fixture.py"))
    monkeypatch.chdir(folder)
    monkeypatch.setenv("RANKSEARCH_CACHE_DIR", str(tmp_path / "cache"))
    yield folder


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's ``RANKSEARCH_CACHE_DIR`` for the tiny problem: its baseline is trained once and reused."""
    return tmp_path_factory.mktemp("tiny-cache")


TINY_SEARCH_DROP = 30.0
"""The shared tiny search's accuracy constraint (points)."""


@pytest.fixture(scope="session")
def tiny_search(
    tmp_path_factory: pytest.TempPathFactory, tiny_cache: Path
) -> Iterator[tuple[RunSettings, SearchResult]]:
    """One finished tiny search with an accuracy constraint of 30 points and its settings, shared by the tests that
    only read a study: rows, show, export, plots, report. Tests that change a study run their own. Its baseline is
    barely trained (about 35 % accuracy), so 3-step fine-tunes drop 5 to 20 points, host by host: a tighter
    constraint left no feasible trial to promote on some hosts."""
    settings = tiny_settings(
        tmp_path_factory.mktemp("tiny-search"), max_accuracy_drop=TINY_SEARCH_DROP, study_name="tiny"
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RANKSEARCH_CACHE_DIR", str(tiny_cache))
        rs.set_default_store(rs.FactorStore())
        yield settings, run_search(settings, console=Console(file=io.StringIO()))


# -- tools and optional packages: a skip where they are missing, a failure under CI, which must provide them --------

CHROMIUM = Path("/usr/bin/chromium")
"""The headless browser the HTML report is rendered in (``apt-get install chromium``)."""


def _python_package(module: str, install: str) -> Callable[[], str | None]:
    return lambda: None if importlib.util.find_spec(module) else f"the Python package {module} is missing ({install})"


def _postgresql_server() -> str | None:
    if postgres_bindir() is None:
        return "the PostgreSQL server is not installed (apt-get install postgresql)"
    return None


def _chromium_binary() -> str | None:
    return None if CHROMIUM.exists() else f"{CHROMIUM} is missing (apt-get install chromium)"


_PSYCOPG2 = _python_package("psycopg2", "pip install -e '.[dist]'")
TOOLS: dict[str, tuple[Callable[[], str | None], ...]] = {
    "psycopg2": (_PSYCOPG2,),
    "postgresql": (_postgresql_server, _PSYCOPG2),
    "chromium": (_python_package("playwright", "pip install -e '.[dev]'"), _chromium_binary),
    "tensorly": (_python_package("tensorly", "pip install -e '.[dev]'"),),
    "timm": (_python_package("timm", "pip install -e '.[timm]'"),),
}
"""What each tool needs: checks that return why it is missing, or None."""


def under_ci() -> bool:
    """Whether the tests run under CI (``CI=true``, as CI services set it)."""
    return os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}


def require_tool(name: str) -> None:
    """Skip the calling test (or fixture) when tool ``name`` (a key of :data:`TOOLS`) is missing, except under CI,
    where a missing tool fails the test: CI installs every tool the tests need (``make test``)."""
    for check in TOOLS[name]:
        reason = check()
        if reason is None:
            continue
        if under_ci():
            pytest.fail(f"{name}: {reason}; CI must provide it", pytrace=False)
        pytest.skip(f"{name}: {reason}")
