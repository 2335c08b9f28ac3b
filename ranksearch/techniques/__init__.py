"""The technique registry: register with :func:`register_technique`, look up by name."""

from __future__ import annotations

from collections.abc import Callable

from ranksearch.errors import CompressionError
from ranksearch.techniques.base import RankSpec, Technique

_REGISTRY: dict[str, Technique] = {}


def register_technique(cls: type[Technique]) -> type[Technique]:
    """Class decorator: make ``cls`` available under ``cls.name``."""
    if cls.name in _REGISTRY:
        raise ValueError(f"technique {cls.name!r} is already registered")
    _REGISTRY[cls.name] = cls()
    return cls


def get_technique(name: str) -> Technique:
    """The registered technique called ``name``."""
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise CompressionError(f"unknown technique {name!r} (known: {known})") from None


def list_techniques(filter: Callable[[Technique], bool] | None = None) -> list[str]:
    """Names of the registered techniques, in registration order."""
    return [name for name, t in _REGISTRY.items() if filter is None or filter(t)]


from ranksearch.techniques import builtin  # noqa: E402,F401  (registers the built-in techniques)

__all__ = ["RankSpec", "Technique", "get_technique", "list_techniques", "register_technique"]
