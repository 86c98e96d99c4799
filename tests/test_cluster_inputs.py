"""A study's local inputs that a node which may run its trials cannot see stop `sweep launch --address` before the
sweep starts (exit 2, one line naming the node and the paths): sweeper/cluster_inputs.py."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

from cluster_harness import WORKER_IP
from helpers import fast_benchmark, sweep, write_study
from sweeper.cluster_inputs import local_inputs
from sweeper.studyfile import load_study_file
from sweeper.trials import expand


def test_local_inputs_are_the_files_trials_open(tmp_path, real_model, shared_data):
    wiki = shared_data / "wikitext-2" / "test.txt"
    calib = shared_data / "wikitext-2" / "valid.txt"
    piqa = tmp_path / "piqa.jsonl"
    piqa.write_text("")
    study = write_study(tmp_path / "s.py", f"""
        study = Study(name="inputs", models=[{str(real_model)!r}, "org/hub-model"],
                      precisions=["fp32", "awq4"], compute_dtypes=["fp32"],
                      precision_options={{"awq4": {{"calib_data": {str(calib)!r}}}}},
                      tasks=[Task("piqa", data={{"validation": {str(piqa)!r}, "train": {str(tmp_path / 'no.jsonl')!r}}})],
                      perplexity=Perplexity(path={str(wiki)!r}))
    """)
    trials, _ = expand(load_study_file(str(study)))

    assert local_inputs(trials) == [
        ("model folder", str(real_model)), ("perplexity text", str(wiki)),
        ("task piqa data (validation)", str(piqa)), ("awq4 calibration text", str(calib)),
    ], "hub ids and paths missing here are not inputs a node must see"


def test_launch_stops_when_the_worker_node_cannot_see_the_model_or_text(two_node_cluster, real_model, shared_data,
                                                                       tmp_path):
    c = two_node_cluster
    hidden_model = c.results_root / "models" / "llama-4m-copy"  # under the worker node's tmpfs over the results folder
    shutil.copytree(real_model, hidden_model)
    text = tmp_path / "wiki.txt"  # under the worker node's tmpfs over /tmp
    shutil.copy(shared_data / "wikitext-2" / "test.txt", text)
    study = write_study(tmp_path / "study.py", f"""
        study = Study(name="hidden-inputs", models=[{str(hidden_model)!r}, {str(real_model)!r}], precisions=["fp32"],
                      compute_dtypes=["fp32"], perplexity=Perplexity(path={str(text)!r}, context=64, max_tokens=128),
                      benchmark={fast_benchmark()}, kl=False)
    """)
    results = c.results_root / "hidden-inputs"

    r = sweep("launch", str(study), "--address", c.address, "--results", str(results), "--no-warm-workers",
              cwd=tmp_path, timeout=600)

    assert r.returncode == 2, r.stdout + r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    line = r.stderr.strip()
    assert f"Ray node {WORKER_IP} (node id {c.worker_node_id[:12]}) cannot see" in line, line
    assert f"model folder {hidden_model}" in line and f"perplexity text {text}" in line, line
    assert f"{real_model}," not in line and not line.endswith(str(real_model)), "the shared model is visible"
    assert not (results / "_log").exists() and not (results / "data").exists() and not (results / "study.json").exists(), \
        "nothing ran, nothing written"


def test_inputs_every_node_sees_pass_the_check(two_node_cluster, real_model, shared_data):
    c = two_node_cluster
    code = textwrap.dedent(f"""
        import json, ray
        from sweeper import Study, Perplexity
        from sweeper.cluster_inputs import check_inputs_visible, local_inputs
        from sweeper.trials import expand
        study = Study(name="visible", models=[{str(real_model)!r}], precisions=["fp32"], compute_dtypes=["fp32"],
                      perplexity=Perplexity(path={str(shared_data / "wikitext-2" / "test.txt")!r}), kl=False)
        trials, _ = expand(study)
        ray.init(address={c.address!r}, logging_level="ERROR", log_to_driver=False)
        check_inputs_visible(trials, {c.address!r})  # raises UserError if a node cannot see one
        print(json.dumps({{"nodes": sum(n["Alive"] for n in ray.nodes()), "inputs": len(local_inputs(trials))}}))
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout.strip().splitlines()[-1]) == {"nodes": 2, "inputs": 2}


def test_a_node_too_small_for_any_trial_is_not_asked(two_node_cluster, real_model):
    """Only nodes that may run a trial must see its inputs: with 2 CPUs per trial neither 1-CPU node qualifies, so a
    model folder the worker node cannot see stops nothing (Ray would never place a trial there)."""
    c = two_node_cluster
    hidden_model = c.results_root / "models" / "too-small"
    shutil.copytree(real_model, hidden_model)
    code = textwrap.dedent(f"""
        import ray
        from sweeper import Study, Resources
        from sweeper.cluster_inputs import check_inputs_visible
        from sweeper.trials import expand
        study = Study(name="big", models=[{str(hidden_model)!r}], precisions=["fp32"], compute_dtypes=["fp32"],
                      kl=False, resources=Resources(cpus_per_trial={{cpus}}))
        ray.init(address={c.address!r}, logging_level="ERROR", log_to_driver=False)
        check_inputs_visible(expand(study)[0], {c.address!r})
        print("passed")
    """)
    runs = {cpus: subprocess.run([sys.executable, "-c", code.replace("{cpus}", str(cpus))], capture_output=True,
                                 text=True, timeout=300) for cpus in (2, 1)}
    assert runs[2].returncode == 0 and runs[2].stdout.strip().endswith("passed"), runs[2].stderr[-3000:]
    assert runs[1].returncode == 1 and f"Ray node {WORKER_IP}" in runs[1].stderr, "a 1-CPU trial may run there"
