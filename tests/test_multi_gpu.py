"""Trials bigger than one GPU, without GPUs: a Llama-3-70B-shaped config (transformers' config only, the model built
on the meta device) on a described node of 4 x 80 GB GPUs (1 GB = 1e9 bytes here).

With the default study settings (no tasks) the estimate is 143.0 GB for fp16 (141.1 GB of weights + 1.9 GB KV cache,
logits and context): 2 GPUs; int8 74.6 GB: 0.95 of one GPU; nf4 44.6 GB: 0.6 of one."""
from __future__ import annotations

import dataclasses
import os

import pytest

from helpers import sweep, write_study
from sweeper import Model, Resources, Study, precisions
from sweeper.errors import StageError, UserError
from sweeper.resources import model_shape, share_function, spread_shares

GB = 1e9


@pytest.fixture(scope="module")
def llama70b(tmp_path_factory):
    from transformers import AutoConfig

    cfg = AutoConfig.for_model("llama", vocab_size=128256, hidden_size=8192, intermediate_size=28672,
                               num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                               max_position_embeddings=8192, rope_theta=500000.0)
    d = tmp_path_factory.mktemp("llama70b")
    cfg.save_pretrained(d)
    return str(d)


def _plan(tmp_path, model, resources=""):
    from sweeper import launch as L

    f = write_study(tmp_path / "s.py", f"study = Study(name='big', models=[{model!r}], "
                                       f"precisions=['fp16', 'int8', 'nf4'], kl=False{resources})\n")
    p, _ = L.plan(str(f), str(tmp_path / "res"))
    return L, p


def test_a_trial_bigger_than_one_gpu_gets_whole_gpus_of_one_node(tmp_path, llama70b):
    L, p = _plan(tmp_path, llama70b)
    shape = model_shape(Model(llama70b))
    assert 70.5e9 < shape.linear_params + shape.unquantized_params < 70.6e9  # Llama-3-70B: 70.55B parameters
    share_for = share_function(80 * GB, 4)
    estimated = {t.precision: share_for(p.study, t.model, t.precision, t.compute_dtype) for t in p.trials}
    # fp16 (143.0 GB) needs 2 whole GPUs; int8 (74.6 GB) and nf4 (44.6 GB) fit one, as fractions < 1
    assert estimated == {"fp16": 2.0, "int8": 0.95, "nf4": 0.6}
    sized = L.size_for_node(p, 4, 80 * GB)
    # the three trials run at once on the node: the fractions are spread to a GPU each, fp16 keeps its two
    assert {t.precision: t.gpu_share for t in sized.trials} == {"fp16": 2.0, "int8": 1.0, "nf4": 1.0}
    est = {t.precision: sized.estimates[t.trial_id] for t in sized.trials}
    assert 140 * GB < est["fp16"] < 150 * GB and 70 * GB < est["int8"] < 80 * GB and 40 * GB < est["nf4"] < 50 * GB
    # spreading fractional shares over the node's GPUs never lowers a whole-GPU count
    assert spread_shares([2.0] + [0.05] * 7, gpus=2) == [2.0] + [0.25] * 7


def test_pinned_whole_gpus_and_what_ray_is_asked_for(tmp_path, llama70b):
    from sweeper.scheduler import trial_resources

    L, p = _plan(tmp_path, llama70b, ", resources=Resources(gpus_per_trial=2)")
    sized = L.for_cluster(p, share_function(80 * GB, 4), cluster_gpus=8, node_gpus=4)
    assert {t.gpu_share for t in sized.trials} == {2.0}
    two = trial_resources({"case": {"spec": sized.trials[0].to_dict()}})
    # one bundle (a bundle is never split over nodes), STRICT_PACK, a whole number of GPUs
    assert two.bundles == [{"CPU": 1, "GPU": 2}] and two.strategy == "STRICT_PACK"
    frac = trial_resources({"case": {"spec": {**sized.trials[0].to_dict(), "gpu_share": 0.25}}})
    assert frac.bundles == [{"CPU": 1, "GPU": 0.25}]
    cpu = trial_resources({"case": {"spec": {**sized.trials[0].to_dict(), "gpu_share": 0.0}}})
    assert cpu.bundles == [{"CPU": 1}]
    # pinned to more GPUs than any node has: refused before the sweep
    L, p = _plan(tmp_path, llama70b, ", resources=Resources(gpus_per_trial=8)")
    with pytest.raises(UserError, match=r"gpus_per_trial=8: the largest node of the cluster has 4 GPU"):
        L.for_cluster(p, share_function(80 * GB, 4), cluster_gpus=8, node_gpus=4)


def test_a_trial_that_fits_no_node_is_refused_with_the_numbers(tmp_path, llama70b):
    L, p = _plan(tmp_path, llama70b)
    with pytest.raises(UserError) as e:
        L.size_for_node(p, 2, 24 * GB)
    msg = str(e.value)
    assert "fp16/fp16: estimated peak 143.0 GB needs 7 GPUs of 24 GB on one node" in msg, msg
    assert "the largest node has 2 x 24 GB" in msg


