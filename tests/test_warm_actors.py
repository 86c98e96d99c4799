"""Warm actors on every node of a joined cluster (sweeper/warm_actors.py, issue 22): real Ray, real trials on CPU."""
from __future__ import annotations

import json
import os
import signal
import statistics
import time
from pathlib import Path

import pytest

from sweeper.errors import WarmWorkerDied
from sweeper.store import ResultsStore
from sweeper.study import Benchmark, Perplexity, Study
from sweeper.trials import expand

from helpers import read_trials, sweep, sweep_popen, wait_for, write_study

# llama-4m x 6 precisions x 3 compute dtypes = 12 trials of one CPU (benchmarks/warm_nodes.py's study, with more new
# tokens: 48 make a trial of 1-3 s, so that the node whose first trial waits longer still runs several)
STUDY = """
    study = Study(name="warm-actors", models=[{model!r}], precisions=["fp32", "bf16", "fp16", "int8", "nf4", "fp4"],
                  compute_dtypes=["fp32", "bf16", "fp16"], kl=False, resources=Resources(cpus_per_trial=1),
                  benchmark=Benchmark(prompt_tokens=16, new_tokens={new_tokens}, batch_sizes=(1, 2), repeats=2,
                                      warmup=0))
"""


def _harness_study(tmp_path: Path, shared_data: Path, new_tokens: int = 48) -> Path:
    # the shared model: the worker node sees /work/shared, not this machine's /tmp (where tiny_model lives)
    return write_study(tmp_path / "study.py", STUDY.format(model=str(shared_data / "models" / "llama-4m"),
                                                           new_tokens=new_tokens))


def _startup(results: Path, rows) -> dict[str, float]:
    """Per trial: the driver's 'scheduled' event (_tune/events.jsonl) -> the row's load_started_at."""
    scheduled = {}
    for line in (results / "_tune" / "events.jsonl").read_text().splitlines():
        e = json.loads(line)
        if e["event"] == "scheduled":
            scheduled[e["trial_id"]] = e["at"]
    return {r["trial_id"]: r["load_started_at"] - scheduled[r["trial_id"]] for r in rows}


def test_trials_on_every_node_run_in_warm_processes(tmp_path, shared_data, two_node_cluster):
    """On a joined cluster whose worker node shares no /tmp with the launch, that node's trials run in warm processes
    too (main: cold, its warm workers live on the launching machine only), and start as soon as the head's do."""
    cluster = two_node_cluster
    results = cluster.results_root / "s"
    out = sweep("launch", str(_harness_study(tmp_path, shared_data)), "--address", cluster.address,
                "--results", str(results))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = read_trials(results).to_dicts()
    assert len(rows) == 12 and {r["status"] for r in rows} == {"done"}
    startup = _startup(results, rows)
    medians = {}
    for node in (cluster.head_node_id, cluster.worker_node_id):
        mine = [r for r in rows if r["ray_node_id"] == node]
        assert mine, f"no trial ran on node {node[:8]}: the test shows nothing about it"
        cold = [r["trial_id"] for r in mine if not r["warm_worker"]]
        assert not cold, f"trials {cold} on node {node[:8]} ran in a cold process"
        assert all(r["warm_worker_ready_at"] is not None for r in mine)
        medians[node] = statistics.median(startup[r["trial_id"]] for r in mine)
    head, worker = medians[cluster.head_node_id], medians[cluster.worker_node_id]
    assert worker <= 1.5 * head or max(head, worker) < 0.5, medians
    # nothing outlives the launch: no warm actor process is left on either node
    from cluster_harness import members

    assert wait_for(lambda: not _cmdlines(members(cluster.base_port), b"WarmActor"), timeout=30)


def _cmdlines(pids: list[int], part: bytes) -> list[int]:
    """Those of ``pids`` whose command line (a Ray worker's process title) holds ``part``."""
    out = []
    for pid in pids:
        try:
            if part in Path(f"/proc/{pid}/cmdline").read_bytes():
                out.append(pid)
        except OSError:
            pass
    return out


