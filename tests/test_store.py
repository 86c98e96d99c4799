"""The results store cannot be made to lie (issue 26): one owner per location, commits visible whole or not at all,
every file checked before use. Each test names the defect of the old store it guards against (docs/store.md)."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sweeper.errors import UserError
from sweeper.lock import LaunchLock
from sweeper.results import open_results
from sweeper.store import ResultsStore, metrics_table, trial_table
from helpers import sweep

REPO = Path(__file__).resolve().parents[1]


def _row(tid: str, status: str = "done", attempt: int = 1, **kw) -> dict:
    return {"trial_id": tid, "study": "s", "model": "m", "precision": "fp32", "compute_dtype": "fp32",
            "status": status, "attempt": attempt, **kw}


def _metrics(tid: str, value: float) -> list[dict]:
    return [{"trial_id": tid, "stage": "load", "metric": "footprint_bytes", "value": value},
            {"trial_id": tid, "stage": "benchmark", "metric": "decode_tok_s", "value": value / 10}]


def _store(root: Path, n: int = 2) -> ResultsStore:
    store = ResultsStore(root)
    store.write_study({"name": "s", "trials": [{"trial_id": f"T{i}", "model": "m", "precision": "fp32",
                                                "compute_dtype": "fp32"} for i in range(1, n + 1)]})
    for i in range(1, n + 1):
        store.write_trial(_row(f"T{i}"), _metrics(f"T{i}", 1000.0 * i))
    return store


def _metric_values(root: Path, tid: str) -> list[float]:
    m = open_results(str(root)).metrics.collect()
    return sorted(m.filter(pl.col("trial_id") == tid)["value"].to_list())


# ---------------------------------------------------------------------------------------------------------- lock


def _contend(path: str, start, tried, q) -> None:
    start.wait()
    try:
        lock = LaunchLock(Path(path)).acquire()
        won = True
    except UserError:
        won = False
    q.put(won)
    tried.wait()  # every contender has tried before the winner lets go: two winners would be owners at once
    if won:
        lock.release()


def test_stale_lock_takeover_race_has_exactly_one_winner(tmp_path):
    """Defect 1: a stale lock was read, then overwritten, nothing atomic: two launches both took it over."""
    ctx = mp.get_context("fork")
    root = tmp_path / "res"
    root.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    contenders, rounds, double = 4, 30, 0
    for _ in range(rounds):
        stale = json.dumps({"host": os.uname().nodename, "pid": dead.pid, "create_time": 0.0, "since": 0.0,
                            "heartbeat": 0.0})
        (tmp_path / ".res.launch.lock").write_text(stale)  # left by a killed launch
        start, tried, q = ctx.Barrier(contenders), ctx.Barrier(contenders), ctx.Queue()
        procs = [ctx.Process(target=_contend, args=(str(root), start, tried, q)) for _ in range(contenders)]
        for p in procs:
            p.start()
        wins = sum(q.get(timeout=60) for _ in procs)
        for p in procs:
            p.join(60)
        assert wins >= 1
        double += wins > 1
    assert double == 0, f"{double} of {rounds} rounds had more than one owner at once"


def test_symlink_or_relative_path_is_the_same_lock(tmp_path, monkeypatch):
    """Defect 2: another path to the same folder skipped the lock (two launches at once on one folder)."""
    real = tmp_path / "real" / "res"
    real.mkdir(parents=True)
    (tmp_path / "link").symlink_to(real)
    (tmp_path / "parentlink").symlink_to(tmp_path / "real")
    with LaunchLock(real):
        with pytest.raises(UserError, match="in use by another"):
            LaunchLock(tmp_path / "link").acquire()
        with pytest.raises(UserError, match="in use by another"):
            LaunchLock(tmp_path / "parentlink" / "res").acquire()
        monkeypatch.chdir(tmp_path / "link")
        with pytest.raises(UserError, match="in use by another"):
            LaunchLock(Path("..") / "res").acquire()


_HOLDER = """
import socket, sys, time
real = time.time
socket.gethostname = lambda: "another-host"      # the owner runs on another host ...
time.time = lambda: real() - 3600                # ... whose clock is an hour behind
from pathlib import Path
from sweeper.lock import LaunchLock
LaunchLock(Path(sys.argv[1])).acquire()
print("held", flush=True)
time.sleep(120)
"""


def test_clock_skewed_or_paused_owner_keeps_its_lock(tmp_path):
    """Defect 3: the heartbeat's age was compared across hosts' clocks, so a skewed or paused owner lost a live lock."""
    root = tmp_path / "res"
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(root)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match="in use by another"):
            LaunchLock(root).acquire()
        holder.send_signal(signal.SIGSTOP)  # paused (a VM migrating, a debugger): still the owner
        time.sleep(1)
        with pytest.raises(UserError, match="in use by another"):
            LaunchLock(root).acquire()
        holder.send_signal(signal.SIGCONT)
    finally:
        holder.kill()
        holder.wait()
    with LaunchLock(root):  # once it is gone, the lock is free at once
        pass


def test_an_ended_owner_cannot_commit(tmp_path):
    """Fencing: a launch (or its leftover worker) whose ownership ended cannot make anything visible."""
    root = tmp_path / "res"
    old = ResultsStore(root)
    old.take_over("launch-A")
    old.write_trial(_row("T1"), _metrics("T1", 1.0))
    new = ResultsStore(root)
    new.take_over("launch-B")
    from sweeper.store import OwnershipLost

    with pytest.raises(OwnershipLost):
        old.write_trial(_row("T2"), _metrics("T2", 2.0))
    # even a commit that raced past the writer's check (written straight into the log) counts for nothing
    seq = new.state().seq + 1
    entry = {"kind": "trials", "token": "launch-A", "trials": [
        {"trial_id": "T3", "status": "done", "attempt": 1,
         "files": {"trials": {"path": new.state().trials["T1"].files["trials"], "size": 1}}}]}
    assert new.loc.create_exclusive(f"_log/{seq:020d}.json", json.dumps(entry).encode())
    assert set(ResultsStore(root).trial_status()) == {"T1"}
    new.write_trial(_row("T2"), _metrics("T2", 2.0))
    assert set(ResultsStore(root).trial_status()) == {"T1", "T2"}


# ---------------------------------------------------------------------------------------------------------- commits


def _crashing(real, crash_at: int, calls: list[int]):
    """``real``, except that its ``crash_at``-th call (counted in ``calls``) is a kill of the process."""
    def crashing(*a, **kw):
        calls[0] += 1
        if calls[0] == crash_at:
            raise KeyboardInterrupt("killed")
        return real(*a, **kw)

    return crashing


def test_crash_during_quarantine_never_leaves_a_done_trial_without_metrics(tmp_path, monkeypatch):
    """Defect 4: quarantine moved the metrics before the row; a crash between left the trial done without data."""
    for crash_at in (1, 2, 3):
        root = tmp_path / f"res{crash_at}"
        store = _store(root)
        path = store.metrics_path("T1")
        path.write_bytes(path.read_bytes()[:40])  # truncated
        real = os.replace
        monkeypatch.setattr(os, "replace", _crashing(real, crash_at, [0]))
        try:
            ResultsStore(root).quarantine_damaged()
        except KeyboardInterrupt:
            pass
        monkeypatch.setattr(os, "replace", real)
        status = ResultsStore(root).trial_status(skip_damaged=True)
        if status.get("T1") == "done":
            assert _metric_values(root, "T1") == [100.0, 1000.0], f"crash at call {crash_at}: done without metrics"
        assert status.get("T2") == "done"


def test_damaged_kl_reference_reruns_its_baseline(tmp_path):
    """Defect 5: a damaged reference was quarantined but its baseline stayed done: every KL trial then failed with
    BaselineMissing on every relaunch."""
    root = tmp_path / "res"
    store = ResultsStore(root)
    store.write_study({"name": "s"})
    ref = store.ref_path("ref1")
    ref.parent.mkdir(parents=True)
    pq.write_table(pa.table({"seq": pa.array([0], pa.int32()), "source": ["wikitext"]}), ref)
    store.write_trial(_row("B", is_baseline=True, kl_reference_id="ref1"), _metrics("B", 1.0))
    store.write_trial(_row("T", is_baseline=False, kl_reference_id="ref1"), _metrics("T", 2.0))
    ref.write_bytes(ref.read_bytes()[:30])
    moved = ResultsStore(root).quarantine_damaged()
    assert any(str(ref) == str(p) for p, _, _ in moved)
    status = ResultsStore(root).trial_status(skip_damaged=True)
    assert status.get("B") != "done", "the baseline whose reference was damaged must run again"
    assert status.get("T") == "done"


def test_uncommitted_metrics_are_invisible_and_a_retry_keeps_its_own(tmp_path, monkeypatch):
    """Defect 8: metrics written before a kill showed without their row, and a retry's metrics were paired with the
    earlier attempt's row."""
    real = pq.write_table
    for crash_at in (1, 2):
        root = tmp_path / f"res{crash_at}"
        store = ResultsStore(root)
        store.write_study({"name": "s"})
        store.write_trial(_row("T1", status="failed", attempt=1), _metrics("T1", 10.0))
        calls = [0]
        monkeypatch.setattr(pq, "write_table", _crashing(real, crash_at, calls))
        with pytest.raises(KeyboardInterrupt):
            store.write_trial(_row("T1", attempt=2), _metrics("T1", 20.0))
        calls[0] = 0
        with pytest.raises(KeyboardInterrupt):
            store.write_trial(_row("T2"), _metrics("T2", 30.0))
        monkeypatch.setattr(pq, "write_table", real)
        res = open_results(str(root))
        trials = res.trials.collect()
        assert trials["trial_id"].to_list() == ["T1"] and trials["attempt"].to_list() == [1]
        assert _metric_values(root, "T1") == [1.0, 10.0], f"crash at write {crash_at}"
        assert _metric_values(root, "T2") == []


