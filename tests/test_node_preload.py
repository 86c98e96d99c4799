"""Warm trial processes on every node, through Ray (issue 22): nodes started as cluster.yaml starts them
(``RAY_enable_worker_prestart=1``, ``RAY_preload_python_modules=sweeper.node_preload``, the ``sweeper-preload``
label) have idle worker processes that imported what a trial needs before any launch, and a launch that joins them
runs its Tune trials in those processes on every node, the worker node of the two-node harness (its own mount
namespace: no /tmp, no results folder of the launching machine) included."""
from __future__ import annotations

import json
import signal
import statistics
import time

import polars as pl
import pytest

from helpers import read_trials, sweep_popen, wait_for, write_study

# trials of 2-4 s here (new_tokens=400), unless a test is about short ones
STUDY = """
    study = Study(name="preload", models=[{model!r}], precisions=["fp32", "bf16", "fp16", "int8", "nf4", "fp4"],
                  compute_dtypes=["fp32", "bf16"], kl=False, resources=Resources(cpus_per_trial=1),
                  benchmark=Benchmark(prompt_tokens=16, new_tokens={new_tokens}, batch_sizes=(1,), repeats=2,
                                      warmup=0))
"""


@pytest.fixture
def preloading_cluster():
    from cluster_harness import TwoNodeCluster, namespace_unavailable

    why = namespace_unavailable()
    if why:
        pytest.skip(f"two-node cluster harness unavailable: {why}")
    with TwoNodeCluster(preload=True) as cluster:
        yield cluster


def _scheduled(results) -> dict[str, float]:
    """When the launch saw each trial's Tune trial start (the driver's events), by trial id."""
    events = [json.loads(line) for line in (results / "_tune" / "events.jsonl").read_text().splitlines()]
    return {e["trial_id"]: e["at"] for e in events if e["event"] == "scheduled"}


def _launch(cluster, study, results):
    # two trials at a time, one CPU a trial and a node: one runs on each node
    return sweep_popen("launch", str(study), "--address", cluster.address, "--results", str(results),
                       "--max-concurrent", "2", cwd=study.parent)


def test_trials_on_every_node_start_in_processes_the_node_preloaded(preloading_cluster, real_model, tmp_path):
    c = preloading_cluster
    study = write_study(tmp_path / "study.py", STUDY.format(model=str(real_model), new_tokens=400))
    results = c.results_root / "preload"
    proc = _launch(c, study, results)
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-4000:]
    assert "every node preloads trial processes (2 of 2)" in out, out[-3000:]
    rows = read_trials(results).to_dicts()
    assert len(rows) == 9 and {r["status"] for r in rows} == {"done"}
    fits = [json.loads(line) for line in (results / "_tune" / "events.jsonl").read_text().splitlines()
            if '"fit"' in line]
    assert fits and not any(f["actor_runtime_env"] for f in fits), fits  # Tune's trial actors got no runtime_env

    scheduled = _scheduled(results)
    by_node = {node: [r for r in rows if r["ray_node_id"] == node] for node in (c.head_node_id, c.worker_node_id)}
    assert all(len(v) >= 2 for v in by_node.values()), {k: len(v) for k, v in by_node.items()}
    for node, mine in by_node.items():
        for r in mine:
            # the Tune trial's process had finished the node's preload before the trial's code ran (a process Ray
            # started with the node, most often, or one it started for the trial: docs/performance.md, run35)
            assert r["ray_worker_preloaded_at"] is not None, (node, r["trial_id"])
            assert r["ray_worker_preloaded_at"] <= r["trainable_started_at"], (node, r)
    assert not any(r["warm_worker"] for r in by_node[c.worker_node_id])  # the launch's own warm workers live on the head only
    # per-trial start-up, the launch's "scheduled" -> the load's start: the worker node's median within 1.5x of the
    # head's (whose trials run in the launch's warm workers), or both under 0.5 s
    startup = {node: statistics.median(r["load_started_at"] - scheduled[r["trial_id"]] for r in mine)
               for node, mine in by_node.items()}
    head, work = startup[c.head_node_id], startup[c.worker_node_id]
    assert work <= 1.5 * head or max(head, work) < 0.5, startup


