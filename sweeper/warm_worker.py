"""A warm worker: a process that `sweep launch` starts on its own machine while Ray starts, which imports what a trial
needs (torch, transformers, lm-eval, the study's quantization libraries and model classes) and, for a GPU, creates
its CUDA context, then runs the trials that Tune trials on this machine hand to it.

A fresh Ray worker spends most of its start importing these (about 20 s before its first load on the H100 host,
docs/performance.md): Ray only starts it once Ray itself is up, so that start was on every launch's critical path.
A warm worker does it at the same time as Ray's start. It is pinned to one GPU (its ``CUDA_VISIBLE_DEVICES`` is set
when it starts) and serves only Tune trials that Ray gave that same GPU; see :mod:`sweeper.warm_pool` for the
client side and the protocol.

It serves one client (one Tune trial process) at a time, for as many trials as that client sends. If the client
goes away in the middle of a trial (Tune stopped it, its process died), this process exits at once: the trial is
abandoned exactly as if it had run in the client's own process. No Ray here.

    python -m sweeper.warm_worker --socket PATH --busy PATH --key KEY --parent PID [--library bitsandbytes] [--model PATH]
        [--tasks]
"""
from __future__ import annotations

import argparse
import fcntl
import json
import os
import queue
import signal
import socket
import sys
import threading
import time

NOT_READY = "warm worker could not start"  # its log's last line when its warm-up failed
NOT_FORKED = "could not fork:"  # in the pool parent's log when it imported, then found forking unsafe
PARENT_GONE = 3  # exit code: the launch that started this process had already ended
READY_TIMEOUT_S = 600.0  # what a client waits for a worker's imports before it runs its trial itself
MSG_BYTES = 1 << 22  # the largest request or reply; trial specs are a few KB


def write_json(path, doc: dict) -> None:
    """``doc`` as ``path`` (a pathlib.Path), replaced whole: a reader never sees half a file."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, path)


def _die_with_parent() -> None:
    """Linux: this process gets SIGKILL when the launch process that started it dies, even by SIGKILL."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def warm_up_shared(models: list[str], tasks: bool, needed: list[str]) -> dict:
    """Import what every trial uses and that touches no GPU: torch, transformers, sweeper's stages, the models'
    classes, lm-eval and its task index. Returns the seconds each step took."""
    steps: dict[str, float] = {}

    def step(name: str, t0: float) -> float:
        now = time.perf_counter()
        steps[name] = round(now - t0, 3)
        return now

    t = time.perf_counter()
    from .import_guard import hide_unless_needed

    hide_unless_needed(needed)  # as a Ray worker does before transformers is imported
    import torch  # noqa: F401

    t = step("torch", t)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    from . import runner  # noqa: F401
    from .stages import benchmark, kl, load, perplexity  # noqa: F401

    t = step("transformers", t)
    for model in models:  # the model class's module, which a first from_pretrained would import
        try:
            config = AutoConfig.from_pretrained(model)
            AutoModelForCausalLM._model_mapping[type(config)]
        except Exception:  # a hub id offline, a remote-code model: its first load imports it
            pass
    t = step("models", t)
    if tasks:
        from lm_eval.models.huggingface import HFLM  # noqa: F401

        from .stages.tasks import task_manager

        task_manager()
        step("lm_eval", t)
    return steps


def warm_up_device(key: str, libraries: list[str]) -> dict:
    """The CUDA context on the GPU this process is pinned to (key ``gpu:<id>``), then the quantization libraries
    (bitsandbytes asks CUDA about the GPU when it is imported). Returns the seconds each step took."""
    steps: dict[str, float] = {}
    t = time.perf_counter()
    if key.startswith("gpu:"):
        import torch

        torch.zeros(1, device="cuda")
        now = time.perf_counter()
        steps["cuda"], t = round(now - t, 3), now
    from .import_guard import import_precision_library

    for library in libraries:
        import_precision_library(library)
    steps["libraries"] = round(time.perf_counter() - t, 3)
    return steps


def warm_up(key: str, libraries: list[str], models: list[str], tasks: bool, needed: list[str]) -> dict:
    """Everything a trial would import or initialise, in this one process; returns the seconds each step took."""
    return {**warm_up_shared(models, tasks, needed), **warm_up_device(key, libraries)}


class _Output:
    """The client's stdout / stderr (file descriptors it sent) in place of this process's, for one trial."""

    def __init__(self, fds: list[int]):
        self._fds = fds
        self._saved: list[int] = []

    def __enter__(self):
        sys.stdout.flush()
        sys.stderr.flush()
        for target, fd in zip((1, 2), self._fds):
            self._saved.append(os.dup(target))
            os.dup2(fd, target)
        return self

    def __exit__(self, *exc):
        sys.stdout.flush()
        sys.stderr.flush()
        for target, saved in zip((1, 2), self._saved):
            os.dup2(saved, target)
            os.close(saved)
        for fd in self._fds:
            os.close(fd)


