"""Sweeps that survive: kills, Ctrl-C, failing trials, locks, damaged files, secrets (issue: reliability)."""
from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
from pathlib import Path

import polars as pl
import pytest

from sweeper.results import open_results

from helpers import (committed_rows, fast_benchmark, free_port, pids_matching, read_trials, small_study, sweep,
                     sweep_popen, write_study)
from helpers import wait_for as _wait_for

SECRET = "hf_sweeper_test_secret_value_123"


def _study(path: Path, model: Path, precisions, name="rel", extra="") -> Path:
    return small_study(path, model, precisions, name, extra=extra)


def _rows(results: Path) -> dict[str, bytes]:
    """trial_id -> its committed row file's bytes (docs/store.md)."""
    return committed_rows(results)


def test_sigkill_at_random_moments_then_resume(tmp_path, tiny_model):
    """Kill the driver a few times at random moments; every trial ends done exactly once, finished files untouched."""
    rng = random.Random(1234)
    study = _study(tmp_path / "s.py", tiny_model, ["fp32", "bf16", "int8", "nf4", "fp4"])
    results = tmp_path / "res"
    finished: dict[str, bytes] = {}
    kills = 0
    for kill in range(3):
        proc = sweep_popen("launch", str(study), "--results", str(results), "--max-concurrent", "1")
        # a random moment: while Ray starts (the first kill), then while a trial runs or right as a file lands
        # (after this launch's next file landed): moments tied to what the launch is doing, not to how fast it is
        before = len(_rows(results))
        if kill == 0:
            time.sleep(rng.uniform(1.0, 4.0))
        else:
            deadline = time.time() + 180
            while len(_rows(results)) <= before and time.time() < deadline and proc.poll() is None:
                time.sleep(0.05)
            time.sleep(rng.uniform(0.0, 0.5))
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        else:  # it finished every trial before the kill came
            assert proc.returncode == 0, proc.communicate()[0]
        proc.communicate()
        for tid, data in _rows(results).items():
            assert finished.setdefault(tid, data) == data, f"{tid}'s row changed after it was finished"
        # readers never see partial files: every committed file is whole (checked, then read)
        if results.is_dir():
            res = open_results(str(results))
            res.trials.collect(), res.metrics.collect()
        if len(finished) == 5:
            break
    assert kills >= 1, "every launch finished before its kill: the test killed nothing"
    assert finished, "no trial finished before the kills: the resume check below would prove nothing"
    r = sweep("launch", str(study), "--results", str(results))
    assert r.returncode == 0, r.stdout + r.stderr
    trials = read_trials(results)
    assert trials.height == 5 and trials["trial_id"].n_unique() == 5 and set(trials["status"]) == {"done"}
    after = _rows(results)
    for tid, data in finished.items():
        assert after[tid] == data
    assert not [p for p in results.rglob("*.tmp") if "_tune" not in p.parts]


def test_sigint_stops_cleanly_and_says_how_to_resume(tmp_path, tiny_model):
    study = _study(tmp_path / "s.py", tiny_model, ["fp32", "bf16", "int8", "nf4"])
    results = tmp_path / "res"
    proc = sweep_popen("launch", str(study), "--results", str(results), "--max-concurrent", "1")
    assert _wait_for(lambda: len(_rows(results)) >= 1)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert len(_rows(results)) < 4, out  # stopped before the end (trials run one at a time after the first)
    assert proc.returncode == 130, out
    assert "again to resume" in out
    r = sweep("launch", str(study), "--results", str(results))
    assert r.returncode == 0, r.stdout + r.stderr
    assert read_trials(results).height == 4


def _broken_model(tmp_path: Path, tiny_model: Path, kind: str) -> Path:
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    d = tmp_path / f"broken-{kind}"
    shutil.copytree(tiny_model, d)
    if kind == "nan":
        w = load_file(str(d / "model.safetensors"))
        w = {k: (torch.full_like(v, float("nan")) if "embed" in k else v) for k, v in w.items()}
        save_file(w, str(d / "model.safetensors"), metadata={"format": "pt"})
    elif kind == "no-weights":
        (d / "model.safetensors").unlink()
    return d