def test_a_sweep_survives_the_death_of_a_preloading_worker_node(preloading_cluster, real_model, tmp_path):
    c = preloading_cluster
    study = write_study(tmp_path / "study.py", STUDY.format(model=str(real_model), new_tokens=400))
    results = c.results_root / "dies"
    proc = _launch(c, study, results)

    def worker_rows() -> int:
        try:
            return sum(r["ray_node_id"] == c.worker_node_id for r in read_trials(results).to_dicts())
        except Exception:  # noqa: BLE001 - no store yet
            return 0

    assert wait_for(lambda: worker_rows() >= 1 or proc.poll() is not None, timeout=600)
    assert proc.poll() is None, "the sweep ended before the worker node could be killed"
    assert worker_rows() >= 1 and len(read_trials(results)) < 9
    killed_at = time.time()
    assert c.kill_worker_node(), "no process of the worker node to kill"
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-4000:]
    rows = read_trials(results)
    assert rows.height == 9 and set(rows["status"]) == {"done"}, rows.select("precision", "status", "error")
    ended = (rows["load_started_at"] + rows["duration_s"]).to_list()
    assert max(ended) > killed_at, "the sweep had finished before the node was killed"
    assert "summary: 9/9 done, 0 failed, 0 pending" in out, out[-2000:]


def test_short_trials_run_on_every_node_even_while_an_actor_is_starting_there(preloading_cluster, real_model, tmp_path):
    """Tune gives a process that just finished a trial the next one (reuse_actors). Its FIFO gave it the first pending
    trial and removed the actor starting for that trial on the other node; with trials shorter than an actor's start,
    every next actor there was removed too, and that node ran none (all 12 trials on one node in each of 6 launches
    on f298acd: benchmarks/logs/warm_nodes_cpu_tune_sparing.txt). scheduler._fifo_sparing_starting_actors leaves a
    starting actor its trial."""
    c = preloading_cluster
    study = write_study(tmp_path / "study.py", STUDY.format(model=str(real_model), new_tokens=4).replace(  # ~1 s trials
        '["fp32", "bf16"]', '["fp32", "bf16", "fp16"]'))
    results = c.results_root / "short"
    # as many trials at once as Tune sees fit (one a node): Tune asks for an actor for each pending trial at once
    out, _ = (p := sweep_popen("launch", str(study), "--address", c.address, "--results", str(results),
                               cwd=study.parent)).communicate(timeout=900)
    assert p.returncode == 0, out[-4000:]
    rows = read_trials(results).to_dicts()
    assert len(rows) == 12 and {r["status"] for r in rows} == {"done"}, rows
    ran = {node: sum(r["ray_node_id"] == node for r in rows) for node in (c.head_node_id, c.worker_node_id)}
    assert min(ran.values()) >= 1, ran
    assert "restricted" not in out, out[-3000:]  # Tune warns when a scheduler reads its controller through the wrapper


def test_the_next_launch_finds_every_node_preloaded_again(preloading_cluster, real_model, tmp_path):
    """Ray ends a job's processes with the job, the preloaded ones its trials took included, and a node prestarts
    only as it starts: a launch that leaves the cluster has each node start its preloaded processes again
    (sweeper/node_refill.py), so the next launch's trials run in processes preloaded before it began."""
    c = preloading_cluster
    study = write_study(tmp_path / "study.py", STUDY.format(model=str(real_model), new_tokens=400).replace(
        '"int8", "nf4", "fp4"]', '"int8"]').replace('["fp32", "bf16"]', '["fp32"]'))
    began = c.preloaded_counts()
    first = c.results_root / "first"
    out, _ = (p := _launch(c, study, first)).communicate(timeout=900)
    assert p.returncode == 0, out[-4000:]
    assert "not restarted" not in out, out[-3000:]
    rows = read_trials(first).to_dicts()
    # one CPU a node and two trials at a time: both nodes' preloaded processes ran trials of this launch, and ended
    # with it
    assert {r["ray_node_id"] for r in rows} == {c.head_node_id, c.worker_node_id}, rows
    c.wait_preloaded(before=began, timeout_s=90)  # as they are when a user's next launch comes, a while later

    second = c.results_root / "second"
    started = time.time()
    out, _ = (p := _launch(c, study, second)).communicate(timeout=900)
    assert p.returncode == 0, out[-4000:]
    rows = read_trials(second).to_dicts()
    assert len(rows) == 4 and {r["status"] for r in rows} == {"done"}, rows
    assert {r["ray_node_id"] for r in rows} == {c.head_node_id, c.worker_node_id}, rows
    for r in rows:  # without the refill, processes Ray started for this launch, which preloaded after it began
        assert r["ray_worker_preloaded_at"] is not None and r["ray_worker_preloaded_at"] < started, (r, started)


