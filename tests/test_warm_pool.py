"""Warm workers (sweeper/warm_pool.py, sweeper/warm_worker.py): real processes running real trials on CPU."""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import polars as pl
import pytest

from sweeper.errors import WarmWorkerDied
from sweeper.store import ResultsStore
from sweeper.study import Benchmark, Perplexity, Study
from sweeper.trials import expand
from sweeper.warm_pool import WarmPool, _alive, claim, worker_keys

from helpers import read_trials


def _trials(model: Path, data: Path, long: bool = False, precisions=("fp32", "bf16")):
    """Quick trials, or (``long``) one whose perplexity over the whole file in 8-token windows takes minutes."""
    text = str(data / "wikitext-2" / "test.txt")
    study = Study(name="warm", models=[str(model)], precisions=list(precisions), compute_dtypes=["fp32"], kl=False,
                  benchmark=Benchmark(enabled=False),
                  perplexity=Perplexity(text, context=8) if long else Perplexity(text, context=64, max_tokens=256))
    return expand(study)[0]


def _wait(pred, timeout=60.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return False


def test_worker_keys_one_per_trial_that_fits_at_once():
    import dataclasses

    from sweeper.trials import TrialSpec  # noqa: F401  (the specs below are real ones with shares replaced)

    base = expand(Study(name="k", models=["org/m"], precisions=["fp16", "int8", "nf4", "fp4"]))[0]
    at = lambda share, n=len(base): [dataclasses.replace(t, gpu_share=share) for t in base[:n]]  # noqa: E731
    assert worker_keys(at(0.25), ["0"], cpus=16, max_concurrent=None) == ["gpu:0"] * 4
    assert worker_keys(at(0.5), ["0"], cpus=16, max_concurrent=None) == ["gpu:0"] * 2  # only two fit at once
    # on several GPUs: as many on each as Ray can put there (auto shares spread ceil(n / GPUs) on each)
    assert worker_keys(at(0.25), ["0", "1"], cpus=16, max_concurrent=None) == ["gpu:0", "gpu:0", "gpu:1", "gpu:1"]
    assert worker_keys(at(0.25), ["0", "1"], cpus=16, max_concurrent=3) == ["gpu:0", "gpu:0", "gpu:1", "gpu:1"]
    assert worker_keys(at(0.5, 2), ["0", "1"], cpus=16, max_concurrent=None) == ["gpu:0", "gpu:1"]
    assert worker_keys(at(0.25), ["0"], cpus=2, max_concurrent=None) == ["gpu:0"] * 2  # one CPU each
    assert worker_keys(at(1.0), ["3"], cpus=16, max_concurrent=None) == ["gpu:3"]  # whole GPUs, one after another
    assert worker_keys(at(2.0), ["0", "1"], cpus=16, max_concurrent=None) == []  # several GPUs per trial
    assert worker_keys(at(0.25), [], cpus=16, max_concurrent=None) == []  # GPU trials, no GPU here
    assert worker_keys(at(0.0), [], cpus=3, max_concurrent=None) == ["cpu"] * 3
    assert worker_keys([], ["0"], cpus=16, max_concurrent=None) == []


def test_a_warm_worker_runs_trials_for_one_client_at_a_time(tmp_path, tiny_model, shared_data):
    first, second = _trials(tiny_model, shared_data)
    store = ResultsStore(tmp_path / "res")
    with WarmPool.start(["cpu"], [first, second]) as pool:
        worker = claim(pool.descriptor, "cpu")
        assert worker is not None and pool.worker_pids() == [worker.pid]
        assert set(worker.ready["steps"]) >= {"torch", "transformers", "libraries", "models"}
        # forked by the pool's parent after its imports (Linux, no CUDA here, no other thread)
        assert worker.ready["forked"] is True and _parent_pid(worker.pid) == pool.procs[0].pid
        assert claim(pool.descriptor, "cpu") is None  # held by this client
        assert claim(pool.descriptor, "gpu:0") is None  # no worker of that key
        assert claim({**pool.descriptor, "host": "another-machine"}, "cpu") is None
        out = worker.run(first, str(store.root), 1, {"trainable_started_at": time.time()})
        assert out["status"] == "done", out
        worker.close()
        again = claim(pool.descriptor, "cpu")  # free again once its client let go; still warm
        assert again is not None and again.pid == worker.pid
        assert again.run(second, str(store.root), 1, {})["status"] == "done"
        again.close()
    rows = read_trials(store.root).sort("worker_trial_index")
    assert rows["warm_worker"].to_list() == [True, True]
    assert set(rows["worker_pid"]) == {worker.pid} and rows["worker_trial_index"].to_list() == [0, 1]
    assert (rows["process_started_at"] < rows["load_started_at"]).all()
    assert rows["trainable_started_at"].to_list()[0] is not None
    # the pool's processes and folder are gone
    assert pool.procs[0].poll() is not None and not _alive(worker.pid) and not pool.folder.exists()


def test_a_preloaded_trial_process_takes_only_a_worker_that_is_ready_now(tmp_path, tiny_model, shared_data,
                                                                        monkeypatch):
    # on the launching node of a preloading cluster, a Tune trial's process has imported what the trial needs
    # (sweeper/node_preload.py): it runs the trial itself rather than wait for a warm worker that is still warming up,
    # and takes one once it is ready. Any other process waits for it (the test above)
    import types

    from sweeper import local_ray, scheduler

    first, _ = _trials(tiny_model, shared_data)
    preload = types.ModuleType(local_ray.PRELOAD_MODULE)
    preload.preloaded_at = time.time()  # as node_preload sets it once its imports are done
    monkeypatch.setitem(sys.modules, local_ray.PRELOAD_MODULE, preload)
    with WarmPool.start(["cpu"], [first]) as pool:
        t0 = time.monotonic()
        assert scheduler._warm_worker(pool.descriptor, first) is None  # its parent is still importing
        assert time.monotonic() - t0 < 2.0
        try:
            assert _wait(lambda: scheduler._warm_worker(pool.descriptor, first) is not None, timeout=120)
            assert scheduler._WARM["worker"].ready["forked"] is True
        finally:
            held = scheduler._WARM.pop("worker", None)
            if held is not None:
                held.close()


@pytest.mark.parametrize("fork", ["1", "0"])
def test_the_pools_parent_imports_once_and_forks_its_workers(tmp_path, monkeypatch, tiny_model, shared_data, fork):
    """One parent process imports torch, transformers, ... once and forks the workers; with SWEEPER_WARM_FORK=0 it
    starts each as its own process, which imports everything itself. Either way they run trials."""
    monkeypatch.setenv("SWEEPER_WARM_FORK", fork)
    (trial,) = _trials(tiny_model, shared_data, precisions=("fp32",))
    store = ResultsStore(tmp_path / "res")
    messages: list[str] = []
    pool = WarmPool.start(["cpu", "cpu"], [trial])
    try:
        first, second = claim(pool.descriptor, "cpu"), claim(pool.descriptor, "cpu")
        assert first is not None and second is not None and sorted(pool.worker_pids()) == sorted([first.pid, second.pid])
        assert {_parent_pid(first.pid), _parent_pid(second.pid)} == {pool.procs[0].pid}
        assert first.ready["forked"] is second.ready["forked"] is (fork == "1")
        shared = ("torch", "transformers", "models")
        same = [first.ready["steps"][k] == second.ready["steps"][k] for k in shared]
        assert all(same) if fork == "1" else not all(same)  # the parent's own import times, or each worker's
        assert second.run(trial, str(store.root), 1, {})["status"] == "done"
        first.close()
        second.close()
    finally:
        pool.close(emit=messages.append, keep_logs=tmp_path / "logs")
    assert messages == [], messages  # nothing to warn about: asked for either way
    parent_log = (tmp_path / "logs" / "parent.log").read_text()
    assert ("forking its workers" if fork == "1" else "not forked: each started as its own process, which imports "
            "everything itself (SWEEPER_WARM_FORK=0)") in parent_log, parent_log
    assert all(" ready: {" in (tmp_path / "logs" / f"worker-{i}.log").read_text() for i in range(2))
    # close() asked the parent to stop; it passed SIGTERM on to each worker and waited for it
    ended = "".join((tmp_path / "logs" / f"worker-{i}.log").read_text() for i in range(2))
    assert ended.count(" ended: signal 15") == 2, ended
    assert not _alive(first.pid) and not _alive(second.pid) and pool.procs[0].poll() is not None
    assert read_trials(store.root)["worker_pid"].to_list() == [second.pid]


def test_a_pool_closed_while_its_parent_starts_workers_leaves_none(tmp_path, tiny_model, shared_data):
    """The launch can end while the pool's parent is still starting its workers (an early error, Ctrl-C): every
    worker ends at once, none waits for the launch's kill."""
    import json

    (trial,) = _trials(tiny_model, shared_data, precisions=("fp32",))
    pool = WarmPool.start(["cpu"] * 4, [trial])
    first = pool.folder / "worker-0.json"
    assert _wait(lambda: json.loads(first.read_text())["pid"] != pool.procs[0].pid, timeout=120)
    started = [pid for pid in pool.worker_pids() if pid != pool.procs[0].pid]
    t0 = time.monotonic()
    pool.close(timeout_s=10.0)
    assert time.monotonic() - t0 < 8.0  # the parent stopped its workers itself: no 10 s wait, then a kill
    assert started and not any(_alive(pid) for pid in started)


def test_a_started_worker_that_never_listens_is_given_up_soon(tmp_path, monkeypatch):
    """A worker its file names (the parent started it) that is alive but never binds its socket is stuck (a hang
    after a fork, say): a claim gives it up after BIND_TIMEOUT_S, not after the whole ready timeout."""
    import json
    import socket
    import subprocess
    import sys

    import sweeper.warm_pool as warm_pool

    monkeypatch.setattr(warm_pool, "BIND_TIMEOUT_S", 1.0)
    stuck = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (tmp_path / "worker-0.json").write_text(json.dumps({
            "key": "cpu", "pid": stuck.pid, "parent": os.getpid(), "socket": str(tmp_path / "worker-0.sock"),
            "lock": str(tmp_path / "worker-0.lock"), "busy": str(tmp_path / "worker-0.busy"),
            "log": str(tmp_path / "worker-0.log")}))
        t0 = time.monotonic()
        assert claim({"dir": str(tmp_path), "host": socket.gethostname()}, "cpu", ready_timeout_s=60) is None
        assert time.monotonic() - t0 < 10
    finally:
        stuck.kill()
        stuck.wait()


def test_a_pool_whose_imports_fail_is_reported_and_never_claimed(tmp_path, tiny_model, shared_data):
    fake = tmp_path / "site"
    (fake / "transformers").mkdir(parents=True)
    (fake / "transformers" / "__init__.py").write_text("raise ImportError('a broken transformers, for this test')\n")
    messages: list[str] = []
    pool = WarmPool.start(["cpu", "cpu"], _trials(tiny_model, shared_data), env={"PYTHONPATH": str(fake)})
    try:
        t0 = time.monotonic()
        assert claim(pool.descriptor, "cpu") is None
        assert time.monotonic() - t0 < 120  # it waited for the parent's end, not for READY_TIMEOUT_S
    finally:
        pool.close(emit=messages.append)
    assert len(messages) == 1 and "warm worker could not start: ImportError: a broken transformers" in messages[0], \
        messages


def test_a_client_that_goes_away_mid_trial_takes_the_trial_with_it(tmp_path, tiny_model, shared_data):
    """As when a Tune trial's own process dies: the trial is abandoned (no row), not finished behind its back."""
    (long_trial,) = _trials(tiny_model, shared_data, long=True, precisions=("fp32",))
    store = ResultsStore(tmp_path / "res")
    with WarmPool.start(["cpu"], [long_trial]) as pool:
        worker = claim(pool.descriptor, "cpu")
        assert worker is not None
        errors = []
        runner = threading.Thread(target=lambda: errors.append(_run_catching(worker, long_trial, store)))
        runner.start()
        time.sleep(3.0)  # the worker has the request (the trial itself runs for minutes)
        worker._conn.shutdown(2)  # what the kernel does to a dead process's socket
        assert _wait(lambda: not _alive(worker.pid), timeout=30), "the worker kept running the trial"
        runner.join(30)
        log = pool.folder / "worker-0.log"
        assert _wait(lambda: f"warm worker {worker.pid} ended: exit code 75" in log.read_text(), timeout=10)
        assert isinstance(errors[0], WarmWorkerDied)
    assert not store.root.exists() or not store.state().trials


def _parent_pid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _run_catching(worker, spec, store):
    try:
        worker.run(spec, str(store.root), 1, {})
    except Exception as e:  # noqa: BLE001 (handed to the test)
        return e
    return None


def test_a_worker_that_dies_mid_trial_is_reported_to_the_client(tmp_path, tiny_model, shared_data):
    (long_trial,) = _trials(tiny_model, shared_data, long=True, precisions=("fp32",))
    store = ResultsStore(tmp_path / "res")
    with WarmPool.start(["cpu"], [long_trial]) as pool:
        worker = claim(pool.descriptor, "cpu")
        threading.Timer(3.0, lambda: os.kill(worker.pid, signal.SIGKILL)).start()
        with pytest.raises(WarmWorkerDied, match=f"warm worker {worker.pid} ended during trial {long_trial.trial_id}"):
            worker.run(long_trial, str(store.root), 1, {})
        assert claim(pool.descriptor, "cpu") is None  # the dead worker is not handed out again


def test_a_worker_that_cannot_start_is_reported_and_never_claimed(tmp_path, tiny_model, shared_data):
    trials = _trials(tiny_model, shared_data)
    messages: list[str] = []
    pool = WarmPool.start(["gpu:99"], trials)  # pinned to a GPU no machine here has: its CUDA start fails
    try:
        t0 = time.monotonic()
        assert claim(pool.descriptor, "gpu:99") is None
        assert time.monotonic() - t0 < 120  # it waited for the worker's end, not for READY_TIMEOUT_S
    finally:
        pool.close(emit=messages.append, keep_logs=tmp_path / "logs")
    assert len(messages) == 1 and "warm worker could not start" in messages[0], messages
    assert "CUDA" in messages[0], messages  # the reason: this torch has no CUDA
    # workers of GPUs are not forked (an import in the parent initialises CUDA on the H100 image: run31), at once
    assert "not forked: each started as its own process" in (tmp_path / "logs" / "parent.log").read_text()
    assert "shared imports" not in (tmp_path / "logs" / "parent.log").read_text()


def test_trial_output_goes_to_the_clients_stdout(tmp_path, tiny_model, shared_data, capfd):
    (trial,) = _trials(tiny_model, shared_data, precisions=("fp32",))
    with WarmPool.start(["cpu"], [trial]) as pool:
        worker = claim(pool.descriptor, "cpu")
        bad = trial.to_dict()
        bad["model"]["id"] = str(tmp_path / "no-such-model")  # the trial fails, and says so in its log
        from sweeper.trials import TrialSpec

        out = worker.run(TrialSpec.from_dict(bad), str(tmp_path / "res"), 1, {})
        worker.close()
    assert out["status"] == "failed" and out["error_type"] == "ModelNotFound", out
    captured = capfd.readouterr()
    assert "failed in load" in captured.err, captured  # the runner's warning, written by the worker process
    assert read_trials(tmp_path / "res")["warm_worker"].to_list() == [True]


def test_a_worker_whose_launch_is_already_gone_does_not_start(tmp_path):
    """The launch can die before the worker asks to die with it: the worker sees it has another parent and ends."""
    import subprocess
    import sys

    from sweeper.warm_worker import PARENT_GONE

    sock = tmp_path / "w.sock"
    not_its_parent = os.getpid() + 100_000  # this test process is its parent; a launch that died would not be
    done = subprocess.run([sys.executable, "-m", "sweeper.warm_worker", "--socket", str(sock), "--busy",
                           str(tmp_path / "w.busy"), "--key", "cpu", "--parent", str(not_its_parent)],
                          capture_output=True, timeout=120)
    assert done.returncode == PARENT_GONE and not sock.exists(), done.stderr


def test_a_long_tmpdir_still_gets_a_pool(tmp_path, monkeypatch, tiny_model, shared_data):
    """Unix socket paths are short (107 bytes): a long TMPDIR (common on HPC machines) gets a folder in /tmp."""
    import tempfile

    long_dir = tmp_path / ("x" * 90)
    long_dir.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(long_dir))
    (trial,) = _trials(tiny_model, shared_data, precisions=("fp32",))
    with WarmPool.start(["cpu"], [trial]) as pool:
        assert pool.folder.parent == Path("/tmp")
        worker = claim(pool.descriptor, "cpu")
        assert worker is not None
        worker.close()


