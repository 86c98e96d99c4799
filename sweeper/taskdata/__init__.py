"""Offline task data: local files in the formats datasets are published in, served to lm-eval's built-in tasks.

:func:`prepare_dataset` converts a task's local files (see :mod:`sweeper.taskdata.formats`) into a folder that
``datasets.load_dataset(<folder>, <dataset_name>)`` reads offline: one jsonl per config and split, declared in the
folder's README.md ``configs:`` metadata (the `datasets` library's manual configuration). The task then runs with its
YAML unchanged except ``dataset_path`` (and the splits that were not given), so prompts, targets, filters and metrics
are lm-eval's own. The folder lives in a cache keyed by the files' content hash, so workers convert once.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from .formats import FAMILIES, Family, FormatError, family_for, piqa_labels_file, read_records, wikitext_pages

__all__ = ["FAMILIES", "Family", "FormatError", "family_for", "prepare_dataset", "data_fingerprint", "cache_root",
           "read_records", "wikitext_pages", "CONVERTER_VERSION"]

log = logging.getLogger(__name__)

# Bump when a converter's output changes, so cached folders are rebuilt.
CONVERTER_VERSION = 1
DEFAULT_CONFIG = "default"  # the config name used for tasks whose YAML has dataset_name: null


def cache_root() -> Path:
    """Where converted data folders live: $SWEEPER_TASKDATA_CACHE, else ~/.cache/sweeper/taskdata."""
    return Path(os.environ.get("SWEEPER_TASKDATA_CACHE") or Path.home() / ".cache" / "sweeper" / "taskdata")


def _hash_file(h: "hashlib._Hash", path: Path) -> None:
    h.update(path.name.encode())
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)


def _hash_source(h: "hashlib._Hash", path: Path) -> None:
    if path.is_dir():
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(str(f.relative_to(path)).encode())
            _hash_file(h, f)
    elif path.is_file():
        _hash_file(h, path)
        labels = piqa_labels_file(path)
        if labels.is_file():  # PIQA's answers live in a side file
            _hash_file(h, labels)
    else:
        h.update(b"<missing>")


def data_fingerprint(data: str | dict[str, str] | None) -> str | None:
    """A content hash of a Task's ``data`` (files, folders, PIQA's side labels file), for trial identity."""
    if data is None:
        return None
    items = {"_": data} if isinstance(data, str) else data
    h = hashlib.sha256()
    for split in sorted(items):
        h.update(split.encode())
        _hash_source(h, Path(items[split]).expanduser())
    return h.hexdigest()[:16]


def _readme(configs: dict[str, list[str]]) -> str:
    lines = ["---", "configs:"]
    for name, splits in configs.items():
        lines.append(f"- config_name: {json.dumps(name)}")
        lines.append("  data_files:")
        for split in splits:
            lines.append(f"  - split: {json.dumps(split)}")
            lines.append(f"    path: {json.dumps(f'{name}/{split}.jsonl')}")
    lines += ["---", "", "Converted by sweeper.taskdata from local files; see docs/tasks.md.", ""]
    return "\n".join(lines)


def prepare_dataset(family: Family, sources: dict[str, Path], dataset_names: list[str | None],
                    root: Path | None = None) -> Path:
    """Convert ``sources`` (lm-eval split -> file or folder) into a datasets folder with one config per dataset name.

    Raises :class:`FormatError` naming the bad file. Returns the folder (reused when it already exists).
    """
    h = hashlib.sha256()
    h.update(json.dumps([family.name, family.dataset_path, CONVERTER_VERSION, sorted(map(str, dataset_names))]).encode())
    for split in sorted(sources):
        h.update(split.encode())
        _hash_source(h, sources[split])
    root = root or cache_root()
    out = root / f"{family.name}-{h.hexdigest()[:20]}"
    if (out / "README.md").is_file():
        return out

    converted = family.convert(sources, dataset_names)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=root))
    try:
        configs: dict[str, list[str]] = {}
        for name, splits in converted.items():
            cfg = DEFAULT_CONFIG if name is None else str(name)
            (tmp / cfg).mkdir(parents=True, exist_ok=True)
            for split, rows in splits.items():
                with (tmp / cfg / f"{split}.jsonl").open("w", encoding="utf-8") as fh:
                    for r in rows:
                        fh.write(json.dumps(r, ensure_ascii=False) + "\n")
            configs[cfg] = sorted(splits)
        (tmp / "README.md").write_text(_readme(configs), encoding="utf-8")
        try:
            os.rename(tmp, out)  # atomic: concurrent workers converting the same files both end with one whole folder
        except OSError:
            if not (out / "README.md").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("converted %s data (%s) into %s", family.name, ", ".join(f"{k}={v}" for k, v in sorted(sources.items())), out)
    return out