@pytest.mark.parametrize("reported", [True, False], ids=["after-each-node-reported", "before-any-trial-reported"])
def test_a_launch_stopped_by_ctrl_c_gives_the_nodes_their_preloaded_processes_back(reported, preloading_cluster,
                                                                                  real_model, tmp_path):
    """Ctrl-C ends the launch's job, and with it the preloaded processes its trials took; within the seconds the
    launch takes to leave, each node is asked to start them again, so the resuming launch finds them. Also for the
    common Ctrl-C, in the sweep's first trials, before any has reported: the launch reads which processes its actors
    took from Ray's actor table (node_refill.processes_taken); counted from the trials' reports, as before 058e5d1,
    neither node was refilled."""
    c = preloading_cluster
    tokens = 400 if reported else 4000
    study = write_study(tmp_path / "study.py", STUDY.format(model=str(real_model), new_tokens=tokens))
    began = c.preloaded_counts()
    results = c.results_root / "interrupted"
    proc = _launch(c, study, results)

    def rows() -> list[dict]:
        try:
            return read_trials(results).to_dicts()
        except Exception:  # noqa: BLE001 - no store yet
            return []

    def started() -> int:
        try:
            return len(_scheduled(results))
        except OSError:  # no events yet
            return 0

    if reported:  # a trial reported from each node, and the launch still running
        assert wait_for(lambda: len({r["ray_node_id"] for r in rows()}) == 2 or proc.poll() is not None, timeout=600)
    else:  # a trial started on each node; at 4000 tokens, none reports for a while
        assert wait_for(lambda: started() >= 2 or proc.poll() is not None, timeout=600)
        time.sleep(2.0)
    assert proc.poll() is None, "the sweep ended before it could be interrupted"
    reported_before = len(rows())
    at = time.time()
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130 and time.time() - at < 10, (proc.returncode, out[-3000:])
    assert sum(r["status"] == "done" for r in rows()) < 9, "every trial had finished"
    if not reported:
        assert reported_before == 0 and "done in " not in out, ("a trial had reported", out[-3000:])
    assert "not restarted" not in out, out[-3000:]
    # one process a node (one CPU each) started again and preloaded; without the refill none is (the wait times out)
    try:
        c.wait_preloaded(before=began, timeout_s=90)
    except RuntimeError as e:  # with the launch's last lines: whether Ray stopped in time to ask for the refill
        raise AssertionError(f"{e}; the launch said:\n{out[-2000:]}") from e


def test_a_launch_through_a_ray_client_runs_its_trials_in_the_preloaded_processes_too(preloading_cluster, real_model,
                                                                                      tmp_path):
    """Through a Ray client (``ray://``), Tune runs its loop in an actor on the cluster, which gave the trial actors
    Tune's runtime_env there: they ran in new processes, none in those the nodes preloaded, and no progress line
    reached the launch. sweeper runs that loop on the cluster itself (scheduler._fit_on_cluster): the trials run in
    the preloaded processes, the progress comes back, and the nodes get their processes back as the launch leaves."""
    c = preloading_cluster
    study = write_study(tmp_path / "study.py", STUDY.format(model=str(real_model), new_tokens=400).replace(
        '"int8", "nf4", "fp4"]', '"int8"]').replace('["fp32", "bf16"]', '["fp32"]'))
    began = c.preloaded_counts()
    results = c.results_root / "client"
    started = time.time()
    out, _ = (p := sweep_popen("launch", str(study), "--address", c.client_address, "--results", str(results),
                               "--max-concurrent", "2", cwd=study.parent)).communicate(timeout=900)
    assert p.returncode == 0, out[-4000:]
    assert "every node preloads trial processes (2 of 2)" in out and "not restarted" not in out, out[-3000:]
    assert out.count("done in ") == 4, out[-3000:]  # each trial's progress line, from the loop on the cluster
    rows = read_trials(results).to_dicts()
    assert len(rows) == 4 and {r["status"] for r in rows} == {"done"}, rows
    # every trial in a process its node preloaded; on the worker node, the one it preloaded before the launch (the
    # head's, one CPU here, runs the loop's actor, so its trials take a process preloaded since)
    assert all(r["ray_worker_preloaded_at"] is not None for r in rows), rows
    facts = [("worker" if r["ray_node_id"] == c.worker_node_id else "head", r["ray_worker_started_at"] - started,
              r["ray_worker_preloaded_at"] - started, r["load_started_at"] - started) for r in rows]
    worker = [f for f in facts if f[0] == "worker"]
    assert worker and all(preloaded < 0 for _, _, preloaded, _ in worker), facts
    fits = [json.loads(line) for line in (results / "_tune" / "events.jsonl").read_text().splitlines()
            if '"fit"' in line]
    assert fits and not any(f["actor_runtime_env"] for f in fits), fits
    c.wait_preloaded(before=began, timeout_s=90)  # refilled: one process a node (one CPU each) started again


