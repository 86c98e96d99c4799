"""The results store: the source of truth for what is done (docs/store.md).

Layout (one study per location)::

    <root>/study.json                      the expanded study as launched, with versions and launch history
    <root>/_log/<seq>.json                 the commit log: a trial is done (or failed) once a commit names its files
    <root>/_log/<seq>.checkpoint.parquet   the live state as of commit <seq>, written by compaction
    <root>/data/<id>.<kind>.parquet        data files, kind trials / metrics / samples: one trial's, or a segment's
    <root>/refs/<ref_id>.parquet           a baseline's reference next-token log-probs for KL

A trial's files are written first under fresh names; the commit that names them is created last, exclusively, so a
trial's row, metrics and samples become visible together or not at all. Commits count only under the location's
current owner (fencing). :meth:`ResultsStore.scan` gives the live rows as Polars LazyFrames over a few files.
"""
from __future__ import annotations

import json
import os
import re
import stat
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .errors import UserError
from .location import LocationError, open_location

METRICS_SCHEMA = pa.schema([
    ("trial_id", pa.string()),
    ("stage", pa.string()),
    ("task", pa.string()),
    ("metric", pa.string()),
    ("batch_size", pa.int64()),
    ("value", pa.float64()),
    ("stderr", pa.float64()),
    ("n", pa.int64()),
    ("min", pa.float64()),
    ("max", pa.float64()),
    ("unit", pa.string()),
])

# Per-item lm-eval rows (the tasks stage's samples table): one row per (document, metric, filter).
SAMPLES_SCHEMA = pa.schema([
    ("trial_id", pa.string()), ("task", pa.string()), ("doc_id", pa.int64()), ("filter", pa.string()),
    ("metric", pa.string()), ("value", pa.float64()), ("weight", pa.float64()), ("correct", pa.bool_()),
    ("gold_loglik", pa.float64()), ("prompt_hash", pa.string()), ("doc_hash", pa.string()),
])

TRIAL_STATUSES = ("done", "failed")

_S, _F, _I, _B = pa.string(), pa.float64(), pa.int64(), pa.bool_()
# Every trial row has every column (null where not applicable), so the files of any mix of trials (done, failed in
# any stage, CPU or GPU, per-trial files and segments) stack into one scan (ResultsStore.scan).
TRIALS_SCHEMA = pa.schema([
    # identity and configuration
    ("trial_id", _S), ("study", _S), ("model", _S), ("model_id", _S), ("model_revision", _S),
    ("model_fingerprint", _S), ("precision", _S), ("precision_options", _S), ("compute_dtype", _S),
    ("is_baseline", _B), ("baseline_id", _S), ("gpu_share", _F), ("cpus", _I), ("tasks", _S), ("config", _S),
    ("task_groups", _S),  # lm-eval's group_subtasks from the tasks stage (JSON): which reported tasks a group holds
    # outcome
    ("status", _S), ("error_stage", _S), ("error_type", _S), ("error", _S), ("error_traceback", _S), ("attempt", _I),
    ("started_at", _S), ("finished_at", _S), ("duration_s", _F), ("process_started_at", _F),
    ("ray_worker_started_at", _F), ("trainable_started_at", _F), ("load_started_at", _F),
    ("warm_worker_ready_at", _F), ("ray_worker_preloaded_at", _F),
    ("stage_load_s", _F), ("stage_benchmark_s", _F), ("stage_perplexity_s", _F), ("stage_kl_s", _F),
    ("stage_tasks_s", _F), ("stage_write_s", _F), ("stage_order", _S),
    # measurement facts
    ("peak_memory_kind", _S), ("timing_exclusive", _B), ("timing_wait_s", _F), ("graph_decode_error", _S),
    ("kl_reference_id", _S), ("runtime_provider", _S), ("notes", _S), ("worker_pid", _I), ("worker_trial_index", _I), ("warm_worker", _B),
    ("ray_node_id", _S),
    # environment
    ("host", _S), ("platform", _S), ("python_version", _S), ("device", _S), ("device_name", _S),
    ("device_uuid", _S), ("device_memory_bytes", _I), ("device_capability", _S), ("cuda_version", _S), ("torch_threads", _I),
    ("gpu_count", _I), ("gpu_devices", _S),
    ("sweeper_version", _S), ("sweeper_git_sha", _S), ("torch_version", _S), ("transformers_version", _S),
    ("accelerate_version", _S), ("bitsandbytes_version", _S), ("ray_version", _S), ("lm_eval_version", _S),
    ("polars_version", _S), ("pyarrow_version", _S),
])


_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; results are meant to be read by others (and other nodes)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_table(path: Path, table: pa.Table) -> None:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    atomic_write_bytes(path, sink.getvalue().to_pybytes())


def metrics_table(rows: Iterable[dict[str, Any]]) -> pa.Table:
    cols: dict[str, list] = {f.name: [] for f in METRICS_SCHEMA}
    for r in rows:
        unknown = set(r) - set(cols)
        if unknown:
            raise ValueError(f"metric row has unknown keys {sorted(unknown)}")
        for k in cols:
            cols[k].append(r.get(k))
    return pa.Table.from_pydict(cols, schema=METRICS_SCHEMA)


def trial_table(row: dict[str, Any]) -> pa.Table:
    """One trial row in TRIALS_SCHEMA; nested values become JSON strings (flat files, nothing to unpickle)."""
    unknown = set(row) - set(TRIALS_SCHEMA.names)
    if unknown:
        raise ValueError(f"trial row has columns missing from TRIALS_SCHEMA: {sorted(unknown)}")
    flat = {k: (json.dumps(v, sort_keys=True) if isinstance(v, (dict, list, tuple)) else v) for k, v in row.items()}
    return pa.Table.from_pylist([flat], schema=TRIALS_SCHEMA)


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def _conform(table: pa.Table, schema: pa.Schema, kind: str) -> pa.Table:
    """``table`` with exactly ``schema``'s columns, in order (absent ones null), or ValueError for unknown ones."""
    unknown = set(table.column_names) - set(schema.names)
    if unknown:
        raise ValueError(f"{kind} rows have columns the store does not know: {sorted(unknown)}")
    cols = [table.column(f.name).cast(f.type) if f.name in table.column_names else pa.nulls(table.num_rows, f.type)
            for f in schema]
    return pa.Table.from_arrays(cols, schema=schema)


