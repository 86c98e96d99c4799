"""A disk cache for lm-eval's task index.

``lm_eval.tasks.TaskManager()`` parses every built-in task YAML (about 14,000 files) on construction: 10 s of CPU on a
fast core, and every process that evaluates tasks pays it (the `sweep launch` driver when it validates the study, and
each Ray worker). The index only changes when the YAML files do, so it is pickled once under
``$SWEEPER_TASK_INDEX_CACHE`` (default ``~/.cache/sweeper/lm-eval-index``) and read back in about 1 s.

The cache key is lm-eval's version plus the path, size and modification time of every YAML file under the scanned
folders, so an upgraded lm-eval, an edited task file or a new ``include_path`` task builds a fresh index.
``SWEEPER_TASK_INDEX_CACHE=off`` disables the cache. A damaged or unreadable cache file is rebuilt, never trusted.
The folder keeps the 8 most recently used index files.

A cache miss parses the YAML files in up to 8 child processes (:func:`parallel_build`), then lets lm-eval's own
``build`` assemble the index from the parsed files, so the result is exactly lm-eval's.
"""
from __future__ import annotations

import hashlib
import logging
import os
import pickle
import re
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lm_eval.tasks import TaskManager

log = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when what is pickled changes
_IGNORE_DIRS_FALLBACK = frozenset({"__pycache__", ".ipynb_checkpoints"})  # lm-eval 0.4.13's, if it stops exporting it
_PATCH_LOCK = threading.RLock()  # make_task_manager holds it while parallel_build patches


def cache_dir() -> Path | None:
    """Where index pickles live, or None when the cache is off."""
    value = os.environ.get("SWEEPER_TASK_INDEX_CACHE")
    if value and value.lower() in ("off", "0", "no", "false"):
        return None
    return Path(value) if value else Path.home() / ".cache" / "sweeper" / "lm-eval-index"


def index_key(paths: list[Path], resolve_includes: bool) -> str:
    """A hash of lm-eval's version and every YAML file (path, size, mtime) under ``paths``.

    The files are those lm-eval's index reads (its ignored folders skipped), found with ``os.walk``: it runs on every
    cache hit, and lm-eval's own walker (``TaskIndex._iter_yaml_files``: a recursive glob, then a sort) alone took
    0.26-0.39 s for its 13,986 files on the 2-core machine, against 0.08-0.11 s for this whole key (walk, stat, hash)
    (``benchmarks/import_costs.py``, output in ``benchmarks/logs/import_costs_cpu.txt``)."""
    import lm_eval
    from lm_eval.tasks import _index

    ignore = getattr(_index, "_IGNORE_DIRS", _IGNORE_DIRS_FALLBACK)
    h = hashlib.sha256(f"{CACHE_FORMAT}|{getattr(lm_eval, '__version__', '?')}|{resolve_includes}".encode())
    for root in paths:
        root = Path(root).resolve()
        h.update(f"\0root:{root}".encode())
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in ignore)
            for name in sorted(filenames):
                if name.endswith(".yaml"):
                    st = os.stat(os.path.join(dirpath, name))
                    h.update(f"\0{dirpath}/{name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:32]


def _read(path: Path) -> dict[str, Any] | None:
    try:
        with path.open("rb") as fh:
            index = pickle.load(fh)
    except FileNotFoundError:
        return None
    except Exception as err:  # a truncated or foreign file: rebuild it
        log.warning("lm-eval task index cache %s is unreadable (%s): rebuilding it", path, err)
        return None
    return index if isinstance(index, dict) else None


def _write(path: Path, index: dict[str, Any]) -> None:
    from ..store import atomic_write_bytes

    try:  # atomic: concurrent workers never read half a file
        atomic_write_bytes(path, pickle.dumps(index, protocol=pickle.HIGHEST_PROTOCOL))
    except OSError as err:  # a read-only home is not an error: the index was built, only not kept
        log.warning("could not cache lm-eval's task index in %s: %s", path.parent, err)


def cached_build(build, paths, *, resolve_includes: bool = True) -> dict[str, Any]:
    """``TaskIndex.build`` through the disk cache (``build`` is the original)."""
    folder = cache_dir()
    paths = list(paths)
    if folder is None:
        return build(paths, resolve_includes=resolve_includes)
    path = folder / f"{index_key(paths, resolve_includes)}.pkl"
    index = _read(path)
    if index is None:
        # one process per machine builds a missing index (the trials starting together on a fresh node would each
        # build it, each with its own parse children); the others wait for it and read what it wrote
        with _build_lock(path.with_suffix(".lock")):
            index = _read(path)
            if index is None:
                index = parallel_build(build, paths, resolve_includes=resolve_includes)
                _write(path, index)
                _prune(folder)
                log.info("lm-eval task index built and cached in %s", path)
                return index
    log.info("lm-eval task index read from %s", path)
    _touch(path)
    return index


BUILD_LOCK_WAIT_S = 600.0  # a build takes seconds; past this, build without the lock rather than wait on a hung one


class _build_lock:
    """An exclusive ``flock`` on ``path`` (released by the kernel if its holder dies). Where the folder cannot be
    written or the file system has no flock, the build goes ahead unlocked, as before."""

    def __init__(self, path: Path):
        self.path, self.fd = path, None

    def __enter__(self):
        import fcntl
        import time

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        except OSError as err:
            log.debug("no build lock at %s: %s", self.path, err)
            return self
        deadline = time.monotonic() + BUILD_LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except BlockingIOError:
                if time.monotonic() > deadline:
                    log.warning("lm-eval task index: still locked by another build after %.0fs (%s); building here",
                                BUILD_LOCK_WAIT_S, self.path)
                    break
                time.sleep(0.2)
            except OSError as err:  # no flock on this file system
                log.debug("no build lock at %s: %s", self.path, err)
                break
        os.close(self.fd)
        self.fd = None
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)  # closing releases the lock
        return False


