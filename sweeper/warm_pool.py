"""Warm workers (sweeper/warm_worker.py) for one `sweep launch`: how many to start on the launching machine and on which
GPU (:func:`worker_keys`, :class:`WarmPool`, the launch's side), and how a Tune trial on that machine takes one and
hands it its trial (:func:`claim`, :class:`WarmWorker`, the trial's side). No Ray here.

The pool lives in a temporary folder named in the trials' config: ``pool.json`` (the launch), ``parent.log`` (the
output of the pool's parent process, which starts the workers: sweeper/warm_pool_parent.py) and, for worker N:
``worker-N.json`` (its key, its pid (the parent's until the parent has started it), socket, lock and log),
``worker-N.sock`` (where it listens), ``worker-N.lock`` (flock'ed by the Tune trial process it serves, for as long as
that process lives) and ``worker-N.log`` (its output between trials, and its end). A key is ``cpu`` or ``gpu:<id>``:
a worker pinned to GPU ``<id>`` serves only Tune trials whose ``CUDA_VISIBLE_DEVICES`` Ray set to that
id, so a trial always runs on the GPU (and in the GPU share) Ray gave it. A trial that finds no free worker of its
key (another machine, a GPU left without one, a worker that died) runs in its own process as before.

Messages are JSON over a SOCK_SEQPACKET Unix socket. A request carries the Tune trial's stdout and stderr (as file
descriptors), so the trial's output goes where it would have gone.
"""
from __future__ import annotations

import fcntl
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from .errors import WarmWorkerDied
from .trials import TrialSpec
from .warm_worker import MSG_BYTES, NOT_FORKED, NOT_READY, READY_TIMEOUT_S, write_json

_PREFIX = "sweeper-warm-"
_SOCKET_PATH_MAX = 100  # AF_UNIX paths end at 107 bytes on Linux (104 on macOS)
BIND_TIMEOUT_S = 60.0  # a worker named in its file that has not bound its socket by then is taken as stuck
PARENT_LOG = "parent.log"  # the output of the pool's parent process (sweeper/warm_pool_parent.py)


