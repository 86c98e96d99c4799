"""Undisturbed timing on a shared device: a writer-preferring readers-writer lock per GPU (or per host for CPUs).

Packing puts several trials on one GPU; their loads, perplexity and lm-eval forwards may overlap freely. A timed
section, though, takes the device exclusively: it waits until every neighbour's current forward pass has finished,
and neighbours wait before starting another one until the timed section ends. Neighbours take the shared side around
each forward pass of their model (a forward pre/post hook) and around loading, so the exclusive side waits at most one
forward pass or one load.

Two ``flock`` files make the lock writer-preferring (a stream of short forwards cannot starve a timing section): a
writer holds the turnstile while it waits for and holds the main lock; readers pass the turnstile before taking the
main lock shared. A third, the timing queue, is held by a writer from before it waits until it is done: timed sections
queue on it, and :meth:`TimingLease.try_reserve` tells a trial, without waiting, that another trial is timing (or
about to), so it can do untimed work first instead of idling in the queue (the runner defers its benchmark stage).
Lock files live in the node's temp dir, keyed by the GPU's UUID, so only trials on the same physical device
interact. No Ray here: it works for any processes on one host.

CUDA work is asynchronous: a forward pass returns on the host while its kernels are still queued. So on CUDA the shared
side synchronises the device before it releases (a neighbour's queued kernels never run inside a timed section), and
the exclusive side synchronises after taking the lock and before releasing it.
"""
from __future__ import annotations

import fcntl
import os
import socket
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .measure import synchronize

_LOCAL = threading.local()  # in_exclusive: this process holds the device, its own forwards skip the shared side


def device_key(device: str) -> str:
    if device == "cuda":
        import torch

        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        uuid = str(getattr(props, "uuid", "")) or f"{socket.gethostname()}-{torch.cuda.current_device()}"
        return f"gpu-{uuid}"
    return f"cpu-{socket.gethostname()}"


class TimingLease:
    def __init__(self, device: str, lock_dir: str | None = None):
        root = Path(lock_dir or os.environ.get("SWEEPER_LOCK_DIR") or tempfile.gettempdir()) / "sweeper-timing"
        root.mkdir(parents=True, exist_ok=True)
        key = device_key(device)
        self._main = os.open(root / f"{key}.lock", os.O_CREAT | os.O_RDWR, 0o666)
        self._turnstile = os.open(root / f"{key}.turnstile", os.O_CREAT | os.O_RDWR, 0o666)
        self._queue = os.open(root / f"{key}.timing", os.O_CREAT | os.O_RDWR, 0o666)
        self._reserved = False  # this process holds the timing queue (try_reserve succeeded, exclusive not yet left)
        self._shared_held = False
        self._device = device

    def _sync(self) -> None:
        synchronize(self._device)

    def try_reserve(self) -> bool:
        """Take the timing queue if no other trial on this device is timing or waiting to; never waits.

        True: this process holds the queue and its next :meth:`exclusive` waits only for neighbours' current forward
        passes. False: another timed section is running or queued."""
        if self._reserved:
            return True
        try:
            fcntl.flock(self._queue, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        self._reserved = True
        return True

    @contextmanager
    def exclusive(self) -> Iterator[float]:
        """Hold the device alone; yields the seconds waited for it."""
        t0 = time.perf_counter()
        if not self._reserved:
            fcntl.flock(self._queue, fcntl.LOCK_EX)
            self._reserved = True
        try:
            with self._exclusive_device(t0) as waited:
                yield waited
        finally:
            self._reserved = False
            fcntl.flock(self._queue, fcntl.LOCK_UN)

    @contextmanager
    def _exclusive_device(self, t0: float) -> Iterator[float]:
        fcntl.flock(self._turnstile, fcntl.LOCK_EX)
        try:
            fcntl.flock(self._main, fcntl.LOCK_EX)
            self._sync()  # this process's own earlier work stays out of the timed section
            waited = time.perf_counter() - t0
            _LOCAL.in_exclusive = True
            try:
                yield waited
            finally:
                _LOCAL.in_exclusive = False
                try:
                    self._sync()
                finally:
                    fcntl.flock(self._main, fcntl.LOCK_UN)
        finally:
            fcntl.flock(self._turnstile, fcntl.LOCK_UN)

    def acquire_shared(self) -> None:
        if getattr(_LOCAL, "in_exclusive", False) or self._shared_held:
            return
        fcntl.flock(self._turnstile, fcntl.LOCK_SH)
        fcntl.flock(self._turnstile, fcntl.LOCK_UN)
        fcntl.flock(self._main, fcntl.LOCK_SH)
        self._shared_held = True

    def release_shared(self) -> None:
        if getattr(_LOCAL, "in_exclusive", False) or not self._shared_held:
            return
        self._shared_held = False
        try:
            self._sync()  # the kernels this forward queued finish before a timed section may start
        finally:
            fcntl.flock(self._main, fcntl.LOCK_UN)

    @contextmanager
    def shared(self) -> Iterator[None]:
        self.acquire_shared()
        try:
            yield
        finally:
            self.release_shared()

    def guard_forwards(self, model) -> list:
        """Take the shared side around every forward pass of ``model``; returns the hook handles.

        ``always_call``: the release runs even when the forward raises (lm-eval's batch-size probe and the KL stage
        catch such errors and go on), so a caught error never leaves the lock held against a waiting neighbour.
        """
        def pre(module, args, kwargs=None):
            self.acquire_shared()

        def post(module, args, output):
            self.release_shared()

        return [model.register_forward_pre_hook(pre), model.register_forward_hook(post, always_call=True)]

    def close(self) -> None:
        for fd in (self._main, self._turnstile, self._queue):
            try:
                os.close(fd)
            except OSError:
                pass
