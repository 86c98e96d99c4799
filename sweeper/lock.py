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
        self.path = Path(root) / ".launch.lock"
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
                raise UserError(f"results dir {self.path.parent} is in use by another `sweep launch` (pid {other.get('pid')} "
                                f"on {other.get('host')}, since {since}); wait for it to finish or stop it") from None
            log.warning("taking over a stale lock of %s left by pid %s on %s", self.path.parent, other.get("pid"),
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
        try:
            if json.loads(self.path.read_text()).get("pid") == self.info["pid"]:
                self.path.unlink()
        except (OSError, json.JSONDecodeError):
            pass

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
