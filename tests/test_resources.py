"""GPU shares from the memory estimate (no GPU needed: the estimate reads only the model's config)."""
from __future__ import annotations

from collections import Counter

import pytest

from sweeper import Benchmark, Model, Resources, Study
from sweeper.resources import estimate_peak_bytes, gpu_share, model_shape, share_function
from sweeper.trials import expand, trial_share

GB = 1e9


@pytest.fixture(scope="module")
def llama8b_config(tmp_path_factory):
    from transformers import AutoConfig

    cfg = AutoConfig.for_model("llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                               num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8)
    d = tmp_path_factory.mktemp("llama8b")
    cfg.save_pretrained(d)
    return d


def test_estimate_follows_bytes_per_parameter(llama8b_config):
    shape = model_shape(Model(str(llama8b_config)))
    assert 7.9e9 < shape.linear_params + shape.unquantized_params < 8.1e9  # Llama-3-8B has 8.03B parameters
    study = Study(name="s", models=[str(llama8b_config)], precisions=["fp16", "int8", "nf4"],
                  benchmark=Benchmark(prompt_tokens=128, new_tokens=64, batch_sizes=(1, 8)))
    est = {p: estimate_peak_bytes(study, shape, p, "fp16") for p in ("fp16", "int8", "nf4")}
    assert 16 * GB < est["fp16"] < 20 * GB
    assert est["nf4"] < est["int8"] < est["fp16"]
    # on an 80 GB GPU: fp16 needs about a quarter, 4-bit fits in a tenth or less
    assert gpu_share(est["fp16"], 80 * GB) in (0.2, 0.25)
    assert gpu_share(est["nf4"], 80 * GB) <= 0.1


def test_precisions_quantized_after_a_full_load_are_budgeted_at_full_size(llama8b_config):
    # HQQ quantizes a model loaded at the compute dtype, AWQ calibrates one: their share must hold that load,
    # or each such trial would run out of memory in its load and be retried at doubled shares
    shape = model_shape(Model(str(llama8b_config)))
    study = Study(name="s", models=[str(llama8b_config)], precisions=["bf16", "nf4", "hqq4", "awq4"],
                  compute_dtypes=["bf16"])
    est = {p: estimate_peak_bytes(study, shape, p, "bf16") for p in ("bf16", "nf4", "hqq4", "awq4")}
    assert est["nf4"] < 8 * GB
    assert est["hqq4"] == est["awq4"] == est["bf16"]


def test_share_rounding_and_bounds():
    assert gpu_share(1, 80 * GB) == 0.05  # at least 0.05
    assert gpu_share(80 * GB, 80 * GB) == 1.0  # a whole GPU
    assert gpu_share(81 * GB, 80 * GB) == 2.0  # beyond one GPU: whole GPUs (tests/test_multi_gpu.py)
    assert gpu_share(4.01 * GB, 80 * GB) == 0.1  # rounded up to the next 0.05


def gpu_shares(study, gpu_share_for):
    """Each trial's share on a GPU cluster, as launch.for_cluster decides it before spreading."""
    return {t.precision: trial_share(study, t.model, t.precision, t.compute_dtype, gpu_share_for, True)
            for t in expand(study)[0]}


def test_auto_shares_on_gpu_clusters_and_pinned_when_asked(llama8b_config):
    study = Study(name="s", models=[str(llama8b_config)], precisions=["fp16", "nf4"])
    shares = gpu_shares(study, share_function(80 * GB))
    assert 0 < shares["nf4"] < shares["fp16"] < 1
    cpu, _ = expand(study)
    assert {t.gpu_share for t in cpu} == {0.0}
    pinned = Study(name="s", models=[str(llama8b_config)], precisions=["fp16", "nf4"],
                   resources=Resources(gpus_per_trial=0.5))
    assert set(gpu_shares(pinned, share_function(80 * GB)).values()) == {0.5}


def test_unreadable_config_falls_back_to_a_whole_gpu(tmp_path):
    study = Study(name="s", models=["no-such-org/no-such-model"], precisions=["fp16"])
    assert gpu_shares(study, share_function(80 * GB)) == {"fp16": 1.0}


def test_local_gpu_memory_reads_nvidia_smi_and_honours_visible_devices(tmp_path, monkeypatch):
    from sweeper.scheduler import _local_gpu_memory_bytes

    fake = tmp_path / "nvidia-smi"  # prints what `nvidia-smi --query-gpu=index,uuid,memory.total ...` prints
    fake.write_text("#!/bin/sh\nprintf '0, GPU-aa11, 81559\\n1, GPU-5e1f, 40960\\n2, GPU-77c0, 143771\\n'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert _local_gpu_memory_bytes() == 40960 * 2**20  # the smallest GPU bounds every share
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,2")
    assert _local_gpu_memory_bytes() == 81559 * 2**20
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-77c0,GPU-aa")  # UUIDs, whole or a unique prefix
    assert _local_gpu_memory_bytes() == 81559 * 2**20
    from sweeper.resources import local_gpus

    assert local_gpus() == {"GPU-77c0": 143771, "GPU-aa": 81559}  # named as Ray names them to its workers
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-ffff")  # no such GPU
    assert _local_gpu_memory_bytes() is None
    for hidden in ("", "NoDevFiles"):  # every GPU hidden, as Ray reads these too
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", hidden)
        assert local_gpus() == {} and _local_gpu_memory_bytes() is None
    monkeypatch.setenv("PATH", str(tmp_path / "none"))
    assert _local_gpu_memory_bytes() is None


def test_spread_shares_fill_every_gpu_when_trials_fit_at_once():
    from sweeper.resources import spread_shares

    assert spread_shares([0.05] * 8, gpus=2) == [0.25] * 8  # 4 per GPU instead of 8 on GPU 0
    assert spread_shares([0.05] * 3, gpus=2) == [0.5] * 3  # 2 + 1: all three still run at once
    assert spread_shares([0.05] * 8, gpus=1) == [0.125] * 8  # one GPU: all 8 still fit
    assert spread_shares([0.05] * 16, gpus=2) == [0.125] * 16  # 8 + 8, not 10 + 6 (as 0.1 would give)
    assert spread_shares([0.05] * 6, gpus=2) == [0.3333] * 6  # 3 per GPU; 4 x 0.3333 would not fit
    assert spread_shares([0.05] * 20, gpus=1) == [0.05] * 20  # exactly the 0.05 slots
    assert spread_shares([0.05] * 21, gpus=1) == [0.05] * 21
    assert spread_shares([0.05] * 30, gpus=1) == [0.05] * 30  # more trials than slots: the estimate stands
    assert spread_shares([0.05, 0.6, 0.05], gpus=2) == [0.5, 0.6, 0.5]  # a larger estimate is kept
    assert spread_shares([0.05, 0.05], gpus=2) == [1.0, 1.0]  # one trial per GPU
    assert spread_shares([0.05] * 8, gpus=2, max_concurrent=2) == [1.0] * 8  # 2 at a time: a GPU each
    assert spread_shares([0.0, 0.0], gpus=0) == [0.0, 0.0]  # CPU cluster


def test_ray_packs_fractional_gpus_onto_one_gpu_and_spread_shares_undo_it():
    """The Ray behaviour spread_shares exists for, on a real local Ray with 2 logical GPUs (no GPU needed: Ray
    assigns GPU ids from its resource table and sets CUDA_VISIBLE_DEVICES per actor)."""
    import ray

    from sweeper.resources import spread_shares

    @ray.remote
    class Holder:
        def gpu(self):
            return tuple(ray.get_gpu_ids())

    ray.init(address="local", num_cpus=8, num_gpus=2, include_dashboard=False, log_to_driver=False)
    try:
        def placement(share, n=8):
            actors = [Holder.options(num_cpus=0, num_gpus=share).remote() for _ in range(n)]  # alive at once
            ids = ray.get([a.gpu.remote() for a in actors], timeout=120)
            for a in actors:
                ray.kill(a)
            return sorted(Counter(g for ids_ in ids for g in ids_).values())

        assert placement(0.05) == [8]  # 8 x 0.05: all on one GPU
        assert placement(spread_shares([0.05] * 8, gpus=2)[0]) == [4, 4]  # 8 x 0.25: both GPUs
        # 16 x 0.125: exactly 8 fit on each GPU (at 0.1, 10 fit, and Ray split them 10 + 6 on the H200s, run17)
        assert placement(spread_shares([0.05] * 16, gpus=2)[0], 16) == [8, 8]
    finally:
        ray.shutdown()


def test_for_cluster_gives_the_clusters_shares_and_spreads_only_pending_trials(tmp_path, llama8b_config):
    """`sweep launch` plans once before Ray starts (shares 0), then for_cluster sets the shares of the cluster Ray
    reports: estimates on GPUs, raised so the trials not done yet spread over the GPUs."""
    from sweeper import launch as L
    from sweeper.runner import config_row

    study_file = tmp_path / "s.py"
    study_file.write_text(f'from sweeper import Study\nstudy = Study(name="s", models=[{str(llama8b_config)!r}], '
                          'precisions=["fp16", "nf4", "int8"], compute_dtypes=["fp16"])\n')
    p, _ = L.plan(str(study_file), str(tmp_path / "res"))
    assert {t.gpu_share for t in p.trials} == {0.0}
    estimated = L.for_cluster(p, share_function(80 * GB), cluster_gpus=0.0)  # CPU-only cluster: still 0
    assert {t.gpu_share for t in estimated.trials} == {0.0}
    one_gpu = {t.precision: t.gpu_share for t in L.for_cluster(p, share_function(800 * GB), 1).trials}
    assert one_gpu == {"fp16": 0.3333, "nf4": 0.3333, "int8": 0.3333}  # 3 trials fit at once on 1 GPU
    # the fp16 trial is done: the two pending ones get a GPU each of 2
    p.store.write_trial({**config_row(p.trials[0]), "status": "done"}, [])
    two = L.for_cluster(p, share_function(800 * GB), 2)
    assert two.status == {p.trials[0].trial_id: "done"}  # the status is read again
    assert [t.gpu_share for t in two.pending] == [1.0, 1.0]
