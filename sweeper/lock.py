"""One `sweep launch` per results location: an exclusive lock held by the kernel, and a fencing token.

The lock is an ``flock`` on ``<real parent>/.<real name>.launch.lock``: the path is resolved first, so a symlink or a
relative path to the same folder is the same lock. The kernel holds it exactly as long as the launching process
lives (or until it releases it) and drops it when the process dies: there is no heartbeat and no clock, so a clock
skewed or paused owner never loses a live lock, and a dead owner's lock is never "stale", only free. Taking a free
lock is atomic in the kernel, so two launches can never both win.

The file also records who holds it (host, pid, since) for the message of the launch that is refused. Each
acquisition gets a new random ``token``; the store's commit log makes it the owner (``ResultsStore.take_over``), and
from then on commits under any earlier token count for nothing (docs/store.md): whatever a killed launch's leftover
processes still write is fenced off.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
import uuid
from pathlib import Path

from .errors import UserError

log = logging.getLogger(__name__)


def lock_path(root: str | os.PathLike) -> Path:
    """The lock file of results location ``root``: beside the resolved folder, not inside it (--fresh moves the
    folder while the lock is held)."""
    real = Path(os.path.realpath(Path(root).expanduser()))
    return real.parent / f".{real.name}.launch.lock"


class LaunchLock:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.path = lock_path(root)
        self.token = uuid.uuid4().hex
        self._fd: int | None = None

    def acquire(self) -> "LaunchLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                other = _read_info(fd)
                os.close(fd)
                since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(other.get("since", 0)))
                raise UserError(f"results dir {self.root} is in use by another `sweep launch` (pid "
                                f"{other.get('pid')} on {other.get('host')}, since {since}); wait for it to finish "
                                "or stop it") from None
            try:  # a releasing launch unlinks the file: a lock on that old inode would guard nothing
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        previous = _read_info(fd)
        if previous:  # written by a launch that ended without releasing (killed): the kernel freed its lock
            log.warning("taking over a stale lock of %s left by pid %s on %s (that launch is gone)", self.root,
                        previous.get("pid"), previous.get("host"))
        info = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time(),
                           "token": self.token}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, info, 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)  # empty: the next launch knows this one ended cleanly
            os.unlink(self.path)  # while still locked: nobody can be holding this inode's lock
        except OSError:
            pass
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def _read_info(fd: int) -> dict:
    try:
        data = os.pread(fd, 4096, 0)
        return json.loads(data) if data else {}
    except (OSError, ValueError):
        return {}


def lock_holder(root: Path) -> dict | None:
    """The live launch holding ``root``'s lock, or None."""
    path = lock_path(root)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_info(fd) or {"pid": None, "host": None}
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


class TrialClaim:
    """An exclusive claim on one trial while it runs (flock: released by the kernel if the process dies).

    A worker orphaned by a killed driver may still be running a trial when a relaunch reaches the same trial; the
    relaunch waits for the claim, then finds the trial done in the store instead of running it a second time.
    """

    def __init__(self, root: Path, trial_id: str):
        import fcntl

        self._fcntl = fcntl
        d = Path(root) / ".claims"
        d.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(d / f"{trial_id}.lock", os.O_CREAT | os.O_RDWR, 0o644)

    def __enter__(self) -> "TrialClaim":
        self._fcntl.flock(self._fd, self._fcntl.LOCK_EX)
        return self

    def try_enter(self) -> bool:
        """Take the claim if it is free now (True), without waiting."""
        try:
            self._fcntl.flock(self._fd, self._fcntl.LOCK_EX | self._fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    def __exit__(self, *exc) -> None:
        self._fcntl.flock(self._fd, self._fcntl.LOCK_UN)
        os.close(self._fd)
