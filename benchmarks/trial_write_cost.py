"""What committing one trial's results costs (issue 18 (d)): row + 65 metric rows + MMLU-sized samples (14,042 items
x 2 metrics), written with ``ResultsStore.write_trial`` (data files, fsyncs, the exclusive-create commit), median
over ``--trials`` trials. Local folder only in this build (object stores are not wired in yet).

    python benchmarks/trial_write_cost.py --out /tmp/write_cost --trials 200
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MMLU_ITEMS = 14_042


def samples(tid: str, rng) -> pa.Table:
    n = MMLU_ITEMS * 2  # acc and acc_norm per item
    doc = np.repeat(np.arange(MMLU_ITEMS), 2)
    return pa.table({
        "trial_id": pa.array([tid] * n), "task": pa.array(["mmlu_" + str(i % 57) for i in doc]),
        "doc_id": pa.array(doc, pa.int64()), "filter": pa.array(["none"] * n),
        "metric": pa.array(["acc", "acc_norm"] * MMLU_ITEMS), "value": pa.array(rng.random(n) > 0.5, pa.float64()),
        "weight": pa.array(np.ones(n)), "correct": pa.array(rng.random(n) > 0.5),
        "gold_loglik": pa.array(-rng.random(n) * 5), "prompt_hash": pa.array([f"{i:016x}" for i in doc]),
        "doc_hash": pa.array([f"{i * 7:016x}" for i in doc]),
    })


def main() -> None:
    from sweeper.store import ResultsStore

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--trials", type=int, default=200)
    a = ap.parse_args()
    shutil.rmtree(a.out, ignore_errors=True)
    store = ResultsStore(a.out)
    store.take_over("write-cost")
    rng = np.random.default_rng(0)
    times, cpu = [], []
    for i in range(a.trials):
        tid = f"t{i:05d}"
        m = [{"trial_id": tid, "stage": "benchmark", "metric": f"m{j}", "value": float(j)} for j in range(65)]
        s = samples(tid, rng)  # made before the clock: the cost measured is moving and writing
        row = {"trial_id": tid, "study": "w", "model": "m", "precision": "fp32", "status": "done", "attempt": 1}
        t0, c0 = time.perf_counter(), time.process_time()
        store.write_trial(row, m, s)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        store.compact()  # as the launch does after each result
    size = sum(f.stat().st_size for f in a.out.rglob("*") if f.is_file()) / a.trials / 2**20
    q = statistics.quantiles(times, n=10)
    print(f"{a.trials} trials into {a.out} (local folder): median {statistics.median(times) * 1e3:.1f} ms per trial, "
          f"p10 {q[0] * 1e3:.1f} ms, p90 {q[-1] * 1e3:.1f} ms; CPU median {statistics.median(cpu) * 1e3:.1f} ms; "
          f"{size:.2f} MiB per trial on disk; load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
