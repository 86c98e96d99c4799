"""Warm trial processes on every node of a joined Ray cluster, as Ray actors (issue 22). Imported by the launch and the
scheduler only; the warm-up itself is :func:`sweeper.warm_worker.warm_up` (no Ray there).

A trial's life, from `sweep launch --address ...` to its row::

    sweep launch ── socket pool (sweeper/warm_pool.py) on this machine, before Ray, when it is a node of the cluster
       ├─ ray.init(address) ── start(): one WarmRegistry (launching node) and, on every other node N (every node for
       │                       `ray://`), one WarmActor per trial N can run at once (num_cpus=0, num_gpus=0, hard
       │                       node affinity); each pins itself to its GPU (CUDA_VISIBLE_DEVICES), tells the registry
       │                       its key and warms up on a thread (imports, model classes, lm-eval's task index, CUDA
       │                       context, quantization libraries)
       └─ Tune ── trial actor on node N (holds the trial's CPUs / GPU share; Ray sets its CUDA_VISIBLE_DEVICES)
                    │ claim (launching node: the trial's flock; other nodes: through the StoreWriter)
                    ├─ launching node: a pool worker of its key (warm_pool.claim), as on a private instance
                    │ registry.acquire(N, "cpu" | "gpu:<its CUDA_VISIBLE_DEVICES>") -> a free warm actor, or none
                    ├─ warm actor: actor.run(request, caller) -> runner.run_request in that process, committing
                    │     through the StoreWriter (sweeper/remote_store.py: RemoteStore) off the launching node,
                    │     to the results itself on it; row: warm_worker=True, warm_worker_ready_at; registry.release
                    └─ none free / its warm-up failed: runner.run_request in the trial actor's own process, as before

The launching node keeps the pool because it starts before Ray: its first trial started 0.1 s after Tune scheduled it,
against about 2 s with a warm actor there (docs/performance.md, "Warm actors on every node";
SWEEPER_WARM_LAUNCHING_NODE=actor gives it warm actors instead, to measure).

Guarantees, as the socket pool (sweeper/warm_pool.py) keeps them on the launching machine: a trial only reaches a
warm actor of its own node and GPU (its key), so it never runs outside the GPU share Ray gave it; a warm actor that
dies mid-trial raises :class:`WarmWorkerDied` in the Tune trial, which Tune retries as a dead worker; a Tune trial
process that dies mid-trial makes the warm actor end itself (a watcher thread asks the caller actor; its call fails
once the caller is gone), so an orphan never races the retry; every actor is owned by the launch's driver, so
nothing outlives the launch, and Ctrl-C (ray.shutdown) ends them with Tune's.

A Tune trial takes a warm actor for one trial (acquire, run, release) rather than for its process's life as the
pool's flock does: Ray says nothing to anyone when a Tune trial process ends, so a hold for a process's life would
need a watcher for every holder; per trial it costs two calls to the registry (milliseconds) and nothing is left held.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from .errors import WarmWorkerDied
from .trials import TrialSpec

NAMESPACE = "sweeper"
ABANDONED = 75  # a warm actor's exit code when its caller died mid-trial (as the socket pool's worker)
WAIT_FOR_KEY_S = 30.0  # how long a trial waits for the GPU warm actors of its node to say which GPU each has


# ---------------------------------------------------------------------------------------------------- the registry
@dataclass
class _Slot:
    node: str
    key: str | None  # None: a GPU actor that has not yet said which GPU id its index names on its node
    actor: Any
    busy: bool = False
    dead: bool = False


class WarmRegistry:
    """Which warm actor of which node and key is free (one per launch, on the launching node; a plain actor: one
    call at a time, so acquire and release are atomic)."""

    def __init__(self):
        self.slots: dict[int, _Slot] = {}
        self.failures: list[str] = []
        self._early: dict[int, list] = {}  # what an actor said before the launch's add() arrived

    def add(self, slot: int, node: str, key: str | None, actor) -> None:
        self.slots[slot] = _Slot(node, key, actor)
        for method, arg in self._early.pop(slot, []):
            getattr(self, method)(slot, *arg)

    def _later(self, slot: int, method: str, *arg) -> bool:
        if slot in self.slots:
            return False
        self._early.setdefault(slot, []).append((method, arg))
        return True

    def resolve(self, slot: int, key: str) -> None:
        if not self._later(slot, "resolve", key):
            self.slots[slot].key = key

    def acquire(self, node: str, key: str):
        """(slot, actor) of a free warm actor of ``node`` and ``key``; "wait" while a GPU actor of that node has not
        said its key yet; None: none."""
        waiting = False
        for i, s in self.slots.items():
            if s.node != node or s.busy or s.dead:
                continue
            if s.key == key:
                s.busy = True
                return i, s.actor
            waiting = waiting or (s.key is None and key.startswith("gpu:"))
        return "wait" if waiting else None

    def release(self, slot: int, dead: bool = False) -> None:
        self.slots[slot].busy = False
        self.slots[slot].dead = self.slots[slot].dead or dead

    def failed(self, slot: int, why: str) -> None:
        """A warm actor whose warm-up failed: never handed out again; the launch reports it."""
        if self._later(slot, "failed", why):
            return
        s = self.slots[slot]
        s.dead = True
        self.failures.append(f"warm actor of {s.key} on node {s.node[:8]} could not start: {why}")

    def report(self) -> dict[str, Any]:
        return {"failures": list(self.failures),
                "slots": [(s.node, s.key, s.busy, s.dead) for s in self.slots.values()]}


# ------------------------------------------------------------------------------------------------- the warm actor
class WarmActor:
    """One warm trial process (see the module docstring). ``index``: for a GPU actor, which of its node's GPUs (the
    index-th entry of the node's CUDA_VISIBLE_DEVICES, which its process inherits from the raylet, else the index
    itself: the ids Ray gives trials on that node); None: a CPU actor, which sees no GPU (as a trial of no GPU)."""

    def __init__(self, registry, slot: int, index: int | None, warm_up: dict[str, Any]):
        self.registry, self.slot = registry, slot
        if index is None:
            self.key = "cpu"
            os.environ["CUDA_VISIBLE_DEVICES"] = ""
        else:
            ids = [g for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]
            self.key = f"gpu:{ids[index] if index < len(ids) else index}"
            os.environ["CUDA_VISIBLE_DEVICES"] = self.key[len("gpu:"):]  # before anything imports torch
            registry.resolve.remote(slot, self.key)
        self.ready_at: float | None = None
        self.error: str | None = None
        self.steps: dict = {}
        self._ready = threading.Event()
        threading.Thread(target=self._warm_up, args=(warm_up,), name="sweeper-warm-up", daemon=True).start()

    def _warm_up(self, args: dict[str, Any]) -> None:
        from .warm_worker import warm_up

        try:
            if "torch" in sys.modules:  # a process whose CUDA state was set before this actor pinned its GPU
                import torch

                if torch.cuda.is_initialized():
                    raise RuntimeError("CUDA was initialised in this process before its GPU was pinned")
            t0 = time.perf_counter()
            self.steps = warm_up(self.key, args["libraries"], args["models"], args["tasks"], args["needed"])
            self.ready_at = time.time()
            # in this actor's Ray log (and the launch's output with -v), as a pool worker's in its log
            print(f"warm actor {os.getpid()} ready: {self.key}, warm-up {time.perf_counter() - t0:.2f}s "
                  f"{self.steps}", flush=True)
        except BaseException as exc:  # noqa: BLE001 - said to the launch; trials then run in their own processes
            self.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            self.registry.failed.remote(self.slot, self.error)
        finally:
            self._ready.set()

    def describe(self) -> dict[str, Any]:
        """What this process is (for tests and the launch's report): key, pid, what it sees, its warm-up."""
        self._ready.wait()
        return {"key": self.key, "pid": os.getpid(), "visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
                "ready_at": self.ready_at, "error": self.error, "steps": self.steps}

    def run(self, request: dict[str, Any], caller, writer: dict | None) -> dict[str, Any]:
        """Run the trial of ``request`` (as :func:`sweeper.runner.run_request`) once the warm-up is done; ``caller``:
        the Tune trial's actor, watched meanwhile; ``writer``: the launch's StoreWriter (name, namespace) for a node
        that commits through it. ``{"not_ready": why}`` when the warm-up failed (the caller then runs it itself)."""
        import ray

        done, running, lock = threading.Event(), threading.Event(), threading.Lock()
        threading.Thread(target=self._watch, args=(caller, done, running, lock), name="sweeper-warm-caller",
                         daemon=True).start()
        try:
            self._ready.wait()
            if self.error is not None:
                return {"not_ready": self.error}
            with lock:
                if done.is_set():  # the caller died while this process warmed up: its retry runs it
                    return {"not_ready": "caller gone"}
                running.set()
            from .runner import run_request

            store = None
            if writer is not None:
                from .remote_store import RemoteStore

                store = RemoteStore(ray.get_actor(writer["name"], namespace=writer["namespace"]), request["store"],
                                    request.get("token"))
            extra = {"warm_worker": True, "warm_worker_ready_at": self.ready_at, **request["extra"]}
            try:
                return run_request({**request, "extra": extra}, store=store)
            except Exception as exc:  # not a trial failure (those are in the row): the request itself was bad
                return {"status": "failed", "error": f"{type(exc).__name__}: {exc}", "error_type": "WarmWorkerError",
                        "duration_s": 0.0}
        finally:
            running.clear()
            done.set()

    def _watch(self, caller, done: threading.Event, running: threading.Event, lock: threading.Lock) -> None:
        """Until ``done``: ask the caller actor whether it lives; when it does not, abandon the trial (end this
        process: the trial dies as it would have in the caller's own process) or, before it started, skip it."""
        import ray

        ref = caller.__ray_ready__.remote()  # queued behind the caller's running call; fails once the caller dies
        while not done.is_set():
            ready, _ = ray.wait([ref], timeout=0.5)
            if not ready:
                continue
            try:
                ray.get(ref)
            except Exception:  # noqa: BLE001 - RayActorError and kin: the caller is gone, and its release with it
                with lock:
                    if done.is_set():  # the trial had ended: the caller released this actor itself
                        return
                    abandon = running.is_set()
                    done.set()
                try:
                    ray.get(self.registry.release.remote(self.slot, abandon), timeout=5)
                except Exception:  # noqa: BLE001 - the launch is gone too: nothing to tell
                    pass
                if abandon:
                    os._exit(ABANDONED)
                return
            time.sleep(0.5)
            ref = caller.__ray_ready__.remote()


# --------------------------------------------------------------------------------------------------- the launch's side
class WarmActors:
    """The warm actors of one launch: :func:`start` makes them; :meth:`descriptor` goes into the trials' config;
    :meth:`close` reports warm-ups that failed and ends them."""

    def __init__(self, registry, name: str, actors: list, per_node: dict[str, list[str]]):
        self.registry, self.name, self.actors, self.per_node = registry, name, actors, per_node

    @property
    def descriptor(self) -> dict[str, str]:
        return {"registry": self.name, "namespace": NAMESPACE}

    def close(self, emit=None, timeout_s: float = 5.0) -> None:
        import ray

        if emit is not None:
            try:
                for line in ray.get(self.registry.report.remote(), timeout=timeout_s)["failures"]:
                    emit(f"warning: {line}; the trials it would have run ran in Ray's workers")
            except Exception:  # noqa: BLE001 - Ray already stopping: nothing to report
                pass
        for actor in [*self.actors, self.registry]:
            try:
                ray.kill(actor)
            except Exception:  # noqa: BLE001 - already gone with its node
                pass


def start(trials: list[TrialSpec], max_concurrent: int | None, name: str,
          skip_launching_node: bool = False) -> WarmActors | None:
    """One registry on this (the driver's) node and, on every alive node (but this one with ``skip_launching_node``:
    the socket pool serves it), one warm actor per trial the node can run at once (its CPUs and GPUs as
    :func:`sweeper.warm_pool.worker_keys` counts them). Returns at once: the actors start and warm up meanwhile."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from .warm_pool import warm_up_plan, worker_keys

    plan = warm_up_plan(trials)
    here = ray.get_runtime_context().get_node_id()
    nodes = []
    for n in ray.nodes():
        res = n.get("Resources", {})
        if not n.get("Alive") or (skip_launching_node and n["NodeID"] == here):
            continue
        gpus = int(res.get("GPU", 0))
        keys = worker_keys(trials, [str(i) for i in range(gpus)], int(res.get("CPU", 0)), max_concurrent)
        if keys:
            nodes.append((n["NodeID"], keys))
    if not nodes:
        return None
    registry = ray.remote(WarmRegistry).options(
        name=name, namespace=NAMESPACE, num_cpus=0, max_restarts=0,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=here, soft=False)).remote()
    actor_class = ray.remote(WarmActor)
    actors, per_node, slot = [], {}, 0
    for node, keys in nodes:
        per_node[node] = keys
        for key in keys:
            index = None if key == "cpu" else int(key[len("gpu:"):])
            actor = actor_class.options(
                num_cpus=0, num_gpus=0, max_restarts=0, max_concurrency=1,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node, soft=False),
            ).remote(registry, slot, index, plan)
            registry.add.remote(slot, node, "cpu" if index is None else None, actor)
            actors.append(actor)
            slot += 1
    return WarmActors(registry, name, actors, per_node)


# ---------------------------------------------------------------------------------------------------- the trial's side
class Lease:
    """A warm actor taken by one Tune trial for one trial; :meth:`run` gives it back."""

    def __init__(self, registry, slot: int, actor, key: str):
        self.registry, self.slot, self.actor, self.key = registry, slot, actor, key
        self._released = False

    def run(self, spec: TrialSpec, store_root: str, attempt: int, extra: dict[str, Any], token: str | None = None,
            writer: dict | None = None) -> dict[str, Any] | None:
        """The trial's outcome (status, error, error_type, duration_s); None when the actor's warm-up failed (the
        caller runs the trial itself); :class:`WarmWorkerDied` when the actor died before it answered."""
        import ray
        from ray.exceptions import RayActorError

        request = {"spec": spec.to_dict(), "store": store_root, "attempt": attempt, "extra": extra, "token": token}
        caller = ray.get_runtime_context().current_actor
        dead = False
        try:
            reply = ray.get(self.actor.run.remote(request, caller, writer))
        except RayActorError as e:
            dead = True
            raise WarmWorkerDied(f"warm actor of {self.key} ended during trial {spec.trial_id} ({spec.cell}): "
                                 f"{str(e).splitlines()[0][:200]}") from None
        finally:
            self.close(dead)
        if "not_ready" in reply:
            return None
        return reply

    def close(self, dead: bool = False) -> None:
        if self._released:
            return
        self._released = True
        import ray

        try:  # waited for: the next Tune trial process of this node asks the registry right after
            ray.get(self.registry.release.remote(self.slot, dead), timeout=30)
        except Exception:  # noqa: BLE001 - the launch is ending
            pass


_REGISTRY: dict[str, Any] = {}  # this process's handle of each launch's registry, by name


def acquire(descriptor: dict | None, spec: TrialSpec, node: str) -> Lease | None:
    """A free warm actor of this node and of this trial's key (its GPU as Ray made it visible here, or the CPU); None
    when there is none."""
    if not descriptor:
        return None
    import ray

    key = f"gpu:{os.environ.get('CUDA_VISIBLE_DEVICES', '')}" if spec.gpu_share else "cpu"
    registry = _REGISTRY.get(descriptor["registry"])
    if registry is None:
        try:
            registry = ray.get_actor(descriptor["registry"], namespace=descriptor["namespace"])
        except ValueError:  # gone: the launch is ending
            return None
        _REGISTRY[descriptor["registry"]] = registry
    deadline = time.monotonic() + WAIT_FOR_KEY_S
    while True:
        got = ray.get(registry.acquire.remote(node, key))
        if got != "wait" or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    if got is None or got == "wait":
        return None
    slot, actor = got
    return Lease(registry, slot, actor, key)
