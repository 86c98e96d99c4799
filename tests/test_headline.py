"""Headline numbers that do not mislead (issue 23), end to end through `sweep launch` on llama-4m (real trained weights,
../shared/data/models/llama-4m) with every registry precision that runs on a CPU:

- each quantized precision's memory reduction is > 0 and its compression ratio (from ``weights_gb``, the true bytes of
  the loaded weights) is the one its bits give the model's shapes, within 25 %;
- every derived column of ``analysis.compare`` equals the same quantity recomputed here from the study's metrics and
  trials files (read with Polars directly, not through sweeper.results), by the definitions of docs/analysis.md;
- the summary's speed columns come in both kinds, and a CPU trial's row says why it has no kernel-level number.
"""
from __future__ import annotations

import math
from pathlib import Path

import polars as pl
import pytest

from helpers import fast_benchmark, read_metrics, read_trials, sweep, write_study

pytest.importorskip("torchao")
pytest.importorskip("hqq")

TASKS_DATA = Path(__file__).parent / "data" / "tasks"
# small AWQ calibration so the study stays fast on 2 cores (as tests/test_calibrated.py)
OPTS = {"awq4": {"group_size": 64, "calib_samples": 2, "calib_seq_len": 64, "scale_search": 4}}
BASELINE = "fp32"


def cpu_precisions() -> list[str]:
    """Every registry precision that runs on a CPU with fp32 compute (what `sweep precisions` lists minus CUDA-only)."""
    from sweeper.precisions import REGISTRY

    return [name for name, p in REGISTRY.items() if p.hardware_problem("cpu", None, "fp32", OPTS.get(name)) is None]


