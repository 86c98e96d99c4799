"""The parent process of one launch's warm workers (`python -m sweeper.warm_pool_parent --pool DIR`). No Ray here.

It starts one worker per ``worker-N.json`` of the pool folder, in one of two ways:
- **Forked (CPU workers):** it imports, once, what every trial needs (torch, transformers, sweeper's stages, the
  models' classes, lm-eval and its task index: :func:`sweeper.warm_worker.warm_up_shared`), then forks the workers,
  which only import the quantization libraries. CPU workers do not see the GPUs (``CUDA_VISIBLE_DEVICES=""``, as
  Ray gives a trial of no GPU), so no import can initialise CUDA in the parent. On the 2-core machine 4 workers
  were ready 6.2 s after the pool's start instead of 12.4 s, and a launch took 15.5 s instead of 18.1 s
  (benchmarks/warm_fork.py, logs in benchmarks/logs/warm_fork*_cpu.txt).
- **Each its own process (GPU workers, or SWEEPER_WARM_FORK=0):** started at once; each imports everything itself,
  then creates its CUDA context. (``SWEEPER_WARM_FORK=always`` imports first and tries to fork GPU workers too: for
  measurements, benchmarks/warm_fork.py --gpu.) On the H100 host an import of the parent initialised CUDA (after
  which a forked child cannot use it), and one process's imports took as long as eight side by side (19-22 s
  against 21 s, docs/performance.md, run31), so forking would not have them ready sooner there.

Forking is only done where it is safe: on Linux, with CUDA not initialised and no other Python thread in this
process after its imports (a fork copies one thread; a lock another thread held would stay held in the child).
Native helper threads of the libraries (torch's, pyarrow's allocator's) are there, as when a torch DataLoader forks
its workers; those libraries prepare for a fork themselves. ``torch.cuda.is_available`` asks NVML
(``PYTORCH_NVML_BASED_CUDA_CHECK``) while this process imports, so that an import that only asks does not initialise
CUDA. If forking turns out unsafe after the imports, each worker is started as its own process, and the launch
says why.

This process ends when the launch does (it dies with it), when all its workers have ended, or on SIGTERM, which it
passes on to its workers before it waits for them. A worker's end is the last line of its log.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from .warm_worker import (NOT_FORKED, _die_with_parent, _listen, _not_ready, _serve_forever, end_with_parent,
                          parse_args, warm_up_device, warm_up_shared, write_json)

FORK_ENV = "SWEEPER_WARM_FORK"  # "0": each worker its own process; "always": try forking GPU workers too (to measure)
_NVML_CHECK = "PYTORCH_NVML_BASED_CUDA_CHECK"
_SPAWNED: list[subprocess.Popen] = []  # kept, so that no later Popen reaps one of them behind os.wait()'s back


def run_pool(args) -> None:
    folder = Path(args.pool)
    children: dict[int, Path] = {}  # pid -> the worker's log
    stopping = []

    def on_term(signum, frame) -> None:
        stopping.append(signum)
        if not children:
            os._exit(0)
        for pid in children:
            _signal(pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_term)
    saved_check = os.environ.get(_NVML_CHECK)
    sys.stdin.read()  # the launch writes every worker-N.json, then closes our stdin
    infos = [(path, json.loads(path.read_text()))
             for path in sorted(folder.glob("worker-*.json"), key=lambda p: int(p.stem.split("-")[1]))]
    keys = [info["key"] for _, info in infos]
    if not any(key.startswith("gpu:") for key in keys):
        # CPU workers see no GPU, as Ray gives a trial of no GPU none; no import here can initialise CUDA then
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    why_not = _why_not_fork_here(keys)
    shared: dict = {}
    shared_s = 0.0
    if why_not is None:  # import once, then see whether forking is safe
        os.environ[_NVML_CHECK] = "1"
        t0 = time.perf_counter()
        try:
            shared = warm_up_shared(args.model, args.tasks, args.needed)
        except BaseException as exc:
            _not_ready(exc)
            os._exit(1)
        shared_s = time.perf_counter() - t0
        _restore(_NVML_CHECK, saved_check)
        why_not = _why_not_fork_after_imports()
    print(f"warm pool {os.getpid()}: "
          + (f"shared imports {shared_s:.2f}s {json.dumps(shared)}; " if shared else "")
          + ("forking its workers" if why_not is None
             else f"{NOT_FORKED if shared else 'not forked:'} each started as its own process, which imports "
                  f"everything itself ({why_not})"),
          flush=True)
    for path, info in infos:
        if stopping:
            break
        if why_not is None:
            go_read, go_write = os.pipe()
            pid = _fork_worker(info, args, shared, shared_s, saved_check, go_read, go_write)
        else:
            pid, go_write = _spawn_worker(info, args, saved_check), None
        children[pid] = Path(info["log"])
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})  # blocked by _fork_worker; one that came
        # meanwhile runs the handler now, which knows this worker
        if stopping:  # a SIGTERM came while this worker was being spawned: the handler did not know it yet
            _signal(pid, signal.SIGTERM)
        write_json(path, {**info, "pid": pid})  # clients now watch the worker itself
        if go_write is not None:
            os.close(go_write)  # the forked worker listens once its file names it (see _fork_worker)
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        log = children.pop(pid, None)
        if log is not None:
            with open(log, "a") as fh:
                fh.write(f"warm worker {pid} ended: {_how(status)}\n")
    os._exit(0)


def _why_not_fork_here(keys: list[str]) -> str | None:
    """Why forking is not even tried (the workers then start at once); None: import, then ask again."""
    setting = os.environ.get(FORK_ENV, "1")
    if setting == "0":
        return f"{FORK_ENV}=0"
    if any(key.startswith("gpu:") for key in keys) and setting != "always":
        return "workers of GPUs"
    if sys.platform != "linux":
        return f"not on Linux ({sys.platform})"
    return None


def _why_not_fork_after_imports() -> str | None:
    """Why forking this process now would not be safe; None when it is."""
    import threading

    import torch

    if torch.cuda.is_initialized():
        return "CUDA was initialised by an import"
    if threading.active_count() > 1:  # a Python thread could hold a lock (an import's, logging's) in the child
        return f"{threading.active_count()} Python threads after the imports"
    return None


def _fork_worker(info: dict, args, shared: dict, shared_s: float, saved_check: str | None, go_read: int,
                 go_write: int) -> int:
    """Fork one worker. It binds its socket only once ``go_write`` is closed (the parent has written the worker's
    own pid into its file), so a client that got its ready message always finds the worker's pid in the file."""
    parent = os.getpid()
    sys.stdout.flush()
    sys.stderr.flush()
    # SIGTERM stays blocked across the fork (the caller unblocks it once it has registered the child): the child
    # would otherwise run the parent's handler if one came before it reset it
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    pid = os.fork()
    if pid:
        os.close(go_read)
        return pid
    try:  # the child: never returns to the parent's code
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # see warm_worker.main: a handler would stall the stop
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        _die_with_parent()
        if os.getppid() != parent:
            os._exit(0)  # the parent ended before the line above
        fd = os.open(info["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        os.close(go_write)
        os.read(go_read, 1)  # EOF once the parent has written the file
        os.close(go_read)
        _worker_env(os.environ, info["key"], saved_check)
        t0 = time.perf_counter()
        try:
            server = _listen(info["socket"])
            steps = warm_up_device(info["key"], args.library)
        except BaseException as exc:
            _not_ready(exc)
            os._exit(1)
        _serve_forever(server, info["busy"], {"key": info["key"], "forked": True, "steps": {**shared, **steps},
                                              "warm_up_s": round(shared_s + time.perf_counter() - t0, 3)})
    except BaseException:
        import traceback

        traceback.print_exc()  # into the worker's log
        sys.stderr.flush()
    finally:
        os._exit(1)


def _spawn_worker(info: dict, args, saved_check: str | None) -> int:
    env = _worker_env(dict(os.environ), info["key"], saved_check)
    extra: list[str] = []
    for flag, values in (("--library", args.library), ("--needed", args.needed), ("--model", args.model)):
        for value in values:
            extra += [flag, value]
    if args.tasks:
        extra.append("--tasks")
    with open(info["log"], "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "sweeper.warm_worker", "--socket", info["socket"], "--busy",
                                 info["busy"], "--key", info["key"], "--parent", str(os.getpid()), *extra],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env)
    _SPAWNED.append(proc)
    return proc.pid


def _worker_env(env, key: str, saved_check: str | None):
    """``env`` (os.environ in a forked worker, a copy for a spawned one) as worker ``key`` runs in: the user's own
    ``PYTORCH_NVML_BASED_CUDA_CHECK`` back, and a GPU worker pinned to its GPU."""
    _restore(_NVML_CHECK, saved_check, env)
    if key.startswith("gpu:"):
        env["CUDA_VISIBLE_DEVICES"] = key[len("gpu:"):]
    return env


def _restore(name: str, value: str | None, env=None) -> None:
    env = os.environ if env is None else env
    if value is None:
        env.pop(name, None)
    else:
        env[name] = value


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _how(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"signal {os.WTERMSIG(status)}"
    return f"exit code {os.WEXITSTATUS(status)}"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv, pool=True)
    end_with_parent(args.parent)
    run_pool(args)


if __name__ == "__main__":
    main()