def serve(conn: socket.socket, ready: dict, busy_fd: int) -> None:
    """One client: its requests in order, until it disconnects. A disconnect during a trial ends this process."""
    running = threading.Event()
    requests: queue.Queue = queue.Queue()

    def read() -> None:
        while True:
            try:
                data, fds, _, _ = socket.recv_fds(conn, MSG_BYTES, 2)
            except OSError:
                data, fds = b"", []
            if not data:
                if running.is_set():
                    os._exit(75)  # the client is gone mid-trial: abandon it, as its own process would have
                requests.put(None)
                return
            running.set()  # before the main thread sees it: a disconnect from here on abandons the trial
            try:
                request = json.loads(data)
            except ValueError:  # not from sweeper's client: nobody would ever get an answer
                os._exit(76)
            requests.put((request, fds))

    from .runner import run_request

    conn.sendall(json.dumps(ready).encode())
    threading.Thread(target=read, name="warm-worker-client", daemon=True).start()
    while True:
        item = requests.get()
        if item is None:
            return
        request, fds = item
        fcntl.flock(busy_fd, fcntl.LOCK_EX)  # held while the trial runs: a client waits only for idle workers
        try:
            with _Output(fds):
                extra = {"warm_worker": True, "warm_worker_ready_at": ready.get("ready_at"), **request["extra"]}
                reply = run_request({**request, "extra": extra})
        except Exception as exc:  # not a trial failure (those are in the row): the request itself was bad
            reply = {"status": "failed", "error": f"{type(exc).__name__}: {exc}", "error_type": "WarmWorkerError",
                     "duration_s": 0.0}
        finally:
            running.clear()
            fcntl.flock(busy_fd, fcntl.LOCK_UN)
        conn.sendall(json.dumps(reply).encode())


def _listen(path: str) -> socket.socket:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    server.bind(path)
    server.listen(1)
    return server


def _not_ready(exc: BaseException) -> None:
    """Why this process could not warm up, said last in its log (before its socket closes, so whoever sees it closed
    can read why)."""
    import traceback

    traceback.print_exc()
    print(f"{NOT_READY}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", flush=True)


def _serve_forever(server: socket.socket, busy_path: str, ready: dict) -> None:
    busy_fd = os.open(busy_path, os.O_RDWR | os.O_CREAT, 0o600)
    ready = {"pid": os.getpid(), **ready, "ready_at": time.time()}
    print(f"warm worker {os.getpid()} ready: {json.dumps(ready)}", flush=True)
    while True:
        conn, _ = server.accept()
        with conn:
            try:
                serve(conn, ready, busy_fd)
            except OSError:  # the client left between trials, before our reply: wait for the next one
                pass


def parse_args(argv: list[str] | None, pool: bool = False):
    """The command line of a worker (``pool``: of the pool's parent, sweeper/warm_pool_parent.py): what to warm up,
    and the process it ends with (:func:`end_with_parent`)."""
    parser = argparse.ArgumentParser(prog=f"python -m sweeper.{'warm_pool_parent' if pool else 'warm_worker'}")
    if pool:
        parser.add_argument("--pool", required=True, help="start every worker of this pool folder's worker-N.json")
    else:
        parser.add_argument("--socket", required=True)
        parser.add_argument("--busy", required=True, help="a file whose lock this process holds while it runs a trial")
        parser.add_argument("--key", required=True, help="cpu, or gpu:<CUDA_VISIBLE_DEVICES> (set in this env)")
    parser.add_argument("--parent", type=int, required=True,
                        help="the pid of the process that started this one (the launch, or the pool's parent): "
                             "this process ends with it")
    parser.add_argument("--library", action="append", default=[])
    parser.add_argument("--needed", action="append", default=[], help="optional packages the trials need")
    parser.add_argument("--model", action="append", default=[])
    parser.add_argument("--tasks", action="store_true")
    return parser.parse_args(argv)


def end_with_parent(parent: int) -> None:
    """This process ends when ``parent``, the process that started it, does; at once if it already has."""
    _die_with_parent()
    if os.getppid() != parent:  # it died before the line above: nothing would end this process
        os._exit(PARENT_GONE)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    end_with_parent(args.parent)
    # SIGTERM keeps its default action (end at once): a Python handler would wait for the main thread, which CUDA's
    # threads can leave blocked in accept() (the signal goes to one of them): 10 s to stop on the H100 (run26).
    t0 = time.perf_counter()
    try:
        server = _listen(args.socket)  # before the imports: a client may connect at once, and waits for ready
        steps = warm_up(args.key, args.library, args.model, args.tasks, args.needed)
    except BaseException as exc:
        _not_ready(exc)
        os._exit(1)
    _serve_forever(server, args.busy, {"key": args.key, "warm_up_s": round(time.perf_counter() - t0, 3),
                                       "steps": steps, "forked": False})


if __name__ == "__main__":
    main()