def test_a_claim_waits_for_an_idle_held_worker_but_not_for_a_running_one(tmp_path, tiny_model, shared_data):
    """An idle worker held by another Tune trial process is being let go (Tune's next phase): worth a short wait. One
    running a trial is not: the claim gives up at once and the trial runs in its own process."""
    (long_trial,) = _trials(tiny_model, shared_data, long=True, precisions=("fp32",))
    with WarmPool.start(["cpu"], [long_trial]) as pool:
        holder = claim(pool.descriptor, "cpu")
        assert holder is not None
        threading.Timer(2.0, holder.close).start()  # idle, and let go 2 s from now
        t0 = time.monotonic()
        second = claim(pool.descriptor, "cpu", busy_wait_s=60)
        assert second is not None and second.pid == holder.pid and 1.5 < time.monotonic() - t0 < 30
        runner = threading.Thread(target=_run_catching, args=(second, long_trial, ResultsStore(tmp_path / "res")))
        runner.start()
        time.sleep(2.0)  # the worker has the request and runs the trial (for minutes)
        t0 = time.monotonic()
        assert claim(pool.descriptor, "cpu", busy_wait_s=60) is None
        assert time.monotonic() - t0 < 10
    runner.join(30)


def test_serves_this_node_only_where_ray_gives_this_node_what_a_trial_needs():
    import dataclasses

    from sweeper.warm_pool import serves_this_node

    base = expand(Study(name="k", models=["org/m"], precisions=["fp16", "int8"]))[0]
    gpu = [dataclasses.replace(t, gpu_share=0.5) for t in base]
    cpu = [dataclasses.replace(t, gpu_share=0.0) for t in base]
    assert serves_this_node(["gpu:0", "gpu:0"], gpu, node_cpus=16, node_gpus=1)
    assert not serves_this_node(["gpu:0"], gpu, node_cpus=16, node_gpus=0)  # a head started with --num-gpus=0
    assert not serves_this_node(["cpu", "cpu"], gpu, node_cpus=16, node_gpus=0)  # sized as CPU trials: no GPU here
    assert serves_this_node(["cpu"], cpu, node_cpus=1, node_gpus=0)
    assert not serves_this_node(["cpu"], cpu, node_cpus=0, node_gpus=0)  # a head that runs no task
    assert not serves_this_node(["gpu:0"], cpu, node_cpus=16, node_gpus=1)  # no CPU worker for CPU trials


