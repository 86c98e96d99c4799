"""Ctrl-C (SIGINT) during `sweep launch`: one KeyboardInterrupt in the main thread, raised only where Python can
unwind it.

The first SIGINT raises KeyboardInterrupt in the main thread wherever it is (Ray starting, a Tune phase, a write),
so the launch stops, stops its running trials and starts no other; a second leaves at once (exit 130). Installed
whatever SIGINT's inherited disposition: a launch started in the background of a shell script inherits SIGINT
ignored, and `kill -INT` must stop it as Ctrl-C does. (Ray Tune's own handler, which ends a phase quietly so that the
next one starts, is kept off: scheduler.py sets TUNE_DISABLE_SIGINT_HANDLER.)

Some places must not see the exception, so there it waits (re-checked every 20 ms by SIGALRM, at most MAX_WAIT_S)
until the main thread has left them. The launch imports Ray Tune on a second thread while Ray starts
(launch.Background), and a Ctrl-C as Ray started hung a launch for good in 3 launches of 40 before these rules, 0 of
40 after (`benchmarks/sigint_at_start.py`, benchmarks/logs/sigint_at_start.txt):
- the import system's own code: between its acquiring of the interpreter's import lock and the `try` that releases
  it, an exception leaves that lock held by the main thread, and the other thread's next import waits forever;
- the same window in logging's lock helpers (`_acquireLock`, `_releaseLock`, also run around every fork;
  `Handler.acquire`) and `threading.Condition.__enter__`: their lock stays held;
- finalizers (`__del__`, `weakref.finalize`, and what they call) and callbacks that Python calls from C
  (importlib's weakref callback, at-fork hooks, caught by the two rules above): Python prints "Exception ignored"
  and drops the exception, so the launch went on as if no Ctrl-C had come. Python hands what it drops to
  `sys.unraisablehook`: the launch's hook raises a dropped KeyboardInterrupt again 20 ms later, where it can be
  (also seen dropping it: a Cython module's start-up code, in 4 launches of 30 signalled right at "warm workers:",
  which then ran every trial; 0 of 30 with the hook).
  For library code that catches it and carries on, the launch calls :func:`checkpoint` between its steps, which
  raises it then (:func:`take` keeps a waiting one from being raised a second time).
A second Ctrl-C leaves at once, even while the first one's exception waits.
"""
from __future__ import annotations

import os
import signal
import sys
import time

RECHECK_S = 0.02
MAX_WAIT_S = 2.0  # a KeyboardInterrupt waits at most this long (a main thread parked in the import system's lock)
# (file, qualified name) of frames where an exception would leave a lock held by the main thread
_LOCK_WINDOWS = {("logging", "_acquireLock"), ("logging", "_releaseLock"), ("logging", "Handler.acquire"),
                 ("threading", "Condition.__enter__")}
_active: "StopOnSigint | None" = None  # the launch's handler while it is installed


def requested() -> bool:
    """Whether a Ctrl-C came during this launch (even one whose KeyboardInterrupt a callback swallowed)."""
    return _active is not None and _active.at is not None


def take() -> None:
    """The caller raises the Ctrl-C's KeyboardInterrupt itself: one still waiting is not raised again."""
    if _active is not None:
        _active.cancel_waiting()


def checkpoint() -> None:
    """KeyboardInterrupt here if a Ctrl-C came and its exception never reached the launch (see the module's text)."""
    if requested():
        take()
        raise KeyboardInterrupt


def _module_of(code) -> str:
    path = code.co_filename.replace("\\", "/")
    if path.endswith("/logging/__init__.py"):
        return "logging"
    return "threading" if path.endswith("/threading.py") else ""


def _unwindable(frame) -> bool:
    """Whether an exception raised in ``frame`` (the main thread's frame at the signal) reaches the launch's code and
    leaves no lock held."""
    if frame is None:
        return True
    code = frame.f_code
    if code.co_filename.startswith("<frozen importlib"):
        return False
    if (_module_of(code), getattr(code, "co_qualname", code.co_name)) in _LOCK_WINDOWS:
        return False
    while frame is not None:  # in a finalizer, or in what it calls: Python drops the exception where it ends
        if frame.f_code.co_name == "__del__" or getattr(frame.f_code, "co_qualname", "") == "finalize.__call__":
            return False
        frame = frame.f_back
    return True


class StopOnSigint:
    """The launch's SIGINT handler while the ``with`` block runs (cli.launch); SIGINT's and SIGALRM's own after."""

    def __init__(self):
        self.at: float | None = None  # when the first SIGINT came
        self._waiting = False  # its KeyboardInterrupt is waiting for the main thread to leave an unsafe place
        self._previous_int = self._previous_alrm = None
        self._previous_unraisable = sys.unraisablehook

    def __enter__(self) -> "StopOnSigint":
        global _active
        _active = self
        self._previous_int = signal.signal(signal.SIGINT, self._on_sigint)
        self._previous_alrm = signal.signal(signal.SIGALRM, self._on_recheck)
        self._previous_unraisable, sys.unraisablehook = sys.unraisablehook, self._on_unraisable
        return self

    def __exit__(self, *exc) -> None:
        global _active
        # no handler of ours may run halfway through the restore (signal.signal runs pending handlers first)
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGALRM})
        try:
            self.cancel_waiting()
            _active = None
            sys.unraisablehook = self._previous_unraisable
            for signum, previous in ((signal.SIGINT, self._previous_int), (signal.SIGALRM, self._previous_alrm)):
                signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)

    def cancel_waiting(self) -> None:
        if self._waiting:
            self._waiting = False
            signal.setitimer(signal.ITIMER_REAL, 0)

    def _on_sigint(self, signum, frame) -> None:
        if self.at is not None:  # a second Ctrl-C, even while the first's exception waits
            os.write(2, b"sweep: second Ctrl-C: leaving without waiting for the clean-up\n")
            os._exit(130)
        self.at = time.time()
        self._raise_when_unwindable(frame)

    def _on_unraisable(self, unraisable) -> None:
        """Python dropped an exception it could not raise (a finalizer's, a callback's called from C, a Cython
        module's): when it is the Ctrl-C's, raise it again once the main thread is somewhere it can be."""
        if self.at is not None and isinstance(unraisable.exc_value, KeyboardInterrupt):
            self._waiting = True
            signal.setitimer(signal.ITIMER_REAL, RECHECK_S)
            return
        self._previous_unraisable(unraisable)

    def _on_recheck(self, signum, frame) -> None:
        if self._waiting:
            self._raise_when_unwindable(frame)

    def _raise_when_unwindable(self, frame) -> None:
        if not _unwindable(frame) and time.time() - self.at < MAX_WAIT_S:
            self._waiting = True
            signal.setitimer(signal.ITIMER_REAL, RECHECK_S)
            return
        self._waiting = False
        raise KeyboardInterrupt
