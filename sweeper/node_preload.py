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
ones a Tune trial actor of a launch on a preloading cluster lands in), and never outside Ray's workers
(``default_worker.py``). An error never reaches Ray (a worker whose
preload raised would die): it is logged, and the trial then imports what is missing itself. No Ray import here
beyond what the worker has.

A preloaded process keeps the code it imported, for as long as the node runs. So until a job takes it (a trial:
scheduler._trainable sets ``taken``; any job: Ray's current job id), a thread looks at sweeper's files every WATCH_S
seconds, and once any has changed (an upgrade, a `git pull` on the node) it ends the process: the next launch's
trials then run in processes that import the new code (and that launch refills the node with such processes as it
ends: sweeper/node_refill.py).
"""
from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

preloaded_at: float | None = None  # epoch seconds at which the preload below finished in this process
steps: dict[str, float] = {}  # seconds per step, for the worker's log
taken = False  # a trial runs in this process (scheduler._trainable): its code stays until its job ends the process
WATCH_S = 5.0  # how often an untaken preloaded process looks at sweeper's files (~100 stat calls)
CHANGED = "sweeper.node_preload: sweeper's code changed on disk since this process imported it; ending it"


def preload() -> None:
    global preloaded_at
    # only in a Ray worker (default_worker.py) started for no runtime_env: not in one for some runtime_env (Ray's job
    # supervisor, the launch's own tasks and actors: local_ray.not_a_trial), nor in a test or tool that imports this
    if not sys.argv[0].endswith("default_worker.py") or _runtime_env_hash() != 0:
        return
    try:
        t0 = time.perf_counter()
        stamp = code_stamp()  # before the imports: a file changed while they run counts as changed
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
        threading.Thread(target=_end_when_code_changes, args=(stamp,), name="sweeper-code-watch", daemon=True).start()
    except Exception as e:  # noqa: BLE001 - never into Ray's worker start-up
        print(f"sweeper.node_preload: failed, trials import for themselves: {type(e).__name__}: {e}",
              file=sys.stderr, flush=True)


def code_stamp() -> tuple:
    """What sweeper's code on disk is now: each .py file of the package with its modification time and size."""
    stamp = []
    for path in sorted(Path(__file__).resolve().parent.rglob("*.py")):
        try:
            st = path.stat()
        except OSError:  # removed while listed
            continue
        stamp.append((str(path), st.st_mtime_ns, st.st_size))
    return tuple(stamp)


def _in_use() -> bool:
    """A trial took this process, or a job did (a process started for no job serves whichever job Ray gives it
    to, a trial or another user's task): its code stays until that job ends it."""
    if taken:
        return True
    worker = getattr(sys.modules.get("ray._private.worker"), "global_worker", None)
    try:
        return worker is not None and not worker.current_job_id.is_nil()
    except Exception:  # noqa: BLE001 - cannot tell: keep the process
        return True


def _end_when_code_changes(stamp: tuple) -> None:
    while True:
        time.sleep(WATCH_S)
        if _in_use():
            return
        if code_stamp() != stamp:
            print(CHANGED, file=sys.stderr, flush=True)
            os._exit(0)  # an idle Ray worker that exits is dropped from the node's pool; nothing of a trial is lost


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
