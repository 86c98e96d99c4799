"""A results location on an object store (issue 18): `--results s3://bucket/study` against moto's S3 server, started
by the test on 127.0.0.1 (docs/store.md, "Object stores"). The tests whose body is the same for every object store
take the ``bucket`` fixture (helpers.Bucket); tests/test_store_gcs.py runs them again on gs://."""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from helpers import (fast_benchmark, fast_kl, moto_s3, served_bucket, small_study, sweep, sweep_popen, wait_for,
                     write_study)

BUCKET = "sweeper-test"


@pytest.fixture()
def bucket(tmp_path, monkeypatch):
    """moto's S3 server with a bucket, and the AWS environment the `sweep` subprocesses (and this process) use."""
    with served_bucket("s3", BUCKET, monkeypatch, tmp_path / "work") as b:
        yield b


def _study(path: Path, model: Path, precisions, name="s3rel", kl="False") -> Path:
    return small_study(path, model, precisions, name, kl=kl)


def _committed(uri: str) -> dict[str, bytes]:
    """trial_id -> the bytes of its committed row object."""
    from sweeper.store import ResultsStore

    store = ResultsStore(uri)
    return {tid: store.loc.read_bytes(live.files["trials"]) for tid, live in store.state().trials.items()}


def _counting_commits(bucket, prefix: str) -> dict[str, int]:
    """trial_id -> how many commits that count (not fenced) name it, read from the log objects themselves."""
    from sweeper.store import ResultsStore

    fenced = set(ResultsStore(bucket.uri(prefix)).state().fenced)
    n: dict[str, int] = {}
    for key in bucket.keys(f"{prefix}/_log/"):
        if not key.endswith(".json") or int(key.rsplit("/", 1)[1][:20]) in fenced:
            continue
        entry = json.loads(bucket.get(key))
        if entry.get("kind") == "trials":
            for t in entry["trials"]:
                n[t["trial_id"]] = n.get(t["trial_id"], 0) + 1
    return n


def test_launch_kill_relaunch_query_report_and_damaged_object(tmp_path, tiny_model, bucket):
    """On the object store: a SIGKILLed launch resumes with every trial done exactly once (one counting commit each,
    finished rows untouched); status, results --sql and report read the location; a damaged object is named (exit 2),
    then quarantined (copied aside, deleted) and its trial rerun by the next launch."""
    precisions = ["fp32", "bf16", "int8", "nf4"]
    study = _study(tmp_path / "s.py", tiny_model, precisions, name=f"{bucket.scheme}rel")
    uri = bucket.uri("study")
    proc = sweep_popen("launch", str(study), "--results", uri, "--max-concurrent", "1")
    try:
        assert wait_for(lambda: len(_committed(uri)) >= 1 or proc.poll() is not None, timeout=300)
        ended = proc.poll() is not None
        if not ended:
            os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        out = proc.communicate()[0]
    assert not ended, "the launch ended before it could be killed:\n" + out
    finished = _committed(uri)
    assert 1 <= len(finished) < len(precisions), out
    r = sweep("launch", str(study), "--results", uri, env={"SWEEPER_LEASE_STALE_S": "3"})
    assert r.returncode == 0, r.stdout + r.stderr
    after = _committed(uri)
    assert len(after) == len(precisions)
    for tid, data in finished.items():
        assert after[tid] == data, f"{tid}'s row changed after it was finished"
    assert _counting_commits(bucket, "study") == {tid: 1 for tid in after}
    # nothing of the location landed in the working directory or beside it
    assert not list(tmp_path.glob(f"{bucket.scheme}*")) and not (tmp_path / "results").exists()

    r = sweep("status", uri)
    assert r.returncode == 0 and f"{len(precisions)} done, 0 failed, 0 pending" in r.stdout, r.stdout + r.stderr
    r = sweep("results", uri, "--sql", "SELECT count(*) AS n_done FROM trials WHERE status = 'done'", "--format", "csv")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == str(len(precisions)), r.stdout
    html = tmp_path / "report.html"
    r = sweep("report", uri, "-o", str(html))
    assert r.returncode == 0, r.stderr
    assert f"{bucket.scheme}rel" in html.read_text() and uri in html.read_text()

    # a committed data object overwritten with garbage: named by `sweep results`, quarantined by `sweep launch`
    from sweeper.store import ResultsStore

    victim_rel = ResultsStore(uri).state().trials[sorted(after)[0]].files["metrics"]
    bucket.put(f"study/{victim_rel}", b"not parquet at all")
    r = sweep("results", uri)
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(err) == 1 and f"{uri}/{victim_rel}" in err[0], r.stderr
    r = sweep("launch", str(study), "--results", uri)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"damaged result file {uri}/{victim_rel}" in r.stderr
    keys = bucket.keys("study/quarantine/")
    assert any(k.startswith(f"study/quarantine/{victim_rel}.") for k in keys)
    assert not bucket.keys(f"study/{victim_rel}")
    r = sweep("status", uri)
    assert r.returncode == 0 and f"{len(precisions)} done" in r.stdout, r.stdout + r.stderr
    # the credentials are in no object of the location and in no output
    secrets = [x.encode() for x in bucket.secrets]
    for key in bucket.keys("study/"):
        assert not any(x in bucket.get(key) for x in secrets), key
    assert not any(x.decode() in out + r.stdout + r.stderr for x in secrets)