def test_failures_are_isolated_recorded_and_listed(tmp_path, tiny_model):
    nan_model = _broken_model(tmp_path, tiny_model, "nan")
    no_weights = _broken_model(tmp_path, tiny_model, "no-weights")
    study = write_study(tmp_path / "s.py", f"""
        study = Study(
            name="failing",
            models=[Model({str(tiny_model)!r}, label="good"), Model({str(nan_model)!r}, label="nan"),
                    Model({str(no_weights)!r}, label="noweights")],
            precisions=["fp32", "nf4"],
            compute_dtypes=["fp32"],
            benchmark={fast_benchmark()},
            kl=False,
        )
    """)
    results = tmp_path / "res"
    r = sweep("launch", str(study), "--results", str(results))
    assert r.returncode == 1, r.stdout + r.stderr  # some trials failed
    t = read_trials(results)
    assert t.height == 6
    good = t.filter(pl.col("model") == "good")
    assert set(good["status"]) == {"done"}
    nan = t.filter(pl.col("model") == "nan")
    assert set(nan["status"]) == {"failed"} and set(nan["error_type"]) == {"NaNLogits"}
    assert set(nan["error_stage"]) == {"benchmark"}
    nw = t.filter(pl.col("model") == "noweights")
    assert set(nw["status"]) == {"failed"} and set(nw["error_stage"]) == {"load"}
    assert all(nw["error"].str.len_chars() > 10)
    s = sweep("status", str(results))
    assert s.returncode == 0
    assert "2 done, 4 failed, 0 pending" in s.stdout
    assert s.stdout.count("FAILED") == 4 and "NaNLogits" in s.stdout
    # a relaunch retries failed trials (attempt 2) and leaves done ones alone
    before = _rows(results)
    r2 = sweep("launch", str(study), "--results", str(results))
    assert r2.returncode == 1
    t2 = read_trials(results)
    assert set(t2.filter(pl.col("status") == "failed")["attempt"]) == {2}
    after = _rows(results)
    for tid in good["trial_id"]:
        assert after[tid] == before[tid]


def test_second_launch_is_refused_and_stale_lock_taken_over(tmp_path, tiny_model):
    study = _study(tmp_path / "s.py", tiny_model, ["fp32", "bf16"])
    results = tmp_path / "res"
    lock = tmp_path / ".res.launch.lock"
    proc = sweep_popen("launch", str(study), "--results", str(results), "--max-concurrent", "1")
    try:
        assert _wait_for(lock.exists, timeout=60)
        r = sweep("launch", str(study), "--results", str(results))
        assert r.returncode == 2
        err = r.stderr.strip().splitlines()
        assert len(err) == 1 and "is in use by another `sweep launch`" in err[0] and f"pid {proc.pid}" in err[0]
    finally:
        proc.kill()
        proc.wait()
    # the killed launch left its lock behind: the next launch detects it is stale and takes over
    assert lock.exists()
    r = sweep("launch", str(study), "--results", str(results))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "taking over a stale lock" in r.stderr
    assert not lock.exists()


