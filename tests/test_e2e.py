"""End to end through `sweep launch` as a subprocess: real Ray (local), real bitsandbytes, real Parquet."""
from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import polars as pl
import pytest

from helpers import (committed_rows, fast_benchmark, fast_kl, read_metrics, read_trials, sweep, sweep_popen,
                     descendant_pids, warm_worker_pids, write_study)

PRECISIONS = ["fp32", "bf16", "int8", "nf4", "fp4"]


@pytest.fixture()
def study_file(tmp_path, tiny_model, shared_data) -> Path:
    return write_study(tmp_path / "tiny.py", f"""
        study = Study(
            name="tiny",
            models=[{str(tiny_model)!r}],
            precisions={PRECISIONS!r},
            compute_dtypes=["fp32"],
            benchmark={fast_benchmark()},
            perplexity=Perplexity({str(shared_data / "wikitext-2" / "test.txt")!r}, context=64, max_tokens=256),
            kl={fast_kl()},
        )
    """)


def test_launch_runs_every_cell_and_results_prints_them(study_file, tmp_path):
    results = tmp_path / "res"
    r = sweep("launch", str(study_file), "--results", str(results), "--num-cpus", "2", env={"SWEEPER_RAY_AS_IS": "0"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "summary: 5/5 done, 0 failed" in r.stdout
    trials = read_trials(results)
    assert sorted(trials["precision"].to_list()) == sorted(PRECISIONS)
    assert set(trials["status"]) == {"done"}
    assert len(committed_rows(results)) == 5
    # metrics: long form
    m = read_metrics(results)
    assert {"trial_id", "stage", "task", "metric", "value", "stderr", "n"} <= set(m.columns)
    wide = (m.filter(pl.col("stage") == "load").pivot(on="metric", index="trial_id", values="value")
            .join(trials.select("trial_id", "precision"), on="trial_id"))
    fp = dict(zip(wide["precision"], wide["footprint_bytes"]))
    assert fp["nf4"] < fp["int8"] < fp["fp32"]
    assert fp["fp4"] == fp["nf4"] and fp["bf16"] < fp["fp32"]
    bench = m.filter(pl.col("stage") == "benchmark")
    for metric in ("prefill_ms", "decode_tok_s", "sequence_ms", "peak_memory_bytes"):
        vals = bench.filter(pl.col("metric") == metric)["value"]
        assert len(vals) == 5 and (vals > 0).all(), metric
    tput = bench.filter(pl.col("metric") == "throughput_tok_s")
    assert sorted(set(tput["batch_size"])) == [1, 2]
    ppl = m.filter(pl.col("metric") == "token_perplexity")["value"]
    assert len(ppl) == 5 and ppl.is_finite().all() and (ppl > 1).all()
    assert set(trials["device"]) == {"cpu"}
    # a trial's start-up, in order: the Ray worker process, the Tune trial in it, the load; and the warm worker that
    # ran it (every trial here, asserted below) started, then was ready, before the load. It may have been forked
    # after the Tune trial began: the trial waits for its pool's parent to fork it (CI saw it 0.13 s after)
    for row in trials.iter_rows(named=True):
        ray_worker, entered, load = row["ray_worker_started_at"], row["trainable_started_at"], row["load_started_at"]
        assert ray_worker <= entered <= load < ray_worker + 600, row
        assert row["process_started_at"] <= row["warm_worker_ready_at"] <= load, row
    # a local launch's Tune trials run in Ray's idle worker processes, up before Tune started, not in processes Ray
    # starts for them (local_ray.tune_actors_without_runtime_env): the baseline phase's trial shows it (a later
    # phase finds fewer idle workers: an actor's process ends with it)
    fits = [e for e in map(json.loads, (results / "_tune" / "events.jsonl").read_text().splitlines())
            if e["event"] == "fit"]
    assert [(f["phase"], f["actor_runtime_env"]) for f in fits] == [("phase1", False), ("phase2", False)], fits
    baseline = trials.filter(pl.col("is_baseline"))
    assert baseline["ray_worker_started_at"][0] < fits[0]["at"] < baseline["trainable_started_at"][0], (fits, baseline)
    # bitsandbytes is imported before the load clock, once per process: a warm worker did it before its first trial
    # (sweeper/warm_worker.py); in a Ray worker, its first bitsandbytes trial pays it (transformers never imports
    # bitsandbytes on its own) and later ones find it imported
    imports = (m.filter(pl.col("metric") == "library_import_s")
               .join(trials.select("trial_id", "precision", "worker_pid", "worker_trial_index", "warm_worker"),
                     on="trial_id")
               .filter(pl.col("precision").is_in(["int8", "nf4", "fp4"])).sort("worker_pid", "worker_trial_index"))
    assert imports.height == 3, imports  # every bitsandbytes load reports it
    for (pid, warm), group in imports.group_by("worker_pid", "warm_worker", maintain_order=True):
        values = group["value"].to_list()
        assert (all(v == 0.0 for v in values) if warm else values[0] > 0 and all(v == 0.0 for v in values[1:])), \
            (pid, group)
    # the launch started warm workers (2 CPUs, 1 per trial: two) and every trial ran in them, not in Ray's workers
    # (the baseline in the KL phase, the other four in the next: its Tune trials found the workers let go)
    assert "warm workers: 2 starting on this machine" in r.stdout
    assert trials["warm_worker"].all() and trials["worker_pid"].n_unique() <= 2, trials.select("warm_worker", "worker_pid")
    # their logs are kept with the results: the parent forked the two workers (CPU), each said it was ready
    (logs,) = (results / "_warm").iterdir()
    assert "forking its workers" in (logs / "parent.log").read_text()
    assert all(" ready: {" in (logs / f"worker-{i}.log").read_text() for i in range(2))
    assert (trials["warm_worker_ready_at"] < trials["load_started_at"]).all()
    # study.json records the expanded study
    assert '"name": "tiny"' in (results / "study.json").read_text()
    # sweep results: one readable row per trial, in every format
    out = sweep("results", str(results), "--format", "markdown")
    assert out.returncode == 0, out.stderr
    for p in PRECISIONS:
        assert f"| {p} " in out.stdout
    for col in ("load_s", "weights_gb", "peak_gb", "decode_tok_s", "batch_tok_s", "perplexity"):
        assert col in out.stdout
    csv = sweep("results", str(results), "--format", "csv")
    assert csv.returncode == 0 and len(csv.stdout.strip().splitlines()) == 6
    assert {"trial_id", "prefill_ms", "sequence_ms"} <= set(csv.stdout.splitlines()[0].split(","))  # exports: all
    # a relaunch redoes nothing
    again = sweep("launch", str(study_file), "--results", str(results))
    assert again.returncode == 0 and "nothing to do: all 5 trials are done" in again.stdout


def test_resume_after_sigkill_redoes_nothing(study_file, tmp_path):
    results = tmp_path / "res"
    proc = sweep_popen("launch", str(study_file), "--results", str(results), "--max-concurrent", "1")
    deadline = time.time() + 300
    first: dict[str, bytes] = {}
    while time.time() < deadline and not first:
        first = committed_rows(results)
        time.sleep(0.2)
    assert first, "no trial finished in time"
    warm = warm_worker_pids(parent=proc.pid)
    assert len(warm) >= 2, f"the launch started no warm workers: {warm}"  # the pool's parent and a worker
    ray_processes = descendant_pids(proc.pid)  # the private Ray instance (and the warm workers)
    assert any(b"default_worker.py" in cmd for cmd in ray_processes.values()), ray_processes  # a Tune trial's
    # one node, this one: no StoreWriter actor (scheduler.start_store_writer), whose process no trial would call
    assert not any(cmd.startswith(b"ray::StoreWriterImpl") for cmd in ray_processes.values()), ray_processes
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # its warm workers and its Ray instance, trial processes included, die with it (they would otherwise keep a GPU's
    # memory) within seconds; Ray's two node agents, which run no trial, end on their own a minute later (65 s here)
    agents = (b"ray::DashboardAgent", b"ray::RuntimeEnvAgent")

    def left(agents_too: bool) -> dict[int, bytes]:
        return {pid: cmd for pid, cmd in descendant_pids(None, ray_processes).items()
                if agents_too or not cmd.startswith(agents)}

    deadline = time.time() + 30
    while time.time() < deadline and (set(warm) & set(warm_worker_pids()) or left(False)):
        time.sleep(0.2)
    assert not set(warm) & set(warm_worker_pids())
    assert not left(False), left(False)
    deadline = time.time() + 150
    while time.time() < deadline and left(True):
        time.sleep(1)
    assert not left(True), left(True)
    snapshot = committed_rows(results)
    assert 1 <= len(snapshot) < 5
    r = sweep("launch", str(study_file), "--results", str(results))
    assert r.returncode == 0, r.stdout + r.stderr
    trials = read_trials(results)
    assert trials.height == 5 and set(trials["status"]) == {"done"}
    assert trials["trial_id"].n_unique() == 5
    after = committed_rows(results)
    for tid, data in snapshot.items():  # what was finished before the kill was not run again
        assert after[tid] == data
    assert f"({len(snapshot)} already done, skipped)" in r.stdout
    st = sweep("status", str(study_file), "--results", str(results))
    assert st.returncode == 0 and "5 trials: 5 done, 0 failed, 0 pending" in st.stdout, st.stdout + st.stderr
    assert not list(results.rglob(".*.tmp")), "temporary files left visible"


def test_dry_run_prints_the_trial_table(study_file, tmp_path):
    r = sweep("launch", str(study_file), "--results", str(tmp_path / "res"), "--dry-run")
    assert r.returncode == 0, r.stderr
    ids = set(re.findall(r"\b[0-9a-f]{12}\b", r.stdout))
    assert len(ids) == 5
    assert "study tiny: 5 trial(s)" in r.stdout
    for col in ("trial_id", "model", "precision", "compute_dtype", "gpu_share"):
        assert col in r.stdout
    assert not (tmp_path / "res").exists(), "a dry run writes nothing"


@pytest.mark.parametrize("body, needle", [
    ("study = Study(name='x', models=['org/m'], precisions=['int3'])", "unknown precision 'int3'; allowed: fp32, fp16"),
    ("x = 1", "defines no module-level `study`"),
    ("study = Study(name='x', models=['org/m'],, precisions=['nf4'])", "syntax error at line"),
    ("study = Study(name='x', models=['./no/such/model'], precisions=['nf4'])", "model folder './no/such/model' does not exist"),
    ("study = 3", "`study` must be a sweeper.Study, got int"),
])
def test_bad_study_exits_2_with_one_line(tmp_path, body, needle):
    f = write_study(tmp_path / "bad.py", body)
    r = sweep("launch", str(f), "--results", str(tmp_path / "res"))
    assert r.returncode == 2, r.stdout + r.stderr
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and str(f) in err[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "res").exists()
