"""The private Ray instance of a `sweep launch` without --address, started so that its Tune trials start fast.

Three things Ray does by default cost a launch seconds on its critical path, and a private instance needs none of them:

- Its head starts the API server (the dashboard process, even with ``include_dashboard=False``: usage stats, job
  and state APIs) and waits until it is up before it starts the raylet: on an H100 host `ray.init` took 12.1-12.9 s
  with it and 8.2-9.4 s without (benchmarks/gpu/ray_start_probe.py --api-server, run28 in docs/performance.md).
- Tune gives its trial actors a runtime_env of its own (PL_DISABLE_FORK, and variables such as
  RAY_CHDIR_TO_TRIAL_DIR copied from the driver's environment), and a job runtime_env is merged into it. Ray runs an
  actor only in a worker process of the same runtime_env, so every Tune trial got a fresh process (Python, then
  `import ray`) while the worker processes Ray had started with the instance sat idle.
- Those idle workers import nothing more, so each Tune trial imported Ray Tune when it was unpickled.

So the instance inherits the trials' environment from this process (every Ray process does) instead of getting it
through a runtime_env, Tune's actors go without theirs when every value in it is the inherited one, its idle workers
import Ray Tune and the scheduler ahead (on machines of up to PRELOAD_MAX_CPUS CPUs), and its head skips the API
server. SWEEPER_RAY_AS_IS=1 starts Ray as it comes (benchmarks/ray_idle_workers.py compares the two). A joined
cluster (--address) is started by its own `ray start` commands: when every node says (PRELOAD_LABEL) that its idle
workers preload sweeper (sweeper/node_preload.py), Tune's actors go without their runtime_env there too.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator

# what Tune itself gives every trial actor through its runtime_env (class_cache.DEFAULT_ENV_VARS of Ray 2.60), written
# out: reading it would import Ray Tune on the launch's critical path. Should Tune change it, the values differ and
# tune_actors_without_runtime_env keeps Tune's runtime_env.
TUNE_ACTOR_ENV = {"PL_DISABLE_FORK": "1"}
# imported by the idle worker processes ahead: what unpickling a Tune trial imports (Tune's trainable wrapper, and
# the scheduler module that holds the trial function)
WORKER_PRELOAD = ("ray.tune", "sweeper.scheduler")
# the node label (`ray start --labels=sweeper-preload=1`) by which a node of a cluster says that its Ray workers
# preload PRELOAD_MODULE (docs/cluster.md)
PRELOAD_LABEL = "sweeper-preload"
PRELOAD_MODULE = "sweeper.node_preload"
PRELOAD_READY = "sweeper.node_preload: ready"  # what a worker logs once its preload is done
# Ray ends a node's idle processes beyond its soft limit (default: one per CPU), the longest idle first: a preloaded
# one, whenever a launch's own processes (input check, StoreWriter, the loop's actor under a Ray client) take a node
# over it. Preloading nodes start with this many more (RAY_num_workers_soft_limit in cluster.yaml's start commands).
SPARE_PROCESSES = 4
# Ray prestarts one worker per CPU; each preloading one holds more memory (benchmarks/ray_idle_workers.py --memory)
# and all import at once while the launch starts: on bigger machines the workers import when their first trial comes
PRELOAD_MAX_CPUS = 32

# the instance this process started (its GCS address) and the environment it inherited; None: none started, or a
# cluster was joined
_started: tuple[str, dict[str, str]] | None = None
# a joined cluster (its GCS address) whose every node preloads sweeper (sweeper/node_preload.py, which also sets what
# Tune's runtime_env would); None: none joined, or some node does not
_joined_preloading: str | None = None
_through_client = False  # that cluster was joined through a Ray client (ray://)


def as_is() -> bool:
    """SWEEPER_RAY_AS_IS=1: Ray as it comes (API server, Tune's actor runtime_env, nothing preloaded)."""
    return os.environ.get("SWEEPER_RAY_AS_IS") == "1"


def _sweeper_first_on_path() -> str:
    """PYTHONPATH with the folder of this process's sweeper package first: Ray's workers import their preloaded
    modules before the driver's sys.path reaches them, so without it they could take another sweeper (an installed
    one) than a driver run from a checkout."""
    root = str(Path(__file__).resolve().parents[1])
    rest = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != root]
    return os.pathsep.join([root, *rest])


@contextlib.contextmanager
def starting(kwargs: dict[str, Any], worker_env: dict[str, str]) -> Iterator[None]:
    """Around ``ray.init(**kwargs)`` of a private instance: ``worker_env`` in this process's environment while Ray's
    processes start (they inherit it; this process's own environment is put back after), the workers' preload in
    ``kwargs``, and the head without its API server. Records the instance and the environment it inherited."""
    global _started
    import ray

    was_running = ray.is_initialized()
    tuned = not as_is()
    inherited = {**worker_env, **TUNE_ACTOR_ENV}
    if tuned and (kwargs.get("num_cpus") or os.cpu_count() or 1) <= PRELOAD_MAX_CPUS:
        kwargs["_system_config"] = {"preload_python_modules": list(WORKER_PRELOAD)}
        inherited["PYTHONPATH"] = _sweeper_first_on_path()
    saved = {k: os.environ.get(k) for k in inherited}
    os.environ.update(inherited)
    try:
        with _without_api_server() if tuned else contextlib.nullcontext():
            yield
        if not was_running:
            _started = (ray.get_runtime_context().gcs_address, dict(os.environ))
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def private() -> bool:
    """Ray is a private instance this process started (one node, this machine; no other node can join it)."""
    import ray

    return _started is not None and ray.is_initialized() and ray.get_runtime_context().gcs_address == _started[0]