KINDS = ("trials", "metrics", "samples")
SCHEMAS = {"trials": TRIALS_SCHEMA, "metrics": METRICS_SCHEMA, "samples": SAMPLES_SCHEMA}


@dataclass(frozen=True)
class Limit:
    """Per trial: bytes on disk, rows, bytes once decoded (Parquet's uncompressed sizes), bytes of any one string."""
    bytes: int
    rows: int
    decoded: int
    string: int


# Generous for real trials (an MMLU trial's samples are ~15k rows), small enough that a bad file is refused before it
# is decoded: an 80 KB file can hold a 1 MB string repeated 1800 times (1.8 GB once read), so string lengths are
# read from the dictionary pages, not from the decoded column.
LIMITS = {
    "trials": Limit(bytes=8 << 20, rows=1, decoded=32 << 20, string=16 << 20),
    "metrics": Limit(bytes=64 << 20, rows=1_000_000, decoded=512 << 20, string=64 << 10),
    "samples": Limit(bytes=512 << 20, rows=10_000_000, decoded=4 << 30, string=64 << 10),
    "ref": Limit(bytes=16 << 30, rows=10_000_000, decoded=64 << 30, string=64 << 10),
}

COMPACT_TAIL = 64  # per-trial commits merged into a segment once this many are live
MAX_SEGMENTS = 8  # more segments than this: the smallest are merged
GC_AFTER_S = 3600.0  # unreferenced data files older than this are deleted (a reader may still be reading younger ones)
_ENTRY = re.compile(r"^(\d{20})\.json$")
_CHECKPOINT = re.compile(r"^(\d{20})\.checkpoint\.parquet$")
# the only paths a commit may name: the store's own names, inside the location (legacy: the old per-trial layout)
_DATA_PATH = re.compile(r"^(data/(seg-)?[0-9a-f]{32}\.(trials|metrics|samples)\.parquet"
                        r"|(trials|metrics|samples)/[A-Za-z0-9_.-]+\.parquet|refs/[A-Za-z0-9_.-]+\.parquet)$")
_CHECKPOINT_KEY = b"sweeper.store"


class OwnershipLost(UserError):
    """This writer's launch no longer owns the results location: another launch took it over."""


@dataclass
class Live:
    """A committed trial: its status and attempt, the commit that made it, and its files (kind -> path)."""
    status: str
    attempt: int
    seq: int
    files: dict[str, str]
    ref: str | None = None


@dataclass
class State:
    seq: int = 0  # the last commit applied (ignored ones included)
    owner: str | None = None
    trials: dict[str, Live] = field(default_factory=dict)
    sizes: dict[str, tuple[int, int]] = field(default_factory=dict)  # path -> (bytes, trials it holds)
    bad: list[tuple[str, str]] = field(default_factory=list)  # log files that cannot be read, with why
    fenced: list[int] = field(default_factory=list)  # commits ignored: written under an owner that had been replaced
    legacy: bool = False
    legacy_bad: list[tuple[str, str, set[str]]] = field(default_factory=list)  # old layout: damaged files


def _kind(path: str) -> str:
    if path.startswith("refs/"):
        return "ref"
    if path.startswith("data/"):
        return path.rsplit(".", 2)[-2]
    return path.split("/", 1)[0]


def _is_segment(path: str) -> bool:
    return path.startswith("data/seg-")


def _valid_path(p: Any) -> str:
    if not isinstance(p, str) or not _DATA_PATH.match(p):
        raise ValueError(f"commit names a file outside the store's layout: {p!r}")
    return p


def _apply(st: State, seq: int, entry: dict) -> None:
    """One commit applied to the state (the replay rule of docs/store.md). Checked whole before anything changes,
    so an entry that does not parse leaves the state as it was."""
    kind = entry.get("kind")
    if kind not in ("owner", "void", "trials", "retract", "compact"):
        raise ValueError(f"unknown commit kind {kind!r}")
    if kind == "owner":
        if not isinstance(entry.get("token"), str):
            raise ValueError("owner commit without a token")
        st.seq, st.owner = seq, entry["token"]
        return
    if kind == "void":
        st.seq = seq
        return
    if entry.get("token") != st.owner:
        st.seq = seq
        st.fenced.append(seq)
        return
    sizes: dict[str, tuple[int, int]] = {}
    if kind == "trials":
        new = {}
        for t in entry["trials"]:
            files = {}
            for k, f in t["files"].items():
                if k not in KINDS:
                    raise ValueError(f"unknown file kind {k!r}")
                files[k] = _valid_path(f["path"])
                sizes[files[k]] = (int(f["size"]), int(f.get("n", 1)))
            if "trials" not in files:
                raise ValueError(f"trial {t.get('trial_id')!r} committed without its row")
            ref = None
            if t.get("ref"):
                ref = _valid_path(t["ref"]["path"])
                sizes[ref] = (int(t["ref"]["size"]), 1)
            if t["status"] not in TRIAL_STATUSES:
                raise ValueError(f"unknown status {t['status']!r}")
            new[str(t["trial_id"])] = Live(t["status"], int(t["attempt"]), seq, files, ref)
        st.trials.update(new)
    elif kind == "retract":
        ids = [str(t) for t in entry["trial_ids"]]
        for tid in ids:
            st.trials.pop(tid, None)
    else:
        segments = {k: _valid_path(v["path"]) for k, v in entry["segments"].items()}
        if set(segments) - set(KINDS):
            raise ValueError(f"unknown file kinds {sorted(set(segments) - set(KINDS))}")
        sizes = {segments[k]: (int(v["size"]), int(v["n"])) for k, v in entry["segments"].items()}
        moved = {str(t): int(s) for t, s in entry["moved"].items()}
        for tid, from_seq in moved.items():
            live = st.trials.get(tid)
            if live is not None and live.seq == from_seq:  # else a later commit replaced it: the segment's rows are dead
                live.files = {k: segments.get(k, f) for k, f in live.files.items()}
    st.sizes.update(sizes)
    st.seq = seq


