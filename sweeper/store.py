"""The results store: the source of truth for what is done.

Layout (one study per directory, readable with ``polars.scan_parquet`` and a glob)::

    <root>/study.json                  the expanded study as launched, with versions and launch history
    <root>/trials/<trial_id>.parquet   one row: config columns, status, error, stage timings, environment
    <root>/metrics/<trial_id>.parquet  long rows: trial_id, stage, task, metric, batch_size, value, stderr, n, min, max, unit
    <root>/samples/<trial_id>.parquet  per-item rows of lm-eval tasks (paired statistics)
    <root>/refs/<ref_id>.parquet       a baseline's reference next-token log-probs for KL

Every file appears atomically: written to a hidden temporary name in the same folder, fsynced, then renamed. A trial's
metrics and samples are written before its trial row, so a trial row is the marker that the trial's files are whole.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from .errors import UserError

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
# Every trial row has every column (null where not applicable), so a plain `pl.scan_parquet("trials/*.parquet")`
# reads any mix of trials: done, failed in any stage, CPU or GPU.
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
    ("warm_worker_ready_at", _F),
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


class ResultsStore:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    # paths
    @property
    def study_json(self) -> Path:
        return self.root / "study.json"

    def trial_path(self, trial_id: str) -> Path:
        return self.root / "trials" / f"{trial_id}.parquet"

    def metrics_path(self, trial_id: str) -> Path:
        return self.root / "metrics" / f"{trial_id}.parquet"

    def samples_path(self, trial_id: str) -> Path:
        return self.root / "samples" / f"{trial_id}.parquet"

    def ref_path(self, ref_id: str) -> Path:
        return self.root / "refs" / f"{ref_id}.parquet"

    # writing
    def write_trial(self, row: dict[str, Any], metrics: list[dict[str, Any]], samples: pa.Table | None = None) -> None:
        """Write a trial's files; the trial row goes last, so its presence means the rest is whole."""
        tid = row["trial_id"]
        assert row.get("status") in TRIAL_STATUSES, row.get("status")
        t0 = time.perf_counter()
        atomic_write_table(self.metrics_path(tid), metrics_table(metrics))
        if samples is not None:
            atomic_write_table(self.samples_path(tid), samples)
        row = {**row, "stage_write_s": time.perf_counter() - t0}
        atomic_write_table(self.trial_path(tid), trial_table(row))

    def write_study(self, doc: dict[str, Any]) -> None:
        atomic_write_bytes(self.study_json, (json.dumps(doc, indent=2, sort_keys=True, default=str) + "\n").encode())

    # reading
    def read_study(self) -> dict[str, Any] | None:
        if not self.study_json.exists():
            return None
        try:
            return json.loads(self.study_json.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{self.study_json} is not valid JSON ({e}); move it aside or restore it") from None

    def trial_status(self, skip_damaged: bool = False) -> dict[str, str]:
        """trial_id -> status for every trial row present ("done" or "failed").

        A damaged row raises UserError naming it, or with ``skip_damaged`` counts as absent (launch quarantines it).
        """
        out: dict[str, str] = {}
        folder = self.root / "trials"
        if not folder.is_dir():
            return out
        for f in folder.glob("*.parquet"):
            try:
                status = pq.read_table(f, columns=["status"]).column("status")[0].as_py()
            except Exception as e:  # a damaged file must never be read as "not there"
                if skip_damaged:
                    continue
                raise UserError(f"corrupted result file {f} ({type(e).__name__}: {str(e).splitlines()[0]}); "
                                "`sweep launch` quarantines it and reruns its trial") from None
            out[f.stem] = status
        return out

    def damaged_files(self) -> list[tuple[Path, str]]:
        """Result files that cannot be read (truncated, not Parquet, wrong schema), with the reason."""
        bad = []
        for sub in ("trials", "metrics", "samples", "refs"):
            for f in sorted((self.root / sub).glob("*.parquet")) if (self.root / sub).is_dir() else []:
                try:
                    meta = pq.read_metadata(f)
                    if sub == "trials":
                        t = pq.read_table(f, columns=["trial_id", "status"])
                        if t.num_rows != 1 or t.column("trial_id")[0].as_py() != f.stem:
                            raise ValueError("not a single trial row for this trial id")
                    elif meta.num_columns == 0:
                        raise ValueError("no columns")
                except Exception as e:
                    bad.append((f, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"))
        return bad

    def quarantine(self, path: Path) -> Path:
        """Move a damaged file to <root>/quarantine/<sub>/ (kept for inspection, never read as results)."""
        dest = self.root / "quarantine" / path.parent.name / f"{path.name}.{time.strftime('%Y%m%d-%H%M%S')}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, dest)
        return dest

    def remove_stale_temp_files(self) -> int:
        """Delete temporary files a killed writer left behind (only under the launch lock: no writer is running)."""
        n = 0
        for d in (self.root, *(self.root / sub for sub in ("trials", "metrics", "samples", "refs"))):
            for f in d.glob(".*.tmp") if d.is_dir() else []:
                f.unlink(missing_ok=True)
                n += 1
        return n

    def quarantine_damaged(self) -> list[tuple[Path, Path, str]]:
        """Quarantine every damaged file; a trial whose metrics were damaged loses its row too, so it runs again."""
        moved = []
        for f, why in self.damaged_files():
            moved.append((f, self.quarantine(f), why))
            if f.parent.name in ("metrics", "samples"):
                row = self.trial_path(f.stem)
                if row.exists():
                    moved.append((row, self.quarantine(row), f"its {f.parent.name} file was damaged"))
        return moved

    def read_trial_row(self, trial_id: str) -> dict[str, Any] | None:
        p = self.trial_path(trial_id)
        if not p.exists():
            return None
        return pq.read_table(p).to_pylist()[0]
