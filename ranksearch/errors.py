"""Errors a user can fix: each carries a one-line message naming the culprit and the fix."""


class RanksearchError(ValueError):
    """Bad input; the CLI prints the message on one line and exits with code 2."""


class CompressionError(RanksearchError):
    """A layer cannot be compressed as asked."""


class Rejected(Exception):
    """An evaluator's verdict that a config is hopeless before its costly steps; the search prunes the trial.

    ``metrics`` holds what was measured before the verdict (recorded with the trial).
    """

    def __init__(self, reason: str, *, metrics: dict[str, float] | None = None) -> None:
        super().__init__(reason)
        self.metrics = dict(metrics or {})