_CHECKPOINT_SCHEMA = pa.schema([("trial_id", pa.string()), ("status", pa.string()), ("attempt", pa.int64()),
                                ("seq", pa.int64()), ("trials", pa.string()), ("metrics", pa.string()),
                                ("samples", pa.string()), ("ref", pa.string())])


def _checkpoint_table(st: State) -> pa.Table:
    ids = list(st.trials)
    lv = [st.trials[t] for t in ids]
    cols = {"trial_id": ids, "status": [x.status for x in lv], "attempt": [x.attempt for x in lv],
            "seq": [x.seq for x in lv], **{k: [x.files.get(k) for x in lv] for k in KINDS}, "ref": [x.ref for x in lv]}
    used = {p for x in lv for p in (*x.files.values(), x.ref) if p}
    meta = {"seq": st.seq, "owner": st.owner, "sizes": {p: list(v) for p, v in st.sizes.items() if p in used}}
    return pa.Table.from_pydict(cols, schema=_CHECKPOINT_SCHEMA.with_metadata({_CHECKPOINT_KEY: json.dumps(meta)}))


def _state_from_checkpoint(table: pa.Table) -> State:
    meta = json.loads(table.schema.metadata[_CHECKPOINT_KEY])
    st = State(seq=int(meta["seq"]), owner=meta["owner"],
               sizes={_valid_path(p): (int(v[0]), int(v[1])) for p, v in meta["sizes"].items()})
    c = {name: table.column(name).to_pylist() for name in table.column_names}
    for i, tid in enumerate(c["trial_id"]):
        files = {k: c[k][i] for k in KINDS if c[k][i] is not None}
        st.trials[tid] = Live(c["status"][i], c["attempt"][i], c["seq"][i], files, c["ref"][i])
    return st


def _plain(t: pa.DataType) -> pa.DataType:
    """Arrow types as Parquet stores them: Polars writes large strings where pyarrow writes strings."""
    return pa.string() if pa.types.is_large_string(t) else t


def _why(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}"[:300]