# ---------------------------------------------------------------------------------------------------------- contents


def test_metrics_of_another_trial_are_named_not_read(tmp_path):
    """Defect 6a: a metrics file holding another trial's rows was read silently (wrong footprint, compression)."""
    root = tmp_path / "res"
    store = _store(root)
    store.metrics_path("T1").write_bytes(store.metrics_path("T2").read_bytes())
    with pytest.raises(UserError, match=str(store.metrics_path("T1"))):
        open_results(str(root))
    assert "T1" not in ResultsStore(root).trial_status(skip_damaged=True)
    ResultsStore(root).quarantine_damaged()
    assert _metric_values(root, "T2") == [200.0, 2000.0]
    assert set(ResultsStore(root).trial_status()) == {"T2"}


def test_wrong_column_type_is_named_and_repaired(tmp_path):
    """Defect 6b: a column of the wrong type crashed `sweep results` with a raw Polars traceback naming no file, and
    `launch` never repaired it."""
    from sweeper.query import run_query

    root = tmp_path / "res"
    store = _store(root)
    bad = metrics_table(_metrics("T1", 5.0)).to_pydict()
    bad["value"] = [str(v) for v in bad["value"]]
    path = store.metrics_path("T1")
    pq.write_table(pa.table(bad), path)
    with pytest.raises(UserError, match=str(path)):
        run_query([str(root)])
    ResultsStore(root).quarantine_damaged()
    assert set(ResultsStore(root).trial_status()) == {"T2"}
    assert "T2" in run_query([str(root)], fmt="csv")