def _spec(tmp_path, llama70b, precision, gpus):
    from sweeper.trials import expand

    study = Study(name="big", models=[llama70b], precisions=["fp16", "int8", "nf4"], kl=False)
    spec = next(t for t in expand(study)[0] if t.precision == precision)
    return dataclasses.replace(spec, gpu_share=float(gpus))


def _device_sizes(spec, dmap):
    """Bytes each GPU of ``dmap`` holds, with accelerate's sizes of the meta model at the map's dtypes."""
    import torch
    from accelerate import init_empty_weights
    from accelerate.utils import compute_module_sizes
    from transformers import AutoConfig, AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(spec.model.id), dtype=torch.float16)
    sizes = compute_module_sizes(model)
    out: dict[int, int] = {}
    for name, dev in dmap.items():
        out[dev] = out.get(dev, 0) + sizes[name]
    return out


def test_the_device_map_uses_exactly_the_trials_gpus_within_max_memory(tmp_path, llama70b):
    from sweeper.resources import gpu_max_memory
    from sweeper.stages.load import device_map

    spec = _spec(tmp_path, llama70b, "fp16", 2)
    node = [80 * GB] * 2  # the two GPUs Ray gave the trial, visible as 0 and 1
    dmap = device_map(spec, precisions.get("fp16"), node)
    assert set(dmap.values()) == {0, 1}
    assert dmap["model.embed_tokens"] == 0 and dmap["lm_head"] == 1
    max_memory = gpu_max_memory(spec, model_shape(spec.model), node)
    held = _device_sizes(spec, dmap)
    assert sum(held.values()) > 140 * GB  # every weight of the 70B model is on one of the two
    for dev, size in held.items():
        assert size <= max_memory[dev] < 80 * GB, (dev, size, max_memory)
    # int8 pinned to 2 GPUs (it would fit one): balanced over both, nothing beyond them
    dmap8 = device_map(_spec(tmp_path, llama70b, "int8", 2), precisions.get("int8"), node)
    assert set(dmap8.values()) == {0, 1}
    layers = [d for name, d in dmap8.items() if name.startswith("model.layers.")]
    assert 30 <= layers.count(0) <= 50, layers
    # too little memory for the trial's GPUs: refused, never spilled to CPU or disk
    with pytest.raises(StageError, match=r"does not fit 2 GPUs of 60 GB"):
        device_map(spec, precisions.get("fp16"), [60 * GB] * 2)


def test_dry_run_shows_each_trials_gpus_and_refuses_a_node_too_small(tmp_path, llama70b):
    f = write_study(tmp_path / "s.py", f"study = Study(name='big', models=[{llama70b!r}], "
                                       "precisions=['fp16', 'int8', 'nf4'], kl=False)\n")
    r = sweep("launch", str(f), "--results", str(tmp_path / "res"), "--dry-run", "--node-gpus", "4x80GB")
    assert r.returncode == 0, r.stderr
    rows = {p: next(line for line in r.stdout.splitlines() if f"┆ {p} " in line) for p in ("fp16", "int8", "nf4")}
    assert "2 whole" in rows["fp16"] and " 143 " in rows["fp16"], r.stdout
    assert "1 whole" in rows["int8"] and "74.6" in rows["int8"] and "44.6" in rows["nf4"], r.stdout
    assert "(dry run: GPUs sized for one node of 4x80GB)" in r.stdout
    r = sweep("launch", str(f), "--results", str(tmp_path / "res"), "--dry-run", "--node-gpus", "2x24GB")
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(err) == 1, r.stdout + r.stderr
    assert "estimated peak 143.0 GB needs 7 GPUs of 24 GB" in err[0] and "largest node has 2 x 24 GB" in err[0]
    r = sweep("launch", str(f), "--dry-run", "--node-gpus", "four")
    assert r.returncode == 2 and "--node-gpus 'four': give GPUs x memory per GPU in GB, e.g. 4x80GB" in r.stderr
    r = sweep("launch", str(f), "--node-gpus", "4x80GB")
    assert r.returncode == 2 and "--node-gpus 4x80GB: only with --dry-run" in r.stderr, r.stderr


def test_rows_record_every_gpu_the_trial_holds(monkeypatch):
    """A trial of two whole GPUs (faked: torch's view of the two devices Ray made visible) records both."""
    import types

    import torch

    from sweeper.environment import device_environment
    from sweeper.store import TRIALS_SCHEMA

    gpus = [types.SimpleNamespace(name="NVIDIA H100 80GB HBM3", uuid=f"GPU-{i}aaa", total_memory=85_000_000_000,
                                  major=9, minor=0) for i in range(2)]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: gpus[i])
    env = device_environment("cuda")
    assert env["gpu_count"] == 2
    assert env["gpu_devices"] == "NVIDIA H100 80GB HBM3 GPU-0aaa,NVIDIA H100 80GB HBM3 GPU-1aaa"
    assert device_environment("cpu")["gpu_count"] == 0
    assert {"gpu_count", "gpu_devices"} <= set(TRIALS_SCHEMA.names)  # the row keeps them


