"""Ctrl-C (SIGINT) during `sweep launch`: one KeyboardInterrupt in the main thread, raised only where Python can
unwind it.

The first SIGINT raises KeyboardInterrupt in the main thread wherever it is (Ray starting, a Tune phase, a write),
so the launch stops, stops its running trials and starts no other; a second leaves at once (exit 130). Installed
whatever SIGINT's inherited disposition: a launch started in the background of a shell script inherits SIGINT
ignored, and `kill -INT` must stop it as Ctrl-C does. (Ray Tune's own handler, which ends a phase quietly so that the
next one starts, is kept off: scheduler.py sets TUNE_DISABLE_SIGINT_HANDLER.)

Some places must not see the exception, so there it waits (re-checked every 20 ms by SIGALRM) until the main thread
has left them. The launch imports Ray Tune on a second thread while Ray starts (launch.Background), and each of
these, hit by a Ctrl-C as Ray started, hung a launch for good (`benchmarks/sigint_at_start.py`: 3 launches in 40
before this rule, 0 in 40 after; benchmarks/logs/sigint_at_start.txt):
- the import system's own code: between its acquiring of the interpreter's import lock and the `try` that releases
  it, an exception leaves that lock held by the main thread, and the other thread's next import waits forever;
- logging's module lock helpers (`_acquireLock`, `_releaseLock`, also run around every fork): the same with
  logging's lock, which the other thread's next `getLogger` waits for;
- finalizers and callbacks that Python calls from C (`__del__`, importlib's weakref callback, at-fork hooks, as
  the two above were): Python prints "Exception ignored" and drops the exception, so the launch went on as if no
  Ctrl-C had come. A callback of another library can still swallow it: :func:`requested` lets a wait of the launch's
  own see that a Ctrl-C came (launch.Background.result raises it then).
"""
from __future__ import annotations

import os
import signal
import time

RECHECK_S = 0.02
_LOGGING_LOCK = ("_acquireLock", "_releaseLock")
_active: "StopOnSigint | None" = None  # the launch's handler while it is installed


def requested() -> bool:
    """Whether a Ctrl-C came during this launch (even one whose KeyboardInterrupt a callback swallowed)."""
    return _active is not None and _active.at is not None


def _unwindable(frame) -> bool:
    """Whether an exception raised in ``frame`` (the main thread's frame at the signal) reaches the launch's code and
    leaves no lock held."""
    if frame is None:
        return True
    code = frame.f_code
    if code.co_filename.startswith("<frozen importlib") or code.co_name == "__del__":
        return False
    return not (code.co_name in _LOGGING_LOCK and code.co_filename.endswith(("logging/__init__.py",
                                                                             "logging\\__init__.py")))


class StopOnSigint:
    """The launch's SIGINT handler while the ``with`` block runs (cli.launch); SIGINT's and SIGALRM's own after."""

    def __init__(self):
        self.at: float | None = None  # when the first SIGINT came
        self._waiting = False  # its KeyboardInterrupt is waiting for the main thread to leave an unsafe place
        self._previous_int = self._previous_alrm = None

    def __enter__(self) -> "StopOnSigint":
        global _active
        _active = self
        self._previous_int = signal.signal(signal.SIGINT, self._on_sigint)
        self._previous_alrm = signal.signal(signal.SIGALRM, self._on_recheck)
        return self

    def __exit__(self, *exc) -> None:
        global _active
        _active = None
        signal.setitimer(signal.ITIMER_REAL, 0)
        for signum, previous in ((signal.SIGINT, self._previous_int), (signal.SIGALRM, self._previous_alrm)):
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)

    def _on_sigint(self, signum, frame) -> None:
        if self.at is not None and not self._waiting:
            os.write(2, b"sweep: second Ctrl-C: leaving without waiting for the clean-up\n")
            os._exit(130)
        if self.at is None:
            self.at = time.time()
        self._raise_when_unwindable(frame)

    def _on_recheck(self, signum, frame) -> None:
        if self._waiting:
            self._raise_when_unwindable(frame)

    def _raise_when_unwindable(self, frame) -> None:
        if not _unwindable(frame):
            self._waiting = True
            signal.setitimer(signal.ITIMER_REAL, RECHECK_S)
            return
        self._waiting = False
        raise KeyboardInterrupt
