"""One `sweep launch` per results dir: an exclusive lock file, with stale-lock take-over.

The lock holds the launcher's host, pid and process start time, and is refreshed every few seconds. It is stale when
its process is gone (same host) or its heartbeat is older than STALE_AFTER_S (another host); a stale lock is taken over
with a warning.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from pathlib import Path

import psutil

from .errors import UserError

log = logging.getLogger(__name__)
HEARTBEAT_S = 5.0
STALE_AFTER_S = 60.0


def _me() -> dict:
    p = psutil.Process()
    return {"host": socket.gethostname(), "pid": p.pid, "create_time": p.create_time(), "since": time.time()}


def _alive(info: dict) -> bool:
    if info.get("host") != socket.gethostname():
        return time.time() - float(info.get("heartbeat", 0)) < STALE_AFTER_S
    try:
        p = psutil.Process(int(info["pid"]))
        return abs(p.create_time() - float(info["create_time"])) < 1.0 and p.status() != psutil.STATUS_ZOMBIE
    except (psutil.Error, KeyError, ValueError, TypeError):
        return False


class LaunchLock:
    def __init__(self, root: Path):
        root = Path(root)
        # beside the results dir, not inside it: --fresh moves the dir while the lock is held
        self.path = root.parent / f".{root.name}.launch.lock"
        self.root = root
        self.info = _me()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _write(self, exclusive: bool) -> None:
        data = json.dumps({**self.info, "heartbeat": time.time()}).encode()
        if exclusive:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
        else:
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, self.path)

    def acquire(self) -> "LaunchLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._write(exclusive=True)
        except FileExistsError:
            try:
                other = json.loads(self.path.read_text())
            except (OSError, json.JSONDecodeError):
                other = {}
            if other and _alive(other):
                since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(other.get("since", 0)))
                raise UserError(f"results dir {self.root} is in use by another `sweep launch` (pid {other.get('pid')} "
                                f"on {other.get('host')}, since {since}); wait for it to finish or stop it") from None
            log.warning("taking over a stale lock of %s left by pid %s on %s", self.root, other.get("pid"),
                        other.get("host"))
            self._write(exclusive=False)
        self._thread = threading.Thread(target=self._beat, daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self._write(exclusive=False)
            except OSError:
                pass

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()  # a heartbeat in flight must not re-create the file after it is removed
        try:
            if json.loads(self.path.read_text()).get("pid") == self.info["pid"]:
                self.path.unlink()
        except (OSError, json.JSONDecodeError):
            pass

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def lock_holder(root: Path) -> dict | None:
    """The live launch holding ``root``'s lock, or None (no lock, or a stale one)."""
    path = Path(root).parent / f".{Path(root).name}.launch.lock"
    try:
        info = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return info if _alive(info) else None


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

    def __exit__(self, *exc) -> None:
        self._fcntl.flock(self._fd, self._fcntl.LOCK_UN)
        os.close(self._fd)
