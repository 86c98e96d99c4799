"""A two-node Ray cluster on this machine, whose worker node sees the machine as a second machine would.

The head node (``ray start --head``) sees this machine's files as they are, as the launching machine. The worker node
(``ray start --address``) runs in a mount namespace of its own (``unshare --mount --propagation private``, as root)
with an empty tmpfs over /tmp and over each ``hidden`` folder: it sees the repository, /work/shared, $HOME and the
virtual environment (bound back in when it lives under /tmp), but not the launching machine's /tmp (Ray's session
files, the warm workers' sockets, pytest's tmp_path) nor its results folder. Only the mount namespace is its own:
both nodes share the network, so every Ray port is pinned to ``base_port .. base_port + 99`` (default 6400, or
$SWEEPER_HARNESS_PORT_BASE) and the worker node gets its own IP, 127.0.0.2. Each node has its own custom resource
(``harness_head`` / ``harness_worker``, 1000 units) to pin a task to it, and its node id is known
(:attr:`TwoNodeCluster.head_node_id`, :attr:`TwoNodeCluster.worker_node_id`) to tell where a trial ran.

Clean-up never uses ``ray stop`` (it kills every Ray process of the machine, other users' too). Each node runs in a
mount namespace of its own (the head's hides nothing) holding a small tmpfs at a path named after the ports
(``/var/tmp/swh-<port>-head``, ``/var/tmp/swh-<port>-results``): a process whose mount table has one is the
harness's, whatever Ray did to its session or environment, and nothing else can have one (process ids, session ids
and namespace numbers are all reused once free; a mount is not). :meth:`TwoNodeCluster.stop` ends exactly those
processes (SIGTERM, then SIGKILL). A harness left on the same ports by a killed test process is ended the same way
when the next one starts (/tmp/swh-<port>/harness.json names its owner); one whose owner still runs is another
test's, and the start fails saying so.

    with TwoNodeCluster() as cluster:  # or the `two_node_cluster` fixture (tests/conftest.py)
        sweep("launch", study, "--address", cluster.address, "--results", str(cluster.results_root / "s"))
"""
from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from sweeper.local_ray import (PRELOAD_LABEL, PRELOAD_MODULE, SPARE_PROCESSES,  # as cluster.yaml starts nodes
                               preloaded_idle_workers)

PORT_BASE_ENV = "SWEEPER_HARNESS_PORT_BASE"
HEAD_RESOURCE = "harness_head"
WORKER_RESOURCE = "harness_worker"
WORKER_IP = "127.0.0.2"


def namespace_unavailable() -> str | None:
    """Why this machine cannot start the worker node in its own mount namespace; None when it can."""
    if not sys.platform.startswith("linux"):
        return f"mount namespaces are Linux only (this is {sys.platform})"
    if os.geteuid() != 0:
        return "creating a mount namespace with tmpfs mounts needs root (unshare --mount)"
    if shutil.which("unshare") is None:
        return "the unshare command (util-linux) is not installed"
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                            "mount -t tmpfs tmpfs /tmp && test ! -e /tmp/.sweeper-harness-probe"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        return f"unshare --mount / mount -t tmpfs failed: {(probe.stderr or probe.stdout).strip()[:200]}"
    return None