class ResultsStore:
    """One results location. Reads replay the commit log; writes commit under ``token`` (the owning launch's, None
    for a location nobody has launched into: tests, tools)."""

    def __init__(self, root: str | os.PathLike, token: str | None = None):
        self.loc = open_location(root)
        self.root = self.loc.root  # a Path, or the URI (str) of an object store
        self.work = self.loc.work  # the launching machine's working state: claims, Tune, events (location.work_dir)
        self.token = token
        self._state: State | None = None
        self._checked: dict[tuple, list] = {}

    # paths
    @property
    def remote(self) -> bool:
        return not isinstance(self.root, Path)

    @property
    def cache_dir(self) -> Path:
        """Where calibrated (AWQ/GPTQ) and ONNX checkpoints are cached: the results folder, or for a URI the
        launching machine's working folder (each machine quantizes or exports once for itself)."""
        return self.work / "cache" if self.remote else self.root

    @property
    def cache_mirror(self) -> "CacheMirror | None":
        """For a URI: the object store's copy of the calibrated / ONNX cache (``quantized/``), which the launching
        machine's ``cache_dir`` is filled from and published to; None for a folder (the cache is in it)."""
        return CacheMirror(self.loc) if self.remote else None

    @property
    def study_json(self) -> Path | str:
        return self.loc.path("study.json")

    def _live_path(self, trial_id: str, kind: str, legacy: str) -> Path | str:
        live = self.state().trials.get(trial_id)
        rel = live.files.get(kind) if live is not None else None
        return self.loc.path(rel or legacy)

    def trial_path(self, trial_id: str) -> Path:
        """The file holding ``trial_id``'s committed row (its old per-trial name when it has none)."""
        return self._live_path(trial_id, "trials", f"trials/{trial_id}.parquet")

    def metrics_path(self, trial_id: str) -> Path:
        return self._live_path(trial_id, "metrics", f"metrics/{trial_id}.parquet")

    def ref_path(self, ref_id: str) -> Path:
        """The local file of KL reference ``ref_id``. For a URI: a copy in the working folder, fetched afresh from
        the location at each call (a reference found damaged is replaced by a rerun baseline's), absent when the
        location has none (a baseline writes it there; :meth:`write_trial` uploads it with the commit)."""
        if not self.remote:
            return self.root / "refs" / f"{ref_id}.parquet"
        path = self.work / "refs" / f"{ref_id}.parquet"
        st = self.loc.lstat(f"refs/{ref_id}.parquet")
        if st is None:
            path.unlink(missing_ok=True)
        elif st.st_size <= LIMITS["ref"].bytes:
            atomic_write_bytes(path, self.loc.read_bytes(f"refs/{ref_id}.parquet"))
        return path

    def sibling_ref_path(self, ref_id: str) -> Path | None:
        """The same KL reference made by another study beside this one (a sibling results dir measured the same
        baseline cell), as a regular file: never a FIFO or a link. None where there is none (always for a URI)."""
        if self.remote:
            return None
        return next(iter(sorted(p for p in self.root.parent.glob(f"*/refs/{ref_id}.parquet")
                                if p.is_file() and not p.is_symlink())), None)

    # ------------------------------------------------------------------------------------------------ the log
    def is_legacy(self) -> bool:
        """A folder in the per-trial layout of an older sweeper (read as it is; `sweep launch` migrates it)."""
        return not self.loc.list("_log") and self.loc.is_real_dir("trials")

    def forget(self) -> None:
        """Read the location afresh on the next call (it was moved or repaired behind this object's back)."""
        self._state = None
        self._checked = {}

    def state(self) -> State:
        """The live state: the newest checkpoint plus every commit after it (re-read as the log grows)."""
        if self.is_legacy():
            if self._state is None or not self._state.legacy:
                self._state = _legacy_state(self)
            return self._state
        for _ in range(5):  # a compaction may delete entries while this reads them: read again from its checkpoint
            try:
                self._state = self._refresh(self._state if self._state is not None and not self._state.legacy
                                            else None)
                return self._state
            except FileNotFoundError:
                self._state = None
        raise UserError(f"the commit log of {self.root} keeps changing under this reader; try again")

    def _refresh(self, st: State | None) -> State:
        names = self.loc.list("_log") if self.loc.is_real_dir("_log") or not self.loc.lstat("_log") else None
        if names is None:
            return State(bad=[("_log", "not a folder of this location (a link or a file)")])
        entries = sorted(int(m.group(1)) for n in names if (m := _ENTRY.match(n)))
        checkpoints = sorted((int(m.group(1)) for n in names if (m := _CHECKPOINT.match(n))), reverse=True)
        if st is None or (checkpoints and checkpoints[0] > st.seq):
            st, bad = None, []
            for cp in checkpoints:
                rel = f"_log/{cp:020d}.checkpoint.parquet"
                try:
                    with self.loc.open_regular(rel) as fh:
                        st = _state_from_checkpoint(pq.read_table(fh))
                    break
                except (FileNotFoundError, LocationError):
                    raise
                except Exception as e:  # noqa: BLE001 - a damaged checkpoint: the previous one and its commits
                    bad.append((rel, _why(e)))
            if st is None:
                st = State()
                if entries and entries[0] != 1:
                    bad.append(("_log", f"no readable checkpoint and commits 1..{entries[0] - 1} are gone"))
            st.bad = bad + st.bad
        for seq in entries:
            if seq <= st.seq:
                continue
            if seq != st.seq + 1:
                st.bad.append((f"_log/{st.seq + 1:020d}.json", "missing from the commit log"))
            rel = f"_log/{seq:020d}.json"
            try:
                entry = json.loads(self.loc.read_bytes(rel))
                if not isinstance(entry, dict):
                    raise ValueError("not a JSON object")
                _apply(st, seq, entry)
            except (FileNotFoundError, LocationError):
                raise
            except Exception as e:  # noqa: BLE001 - named by damaged_files(); launch voids it (its trials rerun)
                st.seq = seq
                st.bad.append((rel, _why(e)))
        return st

    def _commit(self, entry: dict) -> int:
        """Append ``entry`` to the log; the exclusive create is the commit point. Refused (OwnershipLost) once
        another launch owns the location; a lost race for the next number is retried after reading it."""
        if self.is_legacy():
            raise UserError(f"{self.root} is in the layout of an older sweeper; `sweep launch` migrates it first")
        data = json.dumps(entry, separators=(",", ":")).encode()
        while True:
            st = self.state()
            if entry["kind"] != "owner" and st.owner != entry.get("token"):
                raise OwnershipLost(f"this launch no longer owns {self.root} (another launch took it over); "
                                    "nothing more is written by it")
            seq = st.seq + 1
            if self.loc.create_exclusive(f"_log/{seq:020d}.json", data):
                self.state()
                return seq

    def take_over(self, token: str, **info: Any) -> int:
        """Make ``token`` the owner (call holding the launch lock): commits under any earlier token stop counting."""
        self.token = token
        return self._commit({"kind": "owner", "token": token, "at": time.time(), **info})

    # ------------------------------------------------------------------------------------------------ writing
    def write_trial(self, row: dict[str, Any], metrics: list[dict[str, Any]], samples: pa.Table | None = None) -> None:
        """Commit a trial: data files first, then the commit naming them (and the baseline's KL reference)."""
        tid = row["trial_id"]
        assert row.get("status") in TRIAL_STATUSES, row.get("status")
        t0 = time.perf_counter()
        tables = {"metrics": metrics_table(metrics)}
        if samples is not None:
            tables["samples"] = samples
        for kind, table in tables.items():
            ids = set(table.column("trial_id").unique().to_pylist()) if table.num_rows else set()
            if ids - {tid}:
                raise ValueError(f"{kind} rows of trial {tid} name other trials: {sorted(ids - {tid})[:3]}")
        files = {}
        for kind, table in tables.items():
            files[kind] = self._write_data(kind, _parquet_bytes(_conform(table, SCHEMAS[kind], kind)))
        row = {**row, "stage_write_s": time.perf_counter() - t0}
        files["trials"] = self._write_data("trials", _parquet_bytes(trial_table(row)))
        self.loc.sync_dir("data")  # the files' names are durable before a commit names them
        record: dict[str, Any] = {"trial_id": tid, "status": row["status"], "attempt": int(row.get("attempt") or 1),
                                  "files": files}
        ref_id = row.get("kl_reference_id")
        if row.get("is_baseline") and ref_id and row["status"] == "done":
            local = self.work / "refs" / f"{ref_id}.parquet"
            if self.remote and local.is_file():  # the stage wrote it on this machine: into the location first
                self.loc.replace(f"refs/{ref_id}.parquet", local.read_bytes())
            st = self.loc.lstat(f"refs/{ref_id}.parquet")
            if st is not None and stat.S_ISREG(st.st_mode):
                record["ref"] = {"path": f"refs/{ref_id}.parquet", "size": st.st_size}
        self._commit({"kind": "trials", "token": self.token, "trials": [record]})

    def import_trials(self, trials: pa.Table, metrics: pa.Table, samples: pa.Table | None = None) -> None:
        """Commit many trials at once as segments (one file per kind), as compaction would have left them: tools
        and benchmarks that bring whole result sets (benchmarks/store_scale.py)."""
        trials = _conform(trials, TRIALS_SCHEMA, "trials")
        ids = trials.column("trial_id").to_pylist()
        if len(set(ids)) != len(ids):
            raise ValueError("import_trials: a trial id appears twice")
        tables = {"trials": trials, "metrics": metrics, **({"samples": samples} if samples is not None else {})}
        files = {}
        for kind, table in tables.items():
            table = _conform(table, SCHEMAS[kind], kind)
            have = set(pc.unique(table.column("trial_id")).to_pylist())
            if have - set(ids):
                raise ValueError(f"import_trials: {kind} rows of trials not imported: {sorted(have - set(ids))[:3]}")
            holders = len(have)
            files[kind] = self._write_data(kind, _parquet_bytes(table), segment=True, n=holders)
            files[kind]["ids"] = have
        self.loc.sync_dir("data")
        status = trials.column("status").to_pylist()
        attempt = trials.column("attempt").to_pylist()
        records = []
        for tid, st, at in zip(ids, status, attempt):
            own = {k: {"path": f["path"], "size": f["size"], "n": f["n"]} for k, f in files.items() if tid in f["ids"]}
            records.append({"trial_id": tid, "status": st, "attempt": int(at or 1), "files": own})
        self._commit({"kind": "trials", "token": self.token, "trials": records})
        self.checkpoint()  # readers then start from it instead of parsing this (large) commit

    def _write_data(self, kind: str, data: bytes, segment: bool = False, n: int = 1) -> dict[str, Any]:
        rel = f"data/{'seg-' if segment else ''}{uuid.uuid4().hex}.{kind}.parquet"
        self.loc.write_new(rel, data, sync_dir=False)
        return {"path": rel, "size": len(data), "n": n}

    def write_study(self, doc: dict[str, Any]) -> None:
        self.loc.replace("study.json", _study_json(doc).encode())

    # ------------------------------------------------------------------------------------------------ reading
    def read_study(self) -> dict[str, Any] | None:
        st = self.loc.lstat("study.json")
        if st is None:
            return None
        try:
            if not stat.S_ISREG(st.st_mode) or st.st_size > 256 << 20:
                raise ValueError("not a regular file of at most 256 MB")
            return json.loads(self.loc.read_bytes("study.json"))
        except (ValueError, OSError) as e:
            raise UserError(f"{self.study_json} is not valid JSON ({e}); move it aside or restore it") from None

    def committed(self, trial_id: str) -> Live | None:
        """The trial's commit (status, attempt, files), or None: not committed (pending)."""
        return self.state().trials.get(trial_id)

    def trial_status(self, skip_damaged: bool = False) -> dict[str, str]:
        """trial_id -> status ("done" or "failed") of every committed trial whose files are whole.

        A damaged file raises UserError naming it, or with ``skip_damaged`` its trials count as absent (launch
        quarantines it and they run again)."""
        st = self.state()
        damaged = self._damaged(st)
        if damaged and not skip_damaged:
            raise damaged_error([(self.loc.path(f), why) for f, why, _ in damaged])
        hit = {t for _, _, ids in damaged for t in ids}
        return {tid: live.status for tid, live in st.trials.items() if tid not in hit}

    def read_trial_row(self, trial_id: str) -> dict[str, Any] | None:
        live = self.committed(trial_id)
        if live is None or "trials" not in live.files:
            return None
        with self.loc.open_regular(live.files["trials"]) as fh:
            t = pq.read_table(fh, filters=[("trial_id", "=", trial_id)])
        return t.to_pylist()[0] if t.num_rows else None

    def read_trial_rows(self, trial_ids: Iterable[str]) -> dict[str, dict[str, Any]]:
        """trial_id -> committed row for several trials, in one read of the files holding them."""
        import polars as pl

        ids = [t for t in trial_ids if self.committed(t) is not None]
        lf = self.scan("trials")
        if not ids or lf is None:
            return {}
        return {r["trial_id"]: r for r in lf.filter(pl.col("trial_id").is_in(ids)).collect().to_dicts()}

    def scan(self, kind: str):
        """The live rows of ``kind`` (trials / metrics / samples) as a Polars LazyFrame with the store's columns, or
        None when no trial has such a file. Files holding only live trials are scanned as they are; a segment that
        also holds replaced trials is filtered to the live ones."""
        import polars as pl

        st = self.state()
        by_file: dict[str, list[str]] = {}
        for tid, live in st.trials.items():
            f = live.files.get(kind)
            if f is not None:
                by_file.setdefault(f, []).append(tid)
        if not by_file:
            return None
        whole = [f for f, ids in by_file.items() if st.sizes.get(f, (0, 1))[1] == len(ids)]
        parts = [self._scan_files(kind, whole)] if whole else []
        for f, ids in by_file.items():
            if st.sizes.get(f, (0, 1))[1] != len(ids):
                parts.append(self._scan_files(kind, [f]).filter(pl.col("trial_id").is_in(ids)))
        return parts[0] if len(parts) == 1 else pl.concat(parts, how="vertical")

    def _scan_files(self, kind: str, files: list[str]):
        """A lazy scan of data files ``files`` (relative to the location) of ``kind``, in its schema (a column an
        older file lacks reads as nulls); an object store is read by Polars itself, with its endpoint."""
        import polars as pl

        schema = pl.from_arrow(SCHEMAS[kind].empty_table()).schema
        return pl.scan_parquet([str(self.loc.path(f)) for f in files], schema=schema, missing_columns="insert",
                               extra_columns="ignore", storage_options=self.loc.storage_options)

    # ------------------------------------------------------------------------------------------------ checking
    def _check_file(self, rel: str, kind: str, size: int | None, n: int, trial_id: str | None,
                    full: bool, status: str | None = None) -> str | None:
        """Why ``rel`` cannot be used as a ``kind`` file of ``n`` trials (None: it can). Nothing is opened before an
        lstat shows a regular file of the committed size within the limits."""
        st = self.loc.lstat(rel)
        if st is None:
            return "missing"
        if stat.S_ISLNK(st.st_mode):
            return "a symbolic link (the store reads only its own regular files)"
        if not stat.S_ISREG(st.st_mode):
            return "not a regular file"
        if size is not None and st.st_size != size:
            return f"{st.st_size} bytes where its commit recorded {size}"
        lim = LIMITS[kind]
        n = max(1, n)
        if st.st_size > lim.bytes * n:
            return f"{st.st_size} bytes, over the limit of {lim.bytes * n} for a {kind} file"
        try:
            with self.loc.open_regular(rel) as fh:
                pf = pq.ParquetFile(fh)
                meta = pf.metadata
                if kind in SCHEMAS:
                    want = SCHEMAS[kind]
                    have = pf.schema_arrow
                    if "trial_id" not in have.names:
                        return "no trial_id column"
                    for f in have:
                        if f.name in want.names and _plain(f.type) != _plain(want.field(f.name).type):
                            return f"column {f.name} is {f.type}, expected {want.field(f.name).type}"
                    if trial_id is not None and set(have.names) - set(want.names) and size is not None:
                        return f"unknown columns {sorted(set(have.names) - set(want.names))[:3]}"
                rows_limit = n if kind == "trials" else lim.rows * n
                if meta.num_rows > rows_limit or (kind == "trials" and meta.num_rows != n):
                    return f"{meta.num_rows} rows where a {kind} file of {n} trial(s) has " + \
                        (f"{n}" if kind == "trials" else f"at most {rows_limit}")
                decoded = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
                if decoded > lim.decoded * n:
                    return f"{decoded} bytes once decoded, over the limit of {lim.decoded * n}"
                if not full:
                    return None
                strings = [f.name for f in pf.schema_arrow if pa.types.is_string(f.type) or
                           pa.types.is_large_string(f.type)]
                if kind == "ref":
                    strings = [c for c in strings if c in ("source", "category", "prompt_id")]
                elif kind == "trials":  # one row: its decoded size is already bounded
                    strings = [c for c in ("trial_id", "status") if c in strings]
                fh.seek(0)
                t = pq.ParquetFile(fh, read_dictionary=strings).read(columns=strings) if strings else None
                for name in strings:
                    for chunk in t.column(name).chunks:
                        d = chunk.dictionary if pa.types.is_dictionary(chunk.type) else chunk
                        longest = pc.max(pc.binary_length(d)).as_py() if len(d) else 0
                        if longest and longest > lim.string:
                            return f"column {name} holds a {longest}-byte value, over the limit of {lim.string}"
                if trial_id is not None and kind in SCHEMAS:
                    ids = {v for chunk in t.column("trial_id").chunks
                           for v in (chunk.dictionary if pa.types.is_dictionary(chunk.type) else chunk).to_pylist()}
                    if ids - {trial_id}:
                        return f"holds rows of trial(s) {sorted(str(i) for i in ids - {trial_id})[:3]}, not {trial_id}"
                    if kind == "trials" and ids != {trial_id}:
                        return f"its row is not trial {trial_id}"
                    if kind == "trials" and status is not None:
                        have_status = t.column("status").to_pylist()[0]
                        if have_status != status:
                            return f"its row says {have_status!r}, its commit {status!r}"
        except LocationError:  # the location cannot be read now: nothing is known about the file
            raise
        except Exception as e:  # noqa: BLE001 - any failure to read is damage, named with the file
            return _why(e)
        return None

    def _damaged(self, st: State, full: bool = False) -> list[tuple[str, str, set[str]]]:
        """(file, why, live trials it takes down) for every bad file the state relies on. Per-trial files are read
        (schema, trial id, string lengths) always; segments (written by compaction) only with ``full``. Checked once
        per state of the log in this process (a launch asks several times before anything changes)."""
        key = (st.seq, len(st.trials), st.legacy)
        for f in (full, True):
            if self._checked.get((*key, f)) is not None:
                return self._checked[(*key, f)]
        out = self._find_damaged(st, full)
        self._checked = {(*key, full): out}
        return out

    def _find_damaged(self, st: State, full: bool) -> list[tuple[str, str, set[str]]]:
        if st.legacy:
            return list(st.legacy_bad)
        users: dict[str, set[str]] = {}
        for tid, live in st.trials.items():
            for f in (*live.files.values(), *([live.ref] if live.ref else [])):
                users.setdefault(f, set()).add(tid)
        out: list[tuple[str, str, set[str]]] = [(rel, why, set()) for rel, why in st.bad]
        for d in ("data", "refs"):
            if self.loc.lstat(d) is not None and not self.loc.is_real_dir(d):
                out.append((d, "not a folder of this location (a link or a file)", {t for f, ids in users.items()
                                                                                     if f.startswith(d + "/")
                                                                                     for t in ids}))
                users = {f: ids for f, ids in users.items() if not f.startswith(d + "/")}
        for f, ids in sorted(users.items()):
            kind = _kind(f)
            size, n = st.sizes.get(f, (None, 1))
            seg = _is_segment(f)
            tid = None if seg or kind == "ref" else next(iter(ids))
            why = self._check_file(f, kind, size, n, tid, full=full or not seg,
                                   status=st.trials[tid].status if tid is not None else None)
            if why is not None:
                if kind == "ref":  # the trials that compared against it are fine; the baseline that made it reruns
                    ids = {t for t in ids if st.trials[t].ref == f}
                out.append((f, why, ids))
        return out

    def damaged_files(self, full: bool = False) -> list[tuple[Path, str]]:
        """Files of this location that cannot be used as results (unreadable, wrong schema or trial, too large, not a
        regular file, not the committed size), with the reason."""
        return [(self.loc.path(rel), why) for rel, why, _ in self._damaged(self.state(), full=full)]

    # ------------------------------------------------------------------------------------------------ repair
    def quarantine(self, path: Path | str) -> Path | str:
        """Move a damaged file to <root>/quarantine/<its folder>/ (kept for inspection, never read as results; on an
        object store a copy, then a delete)."""
        rel = (str(path)[len(self.root) + 1:] if self.remote else Path(path).relative_to(self.root).as_posix())
        dest = f"quarantine/{rel}.{time.strftime('%Y%m%d-%H%M%S')}.{uuid.uuid4().hex[:6]}"
        self.loc.move(rel, dest)
        return self.loc.path(dest)

    def quarantine_damaged(self) -> list[tuple[Path, Path | None, str]]:
        """(launch, owning the location) Every damaged file moved aside, after a commit that retracts the trials it
        held: a crash at any moment leaves those trials pending, never "done" without their data. A damaged KL
        reference retracts the baseline that made it, so the baseline runs again. Also migrates an old folder."""
        moved = []
        if self.is_legacy():
            moved += self.migrate_legacy()
        st = self.state()
        bad = self._damaged(st, full=True)
        retract = sorted({t for _, _, ids in bad for t in ids if t in st.trials})
        if retract:
            self._commit({"kind": "retract", "token": self.token, "trial_ids": retract,
                          "why": {f: why for f, why, _ in bad}})
        for f, why, ids in bad:
            name = f.split("/", 1)[-1]
            dest = None
            if f in ("data", "refs", "_log"):
                pass  # a link or file where a folder belongs: named, never followed; the user decides
            elif f.startswith("_log/") and _ENTRY.match(name):
                if self.loc.lstat(f) is not None:
                    dest = self.quarantine(self.loc.path(f))
                # the commit's effect is unknown: a void entry keeps the log whole, its trials run again
                self.loc.create_exclusive(f, json.dumps({"kind": "void", "was": why}).encode())
            elif self.loc.lstat(f) is not None:
                dest = self.quarantine(self.loc.path(f))
            note = why if not ids else f"{why}; {len(ids)} trial(s) run again"
            moved.append((self.loc.path(f), dest, note))
        if bad:
            self.forget()
        return moved

    def remove_stale_temp_files(self, older_than_s: float = 0.0) -> int:
        """(launch, owning the location) Delete what killed writers left: temporary files, and data files no commit
        references, once older than the reader grace period."""
        n = 0
        now = time.time()
        st = self.state()
        used = {f for live in st.trials.values() for f in (*live.files.values(), live.ref) if f}
        for d in ("", "_log", "data", "refs", "trials", "metrics", "samples"):
            for name in self.loc.list(d):
                rel = f"{d}/{name}" if d else name
                s = self.loc.lstat(rel)
                if s is None or not stat.S_ISREG(s.st_mode):
                    continue
                stale_tmp = name.startswith(".") and name.endswith(".tmp") and now - s.st_mtime > older_than_s
                garbage = d == "data" and rel not in used and now - s.st_mtime > GC_AFTER_S and not st.legacy
                if stale_tmp or garbage:
                    self.loc.delete(rel)
                    n += 1
        return n

    # ------------------------------------------------------------------------------------------------ compaction
    def compact(self, force: bool = False) -> bool:
        """(the owner) Merge the per-trial files into segments once COMPACT_TAIL are live, and the smallest segments
        when there are more than MAX_SEGMENTS; write a checkpoint and drop the log entries it makes unnecessary.
        Returns whether it did anything."""
        st = self.state()
        if st.legacy or st.bad:
            return False
        tail = [tid for tid, live in st.trials.items() if any(not _is_segment(f) for f in live.files.values())]
        segs: dict[str, int] = {}
        for live in st.trials.values():
            f = live.files.get("trials")
            if f is not None and _is_segment(f):
                segs[f] = segs.get(f, 0) + 1
        merge_tail = len(tail) >= COMPACT_TAIL or (force and tail)
        small = sorted(segs, key=lambda f: segs[f])[: len(segs) - MAX_SEGMENTS // 2] if len(segs) > MAX_SEGMENTS \
            else []
        if not merge_tail and not small:
            return False
        moved = set(tail if merge_tail else [])
        small_set = set(small)
        moved |= {tid for tid, live in st.trials.items() if live.files.get("trials") in small_set}
        segments = {}
        for kind in KINDS:
            ids = [t for t in moved if kind in st.trials[t].files]
            if not ids:
                continue
            segments[kind] = self._merge(st, kind, ids)
        self._commit({"kind": "compact", "token": self.token, "segments": segments,
                      "moved": {t: st.trials[t].seq for t in moved}})
        self.checkpoint()
        return True

    def _merge(self, st: State, kind: str, ids: list[str]) -> dict[str, Any]:
        import polars as pl

        by_file: dict[str, list[str]] = {}
        for t in ids:
            by_file.setdefault(st.trials[t].files[kind], []).append(t)
        parts = []
        for f, fids in by_file.items():
            lf = self._scan_files(kind, [f])
            parts.append(lf if st.sizes.get(f, (0, 1))[1] == len(fids) else lf.filter(pl.col("trial_id").is_in(fids)))
        rel = f"data/seg-{uuid.uuid4().hex}.{kind}.parquet"
        tmp = self.work / "data" / f".{rel.split('/')[1]}.tmp"  # a folder's work is the folder itself
        tmp.parent.mkdir(parents=True, exist_ok=True)
        frame = pl.concat(parts, how="vertical") if len(parts) > 1 else parts[0]
        frame.sink_parquet(tmp, compression="zstd", row_group_size=256 * 1024)
        if self.remote:  # written whole by one PutObject
            try:
                data = tmp.read_bytes()
                self.loc.write_new(rel, data)
            finally:
                tmp.unlink()
            return {"path": rel, "size": len(data), "n": len(ids)}
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, self.root / rel)
        return {"path": rel, "size": (self.root / rel).stat().st_size, "n": len(ids)}

    def checkpoint(self) -> None:
        """Write the state as a checkpoint; keep the previous one and the commits after it (a damaged newest
        checkpoint falls back on them), delete older ones."""
        st = self.state()
        rel = f"_log/{st.seq:020d}.checkpoint.parquet"
        if self.loc.lstat(rel) is None:
            self.loc.create_exclusive(rel, _parquet_bytes(_checkpoint_table(st)))
        names = self.loc.list("_log")
        cps = sorted((int(m.group(1)) for n in names if (m := _CHECKPOINT.match(n))), reverse=True)
        if len(cps) < 2:
            return
        keep_after = cps[1]
        for n in names:
            m = _ENTRY.match(n) or _CHECKPOINT.match(n)
            if m and (int(m.group(1)) <= keep_after and not (_CHECKPOINT.match(n) and int(m.group(1)) == keep_after)):
                self.loc.delete(f"_log/{n}")

    # ------------------------------------------------------------------------------------------------ old layout
    def migrate_legacy(self) -> list[tuple[Path, Path, str]]:
        """(launch) An old folder (one file per trial in trials/ metrics/ samples/) into the log: one commit imports
        every trial whose files are whole; a damaged file is quarantined and its trial runs again."""
        st = _legacy_state(self)
        moved = []
        for f, why, ids in st.legacy_bad:
            if self.loc.lstat(f) is not None:
                moved.append((self.loc.path(f), self.quarantine(self.loc.path(f)), f"{why}; its trial runs again"))
        records = []
        for tid, live in st.trials.items():
            rec = {"trial_id": tid, "status": live.status, "attempt": live.attempt,
                   "files": {k: {"path": f, "size": st.sizes[f][0]} for k, f in live.files.items()}}
            if live.ref:
                rec["ref"] = {"path": live.ref, "size": st.sizes[live.ref][0]}
            records.append(rec)
        self._state = State()
        owner = self.token
        self.loc.create_exclusive(f"_log/{1:020d}.json", json.dumps(
            {"kind": "owner", "token": owner, "at": time.time(), "migrated": True}).encode())
        self._commit({"kind": "trials", "token": owner, "trials": records, "migrated_from": "per-trial layout"})
        self.checkpoint()
        return moved