def test_status_and_results_agree_on_a_row_under_another_trials_name(tmp_path):
    """Defect 6c: `status` keyed on file names and counted a row whose trial_id differs from its name as done, while
    `results` refused the folder."""
    root = tmp_path / "res"
    store = ResultsStore(root)
    store.write_study({"name": "s"})
    store.write_trial(_row("T1", status="failed"), [])
    store.write_trial(_row("T2"), _metrics("T2", 1.0))
    store.trial_path("T1").write_bytes(store.trial_path("T2").read_bytes())
    assert ResultsStore(root).trial_status(skip_damaged=True).get("T1") is None
    with pytest.raises(UserError, match=str(store.trial_path("T1"))):
        ResultsStore(root).trial_status()


def test_fifo_is_refused_not_waited_on(tmp_path):
    """Defect 7a: a FIFO named *.parquet hung `results` and `launch`."""
    root = tmp_path / "res"
    store = _store(root)
    path = store.metrics_path("T1")
    path.unlink()
    os.mkfifo(path)
    r = sweep("results", str(root), timeout=120)
    assert r.returncode == 2 and str(path) in r.stderr, r.stderr
    r = sweep("status", str(root), timeout=120)
    assert r.returncode == 2 and str(path) in r.stderr, r.stderr
    assert "T1" not in ResultsStore(root).trial_status(skip_damaged=True)