def test_killing_the_worker_node_mid_sweep_still_completes_it(tmp_path, shared_data, two_node_cluster):
    """The worker node dies (every process of it, as its machine would) while its warm actor holds a trial: the sweep
    completes on the head, every trial done once (main: no warm actor on that node ever runs a trial)."""
    cluster = two_node_cluster  # one per module: this test kills its worker node, so it comes last of those using it
    results = cluster.results_root / "killed"
    study = _harness_study(tmp_path, shared_data, new_tokens=96)
    proc = sweep_popen("launch", str(study), "--address", cluster.address, "--results", str(results))
    try:
        # Ray titles an actor's process with the method it runs: the worker node's warm actor has a trial
        assert wait_for(lambda: _cmdlines(cluster.worker_node_pids(), b"ray::WarmActor.run") or proc.poll() is not None,
                        timeout=300, every=0.05)
        assert proc.poll() is None, "no warm actor of the worker node ran a trial before the sweep ended"
        killed_at = time.time()
        assert cluster.kill_worker_node(), "found no process of the worker node to kill"
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-20000:]
    t = read_trials(results)
    assert t.height == 12 and set(t["status"]) == {"done"} and t["trial_id"].n_unique() == 12
    ended = (t["load_started_at"] + t["duration_s"]).to_list()
    assert max(ended) > killed_at, "the sweep had finished before the node was killed"


# ----- one local Ray instance: the warm actor and its caller ---------------------------------------------------------

@pytest.fixture()
def local_ray():
    """A local Ray instance in this process; the environment ray.init changes is put back (test_multi_gpu says why)."""
    import ray

    saved = dict(os.environ)

    def start(**kwargs):
        ray.init(address="local", include_dashboard=False, log_to_driver=False, **kwargs)
        return ray

    yield start
    ray.shutdown()
    os.environ.clear()
    os.environ.update(saved)


def _long_trials(model: Path, data: Path, precisions=("fp32", "bf16")):
    """Trials whose perplexity over the whole file in 8-token windows takes minutes."""
    study = Study(name="warm-actors", models=[str(model)], precisions=list(precisions), compute_dtypes=["fp32"],
                  kl=False, benchmark=Benchmark(enabled=False),
                  perplexity=Perplexity(str(data / "wikitext-2" / "test.txt"), context=8))
    return expand(study)[0]


def _caller_class(ray):
    @ray.remote(num_cpus=1)
    class Caller:  # stands in for a Tune trial's actor: takes a warm actor and hands it a trial
        def pid(self) -> int:
            return os.getpid()

        def run(self, descriptor, spec: dict, root: str):
            from sweeper.trials import TrialSpec
            from sweeper.warm_actors import acquire

            spec = TrialSpec.from_dict(spec)
            lease = acquire(descriptor, spec, ray.get_runtime_context().get_node_id())
            assert lease is not None, "no warm actor was free"
            return lease.run(spec, root, 1, {})

    return Caller


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def test_a_caller_that_dies_takes_its_trial_with_it_and_a_dead_actor_is_reported(tmp_path, tiny_model, shared_data,
                                                                                  local_ray):
    """A Tune trial process that dies mid-trial: its warm actor abandons the trial (ends, commits nothing), so no
    orphan races the retry. A warm actor that dies mid-trial: its caller gets WarmWorkerDied (Tune's retry)."""
    from sweeper.warm_actors import start

    ray = local_ray(num_cpus=2)
    first, second = _long_trials(tiny_model, shared_data)
    store = ResultsStore(tmp_path / "res")
    actors = start([first, second], None, name="warm-registry-test")
    assert actors is not None and len(actors.actors) == 2  # two CPUs: two trials at once
    pids = [ray.get(a.describe.remote(), timeout=300)["pid"] for a in actors.actors]  # warmed up
    Caller = _caller_class(ray)

    # 1. the caller dies mid-trial: the warm actor running its trial ends, and nothing is committed
    caller = Caller.remote()
    caller_pid = ray.get(caller.pid.remote())
    running = caller.run.remote(actors.descriptor, first.to_dict(), str(store.root))
    time.sleep(4.0)  # the warm actor has the trial (which runs for minutes)
    busy = [pid for pid, (_, _, b, _) in zip(pids, ray.get(actors.registry.report.remote())["slots"]) if b]
    assert len(busy) == 1
    os.kill(caller_pid, signal.SIGKILL)
    assert wait_for(lambda: _gone(busy[0]), timeout=30), "the warm actor kept running the dead caller's trial"
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(running, timeout=30)
    assert not store.root.exists() or not store.state().trials
    assert [s[3] for s in ray.get(actors.registry.report.remote())["slots"]].count(True) == 1  # never handed out

    # 2. the warm actor dies mid-trial: its caller is told, as Tune is when a trial's own process dies
    caller = Caller.remote()
    running = caller.run.remote(actors.descriptor, second.to_dict(), str(store.root))
    time.sleep(4.0)
    (other,) = [p for p in pids if p != busy[0]]
    os.kill(other, signal.SIGKILL)
    with pytest.raises(ray.exceptions.RayTaskError) as err:
        ray.get(running, timeout=60)
    assert isinstance(err.value.cause, WarmWorkerDied), err.value
    assert not store.root.exists() or not store.state().trials
    actors.close()


