"""Can Ray give a trial actor a process that warmed up before the trial? Three probes (issue 22):

1. A local instance with a job runtime_env: two warm-up *tasks* pinned to the node, then an actor. Does the actor run
   in one of the tasks' processes (then tasks could warm processes up for Tune's actors)?
2. The two-node harness (tests/cluster_harness.py) joined with a runtime_env whose worker_process_setup_hook marks the
   process: does Ray start any worker of the job before something asks for one (then the hook would warm ahead)?
3. A node started by `ray start --head` (as cluster.yaml starts every node) with RAY_enable_worker_prestart=1 and
   RAY_preload_python_modules naming a module that imports torch and marks its process: does the node start
   preloaded idle workers before any driver joins, and does a joining driver's actor (with no runtime_env, then with
   one) run in one of them? The time from the actor's creation to its first reply, the reply importing torch, says
   what the preload saved.

    SWEEPER_HARNESS_PORT_BASE=6600 python3 benchmarks/ray_prestart_probe.py [--only 3] \
        > benchmarks/logs/ray_prestart_probe.txt
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


def marks_each_second(seconds: int) -> list[int]:
    """How many processes have marked themselves, each second for ``seconds``."""
    seen = []
    for _ in range(seconds):
        time.sleep(1)
        seen.append(len(list(MARKS.iterdir())))
    return seen


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
        seen = marks_each_second(10)
        print(f"2. processes that ran the job's setup hook, each second for 10 s after ray.init with nothing "
              f"submitted: {seen}", flush=True)
        ray.shutdown()


def preload() -> None:
    """The module the node of probe 3 preloads in its idle workers: torch, then a mark."""
    import torch  # noqa: F401

    mark()


def node_prestart() -> None:
    import shutil
    import signal
    import subprocess
    import tempfile

    from helpers import free_port, pids_matching

    import ray

    ray_cli = str(Path(sys.executable).parent / "ray")
    for preload_env in ({}, {"RAY_enable_worker_prestart": "1", "RAY_preload_python_modules": "probe_preload"}):
        MARKS.mkdir(parents=True, exist_ok=True)
        for f in MARKS.iterdir():
            f.unlink()
        temp, port = Path(tempfile.mkdtemp(prefix="prestart-", dir="/var/tmp")), free_port()
        (temp / "probe_preload.py").write_text("from ray_prestart_probe import preload\npreload()\n")
        env = {**os.environ, **preload_env, "RAY_AUTH_MODE": "disabled",
               "PYTHONPATH": os.pathsep.join([str(temp), str(REPO / "benchmarks"), str(REPO / "tests")])}
        label = "with the preload" if preload_env else "as Ray comes"
        try:
            t0 = time.time()
            subprocess.run([ray_cli, "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
                            "--disable-usage-stats", f"--temp-dir={temp / 'ray'}"], env=env, check=True,
                           capture_output=True, timeout=120)
            started_s = time.time() - t0
            seen = marks_each_second(20)
            print(f"3. node {label}: `ray start` took {started_s:.1f} s; processes that imported torch "
                  f"and marked themselves, each second for 20 s after it, no driver yet: {seen}", flush=True)
            for runtime_env in (None, {"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}):
                ray.init(address=f"127.0.0.1:{port}", log_to_driver=False, logging_level="ERROR",
                         runtime_env=runtime_env)

                @ray.remote(num_cpus=1)
                class Trial:
                    def first(self) -> tuple[int, float]:
                        t = time.perf_counter()
                        import torch  # noqa: F401 - what a trial imports first

                        return os.getpid(), time.perf_counter() - t

                idle = {int(f.name) for f in MARKS.iterdir()}  # preloaded before the actor was asked for
                t = time.perf_counter()
                pid, import_s = ray.get(Trial.remote().first.remote())
                took = time.perf_counter() - t
                where = ("an idle worker preloaded before it was created" if pid in idle else
                         "a process Ray started for it, " + ("which preloaded as it started"
                                                             if (MARKS / str(pid)).exists() else "without the preload"))
                print(f"   a joining driver, runtime_env {runtime_env}: its actor ran in {where}; "
                      f"creation -> first reply {took:.2f} s, of which `import torch` {import_s:.2f} s", flush=True)
                ray.shutdown()
            if preload_env:
                tune_trial(port)
        finally:
            for pid in pids_matching(str(temp)):  # every process of this node names its temp folder
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            time.sleep(1)
            shutil.rmtree(temp, ignore_errors=True)


def tune_trial(port: int) -> None:
    """A Tune trial on the preloading node, with Tune's actor runtime_env as it comes, then without it (what
    sweeper/local_ray.py does on a private instance): does the trial actor get a preloaded idle worker?"""
    import tempfile

    import ray
    from ray import tune
    from ray.tune.execution import class_cache

    def trial(config):
        import os

        tune.report({"pid": os.getpid()})

    saved = class_cache.DEFAULT_ENV_VARS, class_cache.ENV_VARS_TO_PROPAGATE
    for label, env in (("Tune's actor runtime_env", saved), ("no actor runtime_env", ({}, set()))):
        ray.init(address=f"127.0.0.1:{port}", log_to_driver=False, logging_level="ERROR")
        class_cache.DEFAULT_ENV_VARS, class_cache.ENV_VARS_TO_PROPAGATE = env
        try:
            idle = {int(f.name) for f in MARKS.iterdir()}
            with tempfile.TemporaryDirectory() as d:
                result = tune.Tuner(trial, run_config=tune.RunConfig(storage_path=d, verbose=0)).fit()[0]
            pid = result.metrics["pid"]
            print(f"   a Tune trial, {label}: ran in "
                  f"{'an idle worker preloaded before it' if pid in idle else 'a process Ray started for it'}",
                  flush=True)
        finally:
            class_cache.DEFAULT_ENV_VARS, class_cache.ENV_VARS_TO_PROPAGATE = saved
            ray.shutdown()


if __name__ == "__main__":
    print(f"python {sys.version.split()[0]}, {time.strftime('%Y-%m-%d %H:%M:%S %Z')}, load {os.getloadavg()[0]:.1f}",
          flush=True)
    only = sys.argv[sys.argv.index("--only") + 1] if "--only" in sys.argv else "123"
    if "1" in only:
        tasks_then_actor()
    if "2" in only:
        hook_prestart()
    if "3" in only:
        node_prestart()
