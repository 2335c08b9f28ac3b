"""The search spaces shipped with ranksearch: the package data ``ranksearch.search_spaces``.

They live in the repository's top-level ``search_spaces/`` folder, which setuptools installs as that
package (see pyproject.toml), so a wheel carries them and an editable install reads the folder itself.
"""

from __future__ import annotations

import atexit
from contextlib import ExitStack
from importlib import resources
from pathlib import Path

from ranksearch.errors import RanksearchError

__all__ = ["SPACES_PACKAGE", "default_space_path"]

SPACES_PACKAGE = "ranksearch.search_spaces"
SOURCE_TREE = Path(__file__).resolve().parents[2] / "search_spaces"
"""Where the spaces are in a checkout that was never installed (run with ``PYTHONPATH``)."""

_EXTRACTED = ExitStack()
"""Shipped spaces extracted from a zipped package (none from an ordinary install), removed at exit."""
atexit.register(_EXTRACTED.close)


def default_space_path(model_family: str) -> Path:
    """The shipped search space for ``model_family`` (or a model name such as ``resnet18``), else ``default.yaml``.

    The longest family name that ``model_family`` starts with wins. The path is a real file (extracted for
    the life of the process when the package is zipped), so it can be read and digested.
    """
    try:
        spaces = resources.files(SPACES_PACKAGE)
    except ModuleNotFoundError:
        if not SOURCE_TREE.is_dir():
            raise RanksearchError(
                f"the shipped search spaces ({SPACES_PACKAGE}) are not installed; reinstall ranksearch "
                "(`pip install -e .` in a checkout) or pass a search space file explicitly"
            ) from None
        spaces = SOURCE_TREE
    families = [f.name.removesuffix(".yaml") for f in spaces.iterdir() if f.name.endswith(".yaml")]
    family = max(
        (f for f in families if f != "default" and model_family.lower().startswith(f)), key=len, default="default"
    )
    if family not in families:
        raise RanksearchError(
            f"search space {family}.yaml: not found in {SPACES_PACKAGE}; reinstall ranksearch "
            "or pass a search space file explicitly"
        )
    return _EXTRACTED.enter_context(resources.as_file(spaces / f"{family}.yaml"))