def expected_ratio(model_dir: Path, weight_bits: int) -> float:
    """The compression ratio a precision's bits give this model against the fp32 baseline: the quantized layers are
    the decoder's nn.Linear weights at ``weight_bits`` (scales and zero points not counted: the 25 % tolerance covers
    them); embeddings, lm head (tied here) and norms stay at the compute dtype (fp32), as every method here leaves
    them. (Plain 16-bit dtypes convert every parameter: their ratio is 32 / 16, not this.)"""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(str(model_dir))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    linear = {f"{n}.weight" for n, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")}
    params = dict(model.named_parameters())  # tied embeddings / head counted once, as stored
    q = sum(p.numel() for n, p in params.items() if n in linear)
    other = sum(p.numel() for n, p in params.items() if n not in linear)
    return (q + other) * 32 / (q * weight_bits + other * 32)


@pytest.fixture(scope="module")
def study(tmp_path_factory, real_model, shared_data):
    tmp = tmp_path_factory.mktemp("headline")
    precs = cpu_precisions()
    arc = TASKS_DATA / "arc" / "ARC-Easy-Test.jsonl"
    study = write_study(tmp / "headline.py", f"""
        study = Study(
            name="headline",
            models=[{str(real_model)!r}],
            precisions={precs!r},
            compute_dtypes=["fp32"],
            baseline={BASELINE!r},
            precision_options={OPTS!r},
            benchmark={fast_benchmark()},
            perplexity=Perplexity({str(shared_data / "wikitext-2" / "test.txt")!r}, context=64, max_tokens=128),
            tasks=[Task("arc_easy", limit=8, num_fewshot=0, data={str(arc)!r})],
            eval_batch_size=8,
            kl=False,
        )
    """)
    results = tmp / "res"
    r = sweep("launch", str(study), "--results", str(results), timeout=1500)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return results, precs


def _compare(results: Path) -> pl.DataFrame:
    from sweeper import analysis
    from sweeper.results import open_results

    return analysis.compare(open_results([str(results)])).collect()


def test_every_cpu_precision_ran(study):
    _, precs = study
    # at least the list, and nothing CUDA-only
    assert {"fp32", "fp16", "bf16", "int8", "nf4", "fp4", "w8a16", "w4a16"} <= set(precs) and "fp8" not in precs


def test_true_memory_reduction_and_compression_ratio_per_precision(study, real_model):
    from sweeper.precisions import REGISTRY

    results, precs = study
    cmp = _compare(results).filter(pl.col("status") == "done")
    rows = {r["precision"]: r for r in cmp.to_dicts()}
    assert set(rows) == set(precs), set(precs) - set(rows)
    for name in precs:
        r = rows[name]
        if name == BASELINE:
            assert r["memory_reduction"] == pytest.approx(0.0) and r["compression_ratio"] == pytest.approx(1.0)
            continue
        p = REGISTRY[name]
        # a plain dtype (fp16, bf16) converts every parameter, and so does ONNX Runtime's export (fp32: nothing
        # saved) and its dynamic int8 (every MatMul and Gather weight, embeddings included); a quantization method of
        # torch only the decoder's linears
        every = p.method == "none" or p.runtime == "onnxruntime"
        want = 32 / p.weight_bits if every else expected_ratio(real_model, p.weight_bits)
        if want == 1.0:  # ort-fp32: the same weights in another runtime
            assert abs(r["memory_reduction"]) < 0.01 and r["compression_ratio"] == pytest.approx(1.0, rel=0.01)
            continue
        # llama-4m: 3.15 M decoder linear weights, 1.05 M embedding (tied head) and norm parameters, so
        # 8-bit -> 2.29x, 4-bit -> 2.92x, 16-bit -> 2.0x against fp32
        assert r["memory_reduction"] > 0, (name, r["weights_gb"])
        assert abs(r["compression_ratio"] / want - 1) <= 0.25, (name, r["compression_ratio"], want)
        assert r["gb_saved"] == pytest.approx(rows[BASELINE]["weights_gb"] - r["weights_gb"])
        # get_memory_footprint() stays its own column; for torchao it is the unquantized size (the trap)
        if p.library == "torchao":
            assert r["hf_footprint_gb"] == pytest.approx(rows[BASELINE]["hf_footprint_gb"])


def test_summary_has_true_memory_and_both_speed_kinds(study):
    from sweeper.results import open_results

    results, _ = study
    s = open_results([str(results)]).summary().collect()
    assert "footprint_gb" not in s.columns and "hf_footprint_gb" not in s.columns
    cols = s.columns
    assert cols.index("decode_tok_s") < cols.index("decode_graph_tok_s") < cols.index("graph_decode_error")
    w = dict(zip(s["precision"], s["weights_gb"]))
    assert w["w4a16"] < w["w8a16"] < w["fp32"] and w["nf4"] < w["int8"] < w["fp32"]
    # on a CPU no trial has a kernel-level number, and every row says why
    assert s["decode_graph_tok_s"].is_null().all()
    assert s["graph_decode_error"].str.starts_with("not measured: CUDA graphs need a CUDA device").all()


def _recompute(results: Path) -> pl.DataFrame:
    """Every derived column of compare, from the raw files, by docs/analysis.md's definitions (no sweeper code)."""
    trials = read_trials(results).select("trial_id", "precision", "baseline_id", "worker_trial_index")
    cold = {r["trial_id"]: r["worker_trial_index"] == 0 for r in trials.to_dicts()}  # a worker's first trial
    m = read_metrics(results)  # the committed metric rows, as stored

    def metric(stage: str, name: str, batch_size: int | None = None) -> dict[str, float]:
        f = m.filter((pl.col("stage") == stage) & (pl.col("metric") == name))
        if batch_size is not None:
            f = f.filter(pl.col("batch_size") == batch_size)
        return dict(zip(f["trial_id"], f["value"]))

    load, weights = metric("load", "load_s"), metric("load", "weights_bytes")
    peak, dec = metric("benchmark", "peak_memory_bytes"), metric("benchmark", "decode_tok_s")
    pre, seq = metric("benchmark", "prefill_ms"), metric("benchmark", "sequence_ms")
    ppl = metric("perplexity", "token_perplexity")
    thr = m.filter((pl.col("stage") == "benchmark") & (pl.col("metric") == "throughput_tok_s"))
    tasks = m.filter(pl.col("stage") == "tasks")
    out = []
    for t in trials.to_dicts():
        tid, b = t["trial_id"], t["baseline_id"]
        bs = int(thr.filter(pl.col("trial_id") == tid)["batch_size"].max())
        tput = metric("benchmark", "throughput_tok_s", bs)
        arc = {k: dict(zip(tasks.filter((pl.col("trial_id") == k) & (pl.col("task") == "arc_easy"))["metric"],
                           tasks.filter((pl.col("trial_id") == k) & (pl.col("task") == "arc_easy"))["value"]))
               for k in (tid, b)}
        main = "acc_norm" if "acc_norm" in arc[b] else "acc"
        saved = (weights[b] - weights[tid]) / 1e9
        ppl_delta = 100 * (ppl[tid] / ppl[b] - 1)
        out.append({
            "trial_id": tid, "precision": t["precision"],
            # only between two cold or two warm loads (docs/analysis.md)
            "speedup_load": load[b] / load[tid] if cold[tid] == cold[b] else None,
            "speedup_decode": dec[tid] / dec[b],
            "speedup_prefill": pre[b] / pre[tid],
            "speedup_sequence": seq[b] / seq[tid],
            "batch_size": bs,
            "speedup_throughput": tput[tid] / tput[b],
            "memory_reduction": 1 - weights[tid] / weights[b],
            "memory_reduction_peak": 1 - peak[tid] / peak[b],
            "compression_ratio": weights[b] / weights[tid],
            "gb_saved": saved,
            "ppl_delta_pct": ppl_delta,
            "ppl_delta_per_gb_saved": ppl_delta / saved if saved > 0 else None,
            "retention_arc_easy": arc[tid][main] / arc[b][main] if arc[b][main] > 0 else None,
        })
    return pl.DataFrame(out)


def test_derived_columns_recomputed_from_the_metrics_files(study):
    results, precs = study
    got = {r["trial_id"]: r for r in _compare(results).to_dicts()}
    want = _recompute(results)
    assert want.height == len(precs)
    for w in want.to_dicts():
        g = got[w["trial_id"]]
        for col, v in w.items():
            if col in ("trial_id", "precision"):
                continue
            if v is None:
                assert g[col] is None, (w["precision"], col, g[col])
            else:
                assert g[col] == pytest.approx(v, rel=1e-9), (w["precision"], col, g[col], v)
        # one task: the mean retention is that task's
        if w["retention_arc_easy"] is not None:
            assert g["retention_mean"] == pytest.approx(w["retention_arc_easy"])
        # no kernel-level decode on a CPU: no speedup of that kind either
        assert g["decode_graph_tok_s"] is None and g["speedup_decode_graph"] is None
    assert not any(math.isnan(v) for r in got.values() for k, v in r.items() if isinstance(v, float))


def test_recommendations_use_true_memory_and_name_their_speed_kind(study):
    from sweeper import analysis

    results, _ = study
    cmp = _compare(results)
    rec = {r["scenario"]: r for r in analysis.recommend(cmp).to_dicts()}
    speed = rec["max_throughput_within_1pct"]
    if speed["trial_id"] is not None:
        assert speed["speed_kind"] == "eager"  # no kernel-level number on a CPU
        assert "kernel-level not used" in speed["reason"] and "CUDA graphs need a CUDA device" in speed["reason"]
    mem = rec["min_memory_within_3pct"]
    if mem["trial_id"] is not None:
        assert mem["reason"].startswith("weights_gb = ")
        w = dict(zip(cmp["trial_id"], cmp["weights_gb"]))
        assert mem["value"] == pytest.approx(w[mem["trial_id"]])