def test_ctrl_c_through_a_ray_client_stops_the_trials_on_the_cluster(preloading_cluster, real_model, tmp_path):
    """Ctrl-C of a launch through a Ray client: the launch leaves within seconds, and the trial loop it runs on the
    cluster, with the trial actors it owns, ends with it: no trial goes on to finish, no actor of the launch lives
    on."""
    import subprocess
    import sys

    c = preloading_cluster
    study = write_study(tmp_path / "study.py", STUDY.format(model=str(real_model), new_tokens=400))
    results = c.results_root / "client-interrupted"
    proc = sweep_popen("launch", str(study), "--address", c.client_address, "--results", str(results),
                       "--max-concurrent", "2", cwd=study.parent)

    def done() -> int:
        try:
            return len(read_trials(results).filter(pl.col("status") == "done"))
        except Exception:  # noqa: BLE001 - no store yet
            return 0

    assert wait_for(lambda: done() >= 1 or proc.poll() is not None, timeout=600)
    assert proc.poll() is None, "the sweep ended before it could be interrupted"
    at = time.time()
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130 and time.time() - at < 10, (proc.returncode, out[-3000:])
    stopped = done()
    time.sleep(8)  # trials of 2-4 s: running ones would have finished by now
    assert done() == stopped < 9, (stopped, done())
    code = ("import ray; from ray._private.state import actors; ray.init(address=%r, logging_level='ERROR'); "
            "print([a['ActorClassName'] for a in actors().values() if a['State'] != 'DEAD'])" % c.address)
    alive = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert alive.stdout.strip().splitlines()[-1] == "[]", (alive.stdout, alive.stderr[-2000:])


def test_a_code_change_mid_launch_leaves_the_processes_its_trials_took(preloading_cluster, real_model, tmp_path):
    """node_preload ends an idle preloaded process once sweeper's files change; the ones a launch's trials took stay
    until the launch ends, so its trials run on (each once, in the process the node preloaded)."""
    import os

    import sweeper

    c = preloading_cluster
    study = write_study(tmp_path / "study.py", STUDY.format(model=str(real_model), new_tokens=400).replace(
        '"int8", "nf4", "fp4"]', '"int8"]').replace('["fp32", "bf16"]', '["fp32"]'))
    results = c.results_root / "changed"
    proc = _launch(c, study, results)
    assert wait_for(lambda: (results / "_tune" / "events.jsonl").exists()
                    and sum('"scheduled"' in line for line in (results / "_tune" / "events.jsonl").open()) >= 2
                    or proc.poll() is not None, timeout=600)
    changed = os.path.join(os.path.dirname(sweeper.__file__), "trials.py")  # the file both nodes' processes imported
    st = os.stat(changed)
    try:
        os.utime(changed, ns=(st.st_atime_ns, time.time_ns()))
        out, _ = proc.communicate(timeout=900)
    finally:
        os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert proc.returncode == 0, out[-4000:]
    rows = read_trials(results).to_dicts()
    assert len(rows) == 4 and {r["status"] for r in rows} == {"done"}, rows
    assert all(r["attempt"] == 1 and r["ray_worker_preloaded_at"] is not None for r in rows), rows
    assert "died" not in out, out[-3000:]