def forget() -> None:
    """The instance stopped (or a cluster was joined or left): Tune's actors keep their runtime_env from now on."""
    global _started, _joined_preloading, _through_client
    _started = None
    _joined_preloading = None
    _through_client = False


def preloads(node: dict[str, Any]) -> bool:
    """A ``ray.nodes()`` entry of a node started with PRELOAD_LABEL (its idle workers preload sweeper)."""
    return (node.get("Labels") or {}).get(PRELOAD_LABEL) == "1"


def preloaded_idle_workers(logs: Path) -> int:
    """How many worker processes a node started before any job (Ray names their logs ``worker-*-ffffffff-*``) have
    logged the end of their preload, in the node's session log folder ``logs`` (for harnesses and benchmarks that
    wait for a node to be ready, as a cluster's nodes are long before a launch)."""
    return sum(PRELOAD_READY in f.read_text(errors="replace") for f in logs.glob("worker-*-ffffffff-*.err"))


def not_a_trial() -> dict[str, Any]:
    """Options for the launch's own tasks and actors (the input check, the GPU probe, the StoreWriter) on a cluster
    that preloads: a runtime_env that keeps them out of the idle workers the nodes preloaded for trials (Ray gives an
    actor no process that ran a task, nor one an actor held) and their process from preloading."""
    if _joined_preloading is None:
        return {}
    return {"runtime_env": {"env_vars": {"SWEEPER_NOT_A_TRIAL": "1"}}}  # any runtime_env does; node_preload skips it


def joined(preloading: bool, client: bool = False) -> None:
    """A cluster was joined (after ``ray.init``); ``preloading``: every node of it carries PRELOAD_LABEL, so Tune's
    trial actors go without their runtime_env there (the nodes' preload sets its variables); ``client``: through a
    Ray client (``ray://``)."""
    global _joined_preloading, _through_client
    import ray

    forget()
    _joined_preloading = ray.get_runtime_context().gcs_address if preloading else None
    _through_client = client


def cluster_preloads() -> bool:
    """This process joined a cluster whose every node preloads sweeper (:func:`joined`): its nodes start again the
    processes a launch took as it leaves (sweeper/node_refill.py)."""
    return _joined_preloading is not None


def joined_through_client() -> bool:
    """This process joined a cluster through a Ray client (``ray://``): Tune's loop then runs on the cluster
    (scheduler._fit_on_cluster), and so does the refill (the nodes' raylets are seldom reachable from here)."""
    return _through_client


@contextlib.contextmanager
def _without_api_server() -> Iterator[None]:
    try:
        from ray._private.node import Node
        original = Node.start_api_server
    except (ImportError, AttributeError):  # Ray moved it: start the instance as it comes
        yield
        return

    def skip(self, *args, **kwargs) -> None:
        self._webui_url = None

    Node.start_api_server = skip
    try:
        yield
    finally:
        Node.start_api_server = original


@contextlib.contextmanager
def tune_actors_without_runtime_env(cluster_preloads: bool | None = None) -> Iterator[bool]:
    """While Tune runs: its trial actors without the runtime_env Tune gives them, where that changes nothing: on a
    private instance, each value equals the one the instance inherited; on a joined cluster, every node preloads
    sweeper.node_preload (which sets Tune's own variables; the AWS_* ones Tune would copy from this process are then
    the nodes' own, as docs/cluster.md asks). Kept on any other joined cluster, with SWEEPER_RAY_AS_IS=1, or when
    Tune's internals are not where this expects them. Yields whether it dropped it. ``cluster_preloads``: what
    :func:`cluster_preloads` said in the launch's process, for Tune's loop run on the cluster for a Ray client."""
    try:
        from ray.tune.execution import class_cache
        default, propagate = class_cache.DEFAULT_ENV_VARS, class_cache.ENV_VARS_TO_PROPAGATE
    except (ImportError, AttributeError):
        yield False
        return
    import ray

    wanted = {**default, **{k: os.environ[k] for k in propagate if k in os.environ}}
    ours = ray.get_runtime_context().gcs_address if ray.is_initialized() and not as_is() else None
    preloading = ours is not None and (ours == _joined_preloading if cluster_preloads is None else cluster_preloads)
    inherited = (ours is not None and private()  # not restarted behind our back
                 and all(_started[1].get(k) == v for k, v in wanted.items()))
    if not (preloading or inherited):
        yield False
        return
    class_cache.DEFAULT_ENV_VARS, class_cache.ENV_VARS_TO_PROPAGATE = {}, set()
    try:
        yield True
    finally:
        class_cache.DEFAULT_ENV_VARS, class_cache.ENV_VARS_TO_PROPAGATE = default, propagate
