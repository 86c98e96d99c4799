"""Accuracy in the same trial, end to end through `sweep launch`: lm-eval tasks on local data, KL to the baseline."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import polars as pl
import pytest

from sweeper.results import open_results

from helpers import (committed_rows, fast_benchmark, fast_kl, read_metrics, read_trials, sweep, sweep_popen,
                     write_study)

TASKS_DATA = Path(__file__).parent / "data" / "tasks"


def _study(tmp_path: Path, model: Path, shared: Path, tasks: str) -> Path:
    return write_study(tmp_path / "acc.py", f"""
        study = Study(
            name="acc",
            models=[{str(model)!r}],
            precisions=["fp32", "nf4"],
            compute_dtypes=["fp32"],
            benchmark={fast_benchmark()},
            perplexity=Perplexity({str(shared / "wikitext-2" / "test.txt")!r}, context=64, max_tokens=256),
            kl={fast_kl()},
            tasks=[{tasks}],
            eval_batch_size=4,
        )
    """)


def test_tasks_and_kl_in_the_same_trial(tmp_path, tiny_model, shared_data):
    tasks = (f'Task("piqa", limit=8, data={str(shared_data / "piqa" / "valid.jsonl")!r}), '
             f'Task("arc_easy", limit=4, num_fewshot=0, data={str(TASKS_DATA / "arc" / "ARC-Easy-Test.jsonl")!r})')
    study = _study(tmp_path, tiny_model, shared_data, tasks)
    results = tmp_path / "res"
    # kill the driver as soon as the baseline has finished: the rest must still get KL against the stored reference
    proc = sweep_popen("launch", str(study), "--results", str(results), "--max-concurrent", "1")
    end = time.time() + 600
    while time.time() < end and not committed_rows(results):
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    first = read_trials(results)
    assert first.height >= 1 and first["is_baseline"].to_list()[0], "the baseline runs first"
    r = sweep("launch", str(study), "--results", str(results))
    assert r.returncode == 0, r.stdout + r.stderr
    t = read_trials(results)
    assert t.height == 2 and set(t["status"]) == {"done"}
    m = read_metrics(results)
    # tasks: metric rows per task with lm-eval's names and stderr, n = limit
    tm = m.filter(pl.col("stage") == "tasks")
    for task, n in (("piqa", 8), ("arc_easy", 4)):
        rows = tm.filter(pl.col("task") == task)
        assert {"acc", "acc_norm"} <= set(rows["metric"]), task
        assert rows["stderr"].is_not_null().all() and set(rows["n"]) == {n}
    # per-item records: one per item per metric and trial, enough to pair trials by doc_id
    s = open_results(str(results)).samples.collect()
    for tid in t["trial_id"]:
        mine = s.filter((pl.col("trial_id") == tid) & (pl.col("metric") == "acc"))
        assert mine.filter(pl.col("task") == "piqa").height == 8
        assert mine.filter(pl.col("task") == "arc_easy").height == 4
        assert mine["gold_loglik"].is_not_null().all()
    # KL: baseline 0, quantized > 0, both against the baseline's stored reference
    kl = m.filter((pl.col("stage") == "kl") & (pl.col("metric") == "kl_mean")).join(
        t.select("trial_id", "precision", "kl_reference_id"), on="trial_id")
    by = dict(zip(kl["precision"], kl["value"]))
    assert by["fp32"] == pytest.approx(0.0, abs=1e-6) and by["nf4"] > 1e-4
    assert kl["kl_reference_id"].n_unique() == 1
    assert (results / "refs" / f"{kl['kl_reference_id'][0]}.parquet").exists()
    cats = m.filter(pl.col("stage") == "prompts")
    assert cats["task"].n_unique() == 12 and set(cats["metric"]) >= {"kl_mean", "success_rate", "avg_generated_tokens"}
    # sweep results shows the task main metrics and KL next to the speed columns
    out = sweep("results", str(results), "--format", "csv")
    header = out.stdout.splitlines()[0].split(",")
    assert {"piqa", "arc_easy", "kl_mean", "decode_tok_s", "perplexity"} <= set(header), header


@pytest.mark.parametrize("make, needle", [
    (lambda d: d / "missing.jsonl", "does not exist"),
    (lambda d: (d / "bad.jsonl").write_text('{"goal": "x"\n') and d / "bad.jsonl", "bad.jsonl"),
])
@pytest.mark.parametrize("dry_run", [False, True])
def test_task_with_missing_or_malformed_data_exits_2(tmp_path, tiny_model, shared_data, make, needle, dry_run):
    """A launch checks the tasks while Ray starts (a dry run before printing): the error is still one line, exit 2,
    and nothing is run or written."""
    path = make(tmp_path)
    study = _study(tmp_path, tiny_model, shared_data, f'Task("piqa", limit=4, data={str(path)!r})')
    r = sweep("launch", str(study), "--results", str(tmp_path / "res"), *(["--dry-run"] if dry_run else []))
    assert r.returncode == 2, r.stdout + r.stderr
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and "Traceback" not in r.stderr, r.stderr
    assert "running" not in r.stdout and "pending" not in r.stdout, r.stdout
    assert not (tmp_path / "res").exists()


def test_background_check_runs_beside_the_caller_and_hands_back_its_error():
    """launch.Background: how `sweep launch` checks the tasks while Ray starts."""
    import threading

    from sweeper.errors import UserError
    from sweeper.launch import Background

    started, release = threading.Event(), threading.Event()

    def check(name):
        started.set()
        assert release.wait(10)
        raise UserError(f"unknown task {name!r}")

    after: list[str] = []
    bg = Background(check, "arc_easyy", then=lambda: after.append(threading.current_thread().name))
    assert started.wait(10)  # it runs while the caller goes on (in `sweep launch`: while Ray starts)
    release.set()
    with pytest.raises(UserError, match="unknown task 'arc_easyy'"):
        bg.result()
    assert after == []  # `then` (in `sweep launch`: importing Ray Tune) only follows a check that passed
    Background(lambda: None, then=lambda: after.append(threading.current_thread().name)).result()  # no error
    assert after == ["sweep-<lambda>"]  # on the check's own thread