def test_one_launch_per_location_stale_lease_and_fencing(tmp_path, tiny_model, bucket, monkeypatch):
    """Two launches on one URI: the second exits 2 naming the holder. A killed launch's lease goes stale and is
    taken over; a commit under the old owner's token is then refused to its writer and ignored by readers."""
    from sweeper.store import OwnershipLost, ResultsStore

    study = _study(tmp_path / "s.py", tiny_model, ["fp32", "bf16", "int8"])
    uri = bucket.uri("locked")
    env = {"SWEEPER_LEASE_STALE_S": "4"}
    monkeypatch.setenv("SWEEPER_LEASE_STALE_S", "4")  # sweep_popen's launch inherits it
    proc = sweep_popen("launch", str(study), "--results", uri, "--max-concurrent", "1")
    try:
        def lease():
            data = bucket.get("locked/_lock.json")
            return json.loads(data) if data is not None else None

        assert wait_for(lambda: lease() is not None, timeout=120)
        old = lease()
        assert old["pid"] == proc.pid and not old["released"]
        r = sweep("launch", str(study), "--results", uri, env=env)
        err = r.stderr.strip().splitlines()
        assert r.returncode == 2, r.stdout + r.stderr
        assert len(err) == 1 and "is in use by another `sweep launch`" in err[0] and f"pid {proc.pid}" in err[0]
        assert wait_for(lambda: ResultsStore(uri).state().owner == old["token"], timeout=120)
    finally:
        proc.kill()
        proc.wait()
    assert not lease()["released"]  # killed: its lease is left behind, unreleased
    t0 = time.monotonic()
    r = sweep("launch", str(study), "--results", uri, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "taking over the lease" in r.stderr and time.monotonic() - t0 >= 4
    assert lease()["released"] and lease()["token"] != old["token"]

    # the old owner (paused, say, and now resumed) commits: refused to it, and invisible to readers even when written
    stale = ResultsStore(uri, token=old["token"])
    row = {"trial_id": "ghost", "status": "done", "attempt": 1}
    with pytest.raises(OwnershipLost):
        stale.write_trial(row, [])
    seq = stale.state().seq + 1
    assert stale.loc.create_exclusive(f"_log/{seq:020d}.json", json.dumps(
        {"kind": "trials", "token": old["token"], "trials": [{"trial_id": "ghost", "status": "done", "attempt": 1,
                                                              "files": {"trials": {"path": stale.state().trials[
                                                                  sorted(stale.state().trials)[0]].files["trials"],
                                                                  "size": 1}}}]}).encode())
    fresh = ResultsStore(uri)
    assert "ghost" not in fresh.state().trials and seq in fresh.state().fenced
    assert len(fresh.state().trials) == 3 and not fresh.damaged_files()


def test_kl_reference_goes_through_the_bucket(tmp_path, tiny_model, bucket):
    """With KL on and an object store location, the baseline's reference is uploaded to refs/ with its commit, and the
    other trial reads it from there (a local copy fetched from the bucket), measuring KL against it."""
    from sweeper.store import ResultsStore

    study = _study(tmp_path / "s.py", tiny_model, ["fp32", "int8"], name=f"{bucket.scheme}kl", kl=fast_kl())
    uri = bucket.uri("kl")
    r = sweep("launch", str(study), "--results", uri)
    assert r.returncode == 0, r.stdout + r.stderr
    st = ResultsStore(uri).state()
    refs = {live.ref for live in st.trials.values() if live.ref}
    assert len(st.trials) == 2 and {live.status for live in st.trials.values()} == {"done"}
    (ref,) = refs
    assert bucket.size(f"kl/{ref}") == st.sizes[ref][0]
    from sweeper.results import open_results

    m = open_results(uri).metrics.collect()
    kl_rows = m.filter((m["stage"] == "kl") & m["value"].is_not_null())
    assert kl_rows.height and kl_rows["trial_id"].n_unique() == 2, m.filter(m["stage"] == "kl")


def test_exclusive_create_and_lease_takeover_races(bucket, monkeypatch):
    """The two conditional writes under racing writers: of 8 threads creating one commit object exactly one wins
    (S3: If-None-Match, GCS: ifGenerationMatch=0); of 4 launches taking over one stale lease at once exactly one owns
    it and the others are refused naming it (a write conditional on the version they all saw), in each of 5 rounds."""
    import threading

    from sweeper.errors import UserError
    from sweeper.location import open_location
    from sweeper.lock import LeaseLock

    loc = open_location(bucket.uri("race"))
    for round_ in range(5):
        wins, barrier = [], threading.Barrier(8)

        def create(i):
            barrier.wait()
            if loc.create_exclusive(f"_log/{round_ + 1:020d}.json", json.dumps({"writer": i}).encode()):
                wins.append(i)

        threads = [threading.Thread(target=create, args=(i,)) for i in range(8)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert len(wins) == 1 and json.loads(loc.read_bytes(f"_log/{round_ + 1:020d}.json")) == {"writer": wins[0]}

    monkeypatch.setenv("SWEEPER_LEASE_STALE_S", "1.5")
    for round_ in range(5):
        dead = LeaseLock(loc.root).acquire(heartbeat=False)  # a launch that died holding the lease: never renewed
        assert dead._etag
        owners, refused, barrier = [], [], threading.Barrier(4)

        def take():
            lock = LeaseLock(loc.root)
            barrier.wait()
            try:
                owners.append(lock.acquire())
            except UserError as e:
                refused.append(str(e))

        threads = [threading.Thread(target=take) for _ in range(4)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert len(owners) == 1 and len(refused) == 3, (owners, refused)
        assert all("is in use by another `sweep launch`" in e for e in refused)
        assert json.loads(loc.read_bytes("_lock.json"))["token"] == owners[0].token
        owners[0].release()
        assert json.loads(loc.read_bytes("_lock.json"))["released"]
        loc.delete("_lock.json")


def test_s3_two_node_cluster_worker_node_needs_no_mount_and_no_credentials(tmp_path, real_model, monkeypatch):
    """`--results s3://` on a two-node Ray cluster whose worker node sees neither this machine's /tmp nor any bucket
    credentials (its raylet has no AWS_* variables, and its endpoint points at a closed port), while the head has them
    (as an instance profile would give): the sweep completes with KL, trials ran on both nodes, every commit,
    data object and the baseline's reference are in the bucket."""
    from cluster_harness import TwoNodeCluster, namespace_unavailable

    why = namespace_unavailable()
    if why:
        pytest.skip(f"two-node cluster harness unavailable: {why}")
    from sweeper.store import ResultsStore

    with moto_s3(BUCKET) as aws:
        for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
            monkeypatch.delenv(k, raising=False)
        with TwoNodeCluster(head_env=aws, worker_env={"AWS_ENDPOINT_URL": "http://127.0.0.1:9"}) as c:
            for k, v in {**aws, "SWEEPER_WORK_DIR": str(tmp_path / "work")}.items():
                monkeypatch.setenv(k, v)  # the launching process (and this test) reach the bucket
            study = write_study(tmp_path / "study.py", f"""
                study = Study(name="s3-no-mount", models=[{str(real_model)!r}], precisions=["fp32", "bf16", "int8",
                              "nf4"], compute_dtypes=["fp32"], benchmark={fast_benchmark()}, kl={fast_kl()})
            """)
            uri = f"s3://{BUCKET}/two-node"
            r = sweep("launch", str(study), "--address", c.address, "--results", uri, "--no-warm-workers",
                      "--max-concurrent", "2", cwd=tmp_path, timeout=900)
            out = r.stdout + r.stderr
            assert r.returncode == 0, out[-4000:]
            from sweeper.results import open_results

            res = open_results(uri)
            rows = res.trials.collect()
            assert rows.height == 4 and set(rows["status"]) == {"done"}, rows.select("precision", "error").to_dicts()
            assert set(rows["ray_node_id"]) == {c.head_node_id, c.worker_node_id}, "trials ran on both nodes"
            kl = res.metrics.collect().filter(stage="kl", metric="kl_mean")
            assert set(kl["trial_id"]) == set(rows["trial_id"]), "every trial measured KL against the reference"
            store = ResultsStore(uri)
            assert store.damaged_files(full=True) == []
            (ref,) = {live.ref for live in store.state().trials.values() if live.ref}
            assert store.loc.lstat(ref) is not None
            assert "summary: 4/4 done, 0 failed, 0 pending" in out, out[-2000:]


def test_s3_an_unreachable_location_is_an_error_never_damage(tmp_path, monkeypatch):
    """When the bucket cannot be reached (the server gone, a wrong endpoint), reading is a one-line error naming the
    location; no committed file is taken for damaged (which would retract and rerun good trials)."""
    from sweeper.location import LocationError
    from sweeper.store import ResultsStore

    uri = f"s3://{BUCKET}/gone"
    with moto_s3(BUCKET) as aws:
        for k, v in aws.items():
            monkeypatch.setenv(k, v)
        store = ResultsStore(uri)
        store.take_over("owner")
        store.write_trial({"trial_id": "t1", "status": "done", "attempt": 1},
                          [{"trial_id": "t1", "stage": "load", "metric": "m", "value": 1.0}])
        assert store.trial_status() == {"t1": "done"}
        store.forget()
        state = store.state()
        # the objects list and stat fine but cannot be read (a network fault injected in the client's GET): an error
        from botocore.exceptions import EndpointConnectionError

        def fail(**kw):
            raise EndpointConnectionError(endpoint_url=aws["AWS_ENDPOINT_URL"])

        monkeypatch.setattr(store.loc.client, "get_object", fail)
        with pytest.raises(LocationError, match="Could not connect"):
            store.damaged_files(full=True)
        monkeypatch.undo()
        for k, v in aws.items():
            monkeypatch.setenv(k, v)
    # the server is gone: the log was read before, the files are checked now
    store._state = state
    with pytest.raises(LocationError, match=f"results location {uri}: cannot use it"):
        store.quarantine_damaged()
    r = sweep("results", uri, env={"AWS_ENDPOINT_URL": "http://127.0.0.1:9"})
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(err) == 1 and f"results location {uri}: cannot use it" in err[0], r.stderr


def test_an_object_is_read_into_memory_arrow_owns(bucket, monkeypatch):
    """The Parquet reader gets a copy of an object in memory Arrow owns, never the Python bytes object: Arrow's pool
    threads then free nothing that needs the GIL, which aborted `sweep results` (SIGABRT) when one did so as the
    interpreter exited (4 and 2 exits of 80 on S3 and GCS with a damaged object: benchmarks/exit_abort_probe.py)."""
    import io
    import sys

    import pyarrow as pa
    import pyarrow.parquet as pq

    from sweeper.store import ResultsStore

    buf = io.BytesIO()
    pq.write_table(pa.table({"trial_id": ["a", "b"]}), buf)
    bucket.put("own/x.parquet", buf.getvalue())
    loc = ResultsStore(bucket.uri("own")).loc
    data = loc.read_bytes("x.parquet")
    monkeypatch.setattr(loc, "read_bytes", lambda rel: data)
    held = sys.getrefcount(data)
    reader = loc.open_regular("x.parquet")
    assert sys.getrefcount(data) == held, "the reader keeps the Python bytes alive: Arrow's threads would free them"
    assert pq.ParquetFile(reader).read(use_threads=True)["trial_id"].to_pylist() == ["a", "b"]


def test_compaction_segments_and_checkpoint(bucket):
    """Past COMPACT_TAIL per-trial commits the owner merges them on the bucket (Polars reads the objects, the segment
    is one PutObject) and writes a checkpoint; a fresh reader starts from it and sees every trial's rows once."""
    import pyarrow as pa

    from sweeper.store import COMPACT_TAIL, SAMPLES_SCHEMA, ResultsStore

    uri = bucket.uri("compact")
    store = ResultsStore(uri)
    store.take_over("owner")
    n = COMPACT_TAIL + 6
    for i in range(n):
        tid = f"t{i:03d}"
        samples = pa.table({"trial_id": [tid] * 3, "task": ["x"] * 3, "doc_id": [0, 1, 2]}).cast(
            pa.schema([SAMPLES_SCHEMA.field(c) for c in ("trial_id", "task", "doc_id")]))
        store.write_trial({"trial_id": tid, "status": "done", "attempt": 1},
                          [{"trial_id": tid, "stage": "load", "metric": "m", "value": float(i)}], samples)
        store.compact()
    fresh = ResultsStore(uri)
    st = fresh.state()
    segs = {live.files["trials"] for live in st.trials.values() if live.files["trials"].startswith("data/seg-")}
    assert len(st.trials) == n and len(segs) == 1
    names = fresh.loc.list("_log")
    assert any(x.endswith(".checkpoint.parquet") for x in names)
    assert fresh.damaged_files(full=True) == []
    t, m, s = (fresh.scan(k).collect() for k in ("trials", "metrics", "samples"))
    assert t.height == n and t["trial_id"].n_unique() == n
    assert sorted(m["value"].to_list()) == [float(i) for i in range(n)] and s.height == 3 * n


def test_s3_a_server_that_ignores_conditional_writes_is_refused(bucket, monkeypatch):
    """A server that ignores If-None-Match (simulated: the header dropped before the request leaves the client) would
    let two commits take one number: the launch's lock refuses the location, naming why."""
    from sweeper.errors import UserError
    from sweeper.lock import LeaseLock

    lock = LeaseLock(f"s3://{BUCKET}/lax")
    real = lock.loc.client.put_object
    monkeypatch.setattr(lock.loc.client, "put_object", lambda **kw: real(**{k: v for k, v in kw.items()
                                                                       if k != "IfNoneMatch"}))
    with pytest.raises(UserError, match="ignores conditional writes"):
        lock.acquire(heartbeat=False)
    assert not bucket.keys("lax/")  # the probe removed, no lease
    monkeypatch.undo()


def test_s3_bad_locations_and_fresh_exit_2_with_one_line(tmp_path, tiny_model, bucket):
    """A scheme other than s3:// and gs:// (hdfs://), a bucket that does not exist, and --fresh on a URI (an object
    store cannot move a study aside): exit 2, one line naming the input and what is allowed; nothing written."""
    study = _study(tmp_path / "s.py", tiny_model, ["fp32"])
    cases = [(("results", "hdfs://namenode/study"), "give a folder path, s3://bucket/prefix or gs://bucket/prefix"),
             (("launch", str(study), "--results", "s3://no-such-bucket/x"), "NoSuchBucket"),
             (("launch", str(study), "--results", f"s3://{BUCKET}/fresh", "--fresh"), "give a new prefix instead"),
             (("launch", str(study), "--results", f"s3://{BUCKET}/fresh", "--fresh", "--dry-run"), "new prefix")]
    for args, want in cases:
        r = sweep(*args)
        err = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(err) == 1 and want in err[0], (args, r.stdout + r.stderr)
    assert not bucket.keys("fresh/")


def test_checkpoint_cache_is_published_to_and_filled_from_the_bucket(tmp_path, bucket):
    """The calibrated / ONNX cache of a URI location: a folder made on one machine is published under quantized/
    (meta.json last); another machine's empty cache is filled from the bucket instead of calibrating again; an entry
    without meta.json (a publish cut short) is not taken."""
    from sweeper.quantize.calibrated import ensure_folder
    from sweeper.store import ResultsStore

    mirror = ResultsStore(bucket.uri("cache")).cache_mirror
    made = []

    def make(tmp):
        made.append(tmp)
        (tmp / "sub").mkdir()
        (tmp / "weights.pt").write_bytes(b"w" * 100_000)
        (tmp / "sub" / "x.bin").write_bytes(b"x")
        (tmp / "meta.json").write_text('{"calibration_s": 1.5}')

    first, hit = ensure_folder(tmp_path / "machine-a", "key1", make, mirror)
    assert not hit and len(made) == 1
    keys = set(bucket.keys("cache/quantized/"))
    assert keys == {f"cache/quantized/key1/{f}" for f in ("weights.pt", "sub/x.bin", "meta.json")}
    second, hit = ensure_folder(tmp_path / "machine-b", "key1", make, mirror)
    assert hit and len(made) == 1, "filled from the bucket, not made again"
    for f in ("weights.pt", "sub/x.bin", "meta.json"):
        assert (second / f).read_bytes() == (first / f).read_bytes()
    bucket.delete("cache/quantized/key1/meta.json")
    _, hit = ensure_folder(tmp_path / "machine-c", "key1", make, mirror)
    assert not hit and len(made) == 2


def test_awq_checkpoint_lands_in_the_bucket(tmp_path, tiny_model, shared_data, bucket):
    """A calibrated precision launched into the object store: its AWQ checkpoint is published under quantized/ of the
    location (so a relaunch on another machine does not calibrate again)."""
    study = write_study(tmp_path / "s.py", f"""
        study = Study(name="{bucket.scheme}awq", models=[{str(tiny_model)!r}], precisions=["awq4"],
                      compute_dtypes=["fp32"], benchmark={fast_benchmark()}, kl=False,
                      precision_options={{"awq4": {{"group_size": 64, "calib_samples": 2, "calib_seq_len": 64,
                                                   "scale_search": 4}}}})
    """)
    r = sweep("launch", str(study), "--results", bucket.uri("awq"))
    assert r.returncode == 0, r.stdout + r.stderr
    keys = bucket.keys("awq/quantized/")
    assert any(k.endswith("/meta.json") for k in keys) and any(k.endswith("/weights.pt") for k in keys), keys
