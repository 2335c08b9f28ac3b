"""The package list, which pyproject.toml cannot express: every ``ranksearch`` package found on disk, plus the
top-level ``search_spaces/`` folder shipped as ``ranksearch.search_spaces`` (mapped in pyproject.toml)."""

from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["ranksearch*"]), "ranksearch.search_spaces"])
