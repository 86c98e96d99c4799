"""The two-node cluster harness (tests/cluster_harness.py) really gives a worker node that is another machine's view:
it joins, runs tasks, cannot see the launching machine's /tmp nor its results folder, sees the repository, and
leaves no process behind."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from cluster_harness import (HEAD_RESOURCE, WORKER_IP, WORKER_RESOURCE, TwoNodeCluster, _port_free, _started, members,
                             namespace_unavailable)
from conftest import REPO, SHARED_DATA


def _probe(address: str, paths: list[str]) -> dict:
    """From a driver process: on each node, which of ``paths`` exist, and the node's id and IP."""
    code = textwrap.dedent(f"""
        import json, os, ray
        ray.init(address={address!r}, logging_level="ERROR", log_to_driver=False)

        @ray.remote(num_cpus=0)
        def look(paths):
            ctx = ray.get_runtime_context()
            ip = ray.util.get_node_ip_address()
            return {{"node_id": ctx.get_node_id(), "ip": ip, "exists": {{p: os.path.exists(p) for p in paths}}}}

        out = {{r: ray.get(look.options(resources={{r: 1}}).remote({paths!r}))
               for r in ({HEAD_RESOURCE!r}, {WORKER_RESOURCE!r})}}
        print(json.dumps(out))
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_a_venv_under_tmp_stays_visible_to_the_worker_node(monkeypatch, tmp_path):
    """The worker node's namespace as the harness makes it, with a command in place of `ray start`: a virtual
    environment under /tmp is bound back in, its neighbours stay hidden."""
    why = namespace_unavailable()
    if why:
        pytest.skip(f"two-node cluster harness unavailable: {why}")
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("the venv")
    (tmp_path / "neighbour.txt").write_text("hidden")
    monkeypatch.setattr(sys, "prefix", str(venv))
    cluster = TwoNodeCluster()
    script = cluster._namespace_script(["sh", "-c", f"cat {venv}/bin/python && test ! -e {tmp_path}/neighbour.txt"])
    try:
        run = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                             capture_output=True, text=True, timeout=60)
    finally:
        cluster.stop()  # removes the mount point left on /var/tmp
    assert (run.returncode, run.stdout) == (0, "the venv"), run.stderr


def test_no_node_outlives_a_failing_test_or_a_killed_test_process():
    why = namespace_unavailable()
    if why:
        pytest.skip(f"two-node cluster harness unavailable: {why}")
    # a test process killed with its cluster running (nothing of its own runs stop())
    killed = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import os, signal
        from cluster_harness import TwoNodeCluster
        cluster = TwoNodeCluster().start()
        print(len(cluster._procs), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)], capture_output=True, text=True, timeout=300, cwd=REPO / "tests")
    assert killed.returncode == -9 and killed.stdout.strip() == "2", killed.stderr[-2000:]
    cluster = TwoNodeCluster()
    left = {(p, _started(p)) for p in members(cluster.base_port)}  # a pid with its start time: one process
    assert len(left) > 6, "both nodes (ray start, raylet, agents, gcs_server, ...) outlived their test process"

    with pytest.raises(RuntimeError, match="a failing test"):
        with cluster:
            assert not {(p, _started(p)) for p, _ in left} & left, "the next start ended the stale cluster"
            assert len(members(cluster.base_port)) > 6
            raise RuntimeError("a failing test")
    assert members(cluster.base_port) == []
    assert _port_free(cluster.base_port)
    assert not cluster.results_root.exists()


def test_worker_node_sees_neither_tmp_nor_results_but_the_repo(two_node_cluster, tmp_path):
    c = two_node_cluster
    in_tmp = tmp_path / "written-by-the-driver.txt"
    in_results = c.results_root / "study" / "trials" / "row.txt"
    for f in (in_tmp, in_results):
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("only on the launching machine")
    repo_file = REPO / "sweeper" / "cli.py"
    paths = [str(in_tmp), str(in_results), str(repo_file), str(SHARED_DATA)]

    seen = _probe(c.address, paths)

    head, worker = seen[HEAD_RESOURCE], seen[WORKER_RESOURCE]
    assert head["node_id"] == c.head_node_id and worker["node_id"] == c.worker_node_id != c.head_node_id
    assert worker["ip"] == WORKER_IP
    assert head["exists"] == {p: True for p in paths}, "the head node is the launching machine: it sees everything"
    assert worker["exists"] == {str(in_tmp): False, str(in_results): False, str(repo_file): True,
                                str(SHARED_DATA): SHARED_DATA.exists()}
