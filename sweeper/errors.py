"""Errors the user can fix: the CLI prints them as one line and exits 2 (no traceback unless --debug)."""


class UserError(Exception):
    """Bad input (study file, CLI option, results dir). The message names the input and what is allowed."""


class StageError(Exception):
    """A trial stage failed for a reason that belongs in the trial row (not a bug in sweeper)."""

    def __init__(self, message: str, error_type: str | None = None):
        super().__init__(message)
        self.error_type = error_type or type(self).__name__


class WarmWorkerDied(RuntimeError):
    """The warm worker running a trial ended before it answered (the trial's row was not written); Tune retries the
    trial as it does when its own worker process dies."""