def _mnt_ns(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return None


def _tagged(pid: int, tags: set[str]) -> bool:
    """Whether the process's mount table has a tmpfs mounted at one of ``tags``."""
    try:
        with open(f"/proc/{pid}/mountinfo") as fh:
            for line in fh:
                fields, _, fs = line.partition(" - ")
                if fields.split()[4] in tags and fs.split()[0] == "tmpfs":
                    return True
    except (OSError, IndexError):
        pass
    return False


def tags(port: int) -> set[str]:
    """The tmpfs mount points that mark the mount namespaces of the harness on ``port``'s nodes."""
    return {f"/var/tmp/swh-{port}-head", f"/var/tmp/swh-{port}-results"}


def members(port: int) -> list[int]:
    """The live processes of the harness on ``port``: those in a mount namespace that holds one of its tags."""
    marks, own = tags(port), _mnt_ns(os.getpid())
    ours: dict[str, bool] = {}  # mount namespace -> tagged (one mount table read per namespace)
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        pid = int(entry)
        ns = _mnt_ns(pid)
        if ns is None or ns == own:
            continue
        if ns not in ours:
            ours[ns] = _tagged(pid, marks)
        if ours[ns] and _alive(pid):
            out.append(pid)
    return out


def _end(port: int, grace_s: float = 8.0) -> None:
    """SIGTERM the harness's processes, SIGKILL what is left after ``grace_s`` (gcs_server ignores SIGTERM at times)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = members(port)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + (grace_s if sig == signal.SIGTERM else 10.0)
        while pids and time.monotonic() < deadline:
            time.sleep(0.2)
            pids = members(port)
        if not pids:
            return
    raise RuntimeError(f"processes {pids} of the cluster harness on port {port} outlived SIGKILL")


def _started(pid: int) -> int | None:
    """The process's start time (clock ticks since boot): with the pid, it names one process for good."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return int(fh.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _end_stale(state_dir: Path, port: int) -> None:
    """End a harness left on ``port`` by a test process that was killed; a harness whose owner still runs is another
    test's: RuntimeError rather than ending it."""
    if not members(port):
        return
    owner = {}
    with contextlib.suppress(OSError, ValueError):
        owner = json.loads((state_dir / "harness.json").read_text())
    pid = owner.get("owner")
    if pid and pid != os.getpid() and _started(pid) == owner.get("owner_started"):
        raise RuntimeError(f"ports {port}-{port + 99} are held by the cluster harness of process {pid}; "
                           f"set {PORT_BASE_ENV} to another range")
    _end(port)


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:  # it ended meanwhile
        return b""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended; its parent reaps it
    except OSError:
        return False


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


class TwoNodeCluster:
    """See the module docstring. The worker node sees an empty tmpfs over /tmp, over :attr:`results_root` (a folder
    for results outside /tmp, made empty on start and removed on stop) and over each of ``hidden``."""

    def __init__(self, hidden: list[Path] | tuple[Path, ...] = (), base_port: int | None = None,
                 head_cpus: int = 1, worker_cpus: int = 1, join_timeout_s: float = 120.0,
                 head_env: dict[str, str] | None = None, worker_env: dict[str, str] | None = None,
                 worker_gpus: int = 0, preload: bool = False):
        self.base_port = int(base_port or os.environ.get(PORT_BASE_ENV) or 6400)
        # a results folder outside /tmp, so that its own tmpfs (not /tmp's) is what hides it; emptied on start
        self.results_root = Path(f"/var/tmp/swh-{self.base_port}-results")
        self.hidden = [self.results_root, *(Path(h).resolve() for h in hidden)]
        self.head_cpus, self.worker_cpus = head_cpus, worker_cpus
        self.worker_gpus = worker_gpus  # GPUs the worker node declares to Ray (none there: ids only, for placement)
        self.join_timeout_s = join_timeout_s
        self.state_dir = Path(f"/tmp/swh-{self.base_port}")  # short: Ray's socket paths live under it
        self.head_node_id: str | None = None
        self.worker_node_id: str | None = None
        self._procs: list[subprocess.Popen] = []
        # variables for one node only (its raylet, hence its Ray workers): e.g. a bucket's credentials on the head
        self.node_env = {"head": dict(head_env or {}), "worker": dict(worker_env or {})}
        if preload:  # as cluster.yaml: room for a launch's own processes beside the preloaded ones
            for name, cpus in (("head", head_cpus), ("worker", worker_cpus)):
                self.node_env[name].setdefault("RAY_num_workers_soft_limit", str(cpus + SPARE_PROCESSES))
        # preload: both nodes started as cluster.yaml starts them, with idle workers that preload sweeper
        # (sweeper/node_preload.py) and the label that tells a launch so
        self.preload = preload

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.base_port}"

    @property
    def client_address(self) -> str:
        """The head's Ray client server (``ray://``), as a launch from outside the cluster joins it."""
        return f"ray://127.0.0.1:{self.base_port + 8}"

    def _ports(self, offset: int) -> list[str]:
        b = self.base_port + offset
        return [f"--node-manager-port={b + 1}", f"--object-manager-port={b + 2}",
                f"--dashboard-agent-listen-port={b + 3}", f"--dashboard-agent-grpc-port={b + 4}",
                f"--metrics-export-port={b + 5}", f"--runtime-env-agent-port={b + 6}"]

    def _env(self) -> dict[str, str]:
        # this process's environment (PYTHONPATH, HF offline settings) reaches every Ray worker through its raylet
        # and token authentication as the drivers have it (`ray start` turns it on by itself once ~/.ray/auth_token
        # exists, while a driver without RAY_AUTH_MODE does not use the token)
        return {**os.environ, "RAY_USAGE_STATS_ENABLED": "0",
                "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"),
                **({"RAY_enable_worker_prestart": "1", "RAY_preload_python_modules": PRELOAD_MODULE}
                   if self.preload else {})}

    def start(self) -> "TwoNodeCluster":
        why = namespace_unavailable()
        if why:
            raise RuntimeError(f"cannot start the worker node in its own mount namespace: {why}")
        _end_stale(self.state_dir, self.base_port)
        busy = [p for p in (self.base_port, self.base_port + 1, self.base_port + 11) if not _port_free(p)]
        if busy:
            raise RuntimeError(f"port(s) {busy} in use: another Ray or harness holds {self.base_port}-"
                               f"{self.base_port + 99}; set {PORT_BASE_ENV} to another range")
        for d in (self.state_dir, self.results_root):
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir(parents=True)
        # before any node starts: the next start on these ports knows whose harness this is
        (self.state_dir / "harness.json").write_text(json.dumps({"owner": os.getpid(),
                                                                 "owner_started": _started(os.getpid())}))
        ray = str(Path(sys.executable).parent / "ray")
        common = ["--object-store-memory=100000000", "--disable-usage-stats", "--block",
                  *([f"--labels={PRELOAD_LABEL}=1"] if self.preload else [])]
        head = [ray, "start", "--head", f"--port={self.base_port}", f"--temp-dir={self.state_dir / 'ray'}",
                f"--num-cpus={self.head_cpus}", "--num-gpus=0", f"--resources={json.dumps({HEAD_RESOURCE: 1000})}",
                "--include-dashboard=false", f"--dashboard-port={self.base_port + 7}",
                f"--ray-client-server-port={self.base_port + 8}", *self._ports(0),
                f"--min-worker-port={self.base_port + 20}", f"--max-worker-port={self.base_port + 59}", *common]
        worker = [ray, "start", f"--address={self.address}", f"--node-ip-address={WORKER_IP}",
                  f"--temp-dir=/tmp/swh-{self.base_port}-worker", f"--num-cpus={self.worker_cpus}",
                  f"--num-gpus={self.worker_gpus}",
                  f"--resources={json.dumps({WORKER_RESOURCE: 1000})}", *self._ports(10),
                  f"--min-worker-port={self.base_port + 60}", f"--max-worker-port={self.base_port + 99}", *common]
        head_tag = shlex.quote(f"/var/tmp/swh-{self.base_port}-head")
        try:
            self._spawn(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                         f"set -e\nmkdir -p {head_tag}\nmount -t tmpfs -o size=64k tmpfs {head_tag}\n"
                         f"exec {shlex.join(head)}"], "head")
            self._spawn(["unshare", "--mount", "--propagation", "private", "sh", "-c", self._namespace_script(worker)],
                        "worker")
            self._wait_joined()
            if self.preload:
                self.wait_preloaded()
        except BaseException:
            self.stop()
            raise
        return self

    def _namespace_script(self, worker_cmd: list[str]) -> str:
        """Shell run inside the new mount namespace: hide /tmp and the hidden folders, then start the worker node."""
        lines = ["set -e"]
        venv = Path(sys.prefix).resolve()
        keep = venv.is_relative_to("/tmp")
        if keep:  # the virtual environment stays visible: held aside (outside /tmp) while /tmp is hidden, moved back
            aside = shlex.quote(f"/var/tmp/swh-{self.base_port}-venv")
            lines += [f"mkdir -p {aside}", f"mount --bind {shlex.quote(str(venv))} {aside}"]
        lines.append("mount -t tmpfs tmpfs /tmp")
        for h in self.hidden:
            lines += [f"mkdir -p {shlex.quote(str(h))}", f"mount -t tmpfs tmpfs {shlex.quote(str(h))}"]
        if keep:
            lines += [f"mkdir -p {shlex.quote(str(venv))}", f"mount --move {aside} {shlex.quote(str(venv))}"]
        lines.append("exec " + shlex.join(worker_cmd))
        return "\n".join(lines)

    def _spawn(self, cmd: list[str], name: str) -> None:
        log = open(self.state_dir / f"{name}.log", "wb")
        # a session of its own: Ctrl-C in the test's terminal reaches the test, and stop() ends the node
        self._procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                            env={**self._env(), **self.node_env.get(name, {})},
                                            cwd=self.state_dir, start_new_session=True))
        log.close()

    def _wait_joined(self) -> None:
        """Both nodes alive in the GCS (the worker node really joined); their node ids."""
        code = textwrap.dedent(f"""
            import json, time, ray
            ray.init(address={self.address!r}, logging_level="ERROR", log_to_driver=False)
            deadline = time.monotonic() + {self.join_timeout_s}
            while True:
                nodes = {{r: n["NodeID"] for n in ray.nodes() if n["Alive"]
                         for r in ({HEAD_RESOURCE!r}, {WORKER_RESOURCE!r}) if r in n["Resources"]}}
                if len(nodes) == 2 or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            print(json.dumps(nodes))
        """)
        deadline = time.monotonic() + self.join_timeout_s
        while True:
            for p, name in zip(self._procs, ("head", "worker")):
                if p.poll() is not None:
                    raise RuntimeError(f"the {name} node exited ({p.returncode}): {self.log_tail(name)}")
            # the head's GCS takes a few seconds to listen: only then can a driver ask it
            if not _port_free(self.base_port):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the head node did not listen on {self.base_port}: {self.log_tail('head')}")
            time.sleep(0.5)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=self.join_timeout_s + 60, env=os.environ)
        try:
            nodes = json.loads(out.stdout.strip().splitlines()[-1])
        except (IndexError, ValueError):
            raise RuntimeError(f"could not list the cluster's nodes: {out.stderr[-2000:]}") from None
        if WORKER_RESOURCE not in nodes or HEAD_RESOURCE not in nodes:
            raise RuntimeError(f"nodes alive after {self.join_timeout_s:g}s: {sorted(nodes)}; worker node log: "
                               f"{self.log_tail('worker')}")
        self.head_node_id, self.worker_node_id = nodes[HEAD_RESOURCE], nodes[WORKER_RESOURCE]

    def kill_worker_node(self) -> list[int]:
        """SIGKILL every process of the worker node (its mount namespace holds the tmpfs over results_root), as a
        machine that dies; the processes killed."""
        mark, killed = {str(self.results_root)}, []
        for pid in members(self.base_port):
            if _tagged(pid, mark):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
        return killed

    def preloaded_counts(self) -> dict[str, int]:
        """How many processes started for no job have finished their preload so far, per node ("head", "worker"):
        read from their logs, the worker node's through its raylet's view of its own /tmp."""
        raylet = next(pid for pid in members(self.base_port) if _tagged(pid, {str(self.results_root)})
                      and b"raylet/raylet" in _cmdline(pid))
        root = Path(f"/proc/{raylet}/root")
        latest = root / f"tmp/swh-{self.base_port}-worker/session_latest"  # an absolute link, in the worker's view
        logs = {"head": self.state_dir / "ray" / "session_latest" / "logs",
                "worker": root / os.readlink(latest).lstrip("/") / "logs"}
        return {n: preloaded_idle_workers(logs[n]) for n in logs}

    def wait_preloaded(self, before: dict[str, int] | None = None, more: dict[str, int] | None = None,
                       timeout_s: float = 180.0) -> dict[str, int]:
        """Until each node has ``more`` preloaded processes (by node; None: one per CPU) than ``before``
        (preloaded_counts; None: as it started), as on a cluster whose nodes came up (or whose last launch ended)
        well before the next launch: a launch sooner finds them still importing and Ray starts other processes."""
        more = more if more is not None else {"head": self.head_cpus, "worker": self.worker_cpus}
        want = {n: (before or {}).get(n, 0) + more.get(n, 0) for n in ("head", "worker")}
        deadline = time.monotonic() + timeout_s
        while True:
            ready = self.preloaded_counts()
            if all(ready[n] >= want[n] for n in want):
                return ready
            if time.monotonic() > deadline:
                raise RuntimeError(f"idle workers preloaded after {timeout_s:g}s: {ready}, wanted {want}")
            time.sleep(0.5)

    def log_tail(self, name: str, n: int = 2000) -> str:
        try:
            return (self.state_dir / f"{name}.log").read_text(errors="replace")[-n:]
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """End both nodes and every process they started (members() only: never `ray stop`)."""
        for p in self._procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        _end(self.base_port)
        for p in self._procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        self._procs.clear()
        shutil.rmtree(self.results_root, ignore_errors=True)
        for d in (f"/var/tmp/swh-{self.base_port}-venv", f"/var/tmp/swh-{self.base_port}-head"):
            with contextlib.suppress(OSError):  # empty mount points: a venv under /tmp held aside, the head's tag
                os.rmdir(d)

    def __enter__(self) -> "TwoNodeCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