def test_gpu_warm_actors_see_only_the_gpu_ray_names_on_their_node(tiny_model, local_ray, monkeypatch):
    """With 2 logical GPUs that this node names 3 and 5 (its CUDA_VISIBLE_DEVICES; no GPU needed), one warm actor per
    GPU sees exactly one of them, and the ids are the ones Ray gives trials there; the registry hands a trial of GPU 5
    only GPU 5's actor. (This torch has no CUDA: their warm-up fails, is reported, and trials run in their own
    processes.)"""
    import dataclasses

    from sweeper.warm_actors import WarmRegistry, start

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")  # the raylet's, inherited by every worker of the node
    ray = local_ray(num_cpus=2, num_gpus=2)
    trials = [dataclasses.replace(t, gpu_share=1.0) for t in expand(Study(
        name="g", models=[str(tiny_model)], precisions=["fp32", "bf16"], compute_dtypes=["fp32"], kl=False))[0]]

    @ray.remote(num_gpus=1, num_cpus=0)
    def trial_sees():
        return os.environ.get("CUDA_VISIBLE_DEVICES")

    ray_ids = set(ray.get([trial_sees.remote() for _ in range(4)]))
    assert ray_ids == {"3", "5"}, ray_ids  # what Ray gives trials on this node
    actors = start(trials, None, name="warm-registry-gpu")
    seen = [ray.get(a.describe.remote(), timeout=300) for a in actors.actors]
    assert sorted(s["key"] for s in seen) == ["gpu:3", "gpu:5"]
    for s in seen:
        assert s["visible"] == s["key"][len("gpu:"):], s  # one GPU, its own
        assert "CUDA" in (s["error"] or ""), s  # its warm-up: this torch has no CUDA
    report = ray.get(actors.registry.report.remote())
    assert len(report["failures"]) == 2 and all(dead for (_, _, _, dead) in report["slots"])
    actors.close()

    # the registry, on its own: a trial of GPU 5 gets GPU 5's actor, never GPU 3's; none free -> none
    reg = WarmRegistry()
    reg.add(0, "n1", None, "actor-a")
    assert reg.acquire("n1", "gpu:5") == "wait"  # an actor of this node has not said its GPU yet
    reg.resolve(0, "gpu:3")
    reg.resolve(1, "gpu:5")  # before the launch's add() reached the registry
    reg.add(1, "n1", None, "actor-b")
    assert reg.acquire("n1", "gpu:5") == (1, "actor-b")
    assert reg.acquire("n1", "gpu:5") is None  # taken
    assert reg.acquire("n2", "gpu:3") is None  # another node's GPU 3 is not this one
    reg.release(1)
    assert reg.acquire("n1", "gpu:5") == (1, "actor-b")
