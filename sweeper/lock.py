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
from .location import is_uri, open_location

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


def lock_holder(root: Path | str) -> dict | None:
    """The live launch holding ``root``'s lock, or None (for a URI: the lease's holder unless it was released; whether
    it is still alive shows only by watching it, which ``sweep status`` does not)."""
    if is_uri(root):
        got = open_location(root).get_with_etag(LeaseLock.NAME)
        info = _parse(got[0]) if got else {}
        return None if not info or info.get("released") else info
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


def _parse(data: bytes) -> dict:
    try:
        info = json.loads(data)
        return info if isinstance(info, dict) else {}
    except ValueError:
        return {}


def stale_after_s() -> float:
    return float(os.environ.get("SWEEPER_LEASE_STALE_S", "30"))


class LeaseLock:
    """One launch per object-store location: a lease object ``<location>/_lock.json`` (docs/store.md).

    The owner rewrites it every ``stale_after_s() / 6`` seconds (a beat counter, so every version has a new ETag),
    each time conditionally on the ETag it wrote last (``If-Match``): a rewrite that fails means another launch took
    the lease. A launch that finds it held watches it: if it changes, its holder is alive and this launch is refused
    (exit 2, naming the holder); if it stays unchanged for ``stale_after_s()`` on this launch's own monotonic clock
    (two hosts' clocks are never compared), the holder is taken to be gone and the lease is taken by a write
    conditional on that unchanged ETag, which only one taker can win. A released lease is taken at once. The new
    owner's ``owner`` commit then fences the old one's token (ResultsStore.take_over), so an owner that was only
    paused cannot make anything visible after it resumes."""

    NAME = "_lock.json"

    def __init__(self, root: str):
        self.loc = open_location(root)
        self.root = self.loc.root
        self.token = uuid.uuid4().hex
        self._etag: str | None = None
        self._beat = 0
        self._stop = None
        self._thread = None
        self.lost = False

    def _body(self, released: bool = False) -> bytes:
        self._beat += 1
        return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": self._since,
                           "token": self.token, "beat": self._beat, "released": released}).encode()

    def acquire(self, heartbeat: bool = True) -> "LeaseLock":
        import threading

        self._since = time.time()
        seen, seen_at = None, None
        self.loc.check_conditional_writes()  # before anything relies on them
        try:
            while True:
                got = self.loc.get_with_etag(self.NAME)
                if got is None:
                    etag = self.loc.put_if(self.NAME, self._body(), None)
                else:
                    data, tag = got
                    info = _parse(data)
                    if info and not info.get("released"):
                        now = time.monotonic()
                        if seen is not None and tag != seen:  # it moved: its holder is alive
                            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("since", 0)))
                            raise UserError(f"results location {self.root} is in use by another `sweep launch` "
                                            f"(pid {info.get('pid')} on {info.get('host')}, since {since}); wait for "
                                            "it to finish or stop it")
                        if seen is None:
                            seen, seen_at = tag, now
                        if now - seen_at < stale_after_s():
                            time.sleep(min(1.0, stale_after_s() / 10))
                            continue
                        log.warning("taking over the lease of %s: unchanged for %.0f s (pid %s on %s is gone)",
                                    self.root, now - seen_at, info.get("pid"), info.get("host"))
                    etag = self.loc.put_if(self.NAME, self._body(), tag)
                if etag is not None:
                    break
                seen = None  # another launch wrote it meanwhile: look again
        except OSError as e:
            raise UserError(f"results location {self.root}: cannot use it ({str(e).splitlines()[0]})") from None
        except Exception as e:  # botocore's errors (credentials, no such bucket): one line, no traceback
            if type(e).__module__.startswith("botocore"):
                raise UserError(f"results location {self.root}: cannot use it ({e})") from None
            raise
        self._etag = etag
        if heartbeat:
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._beat_loop, name="sweep-lease", daemon=True)
            self._thread.start()
        return self

    def _beat_loop(self) -> None:
        while not self._stop.wait(stale_after_s() / 6):
            try:
                etag = self.loc.put_if(self.NAME, self._body(), self._etag)
            except Exception as e:  # noqa: BLE001 - a failed beat is retried; only a lost race ends the lease
                log.warning("lease of %s not renewed (%s); retrying", self.root, e)
                continue
            if etag is None:
                self.lost = True
                log.warning("the lease of %s was taken over by another launch: this launch's commits no longer "
                            "count", self.root)
                return
            self._etag = etag

    def release(self) -> None:
        if self._stop is not None:
            self._stop.set()
            self._thread.join()
            self._stop = None
        if self._etag is not None and not self.lost:
            try:  # released: the next launch takes it at once
                self.loc.put_if(self.NAME, self._body(released=True), self._etag)
            except Exception:  # noqa: BLE001 - unreleased, it goes stale and is taken over
                pass
        self._etag = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def launch_lock(root: Path | str) -> LaunchLock | LeaseLock:
    """The lock for one launch of results location ``root``: a kernel flock for a folder, a lease for a URI."""
    return LeaseLock(str(root)) if is_uri(root) else LaunchLock(root)


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
