"""Trials on nodes that cannot see the results folder (issue 18): the launching node is the only writer.

The launch starts one :class:`StoreWriter` actor pinned (hard node affinity) to its own node, holding the
``ResultsStore`` under the launch's token. A trial on another node runs with a :class:`RemoteStore`: the object the
runner and the stages use as their store, whose writes (row, metrics, samples, a baseline's KL reference) travel to the
actor, which commits them with the same ``write_trial`` as a local trial; its claim is taken by the actor; a KL
reference it needs comes back as bytes, written to a node-local file for the stage. Nothing else on that node touches
the results folder. Imported only by the scheduler (stages never import Ray).

Fencing stays the store's: the actor commits under the launch's token, so once a relaunch owns the location whatever a
stale actor sends is refused (``OwnershipLost``); and an actor dies with its launch (its driver), so an orphaned trial
of a killed launch has nobody left to commit through.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

import pyarrow as pa

from .lock import TrialClaim
from .store import ResultsStore, atomic_write_bytes


class StoreWriterImpl:
    """The actor's body (plain class: ``ray.remote`` wraps it in :func:`start_writer`). Threaded: a claim that waits
    for an orphan's flock must not hold up other trials' commits."""

    def __init__(self, root: str | None = None, token: str | None = None):
        self._store: ResultsStore | None = None
        self._failed: BaseException | None = None
        self._opened = threading.Event()
        self._lock = threading.Lock()  # ResultsStore caches its state: one commit at a time in this process
        self._claims: dict[str, TrialClaim] = {}
        self._claiming = threading.Lock()
        if root is not None:
            self.open(root, token)

    def open(self, root: str, token: str | None) -> None:
        """The results location to write, once the launch has prepared it (the actor's process starts earlier, while
        the launch checks its inputs: start_writer); a call before this waits for it, and one after a failed open
        raises its error (never waits for good)."""
        try:
            self._store = ResultsStore(root, token=token)
        except BaseException as e:
            self._failed = e
            raise
        finally:
            self._opened.set()

    @property
    def store(self) -> ResultsStore:
        self._opened.wait()
        if self._store is None:
            raise RuntimeError(f"the launch's StoreWriter could not open the results location: {self._failed!r}")
        return self._store

    def claim(self, trial_id: str) -> tuple[str, int] | None:
        """Take ``trial_id``'s claim (the same flock a local trial takes) and return its committed (status, attempt),
        or None. Kept until :meth:`release`; a claim this actor already holds is an earlier attempt of this launch
        whose worker died (Tune retries a trial only after its attempt ended), so it is taken over as it is."""
        with self._claiming:
            held = self._claims.get(trial_id)
        if held is None:
            held = TrialClaim(self.store.work, trial_id).__enter__()  # blocks while an orphan of a killed launch runs it
            with self._claiming:
                self._claims[trial_id] = held
        with self._lock:
            live = self.store.committed(trial_id)
        return None if live is None else (live.status, live.attempt)

    def release(self, trial_id: str) -> None:
        with self._claiming:
            held = self._claims.pop(trial_id, None)
        if held is not None:
            held.__exit__(None, None, None)

    def reference(self, ref_id: str) -> bytes | None:
        """The bytes of KL reference ``ref_id`` (this study's, else a sibling study's, as the KL stage looks)."""
        path = self.store.ref_path(ref_id)
        if not path.is_file():
            path = self.store.sibling_ref_path(ref_id) or path
        return path.read_bytes() if path.is_file() and not path.is_symlink() else None

    def write_trial(self, row: dict[str, Any], metrics: list[dict[str, Any]], samples: pa.Table | None,
                    ref: bytes | None) -> None:
        """Commit a trial sent by a remote node: its KL reference file first (a baseline's), then data and commit."""
        with self._lock:
            if ref is not None:
                atomic_write_bytes(self.store.ref_path(row["kl_reference_id"]), ref)
            self.store.write_trial(row, metrics, samples)


def start_writer(name: str, namespace: str):
    """The launch's StoreWriter actor, on this (the driver's) node and nowhere else; trials find it by ``name``. Not
    waited for, and not given its location yet (StoreWriterImpl.open): its process starts while the launch goes on."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from .local_ray import not_a_trial

    node = ray.get_runtime_context().get_node_id()
    return ray.remote(StoreWriterImpl).options(
        name=name, namespace=namespace, num_cpus=0, max_concurrency=256, max_restarts=0, **not_a_trial(),
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node, soft=False),
    ).remote()


def node_local_dir(root: str) -> Path:
    """This node's own folder for a results location it cannot see: caches and fetched KL references."""
    return Path(tempfile.gettempdir()) / "sweeper-node" / hashlib.sha256(str(root).encode()).hexdigest()[:16]


class RemoteStore:
    """What the runner and the stages use as the store on a node off the launching one (see the module docstring).
    One per trial.

    ``root``: where calibrated / ONNX checkpoints are cached: the results folder where this node sees it (a shared
    mount), else a node-local folder (``<local>/cache``; its parent holds no ``*/refs/``, so the KL stage's look for a
    sibling study's reference finds nothing there: the writer did that look). ``ref_path``: node-local, filled from the
    writer once per trial (never an earlier trial's copy: a reference found damaged is replaced by a rerun baseline's)."""

    def __init__(self, writer, root: str, token: str | None):
        self.writer = writer
        self.token = token
        self.local = node_local_dir(root)
        self.refs = self.local / "refs"
        self.root = Path(root) if os.path.isdir(root) else self.local / "cache"
        self.root.mkdir(parents=True, exist_ok=True)
        self._fetched: set[str] = set()

    def sibling_ref_path(self, ref_id: str) -> Path | None:
        return None  # the writer already looked beside the results location (StoreWriterImpl.reference)

    def ref_path(self, ref_id: str) -> Path:
        import ray

        path = self.refs / f"{ref_id}.parquet"
        if ref_id not in self._fetched:
            self._fetched.add(ref_id)
            data = ray.get(self.writer.reference.remote(ref_id))
            if data is not None:
                atomic_write_bytes(path, data)
            else:
                path.unlink(missing_ok=True)  # none committed: a baseline here computes it, any other trial fails
        return path

    def write_trial(self, row: dict[str, Any], metrics: list[dict[str, Any]], samples: pa.Table | None = None) -> None:
        import ray

        ref = None
        ref_id = row.get("kl_reference_id")
        if row.get("is_baseline") and ref_id and row.get("status") == "done":
            path = self.refs / f"{ref_id}.parquet"
            ref = path.read_bytes() if path.is_file() else None
        ray.get(self.writer.write_trial.remote(row, metrics, samples, ref))