def test_a_local_file_is_read_into_memory_arrow_owns(tmp_path):
    """The Parquet reader gets a local file in memory Arrow owns, never through a Python file object: Arrow's pool
    threads then free no Python bytes, which needs the GIL and aborted `sweep results` (SIGABRT) when a thread did so
    as the interpreter exited (14 of 80 exits with a FIFO in the folder, 0 after: benchmarks/exit_abort_probe.py)."""
    store = _store(tmp_path / "res")
    rel = store.state().trials["T1"].files["metrics"]
    size = (tmp_path / "res" / rel).stat().st_size
    before = pa.total_allocated_bytes()
    reader = store.loc.open_regular(rel)
    assert pa.total_allocated_bytes() - before >= size, "the file is not in Arrow's memory"
    assert set(pq.ParquetFile(reader).read(use_threads=True)["trial_id"].to_pylist()) == {"T1"}
    empty = tmp_path / "res" / "empty"
    empty.write_bytes(b"")
    assert store.loc.read_bytes("empty") == b""


def test_symlink_out_of_the_folder_is_refused(tmp_path):
    """Defect 7b: symlinks out of the folder were followed (a foreign row counted as done)."""
    root = tmp_path / "res"
    store = ResultsStore(root)
    store.write_study({"name": "s"})
    store.write_trial(_row("T1", status="failed"), [])
    foreign = tmp_path / "elsewhere.parquet"
    pq.write_table(trial_table(_row("T1", status="done")), foreign)
    path = store.trial_path("T1")
    path.unlink()
    path.symlink_to(foreign)
    assert ResultsStore(root).trial_status(skip_damaged=True).get("T1") != "done"
    with pytest.raises(UserError, match=str(path)):
        open_results(str(root))


def _legacy(root: Path, rows: list[dict], metrics: dict[str, pa.Table]) -> None:
    """A folder in the layout sweeper wrote before the commit log: one file per trial."""
    for sub in ("trials", "metrics"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "study.json").write_text(json.dumps({"name": "s", "trials": [{"trial_id": r["trial_id"]} for r in rows]}))
    for r in rows:
        pq.write_table(trial_table(r), root / "trials" / f"{r['trial_id']}.parquet")
    for tid, t in metrics.items():
        pq.write_table(t, root / "metrics" / f"{tid}.parquet")


def test_a_small_file_that_decodes_to_gigabytes_is_refused(tmp_path):
    """Defect 7c: an 80 KB file expanding to 1.8 GB of strings was read whole (3.2 GB RSS)."""
    root = tmp_path / "res"
    big = "x" * (1 << 20)
    rows = 300  # 300 MB once decoded, a few KB on disk
    t = metrics_table(_metrics("T1", 1.0)).to_pydict()
    bomb = pa.table({**{k: pa.array([v[0]] * rows, metrics_table([]).schema.field(k).type) for k, v in t.items()
                        if k != "unit"},
                     "unit": pa.DictionaryArray.from_arrays(pa.array([0] * rows, pa.int32()), pa.array([big]))})
    _legacy(root, [_row("T1"), _row("T2")], {"T1": bomb, "T2": metrics_table(_metrics("T2", 2.0))})
    assert (root / "metrics" / "T1.parquet").stat().st_size < 100_000
    with pytest.raises(UserError, match=str(root / "metrics" / "T1.parquet")):
        open_results(str(root))
    assert ResultsStore(root).trial_status(skip_damaged=True) == {"T2": "done"}


# ---------------------------------------------------------------------------------------------------------- layout


