"""Scheduling trials with Ray Tune: with local_ray.py (how a private instance starts), the only Ray importer.

Each pending trial becomes one Tune trial with its own resources (a GPU share, or CPUs on a CPU-only cluster). The
trainable is idempotent: it re-checks the results store and skips a trial that is already done, so nothing finished
ever runs twice, whichever launch or retry reaches it. Baseline trials run in a first phase when the study needs
their references (KL), so the ordering survives any interruption: a relaunch sees which baselines are done.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import logging
import os
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import local_ray
from .errors import UserError
from .store import ResultsStore
from .trials import TrialSpec

log = logging.getLogger(__name__)

# Tune's per-trial CSV/JSON/TensorBoard loggers: the results store already keeps everything.
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
os.environ.setdefault("TUNE_RESULT_BUFFER_LENGTH", "1")
# Ctrl-C is the launch's (interrupt.StopOnSigint): Tune's own handler ends a phase quietly, the next phase then starts,
# and it prints a Tuner.restore hint that sweeper does not use
os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
# The legacy reporter honours verbose=0; the sweep prints its own progress lines.
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
# With the loggers off, Tune's result grid cannot find per-trial metrics files and warns about every trial.
logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
# Ray tells every local start that token authentication is on; that is the safe default, not news for the user.
logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)


# the environment of every process that runs trials (on a Ray instance this launch starts, Ray's workers inherit it:
# sweeper/local_ray.py; on a joined cluster each trial sets it itself, _trainable; warm workers get it at start)
WORKER_ENV = {"TOKENIZERS_PARALLELISM": "false", "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1"}


@dataclass
class ClusterInfo:
    address: str | None
    nodes: int
    cpus: float
    gpus: float
    gpu_memory_bytes: float | None
    node_gpus: float = 0  # GPUs of the largest node: a trial's whole GPUs come from one node
    here_cpus: float = 0  # this (the launching) node's CPUs and GPUs as Ray counts them (0 for a ray:// client)
    here_gpus: float = 0
    preloading_nodes: int = 0  # nodes labelled local_ray.PRELOAD_LABEL (a joined cluster's; 0 on a private instance)
    job_runtime_env: bool = False  # the job has a runtime_env of its own, which keeps trials out of preloaded processes


def import_ray() -> None:
    """Import Ray in this thread (`sweep launch` does it before a thread that imports Ray's dependencies starts)."""
    importlib.import_module("ray")


def import_tune() -> None:
    """Import Ray Tune (seconds on a cold start): `sweep launch` does it on its task-check thread while Ray starts.
    A failure here is left to the import where Tune is used, on the launch's own thread, to report."""
    try:
        importlib.import_module("ray.tune")
    except Exception as e:  # noqa: BLE001 - raised again, with its own message, by the scheduler's import
        log.debug("ray.tune not imported ahead: %s", e)


def connect(address: str | None = None, num_cpus: int | None = None, verbose: bool = False,
            gpu_memory: bool = True) -> ClusterInfo:
    """Start a local Ray instance (address None) or join a cluster ("auto", "ray://host:10001", "host:6379").

    ``gpu_memory=False``: the GPUs' memory is not read (only `auto` GPU shares need it; on a cluster reading it starts
    a worker process that imports torch, seconds)."""
    import ray

    kwargs: dict[str, Any] = dict(include_dashboard=False, log_to_driver=verbose, ignore_reinit_error=True,
                                  logging_level=logging.INFO if verbose else logging.WARNING)
    if address:
        # no job runtime_env: an actor with one never runs in the idle workers a node started (and, with
        # sweeper/node_preload.py, preloaded) ahead; each trial sets WORKER_ENV itself (_trainable)
        kwargs["address"] = address
        starting = contextlib.nullcontext()
        local_ray.forget()
    else:
        # "local" always starts a private instance; a bare ray.init() would join whatever cluster the machine's
        # /tmp/ray/ray_current_cluster names, even a dead one left by a killed `ray start`
        kwargs["address"] = "local"
        if num_cpus:
            kwargs["num_cpus"] = num_cpus
        starting = local_ray.starting(kwargs, WORKER_ENV)  # trials start in Ray's idle, preloaded workers
    try:
        with starting:
            try:
                ray.init(**kwargs)
            except ConnectionError as e:
                # a Ray client server whose per-client server did not come up in time (seen on the first connection
                # to a freshly started head of the 2-core test machine, ray_client_server.err: FutureTimeoutError);
                # the next one starts in seconds
                if not (address or "").startswith("ray://") or "Initialization failure from server" not in str(e):
                    raise
                log.warning("the Ray client server at %s did not start a server for this launch; trying once more",
                            address)
                ray.init(**kwargs)
    except (ConnectionError, ValueError, RuntimeError) as e:
        raise UserError(f"cannot connect to the Ray cluster at {kwargs['address']!r}: {str(e).splitlines()[0]}; "
                        "start one with `ray start --head` (or `ray up cluster.yaml`), or omit --address for local Ray") from None
    alive = [n for n in ray.nodes() if n.get("Alive")]
    preloading, job_env = 0, False
    if address:  # first: the GPU probe below is one of the launch's own tasks (local_ray.not_a_trial)
        preloading = sum(1 for n in alive if local_ray.preloads(n))
        # a job runtime_env (`ray job submit --runtime-env`, `--working-dir`) reaches every trial actor: Ray then
        # starts processes of that runtime_env for them, never the preloaded ones
        job_env = bool(ray.get_runtime_context().runtime_env)
        local_ray.joined(preloading=preloading == len(alive) and not job_env, client=address.startswith("ray://"))
    res = ray.cluster_resources()
    gpus = float(res.get("GPU", 0))
    mem = None
    if gpus > 0 and gpu_memory:  # this machine's nvidia-smi when Ray is local (fast), else a probe task on a GPU worker
        mem = (None if address else _local_gpu_memory_bytes()) or _gpu_memory_bytes()
    node_gpus = max((float(n.get("Resources", {}).get("GPU", 0)) for n in alive), default=0.0)
    here = ray.get_runtime_context().get_node_id()
    mine = next((n.get("Resources", {}) for n in alive if n.get("NodeID") == here), {})
    return ClusterInfo(address=address, nodes=len(alive), cpus=float(res.get("CPU", 0)), gpus=gpus,
                       gpu_memory_bytes=mem, node_gpus=node_gpus, here_cpus=float(mine.get("CPU", 0)),
                       here_gpus=float(mine.get("GPU", 0)), preloading_nodes=preloading, job_runtime_env=job_env)


def _local_gpu_memory_bytes() -> float | None:
    """Memory of this machine's smallest visible GPU (nvidia-smi: milliseconds; the Ray probe below starts a worker
    process that imports torch, seconds), or None where nvidia-smi is missing or finds no GPU."""
    from .resources import local_gpus

    mib = local_gpus()
    return float(min(mib.values()) * 2**20) if mib else None


def _gpu_memory_bytes() -> float:
    """Memory of the cluster's smallest GPU, read by a tiny task on a GPU worker."""
    import ray

    @ray.remote(num_gpus=0.01, num_cpus=0, **local_ray.not_a_trial())
    def probe():
        import torch

        return torch.cuda.get_device_properties(0).total_memory

    return float(ray.get(probe.remote()))


def disconnect(timeout_s: float = 60.0, emit: Callable[[str], None] | None = None) -> bool:
    """Stop (or leave) Ray; False if it did not stop. Results are already on disk, so a shutdown that hangs is
    reported and given up on after ``timeout_s`` rather than holding the command open. Within the same time, the
    preloading nodes of a joined cluster start again the processes this launch's actors took (sweeper/node_refill.py;
    after Ctrl-C too)."""
    import threading

    import ray

    global _trials_started
    say = emit or (lambda m: None)
    refill = _trials_started and local_ray.cluster_preloads()  # a launch that ran no trial took no process
    _trials_started = False
    client = local_ray.joined_through_client()
    task_options = local_ray.not_a_trial()  # read before forget()
    local_ray.forget()
    if not ray.is_initialized():
        return True

    t0 = time.perf_counter()

    def leave() -> None:
        nodes, taken = _nodes_to_refill(say, client) if refill else ([], None)
        if nodes and client:  # from a task of this job on the cluster, before the client leaves it
            _refill_preloading_nodes(nodes, taken, say, on_cluster=task_options,
                                     wait_s=max(0.5, timeout_s - (time.perf_counter() - t0) - 1.0))
        ray.shutdown()  # first: the job, and the processes its actors took, end; the new ones serve no job
        if nodes and not client:
            _refill_preloading_nodes(nodes, taken, say)

    worker = threading.Thread(target=leave, name="ray-shutdown", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive() and emit is not None:
        emit(f"warning: Ray did not stop within {timeout_s:g}s; leaving it (every result is already written)")
    elif emit is not None and time.perf_counter() - t0 > 5:
        emit(f"Ray stopped in {time.perf_counter() - t0:.1f}s")
    return not worker.is_alive()


def _nodes_to_refill(emit: Callable[[str], None], client: bool) -> tuple[list[dict], Counter | None]:
    """The live preloading nodes this launch's actors took processes from, and how many on each
    (node_refill.processes_taken, read while this process is still connected); through a Ray client, every live
    preloading node, and None: the task on the cluster reads them. ([], None) where this Ray cannot refill (said)."""
    import ray

    from . import node_refill

    why = node_refill.unsupported()
    if why:
        emit(f"note: the nodes' preloaded trial processes are not restarted for the next launch: {why}; its trials "
             "preload as they start")
        return [], None
    try:
        taken = None if client else node_refill.processes_taken()
        nodes = [n for n in ray.nodes() if n.get("Alive") and local_ray.preloads(n)
                 and (taken is None or n.get("NodeID") in taken)]
    except Exception as e:  # noqa: BLE001 - Ray going away: leave the nodes as they are
        emit(f"warning: preloaded trial processes not restarted: the nodes could not be read: {e}")
        return [], None
    return nodes, taken


def _refill_preloading_nodes(nodes: list[dict], taken: Counter | None, emit: Callable[[str], None],
                             on_cluster: dict[str, Any] | None = None, wait_s: float = 10.0) -> None:
    """The preloading nodes start again the preloaded processes this launch took (sweeper/node_refill.py); through a
    Ray client, asked by a task of this job on the cluster, which counts them there (``on_cluster``: its options,
    local_ray.not_a_trial, so that it takes none of the preloaded processes; waited for ``wait_s`` at most)."""
    from . import node_refill

    if on_cluster is not None:
        import ray

        try:
            ask = ray.remote(num_cpus=0, max_retries=0, **on_cluster)(node_refill.refill_what_this_job_took)
            problems = ray.get(ask.remote(nodes), timeout=min(wait_s, node_refill.RPC_TIMEOUT_S + 5))
        except Exception as e:  # noqa: BLE001 - the task could not run: the nodes stay as they are
            problems = [f"every node: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"]
    else:
        problems = node_refill.refill(nodes, taken)
    for problem in problems:
        emit(f"warning: preloaded trial processes not restarted on {problem}")


def _report(outcome: dict[str, Any]) -> None:
    """A trial's one report to Tune (the driver's progress callback reads it): how it ended."""
    from ray import tune

    tune.report({"status": outcome["status"], "error": outcome["error"],
                 "error_type": outcome["error_type"], "trial_seconds": outcome["duration_s"]})


# this Ray worker's warm worker (sweeper/warm_pool.py), kept for the next trial Tune runs in this process
_WARM: dict[str, Any] = {}


def _warm_worker(descriptor: dict | None, spec: TrialSpec):
    """The warm worker this process holds, or a free one of this trial's GPU (or CPU) on this machine; None: none.

    A process its node preloaded (the launching node of a preloading cluster: sweeper/node_preload.py) takes only a
    worker that is ready and free now: it has imported what the trial needs itself, so waiting for a worker's
    warm-up (2.3-2.8 s for a first trial on the two-node test cluster, docs/performance.md) would only delay it."""
    from .warm_pool import claim

    key = f"gpu:{os.environ.get('CUDA_VISIBLE_DEVICES', '')}" if spec.gpu_share else "cpu"
    held = _WARM.get("worker")
    if held is not None and held.key == key and held.alive:
        return held
    if held is not None:
        held.close()
        _WARM.clear()
    preloaded = _preloaded_at() is not None
    worker = claim(descriptor, key, ready_timeout_s=0.0, busy_wait_s=0.0) if preloaded else claim(descriptor, key)
    if worker is not None:
        _WARM["worker"] = worker
    return worker


def _process_facts() -> dict[str, Any]:
    """This Ray worker's start-up facts for the trial's row: when the process started, and when its node's preload
    (sweeper/node_preload.py) finished in it, None where the node does not preload."""
    from .measure import process_started_at

    return {"ray_worker_started_at": process_started_at(), "ray_worker_preloaded_at": _preloaded_at()}


def _preloaded_at() -> float | None:
    """When this process's node preload (sweeper/node_preload.py) finished in it; None: it did not preload."""
    preload = sys.modules.get(local_ray.PRELOAD_MODULE)  # read, never imported: importing it runs the preload
    return getattr(preload, "preloaded_at", None)


def _trainable(config: dict) -> None:
    """A Tune trial: run one sweeper trial unless the store says it is done. Runs on a Ray worker; the trial itself
    runs in a warm worker of this machine when there is a free one, else here."""
    # where a trial's start-up goes: worker process start -> this call -> the row's load_started_at
    entered = time.time()
    preload = sys.modules.get(local_ray.PRELOAD_MODULE)  # read, never imported: importing it runs the preload
    if preload is not None:
        preload.taken = True  # its code watch ends here: the process stays for this launch's trials
    for k, v in WORKER_ENV.items():  # no runtime_env set them on a joined cluster (connect)
        os.environ.setdefault(k, v)
    from ray import tune

    import ray

    from .lock import TrialClaim

    case = config["case"]
    spec = TrialSpec.from_dict(case["spec"])
    node = ray.get_runtime_context().get_node_id()
    writer = config.get("writer")  # the launch's StoreWriter (sweeper/remote_store.py): name and node
    if writer is not None and node != writer["node"]:
        return _remote_trainable(config, spec, writer, node, entered)
    store = ResultsStore(config["store"], token=config.get("token"))
    claim = TrialClaim(store.work, spec.trial_id)
    if writer is not None and not claim.try_enter():
        # taken: by an orphan of a killed launch (wait for it), or by the writer for an attempt of this trial on
        # another node whose worker died (Tune retries only after an attempt ended): the writer lets that one go
        ray.get(ray.get_actor(writer["name"], namespace=WRITER_NAMESPACE).release.remote(spec.trial_id))
    with claim:
        previous = store.committed(spec.trial_id)
        if previous is not None and previous.status == "done":
            tune.report({"status": "skipped"})
            return
        attempt = (previous.attempt if previous is not None else 0) + 1
        extra = {"ray_node_id": node, "trainable_started_at": entered, **_process_facts()}
        worker = _warm_worker(config.get("warm"), spec)
        if worker is not None:
            try:
                outcome = worker.run(spec, str(store.root), attempt, extra, token=store.token)
            except BaseException:  # it died (WarmWorkerDied) or this trial was stopped: let it go either way
                worker.close()
                _WARM.clear()
                raise
        else:
            from .runner import run_request

            outcome = run_request({"spec": spec.to_dict(), "store": str(store.root), "attempt": attempt,
                                   "extra": {**extra, "warm_worker": False}, "token": store.token})
    _report(outcome)


WRITER_NAMESPACE = "sweeper"


def _remote_trainable(config: dict, spec: TrialSpec, writer: dict, node: str, entered: float) -> None:
    """A Tune trial on a node other than the launching one: it may not see the results folder, so it runs here (in a
    process the node preloaded, where it does: sweeper/node_preload.py; the warm workers live on the launching node)
    with a RemoteStore, and the launch's StoreWriter commits it."""
    from ray import tune

    import ray

    from .remote_store import RemoteStore
    from .runner import run_request

    actor = ray.get_actor(writer["name"], namespace=WRITER_NAMESPACE)
    try:
        previous = ray.get(actor.claim.remote(spec.trial_id))
        if previous is not None and previous[0] == "done":
            tune.report({"status": "skipped"})
            return
        attempt = (previous[1] if previous is not None else 0) + 1
        extra = {"ray_node_id": node, "trainable_started_at": entered, **_process_facts(), "warm_worker": False}
        outcome = run_request({"spec": spec.to_dict(), "store": config["store"], "attempt": attempt, "extra": extra,
                               "token": config.get("token")},
                              store=RemoteStore(actor, config["store"], config.get("token")))
    finally:
        ray.get(actor.release.remote(spec.trial_id))
    _report(outcome)


def _minutes(seconds: float) -> str:
    s = int(round(seconds))  # m:ss, never "0m10s" (it reads like a terminal colour code)
    return f"{s // 60:d}:{s % 60:02d}"


@dataclass
class Progress:
    """Counts shown while a sweep runs: done / running / failed / pending, and an estimate of the time left."""

    total: int
    labels: dict[str, str]
    done: set[str] = field(default_factory=set)
    failed: set[str] = field(default_factory=set)
    running: set[str] = field(default_factory=set)
    started: float = field(default_factory=time.time)
    slots: int = 1  # trials the cluster runs at once (launch.concurrent_slots)
    began: dict[str, float] = field(default_factory=dict)  # running trial -> when the driver saw it start
    durations: list[float] = field(default_factory=list)  # wall seconds of the trials run to an end (not skipped)

    @property
    def pending(self) -> int:
        return self.total - len(self.done) - len(self.failed) - len(self.running)

    def time_left(self, now: float | None = None) -> float | None:
        """Seconds until the last trial ends, None before one has: the mean of the finished trials' wall times for
        each pending trial and what a running trial has left of it, divided over the concurrent slots."""
        if not self.durations:
            return None
        now = time.time() if now is None else now
        mean = sum(self.durations) / len(self.durations)
        work = self.pending * mean + sum(max(0.0, mean - (now - self.began.get(t, now))) for t in self.running)
        # no more slots work at once than there are trials left to run
        return work / max(1, min(max(self.slots, len(self.running)), self.pending + len(self.running)))

    def line(self, event: str = "") -> str:
        counts = (f"[{_minutes(time.time() - self.started)}] done {len(self.done)}/{self.total}, running "
                  f"{len(self.running)}, failed {len(self.failed)}, pending {self.pending}")
        left = self.time_left() if self.pending or self.running else None
        if left is not None:
            counts += f", ~{_minutes(left)} left"
        return f"{counts}  {event}" if event else counts


def _record_event(events_path: Path, event: dict) -> None:
    """One line of the launch's driver-side timeline (_tune/events.jsonl): a phase's Tune start, a trial's start."""
    events_path.parent.mkdir(parents=True, exist_ok=True)
    with open(events_path, "a") as fh:
        fh.write(json.dumps(event) + "\n")  # every event carries its own time, "at"


def _apply_event(progress: Progress, emit: Callable[[str], None], events_path: Path, store: ResultsStore,
                 event: dict[str, Any]) -> None:
    """One event of a phase's Tune run (:func:`_tune_callback`), in the launch's process: the progress line, the
    driver-side timeline (_tune/events.jsonl: a phase's start, each trial's start)."""
    kind, t = event["event"], event.get("trial_id")
    if kind in ("fit", "scheduled"):  # "scheduled" -> the row's load_started_at is the per-trial overhead
        _record_event(events_path, event)
    if kind == "scheduled":  # the progress estimate reads this process's clock (the event's may be a node's)
        progress.running.add(t)
        progress.began[t] = time.time()
        emit(progress.line(f"started {progress.labels[t]}"))
    elif kind == "result":
        result = event["result"]
        store.compact()  # every COMPACT_TAIL trials: later reads open a few files, not one per trial
        progress.running.discard(t)
        status = result.get("status")
        if status != "skipped" and t in progress.began:
            progress.durations.append(time.time() - progress.began[t])
        if status == "failed":
            progress.failed.add(t)
            emit(progress.line(f"FAILED {progress.labels[t]}: {result.get('error', '')}"))
        else:
            progress.done.add(t)
            word = "already done" if status == "skipped" else f"done in {result.get('trial_seconds', 0):.1f}s"
            emit(progress.line(f"{word}: {progress.labels[t]}"))
    elif kind == "error":
        progress.running.discard(t)
        progress.failed.add(t)
        emit(progress.line(f"FAILED {progress.labels[t]}: the worker process died (see sweep status)"))


_RESULT_KEYS = ("status", "error", "trial_seconds")


def _tune_callback(sink: Callable[[dict[str, Any]], None]):
    """Tune's callback: each trial's start, report and death as an event for ``sink`` (:func:`_apply_event`)."""
    from ray.tune import Callback

    def event(kind: str, trial, **more) -> None:
        sink({"event": kind, "trial_id": _trial_name(trial), "at": time.time(), **more})

    class EventCallback(Callback):
        def on_trial_start(self, iteration, trials, trial, **info):
            event("scheduled", trial)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            event("result", trial, result={k: result.get(k) for k in _RESULT_KEYS})

        def on_trial_error(self, iteration, trials, trial, **info):
            event("error", trial)

    return EventCallback()


@dataclass
class StoreWriter:
    """The launch's StoreWriter actor (sweeper/remote_store.py) and the name trials find it by."""

    name: str
    actor: Any


def start_store_writer() -> StoreWriter | None:
    """Start the StoreWriter as soon as Ray is up, so that its process start (seconds on a busy head: a new process,
    local_ray.not_a_trial) overlaps the launch's checks instead of holding up the first trial off this node;
    :func:`run_trials` gives it the results location. None on a private instance: its one node is this one, where
    every trial commits to the results itself, so no trial would call it, and the actor would take one of the idle
    processes Ray started for trials (docs/performance.md, the first Ray-based design of issue 22)."""
    from .remote_store import start_writer

    if local_ray.private():
        return None

    name = f"store-writer-{os.getpid()}-{time.time_ns()}"
    return StoreWriter(name, start_writer(name, WRITER_NAMESPACE))


def run_trials(trials: list[TrialSpec], store: ResultsStore, emit: Callable[[str], None],
               max_concurrent: int | None = None, retries: int = 2, baselines_first: bool = True,
               warm: dict | None = None, slots: int = 1, store_writer: StoreWriter | None = None) -> Progress:
    """Run ``trials`` (the pending ones) on the connected Ray cluster; results go to ``store``. ``warm``: the
    launch's warm workers (:attr:`sweeper.warm_pool.WarmPool.descriptor`), or None; ``slots``: how many trials the
    cluster runs at once (for the estimate of the time left); ``store_writer``: one started ahead
    (:func:`start_store_writer`), else it is started here."""
    progress = Progress(total=len(trials), labels={t.trial_id: t.cell for t in trials}, slots=slots)
    phases = [trials]
    if baselines_first:
        base = [t for t in trials if t.is_baseline]
        rest = [t for t in trials if not t.is_baseline]
        phases = [p for p in (base, rest) if p]
    import ray

    # the launching node is the only writer: trials on other nodes commit through this actor (sweeper/remote_store.py)
    store_writer = store_writer or start_store_writer()
    writer = None
    if store_writer is not None:
        store_writer.actor.open.remote(store.loc.canonical, store.token)  # its other calls wait for this one
        writer = {"name": store_writer.name, "node": ray.get_runtime_context().get_node_id()}
    try:
        for i, phase in enumerate(phases):
            _run_phase(phase, store, progress, emit, max_concurrent, retries, name=f"phase{i + 1}", warm=warm,
                       writer=writer)
            _retry_out_of_memory(phase, store, progress, emit, max_concurrent, retries, name=f"phase{i + 1}",
                                 warm=warm, writer=writer)
    finally:
        if store_writer is not None:
            ray.kill(store_writer.actor)
    return progress


def _retry_out_of_memory(trials, store, progress, emit, max_concurrent, retries, name, warm=None,
                         writer=None) -> None:
    """Trials that ran out of memory on a GPU share run again with twice the share, up to a whole GPU."""
    shares = {t.trial_id: t.gpu_share for t in trials}
    round_ = 0
    while True:
        again = []
        for t in trials:
            live = store.committed(t.trial_id)
            row = store.read_trial_row(t.trial_id) if live is not None and live.status == "failed" else None
            share = shares[t.trial_id]
            if row and row["status"] == "failed" and row["error_type"] == "OutOfMemory" and 0 < share < 1:
                shares[t.trial_id] = min(1.0, round(share * 2, 2))
                again.append(t)
        if not again:
            return
        round_ += 1
        for t in again:
            progress.failed.discard(t.trial_id)
            emit(progress.line(f"out of memory at GPU share {shares[t.trial_id] / 2:g}: retrying {t.cell} with "
                               f"{shares[t.trial_id]:g}"))
        # the retried specs carry their doubled share, so the scheduler, the row and a WorkerDied record agree
        _run_phase([dataclasses.replace(t, gpu_share=shares[t.trial_id]) for t in again], store, progress, emit,
                   max_concurrent, retries, name=f"{name}-oom{round_}", warm=warm, writer=writer)


def _trial_name(trial) -> str:
    return trial.config["case"]["spec"]["trial_id"]


def trial_resources(config: dict):
    """What Tune reserves for a trial: its CPUs and its GPU share, a fraction of one GPU or whole GPUs; whole GPUs as
    one bundle placed STRICT_PACK, so they are GPUs of one node, made visible to the trial alone."""
    from ray.tune import PlacementGroupFactory

    spec = config["case"]["spec"]
    share = spec["gpu_share"]
    bundle: dict[str, float] = {"CPU": spec["cpus"]}
    if share:
        bundle["GPU"] = int(share) if share >= 1 else share  # Ray takes more than one GPU only as a whole number
    return PlacementGroupFactory([bundle], strategy="STRICT_PACK")


# the Ray versions whose Tune keeps, per trial, the actor it is starting (TuneController._trial_to_actor), in its
# actor manager which of those hold their resources (live_actors), and the processes it may reuse (_actor_cache), where
# _fifo_sparing_starting_actors reads them
SPARING_TESTED_RAY = ("2.60.",)


def _fifo_sparing_starting_actors():
    """Tune's FIFO order, except that a process Tune reuses (reuse_actors: one that just finished a trial) is not given
    a trial whose own actor already holds its resources and is starting, while another pending trial's does not. Tune's
    FIFO gives it the first pending trial and removes that trial's actor: where an actor takes longer to start than a
    trial takes to run (short trials; a node whose processes start cold), the actors starting on the other nodes were
    removed one after another, and those nodes ran no trial (docs/performance.md, "Tune's actor reuse and a node
    whose actor is starting"). Of those trials, one of the reused process's resources comes first (else Tune would
    give that process another trial of its resources, whatever its actor). Once every pending trial's actor is
    starting, Tune's own choice: the last trials then go to whichever process is free first. On other Ray versions,
    or should those attributes not be what this expects: Tune's own FIFO."""
    import ray
    from ray.tune.experiment import Trial
    from ray.tune.schedulers import FIFOScheduler

    class SparingStartingActors(FIFOScheduler):
        def choose_trial_to_run(self, tune_controller):
            # the controller itself: through Tune's wrapper, these reads would log a warning
            controller = getattr(tune_controller, "_tune_controller", tune_controller)
            first_free = None  # a pending trial whose actor does not hold resources yet
            try:
                actors, cache = controller._trial_to_actor, controller._actor_cache
                starting = set(controller._actor_manager.live_actors)  # resources held: being created, or running
                for trial in controller.get_trials():  # stops at the first fit: a sweep may hold 100k trials
                    if trial.status != Trial.PENDING or actors.get(trial) in starting:
                        continue
                    if not cache.num_cached_objects or cache.has_cached_object(trial.placement_group_factory):
                        return trial
                    first_free = first_free or trial
            except (AttributeError, TypeError):
                return super().choose_trial_to_run(tune_controller)
            return first_free or super().choose_trial_to_run(tune_controller)

    return SparingStartingActors() if ray.__version__.startswith(SPARING_TESTED_RAY) else FIFOScheduler()


@dataclass
class PhaseFit:
    """One phase's Tune run: what it runs (``param_space``: the trials as ``cases``, and what every trial reads), and
    how. Plain data, so that a launch through a Ray client can run it on the cluster (:func:`_fit_on_cluster`)."""

    param_space: dict[str, Any]
    name: str  # the Tune experiment's name
    phase: str
    storage_path: str
    max_concurrent: int | None
    retries: int

    def run(self, sink: Callable[[dict[str, Any]], None], without_runtime_env) -> list[tuple[str, str]]:
        """Fit, each trial's events to ``sink``, inside ``without_runtime_env``
        (local_ray.tune_actors_without_runtime_env); returns (trial id, error) for each Tune trial that ended in an
        error (its worker died more often than ``retries`` allowed)."""
        from ray import tune

        space = {**self.param_space, "case": tune.grid_search(self.param_space["cases"])}
        del space["cases"]
        tuner = tune.Tuner(
            tune.with_resources(_trainable, trial_resources),
            param_space=space,
            tune_config=tune.TuneConfig(max_concurrent_trials=self.max_concurrent, reuse_actors=True,
                                        scheduler=_fifo_sparing_starting_actors(),
                                        trial_name_creator=_trial_name, trial_dirname_creator=_trial_name),
            run_config=tune.RunConfig(name=self.name, storage_path=self.storage_path, verbose=0,
                                      callbacks=[_tune_callback(sink)],
                                      failure_config=tune.FailureConfig(max_failures=self.retries)),
        )
        with without_runtime_env as dropped:
            sink({"event": "fit", "phase": self.phase, "actor_runtime_env": not dropped, "at": time.time()})
            grid = tuner.fit()
        # by its folder's name (_trial_name): a trial whose process died before it reported has no config in its
        # result
        return [(Path(r.path).name, f"{type(r.error).__name__}: {str(r.error).splitlines()[0][:500]}")
                for r in grid if r.error is not None]


# the events of a phase run by a _FitOnCluster actor, until the launch takes them (a deque: appended by Tune's loop,
# taken by another thread; not the actor's own state, which holds a lock: Tune pickles its callbacks, and the sink
# with them, into its experiment state, while calling the live ones)
_CLUSTER_EVENTS: deque = deque()


class _FitOnCluster:
    """The Ray actor that runs a phase's Tune loop on the cluster for a launch through a Ray client: Tune would run it
    in an actor of its own there (Tuner does so under a client), which gives the trial actors Tune's runtime_env and
    so keeps them out of the nodes' preloaded processes, and whose progress stays on the cluster. Its events wait
    here until the launch takes them (:meth:`events`, called while :meth:`run` runs: max_concurrency=2)."""

    def run(self, fit: PhaseFit, cluster_preloads: bool) -> list[tuple[str, str]]:
        return fit.run(_CLUSTER_EVENTS.append,
                       local_ray.tune_actors_without_runtime_env(cluster_preloads=cluster_preloads))

    def events(self) -> list[dict[str, Any]]:
        out = []
        while _CLUSTER_EVENTS:
            out.append(_CLUSTER_EVENTS.popleft())
        return out


def _fit_on_cluster(fit: PhaseFit, on_event: Callable[[dict[str, Any]], None]) -> list[tuple[str, str]]:
    """:meth:`PhaseFit.run` in a :class:`_FitOnCluster` actor on the node of the Ray client's server, its events
    passed to ``on_event`` here as they come. The actor (no runtime_env, as the trials it starts must have none)
    takes one of that node's processes: counted with the trials' for the refill (node_refill.processes_taken).
    Ctrl-C, or any error here, kills it, and with it the trial actors it owns."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    actor = ray.remote(num_cpus=0, max_concurrency=2,
                       scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False))(_FitOnCluster).remote()
    try:
        future = actor.run.remote(fit, local_ray.cluster_preloads() and not local_ray.as_is())
        while True:
            finished, _ = ray.wait([future], timeout=0.25)
            for event in ray.get(actor.events.remote()):  # after the wait: a finished run's last events are here
                on_event(event)
            if finished:
                return ray.get(future)
    finally:
        ray.kill(actor)


# a phase's Tune run began since Ray was joined: disconnect then refills the nodes
_trials_started = False


def _run_phase(trials: list[TrialSpec], store: ResultsStore, progress: Progress, emit, max_concurrent, retries, name,
               warm: dict | None = None, writer: dict | None = None):
    global _trials_started
    specs = [t.to_dict() for t in trials]
    fit = PhaseFit(param_space={"cases": [{"spec": s} for s in specs], "store": store.loc.canonical, "warm": warm,
                                "token": store.token, "writer": writer},
                   name=f"{time.strftime('%Y%m%d-%H%M%S')}-{name}", phase=name,
                   storage_path=str((store.work / "_tune").resolve()), max_concurrent=max_concurrent,
                   retries=retries)
    events_path = store.work / "_tune" / "events.jsonl"

    def on_event(event: dict[str, Any]) -> None:
        _apply_event(progress, emit, events_path, store, event)

    _trials_started = True
    if local_ray.joined_through_client():
        errors = _fit_on_cluster(fit, on_event)
    else:
        errors = fit.run(on_event, local_ray.tune_actors_without_runtime_env())
    # A trial whose worker died more often than ``retries`` allowed has no row: record it as failed.
    from .runner import config_row

    by_id = {t.trial_id: t for t in trials}
    for tid, error in errors:
        previous = store.committed(tid)
        if previous is None or previous.status != "done":  # this launch's failure replaces an older one
            row = {**config_row(by_id[tid]), "status": "failed", "error_stage": "worker", "error_type": "WorkerDied",
                   "error": error, "attempt": (previous.attempt if previous is not None else 0) + 1}
            store.write_trial(row, [])
