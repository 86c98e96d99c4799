"""Worker nodes need no mount (issue 18, point 2): trials on a node that sees neither the results folder nor the
launching machine's /tmp commit through the launch's StoreWriter actor (sweeper/remote_store.py), get the baseline's
KL reference from it, and cache checkpoints node-locally; every file ends up at the launching machine's location."""
from __future__ import annotations

from helpers import fast_benchmark, fast_kl, read_metrics, read_trials, sweep, write_study
from sweeper.store import ResultsStore


def test_a_sweep_with_kl_completes_on_a_worker_node_without_the_results_folder(two_node_cluster, real_model,
                                                                               shared_data, tmp_path):
    c = two_node_cluster
    # one CPU a node and one CPU a trial: two trials at a time means one on each node
    study = write_study(tmp_path / "study.py", f"""
        study = Study(name="no-mount", models=[{str(real_model)!r}], precisions=["fp32", "bf16", "int8", "nf4",
                      "fp4", "fp16"], compute_dtypes=["fp32"], benchmark={fast_benchmark()}, kl={fast_kl()})
    """)
    results = c.results_root / "no-mount"  # the worker node sees an empty tmpfs here

    r = sweep("launch", str(study), "--address", c.address, "--results", str(results), "--no-warm-workers",
              "--max-concurrent", "2", cwd=tmp_path, timeout=900)

    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    rows = read_trials(results)
    assert len(rows) == 6 and set(rows["status"]) == {"done"}, rows.select("precision", "status", "error").to_dicts()
    assert set(rows["ray_node_id"]) == {c.head_node_id, c.worker_node_id}, "trials ran on both nodes"
    kl = read_metrics(results).filter(stage="kl", metric="kl_mean")
    assert set(kl["trial_id"]) == set(rows["trial_id"]), "every trial measured KL against the baseline's reference"
    # every file at the launching machine's location: the baseline's reference committed with its trial, and nothing
    # damaged or missing (each committed file is opened and checked)
    store = ResultsStore(results)
    assert store.damaged_files(full=True) == []
    (ref_id,) = set(rows["kl_reference_id"])
    assert store.ref_path(ref_id).is_file()
    assert "summary: 6/6 done, 0 failed, 0 pending" in out, out[-2000:]


def test_the_writer_commits_a_remote_baseline_with_its_reference_waits_on_claims_and_is_fenced(tmp_path):
    """The StoreWriter's body without Ray: a baseline's reference bytes land in refs/ and in its commit; a claim waits
    for a flock held elsewhere (an orphan) and is re-entrant for this launch; an ended launch's writer is refused."""
    import threading

    import pytest

    from sweeper.lock import TrialClaim
    from sweeper.remote_store import StoreWriterImpl
    from sweeper.store import OwnershipLost

    root = tmp_path / "res"
    launch = ResultsStore(root)
    launch.take_over("launch-A")
    writer = StoreWriterImpl(str(root), "launch-A")
    row = {"trial_id": "B", "study": "s", "model": "m", "precision": "fp32", "compute_dtype": "fp32",
           "status": "done", "attempt": 1, "is_baseline": True, "kl_reference_id": "ref1"}
    writer.write_trial(row, [{"trial_id": "B", "stage": "load", "metric": "weights_bytes", "value": 1.0}], None,
                       b"reference bytes")
    assert (root / "refs" / "ref1.parquet").read_bytes() == b"reference bytes"
    assert launch.state().trials["B"].status == "done"
    assert writer.reference("ref1") == b"reference bytes" and writer.reference("nope") is None

    orphan = TrialClaim(root, "T").__enter__()  # an orphan of a killed launch still runs T
    got = []
    waiter = threading.Thread(target=lambda: got.append(writer.claim("T")))
    waiter.start()
    waiter.join(0.5)
    assert waiter.is_alive(), "the writer took a claim an orphan holds"
    orphan.__exit__(None, None, None)
    waiter.join(10)
    assert got == [None]
    assert writer.claim("T") is None, "a retry of this launch takes over its dead attempt's claim"
    writer.release("T")

    ResultsStore(root).take_over("launch-B")
    with pytest.raises(OwnershipLost):
        writer.write_trial({**row, "trial_id": "C", "is_baseline": False}, [], None, None)


def test_a_remote_trial_caches_checkpoints_in_the_results_folder_only_where_its_node_sees_it(tmp_path):
    from sweeper.remote_store import RemoteStore, node_local_dir

    seen = tmp_path / "results"
    seen.mkdir()
    assert RemoteStore(None, str(seen), "t").root == seen, "a shared mount: one cache for every node"
    unseen = str(tmp_path / "not-on-this-node")
    local = RemoteStore(None, unseen, "t").root
    assert local == node_local_dir(unseen) / "cache" and local.is_dir() and not local.is_relative_to(tmp_path)
    assert not list(local.parent.glob("*/refs/*")), "the KL stage's sibling look must find no node-local copy"
    local.rmdir()
    local.parent.rmdir()
