"""A results location on Google Cloud Storage (issue 18): `--results gs://bucket/study` against fake-gcs-server,
started by the test on 127.0.0.1, which honours ``ifGenerationMatch`` as GCS does (docs/store.md, "Object stores").

The object-store tests whose body is the same for S3 and GCS are tests/test_store_s3.py's, collected here again with
this module's ``bucket`` fixture; the tests below are GCS's own."""
from __future__ import annotations

import pytest

from helpers import GcsBucket, fake_gcs, served_bucket, small_study, sweep
from test_store_s3 import (  # noqa: F401 - collected here with this module's `bucket`
    test_an_object_is_read_into_memory_arrow_owns,
    test_awq_checkpoint_lands_in_the_bucket,
    test_checkpoint_cache_is_published_to_and_filled_from_the_bucket,
    test_compaction_segments_and_checkpoint,
    test_exclusive_create_and_lease_takeover_races,
    test_kl_reference_goes_through_the_bucket,
    test_launch_kill_relaunch_query_report_and_damaged_object,
    test_one_launch_per_location_stale_lease_and_fencing,
)

BUCKET = "sweeper-test"


@pytest.fixture()
def bucket(tmp_path, monkeypatch):
    """fake-gcs-server with a bucket, and the environment the `sweep` subprocesses (and this process) use."""
    with served_bucket("gs", BUCKET, monkeypatch, tmp_path / "work") as b:
        yield b


def test_gcs_a_server_that_ignores_preconditions_is_refused(tmp_path, tiny_model, monkeypatch):
    """gcp-storage-emulator, a GCS server that accepts an upload with ifGenerationMatch=0 over an existing object,
    would let two commits take one number: `sweep launch` refuses the location (exit 2, one line naming why), leaving
    no probe object and no lease behind."""
    pytest.importorskip("gcp_storage_emulator")
    study = small_study(tmp_path / "s.py", tiny_model, ["fp32"], "gslax")
    with fake_gcs(BUCKET, honours_preconditions=False) as env:
        lax = GcsBucket(BUCKET, env)
        lax.put("check", b"1")
        lax.bucket.blob("check").upload_from_string(b"2", if_generation_match=0)  # accepted: the server ignores it
        lax.delete("check")
        r = sweep("launch", str(study), "--results", lax.uri("lax"), env={**env, "SWEEPER_WORK_DIR": str(tmp_path)})
        err = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(err) == 1, r.stdout + r.stderr
        assert "ignores conditional writes (ifGenerationMatch=0)" in err[0] and lax.uri("lax") in err[0]
        assert lax.keys("") == []


def test_gcs_unreachable_location_no_credentials_and_bad_input_exit_2_with_one_line(tmp_path, tiny_model, bucket):
    """A bucket that does not exist, the server gone, credentials that cannot be found, and --fresh on a URI: exit 2
    and one line naming the location; a location that became unreachable after its log was read is an error, never
    damage (no good trial is retracted)."""
    from sweeper.location import LocationError
    from sweeper.store import ResultsStore

    study = small_study(tmp_path / "s.py", tiny_model, ["fp32"], "gsbad")
    gone = {"STORAGE_EMULATOR_HOST": "http://127.0.0.1:9"}
    no_credentials = {"STORAGE_EMULATOR_HOST": "", "GOOGLE_APPLICATION_CREDENTIALS": str(tmp_path / "none.json")}
    cases = [(("results", "gs://no-such-bucket/x"), {}, "results location gs://no-such-bucket/x: cannot use it"),
             (("launch", str(study), "--results", "gs://no-such-bucket/x"), {}, "gs://no-such-bucket/x: cannot use"),
             (("results", bucket.uri("gone")), gone, f"results location {bucket.uri('gone')}: cannot use it"),
             (("results", bucket.uri("x")), no_credentials, "GOOGLE_APPLICATION_CREDENTIALS"),
             (("launch", str(study), "--results", bucket.uri("fresh"), "--fresh"), {}, "give a new prefix instead")]
    for args, env, want in cases:
        r = sweep(*args, env=env)
        err = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(err) == 1 and want in err[0], (args, r.stdout + r.stderr)
    assert not bucket.keys("fresh/")

    uri = bucket.uri("later")
    store = ResultsStore(uri)
    store.take_over("owner")
    store.write_trial({"trial_id": "t1", "status": "done", "attempt": 1},
                      [{"trial_id": "t1", "stage": "load", "metric": "m", "value": 1.0}])
    store.forget()
    store.state()
    store.loc.__dict__.update(_fs=None, _client=None)  # clients made again, now for a server that is gone
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STORAGE_EMULATOR_HOST", gone["STORAGE_EMULATOR_HOST"])
        mp.setattr(type(store.loc), "RETRY_S", 2)
        with pytest.raises(LocationError, match=f"results location {uri}: cannot use it"):
            store.quarantine_damaged()
    assert ResultsStore(uri).trial_status() == {"t1": "done"}
