"""What a Ray node that runs sweeper trials imports into its worker processes before any trial comes.

A node started with Ray's own two settings (cluster.yaml's start commands; docs/cluster.md)::

    RAY_enable_worker_prestart=1 RAY_preload_python_modules=sweeper.node_preload \\
        ray start ... --labels=sweeper-preload=1

starts one idle worker process per CPU as it comes up, before any launch, and each imports this module (importing it
anywhere else does the same, so nothing else does): torch, transformers, sweeper's stages, lm-eval and its task
index, Ray Tune and the scheduler, which a trial's first seconds otherwise go to. A Tune trial actor with no
runtime_env runs in one of them. The label (local_ray.PRELOAD_LABEL) tells `sweep launch` that the node does this, so
it gives Tune's trial actors no runtime_env there (scheduler.connect, local_ray.tune_actors_without_runtime_env) and
Ray's placement alone decides where a trial runs, on every node alike. Nothing here touches a GPU: Ray gives a trial
its GPU (``CUDA_VISIBLE_DEVICES``) when the trial arrives, before torch first asks CUDA.

Ray runs it in every Python worker the node starts; it does its work only in those started for no runtime_env (the
ones a Tune trial actor of a launch on a preloading cluster lands in). An error never reaches Ray (a worker whose preload raised would
die): it is logged, and the trial then imports what is missing itself. No Ray import here beyond what the worker has.
"""
from __future__ import annotations

import os
import sys
import time

preloaded_at: float | None = None  # epoch seconds at which the preload below finished in this process
steps: dict[str, float] = {}  # seconds per step, for the worker's log


def preload() -> None:
    global preloaded_at
    if _runtime_env_hash() != 0:  # a process for some runtime_env: never a trial's (Ray's job supervisor, the
        return                    # launch's own tasks and actors: local_ray.not_a_trial)
    try:
        t0 = time.perf_counter()
        import ray.tune  # noqa: F401 - what unpickling a Tune trial imports

        # the scheduler sets Tune's variables as it is imported (RAY_CHDIR_TO_TRIAL_DIR among them); the rest is what
        # the runtime_envs a trial actor no longer gets would have set, before transformers reads any of it
        from . import local_ray, scheduler
        for k, v in {**scheduler.WORKER_ENV, **local_ray.TUNE_ACTOR_ENV}.items():
            os.environ.setdefault(k, v)
        steps["tune"] = round(time.perf_counter() - t0, 3)
        from .warm_worker import warm_up_shared

        steps.update(warm_up_shared([], tasks=True, needed=[]))
        steps["total"] = round(time.perf_counter() - t0, 3)
        preloaded_at = time.time()
        print(f"{local_ray.PRELOAD_READY} in {steps['total']:.2f}s {steps}", file=sys.stderr, flush=True)
    except Exception as e:  # noqa: BLE001 - never into Ray's worker start-up
        print(f"sweeper.node_preload: failed, trials import for themselves: {type(e).__name__}: {e}",
              file=sys.stderr, flush=True)


def _runtime_env_hash() -> int:
    """The runtime_env hash Ray started this worker process for (default_worker's ``--runtime-env-hash``; 0: none)."""
    for arg in sys.argv:
        if arg.startswith("--runtime-env-hash="):
            try:
                return int(arg.split("=", 1)[1])
            except ValueError:
                return -1
    return 0


preload()