def test_damaged_parquet_is_reported_quarantined_and_rerun(tmp_path, tiny_model):
    study = _study(tmp_path / "s.py", tiny_model, ["fp32", "nf4"])
    results = tmp_path / "res"
    assert sweep("launch", str(study), "--results", str(results)).returncode == 0
    from sweeper.store import ResultsStore

    victim = ResultsStore(results).trial_path(sorted(_rows(results))[0])
    victim.write_bytes(victim.read_bytes()[: len(victim.read_bytes()) // 2])  # truncated
    r = sweep("results", str(results))
    assert r.returncode == 2 and str(victim) in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = sweep("launch", str(study), "--results", str(results))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"damaged result file {victim}" in r.stderr
    assert list((results / "quarantine").rglob(victim.name + ".*"))
    t = read_trials(results)
    assert t.height == 2 and set(t["status"]) == {"done"}


def test_results_dir_of_another_study_and_unwritable_dir(tmp_path, tiny_model):
    study = _study(tmp_path / "s.py", tiny_model, ["fp32"])
    results = tmp_path / "res"
    results.mkdir()
    (results / "study.json").write_text(json.dumps({"name": "someone-else"}))
    r = sweep("launch", str(study), "--results", str(results))
    assert r.returncode == 2 and "belongs to study 'someone-else'" in r.stderr
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    r = sweep("launch", str(study), "--results", str(blocker / "res"))
    assert r.returncode == 2 and "not writable" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_no_secrets_in_results(tmp_path, tiny_model):
    study = _study(tmp_path / "s.py", tiny_model, ["fp32"])
    results = tmp_path / "res"
    env = {"HF_TOKEN": SECRET, "AWS_SECRET_ACCESS_KEY": SECRET, "MY_PASSWORD": SECRET}
    r = sweep("launch", str(study), "--results", str(results), env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    for f in results.rglob("*"):
        if f.is_file():
            assert SECRET.encode() not in f.read_bytes(), f"secret found in {f}"


# ----- a real two-node Ray cluster on this machine -------------------------------------------------------------

@pytest.fixture()
def two_node_cluster(tmp_path):
    import subprocess

    port = free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    common = ["--num-cpus", "1", "--disable-usage-stats"]
    ray = str(Path(sys.executable).parent / "ray")
    subprocess.run([ray, "start", "--head", "--port", str(port), "--include-dashboard", "false",
                    "--resources", '{"head_node": 1}', *common], check=True, env=env, capture_output=True, timeout=120)
    subprocess.run([ray, "start", "--address", f"127.0.0.1:{port}", "--resources", '{"worker_node": 1}', *common],
                   check=True, env=env, capture_output=True, timeout=120)
    yield f"127.0.0.1:{port}"
    # every process of both nodes names the GCS port (gcs_server as --gcs_server_port=PORT) or the worker node's
    # resource; `ray stop` would also stop other Ray instances of this machine
    def left() -> list[int]:
        return pids_matching(f":{port}", f"={port}", "worker_node")

    for pid in left():
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert _wait_for(lambda: not left(), timeout=10), f"processes of the cluster outlived it: {left()}"


def test_two_node_cluster_spreads_trials_and_survives_a_dead_worker_node(tmp_path, tiny_model, two_node_cluster):
    study = _study(tmp_path / "s.py", tiny_model, ["fp32", "bf16", "int8", "nf4", "fp4"], name="multi",
                   extra="resources=Resources(cpus_per_trial=1),")
    results = tmp_path / "shared-results"  # both nodes see this path (same machine)
    # no warm workers: they would make the head's trials start seconds faster than the worker node's cold ones, and
    # the head could then finish most of the sweep before the worker node wrote its first row (a CI run did)
    proc = sweep_popen("launch", str(study), "--results", str(results), "--address", two_node_cluster,
                       "--no-warm-workers")

    def nodes_seen() -> set[str]:
        return set(read_trials(results)["ray_node_id"]) if _rows(results) else set()

    # both nodes run trials; then the worker node dies mid-sweep
    assert _wait_for(lambda: len(nodes_seen()) == 2 or proc.poll() is not None, timeout=300)
    assert len(nodes_seen()) == 2, "trials did not spread over both nodes"
    assert len(_rows(results)) < 5, "the sweep ended before the worker node could be killed mid-sweep"
    killed_at, killed = time.time(), []
    for pid in pids_matching("worker_node"):
        if "raylet" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="ignore"):
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
    assert killed, "found no raylet of the worker node to kill"
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    t = read_trials(results)
    assert t.height == 5 and set(t["status"]) == {"done"} and t["trial_id"].n_unique() == 5
    # the node died mid-sweep: trials still ended after it
    ended = (t["load_started_at"] + t["duration_s"]).to_list()
    assert max(ended) > killed_at, "the sweep had finished before the node was killed"