def test_warm_workers_of_a_machine_that_runs_no_trial_stop_once_the_cluster_is_known(tmp_path, real_model):
    """A joined cluster whose GPUs are all on another node: the warm workers this machine started before Ray was up
    (sized from this machine, which has no GPU: as CPU workers) can take none of the GPU trials, so the launch stops
    them as soon as it knows the cluster instead of leaving them importing and idle for the whole sweep; the trials
    run on the GPU node."""
    from cluster_harness import TwoNodeCluster, namespace_unavailable
    from helpers import small_study, sweep_popen, warm_worker_pids

    why = namespace_unavailable()
    if why:
        pytest.skip(f"two-node cluster harness unavailable: {why}")
    study = small_study(tmp_path / "s.py", real_model, ["fp32", "bf16"], name="gpu-node",
                        extra="resources=Resources(gpus_per_trial=1, cpus_per_trial=1),")
    with TwoNodeCluster(worker_gpus=1) as cluster:
        results = cluster.results_root / "r"
        proc = sweep_popen("launch", str(study), "--address", cluster.address, "--results", str(results))
        lines, started, at_running = [], None, None
        for line in proc.stdout:
            lines.append(line)
            if "starting on this machine" in line:
                started = warm_worker_pids(parent=proc.pid)
            if line.startswith("running ") and at_running is None:
                at_running = warm_worker_pids(parent=proc.pid)
        proc.wait(timeout=600)
        out = "".join(lines)
        assert started, f"the launch started no warm worker on this machine:\n{out}"
        assert "warm workers: stopped, no trial can run on this machine" in out, out
        assert at_running == [], f"warm workers {at_running} still ran when the trials began:\n{out}"
        rows = read_trials(results)
        assert rows.height == 2 and set(rows["ray_node_id"]) == {cluster.worker_node_id}, rows