def test_refilling_is_gated_on_the_ray_versions_it_was_tested_with(monkeypatch):
    import ray

    from sweeper import node_refill

    if not ray.__version__.startswith(node_refill.TESTED_RAY):
        pytest.skip(f"Ray {ray.__version__}: refilling is gated off")
    assert node_refill.unsupported() is None  # this environment's Ray (pyproject's grpcio installed)
    monkeypatch.setattr(ray, "__version__", "2.99.0")
    assert "Ray 2.99.0" in node_refill.unsupported()


def test_a_node_that_cannot_be_asked_to_refill_is_named_not_raised():
    import socket

    from sweeper import node_refill

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    nodes = [{"NodeID": node, "NodeManagerAddress": "127.0.0.1", "NodeManagerPort": port, "Resources": res}
             for node, res in [("ab12cd34ef", {"CPU": 2.0}), ("no-cpus", {"GPU": 1.0}), ("untaken", {"CPU": 2.0})]]
    # the launch's trials took one process on the first node; the others are asked for nothing
    problems = node_refill.refill(nodes, {"ab12cd34ef": 1, "no-cpus": 1})
    assert len(problems) == 1 and problems[0].startswith("node 127.0.0.1 (ab12cd34)"), problems
    assert time.monotonic() - t0 < node_refill.RPC_TIMEOUT_S + 5


