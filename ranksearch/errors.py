"""Errors a user can fix: each carries a one-line message naming the culprit and the fix."""


class RanksearchError(ValueError):
    """Bad input; the CLI prints the message on one line and exits with code 2."""


class CompressionError(RanksearchError):
    """A layer cannot be compressed as asked."""