KEEP = 8  # index files kept (each ~15 MB); one per lm-eval version and set of task folders


def _touch(path: Path) -> None:
    try:  # the modification time says when an index was last used: the least recently used go first
        os.utime(path)
    except OSError:
        pass


def _prune(folder: Path) -> None:
    """Delete all but the KEEP most recently used index files (an upgraded lm-eval or edited tasks leave old ones)."""
    try:
        ours = [f for f in folder.glob("*.pkl") if re.fullmatch(r"[0-9a-f]{32}\.pkl", f.name)]  # index_key names only
        files = sorted(ours, key=lambda f: f.stat().st_mtime, reverse=True)
        for old in files[KEEP:]:
            old.unlink()
            old.with_suffix(".lock").unlink(missing_ok=True)  # its build lock (a least recently used key)
    except OSError as err:  # another process pruned first, or a read-only folder: nothing lost
        log.debug("could not prune %s: %s", folder, err)


# A child process parses its share of the YAML files with lm-eval's loader, read from its file so that the child does
# not import lm-eval (seconds): argv = loader file, input pickle (files, recursive), output pickle.
_PARSE_CHILD = """
import importlib.util, pickle, sys
spec = importlib.util.spec_from_file_location("_sweeper_lm_eval_yaml_loader", sys.argv[1])
loader = importlib.util.module_from_spec(spec)
spec.loader.exec_module(loader)
with open(sys.argv[2], "rb") as fh:
    files, recursive = pickle.load(fh)
out = {}
for f in files:
    try:
        out[f] = (True, loader.load_yaml(f, resolve_func=False, recursive=recursive))
    except Exception as err:
        out[f] = (False, f"{type(err).__name__}: {err}")
with open(sys.argv[3], "wb") as fh:
    pickle.dump(out, fh, protocol=pickle.HIGHEST_PROTOCOL)
"""