def test_old_layout_is_read_and_migrated_once_by_launch(tmp_path):
    from sweeper.launch import prepare_store

    root = tmp_path / "res"
    rows = [_row(f"T{i}") for i in range(1, 4)] + [_row("F", status="failed")]
    _legacy(root, rows, {f"T{i}": metrics_table(_metrics(f"T{i}", float(i))) for i in range(1, 4)})
    (root / "metrics" / "T3.parquet").write_bytes(b"PAR1 not really")  # damaged: T3 runs again
    before = open_results(str(root), check=False)  # the old layout reads as it is
    assert sorted(before.trials.collect()["trial_id"].to_list()) == ["F", "T1", "T2"]
    with LaunchLock(root) as lock:
        lines = prepare_store(ResultsStore(root), lock.token)
    assert any("T3.parquet" in line for line in lines) and any("migrated" in line for line in lines)
    assert (root / "_log").is_dir()
    assert ResultsStore(root).trial_status() == {"T1": "done", "T2": "done", "F": "failed"}
    assert _metric_values(root, "T2") == [0.2, 2.0]
    with LaunchLock(root) as lock:  # a second launch finds nothing to migrate
        assert not any("migrated" in line for line in prepare_store(ResultsStore(root), lock.token))
    assert ResultsStore(root).trial_status() == {"T1": "done", "T2": "done", "F": "failed"}


def test_compaction_keeps_exactly_the_live_rows(tmp_path):
    """Reads open a few files at any size; retries and retractions stay right across compactions."""
    from sweeper import store as S

    root = tmp_path / "res"
    store = ResultsStore(root)
    store.take_over("L")
    expected = {}
    for i in range(3 * S.COMPACT_TAIL + 5):
        tid = f"T{i % 150}"  # the last 50 are committed twice: the later attempt wins
        attempt = expected.get(tid, (0, 0))[0] + 1
        store.write_trial(_row(tid, attempt=attempt), _metrics(tid, float(i)))
        expected[tid] = (attempt, float(i))
        store.compact()
    store.compact(force=True)
    live = store.state().trials
    assert all(f.startswith("data/seg-") for t in live.values() for f in t.files.values())
    res = open_results(str(root))
    trials = res.trials.collect()
    assert trials.height == len(expected) == 150
    assert dict(zip(trials["trial_id"], trials["attempt"])) == {t: a for t, (a, _) in expected.items()}
    m = res.metrics.filter(pl.col("stage") == "load").collect()
    assert dict(zip(m["trial_id"], m["value"])) == {t: v for t, (_, v) in expected.items()}
    assert len(os.listdir(root / "_log")) < 3 * S.COMPACT_TAIL


def test_damaged_checkpoint_and_commit_are_named_and_repaired(tmp_path):
    """The log itself: a damaged newest checkpoint falls back on the previous one and the commits after it; a commit
    that does not parse is named, and launch replaces it with a void one (its trial runs again)."""
    from sweeper import store as S

    root = tmp_path / "res"
    store = ResultsStore(root)
    store.take_over("L")
    for i in range(2 * S.COMPACT_TAIL):
        store.write_trial(_row(f"T{i}"), _metrics(f"T{i}", float(i)))
        store.compact()
    store.write_trial(_row("X"), _metrics("X", 1.0))
    log = sorted((root / "_log").iterdir())
    checkpoints = [p for p in log if p.name.endswith(".checkpoint.parquet")]
    assert len(checkpoints) == 2
    checkpoints[-1].write_bytes(b"not parquet")
    last = [p for p in log if p.name.endswith(".json")][-1]  # X's commit
    last.write_text("{truncated")
    with pytest.raises(UserError, match="checkpoint.parquet"):
        open_results(str(root))
    fresh = ResultsStore(root, token="L")
    assert set(fresh.trial_status(skip_damaged=True)) == {f"T{i}" for i in range(2 * S.COMPACT_TAIL)}
    moved = fresh.quarantine_damaged()
    assert {p.name for p, _, _ in moved} == {checkpoints[-1].name, last.name}
    assert json.loads(last.read_text())["kind"] == "void"
    after = ResultsStore(root)
    assert after.damaged_files() == [] and "X" not in after.trial_status()
    assert _metric_values(root, "T5") == [0.5, 5.0]
