"""Cost of the StoreWriter actor (sweeper/remote_store.py) on a local Ray instance: the launch's call that starts it,
the time until it answers, one round trip to it, and a trial's commit (row + 20 metrics + MMLU-sized samples,
14,042 rows) made directly (a trial on the launching node) vs through the actor (a trial on another node); medians.
Run: python benchmarks/store_writer_cost.py  (log: benchmarks/logs/i18-store-writer-cost.log)"""
import statistics
import random
import tempfile
import time

import pyarrow as pa
import ray

from sweeper.remote_store import RemoteStore, start_writer
from sweeper.store import ResultsStore

ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
tmp = tempfile.TemporaryDirectory()
store = ResultsStore(tmp.name)
store.take_over("tok")
t0 = time.perf_counter()
actor = start_writer("w", "sweeper")
actor.open.remote(str(store.root), store.token)
call = time.perf_counter() - t0
ray.get(actor.release.remote("x"))
ready = time.perf_counter() - t0
ts = []
for i in range(200):
    t0 = time.perf_counter()
    ray.get(ray.get_actor("w", namespace="sweeper").release.remote(f"t{i}"))
    ts.append(time.perf_counter() - t0)
print(f"start_writer returns in {call * 1000:.1f} ms; actor answers after {ready * 1000:.0f} ms; "
      f"round trip (get_actor + call), median of 200: {statistics.median(ts) * 1000:.2f} ms")

def trial(tid: str):
    row = {"trial_id": tid, "study": "s", "model": "m", "precision": "fp32", "compute_dtype": "fp32",
           "status": "done", "attempt": 1}
    metrics = [{"trial_id": tid, "stage": "tasks", "task": f"t{i}", "metric": "acc", "value": random.random()}
               for i in range(20)]
    n = 14042
    samples = pa.table({"trial_id": [tid] * n, "task": ["mmlu"] * n, "doc_id": list(range(n)), "filter": ["none"] * n,
                        "metric": ["acc"] * n, "value": [random.random() for _ in range(n)], "weight": [1.0] * n,
                        "correct": [random.random() > .5 for _ in range(n)], "gold_loglik": [-1.0] * n,
                        "prompt_hash": [f"{random.getrandbits(64):016x}" for _ in range(n)],
                        "doc_hash": [f"{random.getrandbits(64):016x}" for _ in range(n)]})
    return row, metrics, samples


remote = RemoteStore(actor, str(store.root), "tok")
direct, through = [], []
for i in range(40):
    for target, out in ((store, direct), (remote, through)):
        row, metrics, samples = trial(f"{'d' if target is store else 'r'}{i}")
        t0 = time.perf_counter()
        target.write_trial(row, metrics, samples)
        out.append(time.perf_counter() - t0)
print(f"commit of one trial, median of 40: direct {statistics.median(direct) * 1000:.1f} ms, through the actor "
      f"{statistics.median(through) * 1000:.1f} ms")
ray.shutdown()
tmp.cleanup()
