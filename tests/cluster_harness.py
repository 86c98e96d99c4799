"""A two-node Ray cluster on this machine, whose worker node sees the machine as a second machine would.

The head node (``ray start --head``) runs in this machine's mount namespace, as the launching machine. The worker node
(``ray start --address``) runs in a mount namespace of its own (``unshare --mount --propagation private``, as root)
with an empty tmpfs over /tmp and over each ``hidden`` folder: it sees the repository, /work/shared, $HOME and the
virtual environment (bound back in when it lives under /tmp), but not the launching machine's /tmp (Ray's session
files, the warm workers' sockets, pytest's tmp_path) nor its results folder. Only the mount namespace is its own:
both nodes share the network, so every Ray port is pinned to ``base_port .. base_port + 99`` (default 6400, or
$SWEEPER_HARNESS_PORT_BASE) and the worker node gets its own IP, 127.0.0.2. Each node has its own custom resource
(``harness_head`` / ``harness_worker``, 1000 units) to pin a task to it, and its node id is known
(:attr:`TwoNodeCluster.head_node_id`, :attr:`TwoNodeCluster.worker_node_id`) to tell where a trial ran.

Clean-up never uses ``ray stop`` (it kills every Ray process of the machine, other users' too). Each node starts in a
session of its own, which Ray's processes keep; the worker node's processes are also the only ones in its mount
namespace; and each process carries ``SWEEPER_CLUSTER_HARNESS=<base port>:<owner pid>`` in its environment (where
Ray's process titles do not overwrite it). :meth:`TwoNodeCluster.stop` ends exactly those processes (SIGTERM, then
SIGKILL). A harness left on the same ports by a killed test run (its owner gone; /tmp/swh-<port>/harness.json says
what it was) is ended the same way when the next one starts; one whose owner still runs is another test's, and the
start fails saying so.

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

MARKER = "SWEEPER_CLUSTER_HARNESS"
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


def _stat_session(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return int(fh.read().rsplit(")", 1)[1].split()[3])  # state ppid pgrp session
    except (OSError, ValueError, IndexError):
        return None


def _mnt_ns(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return None


def _marker_of(pid: int) -> str | None:
    """MARKER's value in the process's environment (Ray's `ray::...` processes overwrite theirs with their title)."""
    prefix = f"{MARKER}=".encode()
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            return next((v[len(prefix):].decode() for v in fh.read().split(b"\0") if v.startswith(prefix)), None)
    except OSError:
        return None


def members(ident: dict) -> list[int]:
    """The live processes of the harness ``ident`` (:attr:`TwoNodeCluster.ident`): in one of its nodes' sessions
    (Ray's workers and agents stay in their node's), in its worker node's mount namespace, or carrying its marker."""
    sessions, ns = set(ident.get("sessions", ())), ident.get("mnt_ns")
    if ns == _mnt_ns(os.getpid()):  # never this machine's own namespace
        ns = None
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        pid = int(entry)
        if ((_stat_session(pid) in sessions or (ns is not None and _mnt_ns(pid) == ns)
             or _marker_of(pid) == ident["marker"]) and _alive(pid)):
            out.append(pid)
    return out


def _end(ident: dict, grace_s: float = 8.0) -> None:
    """SIGTERM the harness's processes, SIGKILL what is left after ``grace_s`` (gcs_server ignores SIGTERM at times)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = members(ident)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + (grace_s if sig == signal.SIGTERM else 5.0)
        while pids and time.monotonic() < deadline:
            time.sleep(0.2)
            pids = members(ident)
        if not pids:
            return


def _end_stale(state_dir: Path, port: int) -> None:
    """End a harness left on ``port`` by a test run that was killed (its owner process gone); a harness whose owner
    still runs is another test's: RuntimeError rather than ending it."""
    found = []
    with contextlib.suppress(OSError, ValueError):
        found.append(json.loads((state_dir / "harness.json").read_text()))
    for entry in os.listdir("/proc"):  # one killed before it wrote harness.json: its marker names it
        value = _marker_of(int(entry)) if entry.isdigit() else None
        if value and value.split(":")[0] == str(port):
            found.append({"marker": value})
    for ident in found:
        owner = int(ident["marker"].split(":")[1])
        if owner != os.getpid() and _alive(owner):
            raise RuntimeError(f"ports {port}-{port + 99} are held by the cluster harness of process {owner}; "
                               f"set {PORT_BASE_ENV} to another range")
        _end(ident)


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
                 head_cpus: int = 1, worker_cpus: int = 1, join_timeout_s: float = 120.0):
        self.base_port = int(base_port or os.environ.get(PORT_BASE_ENV) or 6400)
        # a results folder outside /tmp, so that its own tmpfs (not /tmp's) is what hides it; emptied on start
        self.results_root = Path(f"/var/tmp/swh-{self.base_port}-results")
        self.hidden = [self.results_root, *(Path(h).resolve() for h in hidden)]
        self.head_cpus, self.worker_cpus = head_cpus, worker_cpus
        self.join_timeout_s = join_timeout_s
        self.state_dir = Path(f"/tmp/swh-{self.base_port}")  # short: Ray's socket paths live under it
        self.marker = f"{self.base_port}:{os.getpid()}"  # ports, and the process that owns this harness
        self.ident: dict = {"marker": self.marker, "sessions": [], "mnt_ns": None}  # what members() looks for
        self.head_node_id: str | None = None
        self.worker_node_id: str | None = None
        self._procs: list[subprocess.Popen] = []

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.base_port}"

    def _ports(self, offset: int) -> list[str]:
        b = self.base_port + offset
        return [f"--node-manager-port={b + 1}", f"--object-manager-port={b + 2}",
                f"--dashboard-agent-listen-port={b + 3}", f"--dashboard-agent-grpc-port={b + 4}",
                f"--metrics-export-port={b + 5}", f"--runtime-env-agent-port={b + 6}"]

    def _env(self) -> dict[str, str]:
        # this process's environment (PYTHONPATH, HF offline settings) reaches every Ray worker through its raylet
        # and token authentication as the drivers have it (`ray start` turns it on by itself once ~/.ray/auth_token
        # exists, while a driver without RAY_AUTH_MODE does not use the token)
        return {**os.environ, MARKER: self.marker, "RAY_USAGE_STATS_ENABLED": "0",
                "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}

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
        ray = str(Path(sys.executable).parent / "ray")
        common = ["--object-store-memory=100000000", "--disable-usage-stats", "--block"]
        head = [ray, "start", "--head", f"--port={self.base_port}", f"--temp-dir={self.state_dir / 'ray'}",
                f"--num-cpus={self.head_cpus}", "--num-gpus=0", f"--resources={json.dumps({HEAD_RESOURCE: 1000})}",
                "--include-dashboard=false", f"--dashboard-port={self.base_port + 7}", *self._ports(0),
                f"--min-worker-port={self.base_port + 20}", f"--max-worker-port={self.base_port + 59}", *common]
        worker = [ray, "start", f"--address={self.address}", f"--node-ip-address={WORKER_IP}",
                  f"--temp-dir=/tmp/swh-{self.base_port}-worker", f"--num-cpus={self.worker_cpus}", "--num-gpus=0",
                  f"--resources={json.dumps({WORKER_RESOURCE: 1000})}", *self._ports(10),
                  f"--min-worker-port={self.base_port + 60}", f"--max-worker-port={self.base_port + 99}", *common]
        try:
            self._spawn(head, "head")
            self._spawn(["unshare", "--mount", "--propagation", "private", "sh", "-c", self._namespace_script(worker)],
                        "worker")
            self._wait_joined()
            self.ident["mnt_ns"] = _mnt_ns(self._procs[1].pid)  # read once it joined: surely inside its namespace
            self._save_ident()
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
        self._procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self._env(),
                                            cwd=self.state_dir, start_new_session=True))
        log.close()
        self.ident["sessions"].append(self._procs[-1].pid)  # a new session's id is its leader's pid
        self._save_ident()

    def _save_ident(self) -> None:
        """For the next start on these ports, should this process be killed before stop() runs."""
        (self.state_dir / "harness.json").write_text(json.dumps(self.ident))

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
                             timeout=self.join_timeout_s + 60, env={k: v for k, v in os.environ.items() if k != MARKER})
        try:
            nodes = json.loads(out.stdout.strip().splitlines()[-1])
        except (IndexError, ValueError):
            raise RuntimeError(f"could not list the cluster's nodes: {out.stderr[-2000:]}") from None
        if WORKER_RESOURCE not in nodes or HEAD_RESOURCE not in nodes:
            raise RuntimeError(f"nodes alive after {self.join_timeout_s:g}s: {sorted(nodes)}; worker node log: "
                               f"{self.log_tail('worker')}")
        self.head_node_id, self.worker_node_id = nodes[HEAD_RESOURCE], nodes[WORKER_RESOURCE]

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
        _end(self.ident)
        for p in self._procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        self._procs.clear()
        shutil.rmtree(self.results_root, ignore_errors=True)
        with contextlib.suppress(OSError):  # the empty mount point a venv under /tmp was held aside on
            os.rmdir(f"/var/tmp/swh-{self.base_port}-venv")

    def __enter__(self) -> "TwoNodeCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