class CacheMirror:
    """The calibrated / ONNX checkpoint cache on an object store, under ``quantized/<key>/``: files copied through
    pyarrow (multipart for large ones), ``meta.json`` last, so an entry whose ``meta.json`` exists is whole (the same
    rule as the local cache). A failure to publish is logged, not fatal: the entry is only a cache."""

    PREFIX = "quantized"

    def __init__(self, loc):
        self.loc = loc

    def fetch(self, name: str, dest: Path) -> bool:
        base = f"{self.PREFIX}/{name}"
        if self.loc.lstat(f"{base}/meta.json") is None:
            return False
        self.loc.download_tree(base, dest, last="meta.json")
        return (dest / "meta.json").is_file()

    def publish(self, name: str, folder: Path) -> None:
        import logging

        try:
            self.loc.upload_tree(folder, f"{self.PREFIX}/{name}", last="meta.json")
        except Exception as e:  # noqa: BLE001 - this machine keeps its copy; another one makes its own
            logging.getLogger(__name__).warning("checkpoint %s not copied to %s: %s", name, self.loc.root, e)


def _study_json(doc: dict[str, Any]) -> str:
    """study.json: one top-level key per line and one list item (a trial, a launch) per line. json.dumps with an
    indent runs Python's pure encoder: 15 s for a study of 100k trials; this takes the C encoder's time."""
    def dump(v: Any) -> str:
        return json.dumps(v, sort_keys=True, default=str)

    lines = []
    for k in sorted(doc):
        v = doc[k]
        if isinstance(v, list) and v:
            body = ",\n".join(f"    {dump(x)}" for x in v)
            lines.append(f"  {dump(k)}: [\n{body}\n  ]")
        else:
            lines.append(f"  {dump(k)}: {dump(v)}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def damaged_error(damaged: list[tuple[Path, str]]) -> UserError:
    f, why = damaged[0]
    more = f" (and {len(damaged) - 1} more)" if len(damaged) > 1 else ""
    return UserError(f"damaged result file {f}{more}: {why}; `sweep launch` on its study quarantines it and reruns "
                     "the trial")


def _legacy_state(store: ResultsStore) -> State:
    """The state of a folder in the old per-trial layout, every file checked as the log's files are."""
    st = State(legacy=True)
    bad: list[tuple[str, str, set[str]]] = []
    loc = store.loc
    rows: dict[str, dict] = {}
    for name in sorted(loc.list("trials")):
        if not name.endswith(".parquet"):
            continue
        rel, tid = f"trials/{name}", name[: -len(".parquet")]
        why = store._check_file(rel, "trials", None, 1, tid, full=True)
        if why is None:
            try:
                with loc.open_regular(rel) as fh:
                    row = pq.read_table(fh, columns=["status", "attempt", "is_baseline", "kl_reference_id"]
                                        ).to_pylist()[0]
                if row["status"] not in TRIAL_STATUSES:
                    why = f"status {row['status']!r}"
            except Exception as e:  # noqa: BLE001
                why = _why(e)
        if why is not None:
            bad.append((rel, why, set()))
            continue
        rows[tid] = row
        st.sizes[rel] = (loc.lstat(rel).st_size, 1)
        st.trials[tid] = Live(row["status"], int(row.get("attempt") or 1), 0, {"trials": rel})
    for kind in ("metrics", "samples"):
        for name in sorted(loc.list(kind)):
            if not name.endswith(".parquet"):
                continue
            rel, tid = f"{kind}/{name}", name[: -len(".parquet")]
            why = store._check_file(rel, kind, None, 1, tid, full=True)
            if why is not None:
                bad.append((rel, why, {tid} if tid in st.trials else set()))
                st.trials.pop(tid, None)  # a trial whose metrics are damaged is not done
                continue
            if tid in st.trials:
                st.sizes[rel] = (loc.lstat(rel).st_size, 1)
                st.trials[tid].files[kind] = rel
    for tid, row in rows.items():
        live = st.trials.get(tid)
        ref = row.get("kl_reference_id")
        if live is None or not (row.get("is_baseline") and ref and live.status == "done"):
            continue
        rel = f"refs/{ref}.parquet"
        if loc.lstat(rel) is None:
            continue
        why = store._check_file(rel, "ref", None, 1, None, full=True)
        if why is not None:
            bad.append((rel, why, {tid}))
            st.trials.pop(tid, None)
        else:
            st.sizes[rel] = (loc.lstat(rel).st_size, 1)
            live.ref = rel
    st.legacy_bad = bad
    return st