def parse_workers() -> int:
    """Child processes for a cold index build: one per CPU, at most 8 (1: parse in this process)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus))


def _parse_in_children(files: list[str], recursive: bool, workers: int) -> dict[str, tuple[bool, Any]] | None:
    """{file: (True, config) or (False, error)} parsed by ``workers`` child processes; None if a child failed."""
    from lm_eval.tasks import _yaml_loader

    with tempfile.TemporaryDirectory(prefix="sweeper-index-") as tmp:
        procs = []
        for i in range(workers):
            src, dst = Path(tmp) / f"in{i}.pkl", Path(tmp) / f"out{i}.pkl"
            src.write_bytes(pickle.dumps((files[i::workers], recursive)))
            procs.append((subprocess.Popen([sys.executable, "-c", _PARSE_CHILD, _yaml_loader.__file__, str(src),
                                            str(dst)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE), dst))
        parsed: dict[str, tuple[bool, Any]] = {}
        failed = None
        try:
            for proc, dst in procs:
                err = proc.communicate()[1]
                if proc.returncode != 0 and failed is None:
                    failed = err.decode(errors="replace").strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
                elif proc.returncode == 0:
                    with dst.open("rb") as fh:
                        parsed.update(pickle.load(fh))
        finally:  # interrupted: no child outlives the build
            for proc, _ in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    if failed is not None:
        log.warning("parsing lm-eval's task files in child processes failed (%s): parsing them here", failed[0])
        return None
    return parsed


def parallel_build(build, paths, *, resolve_includes: bool = True, workers: int | None = None) -> dict[str, Any]:
    """``build(paths)`` (lm-eval's ``TaskIndex.build``) with the YAML files parsed in child processes first.

    ``build`` itself still walks the files in its order and assembles the index (duplicates, overrides, tags); only
    its ``load_yaml`` is answered from the parsed files. Where lm-eval lacks that layout, or with one worker, it is
    ``build(paths)`` as is.
    """
    from lm_eval.tasks import _index

    walk = getattr(getattr(_index, "TaskIndex", None), "_iter_yaml_files", None)
    if walk is None or getattr(_index, "load_yaml", None) is None:
        return build(paths, resolve_includes=resolve_includes)
    files = [str(f) for root in paths for f in walk(Path(root))]
    if workers is None:  # a child per ~500 files at most: starting one costs more than parsing a few hundred
        workers = min(parse_workers(), len(files) // 500)
    parsed = _parse_in_children(files, resolve_includes, workers) if workers >= 2 and files else None
    if parsed is None:
        return build(paths, resolve_includes=resolve_includes)

    def load_yaml(path, *, resolve_func=True, recursive=True, **kwargs):
        hit = parsed.get(str(path)) if (not resolve_func and recursive == resolve_includes and not kwargs) else None
        if hit is None:
            return real(path, resolve_func=resolve_func, recursive=recursive, **kwargs)
        ok, value = hit
        if ok:
            return value
        raise ValueError(value)  # build skips the file, as it does for the loader's own error

    with _PATCH_LOCK:
        real = _index.load_yaml
        _index.load_yaml = load_yaml
        try:
            return build(paths, resolve_includes=resolve_includes)
        finally:
            _index.load_yaml = real


def make_task_manager(**kwargs) -> "TaskManager":
    """``lm_eval.tasks.TaskManager(**kwargs)`` with its index built through the disk cache.

    TaskManager builds its index with ``TaskIndex().build(paths)`` looked up in ``lm_eval.tasks.manager``; that name is
    swapped for a subclass whose ``build`` goes through the cache, only while the manager is constructed. On an
    lm-eval without that layout the manager is built the plain way.
    """
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks import manager as _manager

    with _PATCH_LOCK:  # read and swapped under the lock: a concurrent caller never takes the swap for the original
        base = getattr(_manager, "TaskIndex", None)
        original = getattr(base, "build", None)
        if base is None or original is None or cache_dir() is None:
            return TaskManager(**kwargs)

        class CachedTaskIndex(base):
            @staticmethod
            def build(paths, *, resolve_includes=True):
                return cached_build(original, paths, resolve_includes=resolve_includes)

        _manager.TaskIndex = CachedTaskIndex
        try:
            return TaskManager(**kwargs)
        finally:
            _manager.TaskIndex = base