# -------------------------------------------------------------------------------------------------- the launch's side
def worker_keys(pending: list[TrialSpec], gpu_ids: list[str], cpus: int, max_concurrent: int | None) -> list[str]:
    """One key per trial that can run at once on this machine: GPU trials need a free slot of their share on a GPU
    and their CPUs; CPU trials their CPUs. ``gpu_ids``: this machine's GPUs as Ray names them to its workers."""
    n = len(pending) if not max_concurrent else min(len(pending), max_concurrent)
    if n == 0:
        return []
    least_cpus = max(1, min(t.cpus for t in pending))
    n = min(n, max(1, cpus // least_cpus))
    shares = [t.gpu_share for t in pending if t.gpu_share > 0]
    if not shares:
        return ["cpu"] * n
    if not gpu_ids or min(shares) > 1:  # no GPU here, or trials of several GPUs (no single-GPU key matches them)
        return []
    # Ray decides which GPU each trial gets. With `auto` shares spread over the GPUs (launch.for_cluster) exactly
    # ceil(n / GPUs) fit on each, so that many on every GPU match whatever Ray picks; with a pinned share and fewer
    # trials than fit, Ray may stack them on one GPU, and those beyond its workers run in Ray's workers.
    per_gpu = min(math.floor(1 / min(shares) + 1e-9), math.ceil(n / len(gpu_ids)))
    return [f"gpu:{g}" for g in gpu_ids for _ in range(per_gpu)]


def serves_this_node(keys: list[str], pending: list[TrialSpec], node_cpus: float, node_gpus: float) -> bool:
    """Whether a worker of ``keys`` can take any of ``pending`` (their shares as sized for the cluster) on this
    machine, given what Ray gives this node (``node_cpus``, ``node_gpus``). The pool is sized before Ray is up, from
    this machine's own GPUs; a cluster's head often has none in Ray (or hides them), and then its GPU trials all run
    on other nodes and no worker here would ever get one."""
    gpu_keys, cpu_keys = any(k.startswith("gpu:") for k in keys), "cpu" in keys
    return any((t.gpu_share > 0 and gpu_keys and node_gpus > 0) or (t.gpu_share == 0 and cpu_keys and node_cpus >= t.cpus)
               for t in pending)


class WarmPool:
    """The warm workers of one launch: started by :meth:`start`, stopped (and their folder removed) by :meth:`close`."""

    def __init__(self, folder: Path, procs: list[subprocess.Popen], keys: list[str]):
        self.folder = folder
        self.procs = procs
        self.keys = keys
        self.started_at = time.time()

    @property
    def descriptor(self) -> dict[str, str]:
        """What a Tune trial needs to find the pool (in its config)."""
        return {"dir": str(self.folder), "host": socket.gethostname()}

    @classmethod
    def start(cls, keys: list[str], trials: list[TrialSpec], env: dict[str, str] | None = None) -> "WarmPool":
        """Start one worker per key, preloading what ``trials`` use; returns at once (they warm up meanwhile)."""
        from . import precisions

        _remove_stale_pools()
        folder = Path(tempfile.mkdtemp(prefix=_PREFIX))
        if len(str(folder / f"worker-{len(keys)}.sock").encode()) > _SOCKET_PATH_MAX:
            shutil.rmtree(folder, ignore_errors=True)  # a long TMPDIR: a short folder of the system's own /tmp
            folder = Path(tempfile.mkdtemp(prefix=_PREFIX, dir="/tmp"))
        write_json(folder / "pool.json", {"pid": os.getpid(), "host": socket.gethostname()})
        used = [precisions.get(t.precision) for t in trials]
        args: list[str] = []
        for library in sorted({p.library for p in used} - {"torch"}):
            args += ["--library", library]
        for needed in sorted({m for p in used for m in p.requires}):
            args += ["--needed", needed]
        for model in sorted({t.model.id for t in trials if Path(t.model.id).is_dir()}):
            args += ["--model", model]
        if any(t.tasks for t in trials):
            args.append("--tasks")
        base_env = {**os.environ, **(env or {})}
        package_root = str(Path(__file__).resolve().parents[1])  # this sweeper, wherever the launch imported it from
        # after the user's own path, so that a warm worker imports what Ray's workers import
        base_env["PYTHONPATH"] = os.pathsep.join(p for p in (base_env.get("PYTHONPATH"), package_root) if p)
        # as Ray does for its workers: one trial's CPUs worth of OpenMP threads unless the user set it
        base_env.setdefault("OMP_NUM_THREADS", str(max(1, min((t.cpus for t in trials), default=1))))
        procs: list[subprocess.Popen] = []
        try:
            cls._spawn(folder, keys, args, base_env, procs)
        except BaseException:
            cls(folder, procs, list(keys)).close()
            raise
        return cls(folder, procs, list(keys))

    @staticmethod
    def _spawn(folder: Path, keys: list[str], args: list[str], base_env: dict[str, str],
               procs: list[subprocess.Popen]) -> None:
        """The pool's parent process (sweeper/warm_pool_parent.py), which starts one worker per worker-N.json."""
        with open(folder / PARENT_LOG, "wb") as log:
            # its own session: a Ctrl-C at the terminal reaches the launch, which stops the workers itself
            proc = subprocess.Popen([sys.executable, "-m", "sweeper.warm_pool_parent", "--pool", str(folder),
                                     "--parent", str(os.getpid()), *args],
                                    stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, env=base_env,
                                    cwd=os.getcwd(), start_new_session=True)
        procs.append(proc)
        try:
            for i, key in enumerate(keys):
                paths = {kind: str(folder / f"worker-{i}.{kind}") for kind in ("sock", "lock", "busy", "log")}
                # the parent's pid until it has started the worker: a client waits while the parent lives
                write_json(folder / f"worker-{i}.json", {"key": key, "pid": proc.pid, "parent": proc.pid,
                                                         "socket": paths["sock"], "lock": paths["lock"],
                                                         "busy": paths["busy"], "log": paths["log"]})
        finally:
            proc.stdin.close()  # the parent reads the worker files once this is closed

    def worker_pids(self) -> list[int]:
        """The workers' pids (the parent's pid for a worker it has not started yet)."""
        return [int(info["pid"]) for info in _infos(self.folder, None)]

    def close(self, emit: Callable[[str], None] | None = None, timeout_s: float = 10.0,
              keep_logs: Path | None = None) -> None:
        """Stop every worker (a trial still running in one is abandoned, as Ray's own workers' are when Ray stops)
        and remove the folder; a worker whose warm-up failed is reported (``emit``) with its error. ``keep_logs``:
        a folder to copy the pool's logs into first (the launch keeps them in its results, ``_warm/<start>/``)."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)  # the parent passes it on to its workers and waits for them
        deadline = time.monotonic() + timeout_s
        for proc in self.procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()  # its workers die with it (PR_SET_PDEATHSIG)
                proc.wait()
        workers = self.worker_pids() if self.folder.is_dir() else []  # read once the parent has ended: final
        while any(_alive(pid) for pid in workers) and time.monotonic() < deadline + 5.0:
            time.sleep(0.05)
        if emit is not None:
            for line in _last_line(self.folder / PARENT_LOG, NOT_READY):
                emit(f"warning: {line}; the trials ran in Ray's workers")
            for line in _last_line(self.folder / PARENT_LOG, "warm pool "):
                if NOT_FORKED in line:  # the slow way: say why, so that it can be mended
                    emit(f"note: warm workers {NOT_FORKED}{line.split(NOT_FORKED, 1)[1]}")
            for i, pid in enumerate(workers):
                for line in _last_line(self.folder / f"worker-{i}.log", NOT_READY):
                    emit(f"warning: {line} (pid {pid}); trials it would have run ran in Ray's workers")
        if keep_logs is not None:
            try:
                keep_logs.mkdir(parents=True, exist_ok=True)
                for log in self.folder.glob("*.log"):
                    shutil.copy2(log, keep_logs / log.name)
            except OSError as e:
                if emit is not None:
                    emit(f"warning: the warm workers' logs were not kept in {keep_logs}: {e}")
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> "WarmPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _remove_stale_pools() -> None:
    """Folders of pools whose launch was killed (its workers died with it, the folder stayed): its launch is gone."""
    for folder in {*Path(tempfile.gettempdir()).glob(f"{_PREFIX}*"), *Path("/tmp").glob(f"{_PREFIX}*")}:
        try:
            launch = json.loads((folder / "pool.json").read_text())
        except (OSError, ValueError):
            launch = None
        try:
            old = time.time() - folder.stat().st_mtime > 3600
        except OSError:
            continue
        if (launch is not None and launch.get("host") == socket.gethostname() and not _alive(int(launch["pid"]))) \
                or (launch is None and old):
            shutil.rmtree(folder, ignore_errors=True)


# --------------------------------------------------------------------------------------------------- the trial's side
class WarmWorker:
    """A warm worker taken by this process: run trials in it until :meth:`close` (or this process ends)."""

    def __init__(self, conn: socket.socket, lock_fd: int, key: str, ready: dict[str, Any]):
        self._conn = conn
        self._lock_fd = lock_fd
        self.key = key
        self.pid = int(ready["pid"])
        self.ready = ready

    def run(self, spec: TrialSpec, store_root: str, attempt: int, extra: dict[str, Any],
            token: str | None = None) -> dict[str, Any]:
        """Run ``spec`` there, committing under the launch's ``token``; returns its status, error, error_type and
        duration_s. :class:`WarmWorkerDied` if the worker is gone before it answers (nothing was then committed)."""
        request = {"spec": spec.to_dict(), "store": store_root, "attempt": attempt, "extra": extra, "token": token}
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            socket.send_fds(self._conn, [json.dumps(request).encode()], [1, 2])
            reply = self._conn.recv(MSG_BYTES)
        except OSError:
            reply = b""
        if not reply:
            self.close()
            raise WarmWorkerDied(f"warm worker {self.pid} ended during trial {spec.trial_id} ({spec.cell})")
        return json.loads(reply)

    @property
    def alive(self) -> bool:
        return _alive(self.pid)

    def close(self) -> None:
        for close in (self._conn.close, lambda: os.close(self._lock_fd)):
            try:
                close()
            except OSError:
                pass


def claim(descriptor: dict[str, str] | None, key: str, ready_timeout_s: float = READY_TIMEOUT_S,
          busy_wait_s: float = 30.0) -> WarmWorker | None:
    """A free warm worker of ``key`` from the pool ``descriptor`` names, connected and ready; None when this machine
    has none (not the launching machine, none of that key, or each one dead or not ready in time).

    When the key's workers are all held and one of them is idle (between trials), it waits up to ``busy_wait_s`` for
    one to be let go: an idle held worker belongs to a Tune trial process that is ending (Tune's next phase, or a
    retry, starts new ones while the old ones stop). Workers running trials are not waited for. One deadline,
    ``ready_timeout_s``, covers the rest."""
    if not descriptor or descriptor.get("host") != socket.gethostname() or not Path(descriptor["dir"]).is_dir():
        return None
    deadline = time.monotonic() + ready_timeout_s
    busy_until = time.monotonic() + busy_wait_s
    while True:
        idle_held = False
        for info in _infos(Path(descriptor["dir"]), key):
            try:
                fd = os.open(info["lock"], os.O_RDWR | os.O_CREAT, 0o600)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # another trial process has it
                os.close(fd)
                idle_held = idle_held or (_alive(int(info["pid"])) and not _running(info))
                continue
            conn, ready = _connect(info, deadline)
            if conn is None:
                os.close(fd)  # releases the flock
                continue
            return WarmWorker(conn, fd, key, ready)
        if not idle_held or time.monotonic() > busy_until:
            return None
        time.sleep(0.1)


def _running(info: dict[str, Any]) -> bool:
    """Whether the worker is running a trial (it holds its busy file's lock meanwhile)."""
    try:
        fd = os.open(info["busy"], os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def _infos(folder: Path, key: str | None) -> list[dict[str, Any]]:
    """The workers of ``key`` (None: all), in worker order."""
    out = []
    for path in sorted(folder.glob("worker-*.json"), key=lambda p: int(p.stem.split("-")[1])):
        try:
            info = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if key is None or info.get("key") == key:
            out.append({**info, "path": str(path)})
    return out


def _reread(info: dict[str, Any]) -> dict[str, Any]:
    try:
        return {**json.loads(Path(info["path"]).read_text()), "path": info["path"]}
    except (OSError, ValueError, KeyError):
        return info


def _last_line(log: Path, prefix: str) -> list[str]:
    """The log's last line starting with ``prefix``, if any."""
    lines = log.read_text(errors="replace").strip().splitlines() if log.exists() else []
    return [line for line in lines if line.startswith(prefix)][-1:]


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, a dead worker the launch has not reaped yet, does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (OSError, IndexError):  # no /proc (not Linux): ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def _connect(info: dict[str, Any], deadline: float) -> tuple[socket.socket | None, dict[str, Any]]:
    """Connect to a worker and wait for its ready message (its imports); (None, {}) if it (or, before it is started,
    the pool's parent) died, if it was started but has not bound its socket within BIND_TIMEOUT_S, or if it is not
    ready by ``deadline`` (time.monotonic). Its file names the parent until the parent has started it, which can take
    the parent's imports."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    named_at: float | None = None  # when the file first named the worker itself (not the pool's parent)
    while True:
        info = _reread(info)  # the pool's parent names the worker's own pid once it has started it
        if not _alive(int(info["pid"])):
            conn.close()
            return None, {}
        if named_at is None and info["pid"] != info.get("parent"):
            named_at = time.monotonic()
        try:
            conn.connect(info["socket"])
            break
        except (FileNotFoundError, ConnectionRefusedError):  # not bound, or bound and not listening yet
            # a started worker binds within a second; one alive and still unbound long after is stuck
            stuck = named_at is not None and time.monotonic() - named_at > BIND_TIMEOUT_S
            if time.monotonic() > deadline or stuck:
                conn.close()
                return None, {}
            time.sleep(0.05)
    conn.settimeout(max(0.1, deadline - time.monotonic()))
    try:
        ready = conn.recv(MSG_BYTES)
    except OSError:  # socket.timeout included
        ready = b""
    conn.settimeout(None)
    if not ready:
        conn.close()
        return None, {}
    return conn, json.loads(ready)
