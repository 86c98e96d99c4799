"""A disk cache for lm-eval's task index.

``lm_eval.tasks.TaskManager()`` parses every built-in task YAML (about 14,000 files) on construction: 10 s of CPU on a
fast core, and every process that evaluates tasks pays it (the `sweep launch` driver when it validates the study, and
each Ray worker). The index only changes when the YAML files do, so it is pickled once under
``$SWEEPER_TASK_INDEX_CACHE`` (default ``~/.cache/sweeper/lm-eval-index``) and read back in about 1 s.

The cache key is lm-eval's version plus the path, size and modification time of every YAML file under the scanned
folders, so an upgraded lm-eval, an edited task file or a new ``include_path`` task builds a fresh index.
``SWEEPER_TASK_INDEX_CACHE=off`` disables the cache. A damaged or unreadable cache file is rebuilt, never trusted.
"""
from __future__ import annotations

import hashlib
import logging
import os
import pickle
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lm_eval.tasks import TaskManager

log = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when what is pickled changes
_IGNORE_DIRS = {"__pycache__", ".ipynb_checkpoints"}  # as lm_eval.tasks._index
_PATCH_LOCK = threading.Lock()


def cache_dir() -> Path | None:
    """Where index pickles live, or None when the cache is off."""
    value = os.environ.get("SWEEPER_TASK_INDEX_CACHE")
    if value and value.lower() in ("off", "0", "no", "false"):
        return None
    return Path(value) if value else Path.home() / ".cache" / "sweeper" / "lm-eval-index"


def index_key(paths: list[Path], resolve_includes: bool) -> str:
    """A hash of lm-eval's version and every YAML file (path, size, mtime) under ``paths``."""
    import lm_eval

    h = hashlib.sha256(f"{CACHE_FORMAT}|{getattr(lm_eval, '__version__', '?')}|{resolve_includes}".encode())
    for root in paths:
        root = Path(root).resolve()
        h.update(f"\0root:{root}".encode())
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in _IGNORE_DIRS)
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
    if index is not None:
        log.info("lm-eval task index read from %s", path)
        return index
    index = build(paths, resolve_includes=resolve_includes)
    _write(path, index)
    return index


def make_task_manager(**kwargs) -> "TaskManager":
    """``lm_eval.tasks.TaskManager(**kwargs)`` with its index built through the disk cache.

    TaskManager builds its index with ``TaskIndex().build(paths)`` looked up in ``lm_eval.tasks.manager``; that name is
    swapped for a subclass whose ``build`` goes through the cache, only while the manager is constructed. On an
    lm-eval without that layout the manager is built the plain way.
    """
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks import manager as _manager

    base = getattr(_manager, "TaskIndex", None)
    original = getattr(base, "build", None)
    if base is None or original is None or cache_dir() is None:
        return TaskManager(**kwargs)

    class CachedTaskIndex(base):
        @staticmethod
        def build(paths, *, resolve_includes=True):
            return cached_build(original, paths, resolve_includes=resolve_includes)

    with _PATCH_LOCK:
        _manager.TaskIndex = CachedTaskIndex
        try:
            return TaskManager(**kwargs)
        finally:
            _manager.TaskIndex = base
