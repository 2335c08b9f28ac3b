"""Errors by consequence: a user error stops, a trial failure fails one trial, a rejection prunes one trial.

- :class:`RanksearchError` (alias :data:`UserError`): bad input the user can fix. The message is one line naming
  the culprit and the fix; the CLI prints it and exits with code 2, and a search stops.
- :class:`TrialFailure`: one configuration cannot be evaluated. Inside a search that trial fails with the
  message as its reason and the search goes on (so does any other exception an evaluator raises).
- :class:`Rejected`: a configuration judged hopeless before its costly steps; the trial is pruned with its reason.
"""

from __future__ import annotations


class RanksearchError(ValueError):
    """Bad input; the CLI prints the message on one line and exits with code 2, and a search stops."""


UserError = RanksearchError


class TrialFailure(Exception):
    """One configuration cannot be evaluated: inside a search its trial fails with this reason, the search goes on."""


class CompressionError(TrialFailure, ValueError):
    """A layer cannot be compressed as asked.

    Inside a search the trial fails; outside one (``apply``, ``export``, the Python API) the config is the user's
    input, and the CLI reports it on one line like a :class:`RanksearchError`.
    """


USER_ERRORS: tuple[type[Exception], ...] = (RanksearchError, CompressionError)
"""What the CLI reports on one line with exit code 2 when it reaches the top."""


class Rejected(Exception):
    """An evaluator's verdict that a config is hopeless before its costly steps; the search prunes the trial.

    ``metrics`` holds what was measured before the verdict (recorded with the trial).
    """

    def __init__(self, reason: str, *, metrics: dict[str, float] | None = None) -> None:
        super().__init__(reason)
        self.metrics = dict(metrics or {})
