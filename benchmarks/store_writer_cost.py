"""Cost of the StoreWriter actor (sweeper/remote_store.py) on a local Ray instance: the launch's call that starts it,
the time until it answers, and one round trip to it (what a trial off the launching node pays per call)."""
import statistics
import tempfile
import time

import ray

from sweeper.remote_store import start_writer
from sweeper.store import ResultsStore

ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
store = ResultsStore(tempfile.mkdtemp())
store.take_over("tok")
t0 = time.perf_counter()
actor = start_writer(store, "w", "sweeper")
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
ray.shutdown()
