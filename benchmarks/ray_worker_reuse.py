"""Which Ray worker processes run an actor (CPU, local Ray): why a warm pool of task workers cannot serve Tune's trials.

    python3 benchmarks/ray_worker_reuse.py > benchmarks/logs/ray_worker_reuse_cpu.txt

1. Tasks run first, then actors: does an actor reuse a worker process that ran a task?
2. The same with a job runtime_env (sweep launch passes env_vars).
3. A Tune trial (reuse_actors=True): does it run in a worker that was idle before Tuner.fit?
"""
import os
import subprocess
import sys
import time

import ray


def idle_workers() -> set[int]:
    out = subprocess.run(["pgrep", "-f", "ray::IDLE"], capture_output=True, text=True).stdout
    return {int(p) for p in out.split()}


@ray.remote(num_cpus=0)
def task_pid() -> int:
    return os.getpid()


@ray.remote(num_cpus=1)
class Actor:
    def pid(self) -> int:
        return os.getpid()


def tasks_then_actors(runtime_env: dict | None) -> None:
    ray.init(address="local", include_dashboard=False, num_cpus=4, logging_level="WARNING",
             **({"runtime_env": runtime_env} if runtime_env else {}))
    try:
        time.sleep(3)
        before = idle_workers()
        tasks = set(ray.get([task_pid.remote() for _ in range(3)]))
        time.sleep(1)
        actors = [ray.get(a.pid.remote()) for a in [Actor.remote() for _ in range(3)]]
        print(f"runtime_env={runtime_env}: idle at start {sorted(before)}, task workers {sorted(tasks)}, "
              f"actor workers {actors}; actors in a task's worker: {sum(p in tasks for p in actors)}/3, "
              f"in a worker idle at start: {sum(p in before for p in actors)}/3", flush=True)
    finally:
        ray.shutdown()


def tune_trial() -> None:
    from ray import tune

    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    ray.init(address="local", include_dashboard=False, num_cpus=4, logging_level="WARNING",
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false", "PL_DISABLE_FORK": "1"}})
    try:
        time.sleep(3)
        ray.get([task_pid.remote() for _ in range(4)])  # warm task workers, as a pre-warming pool would
        time.sleep(1)
        before = idle_workers()

        def trainable(config):
            tune.report({"pid": os.getpid()})

        grid = tune.Tuner(tune.with_resources(trainable, {"cpu": 1}),
                          param_space={"x": tune.grid_search([1, 2, 3, 4])},
                          tune_config=tune.TuneConfig(reuse_actors=True),
                          run_config=tune.RunConfig(storage_path="/tmp/ray_worker_reuse_tune", verbose=0)).fit()
        pids = sorted({r.metrics["pid"] for r in grid})
        print(f"Tune: idle before fit {sorted(before)}, trial workers {pids}; in a worker idle before fit: "
              f"{sum(p in before for p in pids)}/{len(pids)}", flush=True)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    print(f"ray {ray.__version__}, python {sys.version.split()[0]}", flush=True)
    tasks_then_actors(None)
    tasks_then_actors({"env_vars": {"A": "1"}})
    tune_trial()
