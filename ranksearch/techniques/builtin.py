"""Importing this module registers the built-in techniques."""

from ranksearch.techniques import matrix, tensor

__all__ = ["matrix", "tensor"]
