"""What committing one trial's results costs (issue 18 (d)): row + 65 metric rows + MMLU-sized samples (14,042 items
x 2 metrics), written with ``ResultsStore.write_trial`` (data files, fsyncs, the exclusive-create commit), median
over ``--trials`` trials, into a local folder or an object store location (docs/store.md, "Object stores").

    python benchmarks/trial_write_cost.py --out /tmp/write_cost --trials 200            # a local folder
    python benchmarks/trial_write_cost.py --moto --out s3://bench/wcost --trials 200    # moto's S3 server, started here
    python benchmarks/trial_write_cost.py --gcs --out gs://bench/wcost --trials 200     # fake-gcs-server, started here
    python benchmarks/trial_write_cost.py --out s3://BUCKET/PREFIX --trials 200         # any S3 (AWS_* environment)
    python benchmarks/trial_write_cost.py --out gs://BUCKET/PREFIX --trials 200         # GCS (application default)
"""
from __future__ import annotations

import argparse
import contextlib
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


def stored_bytes(store) -> int:
    if not store.remote:
        return sum(f.stat().st_size for f in Path(store.root).rglob("*") if f.is_file())
    from pyarrow import fs

    return sum(i.size or 0 for i in store.loc.fs.get_file_info(fs.FileSelector(store.loc._fs_path(""), recursive=True)))


def main() -> None:
    from sweeper.location import is_uri
    from sweeper.store import ResultsStore

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True, help="a folder (emptied first), s3:// or gs://bucket/prefix (a fresh "
                    "prefix)")
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--moto", action="store_true", help="start moto's S3 server here and create the bucket")
    ap.add_argument("--gcs", action="store_true", help="start fake-gcs-server here and create the bucket")
    a = ap.parse_args()
    if not is_uri(a.out):
        shutil.rmtree(a.out, ignore_errors=True)
    with contextlib.ExitStack() as stack:
        if a.moto or a.gcs:  # the tests' servers (tests/helpers.py): a free port of 127.0.0.1 outside 6000-6999
            sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
            from helpers import fake_gcs, moto_s3

            server = moto_s3 if a.moto else fake_gcs
            os.environ.update(stack.enter_context(server(a.out.split("://", 1)[1].split("/", 1)[0])))
        run(a, ResultsStore(a.out))


def run(a, store) -> None:
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
    size = stored_bytes(store) / a.trials / 2**20
    q = statistics.quantiles(times, n=10)
    server = "moto S3 server" if a.moto else "fake-gcs-server" if a.gcs else None
    where = (f"{server} on 127.0.0.1" if server else "object store") if store.remote else "local folder"
    print(f"{a.trials} trials into {a.out} ({where}): median {statistics.median(times) * 1e3:.1f} ms per trial, "
          f"p10 {q[0] * 1e3:.1f} ms, p90 {q[-1] * 1e3:.1f} ms; CPU median {statistics.median(cpu) * 1e3:.1f} ms; "
          f"{size:.2f} MiB per trial on disk; load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
