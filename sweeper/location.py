"""Where a results store lives, and the few file operations the store needs there (docs/store.md).

A local folder today. Every operation the store's guarantees rest on is here and nowhere else: a data file written
whole under a name nobody reads yet, an exclusive create (the commit), an ``lstat`` before any open (so a FIFO, a
device or a link is never opened), and an open that can neither follow a link nor block.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

from .errors import UserError

_UMASK = os.umask(0)
os.umask(_UMASK)


def is_uri(location: str | os.PathLike) -> bool:
    return "://" in str(location)


class Local:
    """A results folder on a local (or mounted) file system."""

    def __init__(self, root: str | os.PathLike):
        if is_uri(root):
            raise UserError(f"results location {root}: only local folders are supported by this build; "
                            "give a folder path")
        self.root = Path(root)

    def __str__(self) -> str:
        return str(self.root)

    def path(self, rel: str) -> Path:
        return self.root / rel

    def exists(self) -> bool:
        return self.root.is_dir()

    def lstat(self, rel: str) -> os.stat_result | None:
        try:
            return os.lstat(self.root / rel)
        except (FileNotFoundError, NotADirectoryError):  # a file where a folder of the path should be
            return None

    def is_real_dir(self, rel: str) -> bool:
        """``rel`` is a directory of this location, not a link to one elsewhere."""
        st = self.lstat(rel)
        return st is not None and stat.S_ISDIR(st.st_mode)

    def open_regular(self, rel: str):
        """A binary file object on ``rel``, refusing links (O_NOFOLLOW) and anything but a regular file without
        blocking on it (O_NONBLOCK: a FIFO would otherwise wait for a writer forever)."""
        fd = os.open(self.root / rel, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(f"{self.root / rel} is not a regular file")
            os.set_blocking(fd, True)
            return os.fdopen(fd, "rb")
        except BaseException:
            os.close(fd)
            raise

    def read_bytes(self, rel: str) -> bytes:
        with self.open_regular(rel) as fh:
            return fh.read()

    def list(self, rel: str) -> list[str]:
        """Names in folder ``rel`` ([] if it does not exist)."""
        try:
            return [e.name for e in os.scandir(self.root / rel)]
        except (FileNotFoundError, NotADirectoryError):
            return []

    def _fsync_dir(self, folder: Path) -> None:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _write_fd(self, path: Path, data: bytes, flags: int) -> None:
        fd = os.open(path, flags | os.O_WRONLY | getattr(os, "O_CLOEXEC", 0), 0o666 & ~_UMASK)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)

    def write_new(self, rel: str, data: bytes, sync_dir: bool = True) -> None:
        """Write a file under a fresh name (nothing refers to it until a commit names it). Fsynced; its folder too
        unless ``sync_dir`` is False (the caller then calls :meth:`sync_dir` once for several files)."""
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        self._write_fd(path, data, os.O_CREAT | os.O_EXCL)
        if sync_dir:
            self._fsync_dir(path.parent)

    def sync_dir(self, rel: str) -> None:
        self._fsync_dir(self.root / rel)

    def _temp(self, rel: str, data: bytes) -> tuple[Path, Path]:
        """(final path, a fsynced temporary file beside it holding ``data``)."""
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
        self._write_fd(tmp, data, os.O_CREAT | os.O_EXCL)
        return path, tmp

    def create_exclusive(self, rel: str, data: bytes) -> bool:
        """Create ``rel`` with ``data``, whole or not at all; False if it exists already (another commit won)."""
        path, tmp = self._temp(rel, data)
        try:
            os.link(tmp, path)  # atomic, and fails if the name exists: the commit point
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
        self._fsync_dir(path.parent)
        return True

    def replace(self, rel: str, data: bytes) -> None:
        """Write ``rel`` atomically (temporary name, fsync, rename, fsync of the folder)."""
        path, tmp = self._temp(rel, data)
        try:
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
        self._fsync_dir(path.parent)

    def delete(self, rel: str) -> None:
        try:
            os.unlink(self.root / rel)
        except FileNotFoundError:
            pass

    def move(self, rel: str, dest_rel: str) -> None:
        dest = self.root / dest_rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.root / rel, dest)
        self._fsync_dir(dest.parent)


def open_location(root: str | os.PathLike) -> Local:
    return Local(root)
