"""Can Ray give a trial actor a process that warmed up before the trial? Two probes (issue 22):

1. A local instance with a job runtime_env: two warm-up *tasks* pinned to the node, then an actor. Does the actor run
   in one of the tasks' processes (then tasks could warm processes up for Tune's actors)?
2. The two-node harness (tests/cluster_harness.py) joined with a runtime_env whose worker_process_setup_hook marks the
   process: does Ray start any worker of the job before something asks for one (then the hook would warm ahead)?

    SWEEPER_HARNESS_PORT_BASE=6600 python3 benchmarks/ray_prestart_probe.py > benchmarks/logs/ray_prestart_probe.txt
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
MARKS = Path("/var/tmp/ray-prestart-probe")


def mark() -> None:
    """The probe's setup hook: one file per process that ran it."""
    (MARKS / str(os.getpid())).touch()


def tasks_then_actor() -> None:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PROBE": "1"}})
    node = ray.get_runtime_context().get_node_id()

    @ray.remote(num_cpus=0)
    def warm() -> int:
        return os.getpid()

    @ray.remote(num_cpus=1)
    class Trial:
        def pid(self) -> int:
            return os.getpid()

    pids = ray.get([warm.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote()
                    for _ in range(2)])
    actor = ray.get(Trial.remote().pid.remote())
    print(f"1. warm-up tasks ran in processes {sorted(pids)}; the actor after them in {actor}: "
          f"{'one of them' if actor in pids else 'a new process'}", flush=True)
    ray.shutdown()


def hook_prestart() -> None:
    import ray
    from cluster_harness import TwoNodeCluster

    MARKS.mkdir(parents=True, exist_ok=True)
    for f in MARKS.iterdir():
        f.unlink()
    with TwoNodeCluster() as cluster:
        ray.init(address=cluster.address, log_to_driver=False, logging_level="ERROR",
                 runtime_env={"env_vars": {"PYTHONPATH": str(REPO / "benchmarks")},
                              "worker_process_setup_hook": "ray_prestart_probe.mark"})
        seen = []
        for _ in range(10):
            time.sleep(1)
            seen.append(len(list(MARKS.iterdir())))
        print(f"2. processes that ran the job's setup hook, each second for 10 s after ray.init with nothing "
              f"submitted: {seen}", flush=True)
        ray.shutdown()


if __name__ == "__main__":
    print(f"python {sys.version.split()[0]}", flush=True)
    tasks_then_actor()
    hook_prestart()