def test_memory_and_timing_cover_every_gpu_of_a_split_model(monkeypatch):
    """Faked two-GPU view: the peak is the sum of both GPUs' peaks, and each latency mark waits for both GPUs (an
    event on GPU 0's stream would miss the layers on GPU 1)."""
    import torch

    from sweeper.measure import LatencyRecorder, PeakMemory

    synced, reset = [], []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda i=None: synced.append(i))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda i=None: reset.append(i))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda i=None: {0: 70 * 10**9, 1: 60 * 10**9}[i])
    peak = PeakMemory("cuda")
    with peak.track():
        pass
    assert peak.peak_bytes == 130 * 10**9 and sorted(reset) == [0, 1]
    synced.clear()
    rec = LatencyRecorder("cuda")
    rec.mark()
    rec.mark()
    assert synced == [0, 1, 0, 1]
    assert len(rec.elapsed_ms()) == 1 and rec.elapsed_ms()[0] >= 0


def test_precisions_that_load_onto_one_gpu_are_refused_beyond_one(tmp_path, llama70b):
    """HQQ quantizes onto one device and AWQ's checkpoint loads onto one: a trial of them bigger than a GPU is refused
    before the sweep (auto), or fails its load with PrecisionUnsupported (pinned), never loads half-placed."""
    from sweeper.stages.load import trial_gpus_device_map

    study = Study(name="big", models=[llama70b], precisions=["fp16", "hqq4"], compute_dtypes=["bf16"], kl=False)
    share_for = share_function(80 * GB, 4)
    with pytest.raises(UserError, match=r"hqq4/bf16: estimated peak 143.0 GB exceeds one GPU of 80 GB, and hqq4 "
                                        r"loads onto one GPU"):
        share_for(study, Model(llama70b), "hqq4", "bf16")
    spec = dataclasses.replace(_spec(tmp_path, llama70b, "fp16", 2), precision="hqq4")
    with pytest.raises(StageError, match="hqq4 loads onto one GPU; this trial holds 2"):
        trial_gpus_device_map(spec, precisions.get("hqq4"))


@pytest.mark.parametrize("preload", [False, True], ids=["as-ray-comes", "preloaded"])
def test_tune_gives_a_trial_its_whole_gpus_and_only_those(tmp_path, preload):
    """On a real local Ray with 4 logical GPUs (no GPU needed: Ray assigns ids from its resource table and sets
    CUDA_VISIBLE_DEVICES per trial), the scheduler's request gives a 2-GPU trial two GPUs of one node, visible to it
    alone, and a fractional trial one. ``preloaded``: the same in processes that imported torch, transformers and
    the rest before Ray gave them a GPU, as on a node started by cluster.yaml (sweeper/node_preload.py)."""
    import ray
    from ray import tune

    from sweeper import local_ray
    from sweeper.scheduler import trial_resources

    def report_gpus(config):  # defined here: Ray pickles it by value (the workers cannot import this test module)
        import os
        import sys

        preload = sys.modules.get("sweeper.node_preload")  # read, never imported (importing it runs the preload)
        tune.report({"gpu_ids": ",".join(sorted(str(g) for g in ray.get_gpu_ids())),
                     "visible": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
                     "preloaded": getattr(preload, "preloaded_at", None) is not None})

    shares = [2.0, 2.0, 0.5]
    # ray.init sets variables in this process's environment (RAY_AUTH_MODE=token among them) that every later
    # subprocess of the test session would inherit: a later `sweep launch --address` then failed to run any trial on a
    # cluster started with auth disabled. Put the environment back afterwards.
    saved_env = dict(os.environ)
    kwargs = dict(address="local", num_cpus=3, num_gpus=4, include_dashboard=False, log_to_driver=False)
    if preload:  # the node's idle workers (one per CPU) preload sweeper, as RAY_preload_python_modules makes them
        kwargs["_system_config"] = {"preload_python_modules": [local_ray.PRELOAD_MODULE]}
    ray.init(**kwargs)
    if preload:  # as a launch treats a cluster whose every node preloads: Tune's actors go into those processes
        local_ray.joined(preloading=True)
    try:
        tuner = tune.Tuner(
            tune.with_resources(report_gpus, trial_resources),
            param_space={"case": tune.grid_search([{"spec": {"cpus": 1, "gpu_share": s, "i": i}}
                                                   for i, s in enumerate(shares)])},
            run_config=tune.RunConfig(storage_path=str(tmp_path), verbose=0))
        with local_ray.tune_actors_without_runtime_env():  # as the scheduler runs Tune
            rows = [(r.config["case"]["spec"]["gpu_share"], r.metrics) for r in tuner.fit()]
    finally:
        ray.shutdown()
        local_ray.forget()
        os.environ.clear()
        os.environ.update(saved_env)
    assert len(rows) == 3
    for share, m in rows:
        ids = m["gpu_ids"].split(",")
        assert len(ids) == (2 if share == 2.0 else 1), (share, m)
        assert sorted(m["visible"].split(",")) == sorted(ids), m  # the trial sees exactly its GPUs
        assert m["preloaded"] is preload, m