def test_what_the_refill_counts_is_read_from_rays_actor_table_ended_actors_included():
    """The processes a launch took: one per actor of its job that ran without a runtime_env (Tune's trial actors),
    by node, ended ones included (a Ctrl-C's trials); not the launch's own actors (a runtime_env: they take no
    preloaded process), nor an actor never placed (no process)."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import os, time, ray
        ray.init(address="local", num_cpus=1, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        from sweeper import node_refill

        @ray.remote(num_cpus=0)
        class A:
            def pid(self):
                return os.getpid()

        trials = [A.remote() for _ in range(2)]
        own = A.options(runtime_env={"env_vars": {"SWEEPER_NOT_A_TRIAL": "1"}})  # as local_ray.not_a_trial's
        ray.get([a.pid.remote() for a in [*trials, own.remote()]])
        ray.kill(trials[0])
        never = A.options(num_cpus=64).remote()  # no node has 64 CPUs

        def state(actor):
            return ray._private.state.actors(actor._actor_id.hex()).get("State")

        deadline = time.monotonic() + 60
        while (state(trials[0]), state(never)) != ("DEAD", "PENDING_CREATION") and time.monotonic() < deadline:
            time.sleep(0.1)
        here = ray.get_runtime_context().get_node_id()
        print(state(trials[0]), state(never), node_refill.unsupported(),
              dict(node_refill.processes_taken()) == {here: 2})
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.stdout.strip().splitlines()[-1:] == ["DEAD PENDING_CREATION None True"], (run.stdout,
                                                                                       run.stderr[-3000:])


@pytest.mark.parametrize("taken", [False, True])
def test_a_preloaded_process_ends_when_sweepers_code_changes_unless_a_trial_took_it(taken, tmp_path):
    """A node's preloaded processes keep the code they imported; one no trial has taken ends once a file of the
    package changes on disk (so the next launch's trials import the new code), one a trial took stays for its job."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    import sweeper
    from sweeper import node_preload

    package = tmp_path / "sweeper"  # a copy: the change below must not touch the checkout other tests run
    shutil.copytree(Path(sweeper.__file__).parent, package, ignore=shutil.ignore_patterns("__pycache__"))
    code = ("import sys, time; sys.argv = ['default_worker.py']; import sweeper.node_preload as p; "
            f"assert p.preloaded_at is not None, 'no preload'; p.taken = {taken}; print(p.__file__, flush=True); "
            "time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(tmp_path)},
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stderr is not None
    try:
        import select

        assert select.select([proc.stdout], [], [], 240)[0], "the preloading process printed nothing in 240 s"
        ready = proc.stdout.readline().strip()  # the copy's module (`-c` puts the cwd first on sys.path)
        assert ready == str(package / "node_preload.py"), (ready, proc.poll() is not None and proc.stderr.read())
        changed = package / "trials.py"
        st = changed.stat()
        os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # as an upgrade or a `git pull` would
        try:
            proc.wait(timeout=node_preload.WATCH_S * 2 + 5)
        except subprocess.TimeoutExpired:
            pass
        if taken:
            assert proc.poll() is None, proc.stderr.read()[-2000:]
        else:
            assert proc.poll() == 0, "the process outlived the change of sweeper's code"
            assert node_preload.CHANGED in proc.stderr.read()
    finally:
        proc.kill()
        proc.communicate()


@pytest.mark.parametrize("program, hash_arg, preloads", [
    ("default_worker.py", None, True), ("default_worker.py", "--runtime-env-hash=0", True),
    ("default_worker.py", "--runtime-env-hash=-1619862153", False),
    ("pytest", None, False)])  # an import outside Ray's workers: it once loaded lm-eval and hid hqq in the test process
def test_the_preload_runs_only_in_processes_for_no_runtime_env(program, hash_arg, preloads):
    """Ray's worker processes (``default_worker.py``) get ``--runtime-env-hash``; one started for a runtime_env (Ray's
    job supervisor, the launch's own tasks: local_ray.not_a_trial) never runs a trial of a preloading cluster, so it
    imports nothing; nor does any process that is not a Ray worker."""
    import subprocess
    import sys

    code = (f"import sys; sys.argv = [{program!r}] + sys.argv[1:]; import sweeper.node_preload as p; "
            "print(p.preloaded_at is not None, 'torch' in sys.modules, 'lm_eval' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code, *([hash_arg] if hash_arg else [])], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == [str(preloads)] * 3, (r.stdout, r.stderr[-2000:])


def test_a_store_writer_whose_location_failed_to_open_says_so_instead_of_waiting():
    """The StoreWriter starts before it knows the location (scheduler.start_store_writer); a trial that calls it
    after the location failed to open gets the error, never waits for good."""
    import threading

    from sweeper.errors import UserError
    from sweeper.remote_store import StoreWriterImpl

    writer = StoreWriterImpl()
    answered: list[BaseException] = []

    def claim() -> None:  # a trial's first call, made before the launch opens the location
        try:
            writer.claim("t1")
        except BaseException as e:  # noqa: BLE001 - what the trial would get
            answered.append(e)

    waiting = threading.Thread(target=claim, daemon=True)
    waiting.start()
    waiting.join(0.5)
    assert waiting.is_alive(), "a call before open() must wait for it"
    with pytest.raises(UserError):
        writer.open("ftp://nowhere/results", "launch-A")
    waiting.join(10)
    assert not waiting.is_alive() and answered and "could not open" in str(answered[0]), answered
    with pytest.raises(RuntimeError, match="could not open"):
        writer.reference("r1")


def test_a_job_runtime_env_keeps_the_trials_out_of_the_preloaded_processes_and_the_launch_says_so(
        preloading_cluster, real_model, tmp_path):
    """`ray job submit --runtime-env-json` / `--working-dir` give the launch's job a runtime_env (Ray passes it to the
    driver as RAY_JOB_CONFIG_JSON_ENV_VAR), which every actor of the job inherits: the launch must not claim the
    preloaded processes then, and Tune's actors keep their own runtime_env."""
    from helpers import sweep

    c = preloading_cluster
    study = write_study(tmp_path / "study.py", f"""
        study = Study(name="job-env", models=[{str(real_model)!r}], precisions=["fp32", "fp16"], kl=False,
                      benchmark=Benchmark(prompt_tokens=16, new_tokens=4, batch_sizes=(1,), repeats=2, warmup=0))
    """)
    results = c.results_root / "job-env"
    job = json.dumps({"runtime_env": {"env_vars": {"SWEEPER_TEST_JOB_ENV": "1"}}})
    r = sweep("launch", str(study), "--address", c.address, "--results", str(results), cwd=tmp_path, timeout=600,
              env={"RAY_JOB_CONFIG_JSON_ENV_VAR": job})
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert "this job's runtime_env keeps its trials out of them" in out, out[-3000:]
    assert "every node preloads" not in out
    fits = [json.loads(line) for line in (results / "_tune" / "events.jsonl").read_text().splitlines()
            if '"fit"' in line]
    assert fits and all(f["actor_runtime_env"] for f in fits), fits
    assert set(read_trials(results)["status"]) == {"done"}
