"""ONNX Runtime precisions (ort-fp32, ort-int8) and the KV-cache on / off benchmark setting (issue 19, seed 001)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from helpers import fast_kl, read_trials, sweep, write_study

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

PROMPT = "The tower is 324 metres tall, about the same height as an 81-storey building, and the tallest structure"


def _spec(model_dir: Path, precision: str, **study_kw):
    from sweeper import Study
    from sweeper.trials import expand

    study = Study(name="onnx", models=[str(model_dir)], precisions=["fp32", precision], compute_dtypes=["fp32"],
                  kl=False, **study_kw)
    return next(t for t in expand(study)[0] if t.precision == precision)


def _ppl(model, tokenizer, text: Path) -> float:
    from sweeper.stages.perplexity import token_perplexity
    from sweeper.study import Perplexity

    rows = token_perplexity(model, tokenizer, Perplexity(str(text), context=64, max_tokens=1024))
    return next(r["value"] for r in rows if r["metric"] == "token_perplexity")


def _greedy(model, ids, use_cache: bool) -> list[int]:
    import torch

    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, min_new_tokens=24,
                         do_sample=False, pad_token_id=0, eos_token_id=None, use_cache=use_cache)
    return out[0, ids.shape[1]:].tolist()


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory) -> Path:
    """A random-weight GPT-2 (seed 001's model family) with llama-4m's tokenizer."""
    import shutil

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from conftest import REAL_MODEL

    path = tmp_path_factory.mktemp("models") / "tiny-gpt2"
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=4096, n_positions=512, n_embd=64, n_layer=2, n_head=4, bos_token_id=1,
                               eos_token_id=2)).save_pretrained(path)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(REAL_MODEL / f, path / f)
    return path


@pytest.mark.parametrize("which", ["gpt2", "llama-4m"])
def test_ort_fp32_equals_pytorch_fp32_and_cache_does_not_change_greedy_tokens(which, tiny_gpt2, real_model,
                                                                             shared_data, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from sweeper import ort_model
    from sweeper.quantize import onnx_export
    from sweeper.stages.load import load_tokenizer

    model_dir = tiny_gpt2 if which == "gpt2" else real_model
    spec = _spec(model_dir, "ort-fp32")
    folder, meta, _ = onnx_export.ensure_model(spec, False, tmp_path)
    ort = ort_model.load(folder, meta, str(model_dir), None, False, "cpu")
    pt = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = load_tokenizer(spec)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.inference_mode():
        diff = (pt(input_ids=ids).logits - ort(input_ids=ids).logits).abs().max().item()
    assert diff <= 1e-3, diff
    text = shared_data / "wikitext-2" / "test.txt"
    p_pt, p_ort = _ppl(pt, tok, text), _ppl(ort, tok, text)
    assert abs(p_ort / p_pt - 1) <= 1e-3, (p_pt, p_ort)
    # greedy tokens: the same with and without the KV cache, and the same as PyTorch's
    with torch.inference_mode():
        cached, uncached = _greedy(ort, ids, True), _greedy(ort, ids, False)
        assert cached == uncached == _greedy(pt, ids, True) == _greedy(pt, ids, False)


def _store_metrics(store_root: Path) -> pl.DataFrame:
    return pl.read_parquet(str(store_root / "metrics" / "*.parquet"))


def test_every_stage_runs_on_ort_and_a_relaunch_reuses_the_export(tmp_path, real_model, shared_data):
    """fp32 (PyTorch baseline), ort-fp32, ort-int8 on llama-4m through run_trial: benchmark with the KV cache on and
    off, perplexity, KL to the PyTorch baseline, an lm-eval task; then the int8 trial again (a relaunch)."""
    from sweeper import Benchmark, KLSettings, Perplexity, Study, Task
    from sweeper.quantize import onnx_export
    from sweeper.runner import run_trial
    from sweeper.store import ResultsStore
    from sweeper.trials import expand

    study = Study(
        name="seed001", models=[str(real_model)], precisions=["fp32", "ort-fp32", "ort-int8"], compute_dtypes=["fp32"],
        benchmark=Benchmark(prompt_tokens=16, new_tokens=4, batch_sizes=(1, 2), repeats=2, warmup=0,
                            kv_cache=(True, False)),
        perplexity=Perplexity(str(shared_data / "wikitext-2" / "test.txt"), context=128, max_tokens=4096),
        kl=KLSettings(wiki_tokens=128, wiki_seq_len=64, max_prompts_per_category=1, gen_tokens=4, continuation_tokens=4),
        tasks=[Task("piqa", limit=4, data=str(shared_data / "piqa" / "valid.jsonl"))], eval_batch_size=2,
    )
    trials, _ = expand(study)
    assert [t.precision for t in trials] == ["fp32", "ort-fp32", "ort-int8"], "the PyTorch plain dtype is the baseline"
    store = ResultsStore(tmp_path / "res")
    exports = onnx_export.EXPORTS[0]
    rows = {t.precision: run_trial(t, store, device="cpu") for t in trials}
    for p, row in rows.items():
        assert row["status"] == "done", (p, row["error"], row["error_traceback"])
    assert onnx_export.EXPORTS[0] == exports + 1, "ort-int8 quantizes ort-fp32's export, it does not export again"
    assert rows["fp32"].get("runtime_provider") is None
    assert rows["ort-fp32"]["runtime_provider"] == rows["ort-int8"]["runtime_provider"] == "CPUExecutionProvider"
    m = _store_metrics(store.root)
    by = {p: {(r["stage"], r["metric"], r["batch_size"], r["task"]): r["value"]
              for r in m.filter(pl.col("trial_id") == rows[p]["trial_id"]).iter_rows(named=True)} for p in rows}

    def val(p, stage, metric, batch=None, task=None):
        return by[p][(stage, metric, batch, task)]

    for p in rows:  # both cache settings measured for every precision, as distinct metrics
        for metric in ("decode_tok_s", "decode_tok_s_no_kv", "sequence_ms", "sequence_ms_no_kv"):
            assert val(p, "benchmark", metric, 1) > 0, (p, metric)
        for metric in ("throughput_tok_s", "throughput_tok_s_no_kv"):
            assert val(p, "benchmark", metric, 2) > 0, (p, metric)
        assert val(p, "tasks", "acc", task="piqa") is not None
    ppl = {p: val(p, "perplexity", "token_perplexity") for p in rows}
    assert abs(ppl["ort-fp32"] / ppl["fp32"] - 1) <= 1e-3, ppl
    assert ppl["ort-int8"] == ppl["ort-int8"] and abs(ppl["ort-int8"] / ppl["ort-fp32"] - 1) <= 0.10, ppl
    assert val("ort-fp32", "kl", "kl_mean") < 1e-6 < val("ort-int8", "kl", "kl_mean")
    # memory: the ONNX initializers; int8 weights are about a quarter of the fp32 export's
    w32, w8 = val("ort-fp32", "load", "weights_bytes"), val("ort-int8", "load", "weights_bytes")
    assert w32 == pytest.approx(val("fp32", "load", "weights_bytes"), rel=0.05) and w8 < 0.35 * w32
    assert val("ort-int8", "benchmark", "peak_memory_bytes") > 0
    assert val("ort-int8", "load", "export_cache_hit") == 1 and val("ort-int8", "load", "quantize_cache_hit") == 0
    assert val("ort-fp32", "load", "export_cache_hit") == 0 and val("ort-fp32", "load", "export_s") > 0

    # a relaunch of the int8 trial: export and quantized model both come from the cache, nothing is exported
    again = run_trial(trials[2], store, attempt=2, device="cpu")
    assert again["status"] == "done", again["error"]
    assert onnx_export.EXPORTS[0] == exports + 1
    m2 = _store_metrics(store.root).filter(pl.col("trial_id") == trials[2].trial_id)
    got = dict(zip(m2["metric"], m2["value"]))
    assert got["export_cache_hit"] == 1 and got["quantize_cache_hit"] == 1
    assert got["export_s"] == 0 and got["quantize_s"] == 0

    # the summary, --vs-baseline and the report show both cache settings (seed 001's table)
    from sweeper import analysis
    from sweeper.report import build_report
    from sweeper.results import open_results

    res = open_results([str(store.root)])
    summary = res.summary().collect()
    assert summary["decode_tok_s_no_kv"].is_not_null().all()
    cmp = analysis.compare(res).collect()
    r8 = cmp.filter(pl.col("precision") == "ort-int8").row(0, named=True)
    assert r8["kv_cache_speedup"] == pytest.approx(r8["decode_tok_s"] / r8["decode_tok_s_no_kv"])
    base_no_kv = cmp.filter(pl.col("precision") == "fp32")["decode_tok_s_no_kv"][0]
    assert r8["speedup_decode_no_kv"] == pytest.approx(r8["decode_tok_s_no_kv"] / base_no_kv)
    table = build_report([str(store.root)]).summary[Path(real_model).name]
    assert {"Decode no KV (tok/s)", "No KV vs base", "KV cache speedup"} <= set(table.columns)


def test_default_kv_cache_keeps_trial_ids_and_other_settings_change_them():
    from sweeper import Benchmark, Study
    from sweeper.trials import expand

    def tid(**kw) -> str:
        return expand(Study(name="x", models=["org/m"], precisions=["fp32"], kl=False, **kw))[0][0].trial_id

    # the id main computed for this cell before Benchmark.kv_cache existed
    assert tid() == tid(benchmark=Benchmark(kv_cache=(True,))) == tid(benchmark=Benchmark(kv_cache=True)) \
        == "c702dbcb881f"
    off, both = tid(benchmark=Benchmark(kv_cache=False)), tid(benchmark=Benchmark(kv_cache=(True, False)))
    assert len({tid(), off, both}) == 3


@pytest.mark.parametrize("bad", ["yes", (), (True, True), (1,)])
def test_kv_cache_setting_is_validated(bad):
    from sweeper import Benchmark
    from sweeper.errors import UserError

    with pytest.raises(UserError, match=r"Benchmark.kv_cache must be True, False or \(True, False\)"):
        Benchmark(kv_cache=bad)


def test_ort_precisions_in_the_registry_with_their_dtype_rules():
    out = sweep("precisions", "--format", "csv")
    assert out.returncode == 0, out.stderr
    rows = {line.split(",")[0]: line for line in out.stdout.splitlines()}
    assert "fp32 (fixed: the export is fp32)" in rows["ort-fp32"]
    assert "int8 matmuls (weights per channel" in rows["ort-int8"] and "onnxruntime" in rows["ort-int8"]


def test_missing_onnxruntime_fails_the_trial_naming_the_extra(tmp_path, tiny_model):
    code = f"""
import sys
from sweeper import Study
from sweeper.trials import expand
from sweeper.runner import run_trial
from sweeper.store import ResultsStore
spec = expand(Study(name='x', models=[{str(tiny_model)!r}], precisions=['fp32', 'ort-int8'], kl=False))[0][1]
sys.modules['onnxruntime'] = None  # `import onnxruntime` now fails, as where it is not installed
row = run_trial(spec, ResultsStore({str(tmp_path / 'res')!r}), device='cpu')
print('ROW', row['status'], row['error_stage'], '|', row['error'])
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "ROW failed load | UserError: precision 'ort-int8' needs onnxruntime: pip install 'quant-sweeper[onnx]'" \
        in r.stdout


def _launch_study(path: Path, name: str, model: Path, data: Path, new_tokens: int) -> Path:
    return write_study(path, f"""
        study = Study(
            name={name!r},
            models=[{str(model)!r}],
            precisions=["fp32", "ort-int8"],
            compute_dtypes=["fp32"],
            benchmark=Benchmark(prompt_tokens=16, new_tokens={new_tokens}, batch_sizes=(1,), repeats=2, warmup=0,
                                kv_cache=(True, False)),
            perplexity=Perplexity({str(data / "wikitext-2" / "test.txt")!r}, context=64, max_tokens=256),
            kl={fast_kl()},
        )
    """)


def test_sweep_launch_runs_ort_and_a_second_study_reuses_the_cached_models(tmp_path, real_model, shared_data):
    """Through `sweep launch` (Ray workers): the export and its int8 model are made once; a second study (other
    trial ids, other results dir) sharing the cache folder finds both (counted: no new folder, files untouched)."""
    res_a, res_b = tmp_path / "res-a", tmp_path / "res-b"
    first = sweep("launch", str(_launch_study(tmp_path / "a.py", "ort-a", real_model, shared_data, 4)),
                  "--results", str(res_a))
    assert first.returncode == 0, first.stdout + first.stderr
    t = read_trials(res_a)
    assert t.height == 2 and set(t["status"]) == {"done"}, t["error"].to_list()
    assert t.filter(pl.col("precision") == "ort-int8")["runtime_provider"].to_list() == ["CPUExecutionProvider"]
    cache = res_a / "quantized"
    made = sorted(p for p in cache.iterdir() if not p.name.startswith("."))
    assert len(made) == 2, made  # the fp32 export and its int8 quantization
    stamps = {f: f.stat().st_mtime_ns for p in made for f in p.iterdir()}

    second = sweep("launch", str(_launch_study(tmp_path / "b.py", "ort-b", real_model, shared_data, 5)),
                   "--results", str(res_b), env={"SWEEPER_QUANTIZED_CACHE": str(cache)})
    assert second.returncode == 0, second.stdout + second.stderr
    tb = read_trials(res_b)
    assert set(tb["status"]) == {"done"} and not set(tb["trial_id"]) & set(t["trial_id"])
    m = pl.read_parquet(str(res_b / "metrics" / "*.parquet"))
    tid = tb.filter(pl.col("precision") == "ort-int8")["trial_id"][0]
    load = dict(zip(*m.filter((pl.col("trial_id") == tid) & (pl.col("stage") == "load"))[["metric", "value"]]))
    assert load["export_cache_hit"] == 1 and load["quantize_cache_hit"] == 1 and load["export_s"] == 0
    assert sorted(p for p in cache.iterdir() if not p.name.startswith(".")) == made
    assert {f: f.stat().st_mtime_ns for p in made for f in p.iterdir()} == stamps
    assert not (res_b / "quantized").exists()

    # --vs-baseline shows both cache settings against the PyTorch baseline
    out = sweep("results", str(res_a), "--vs-baseline", "--format", "csv", "--columns",
                "precision,decode_tok_s,decode_tok_s_no_kv,speedup_decode_no_kv,kv_cache_speedup")
    assert out.returncode == 0, out.stderr
    rows = {line.split(",")[0]: line.split(",") for line in out.stdout.splitlines()[1:]}
    assert set(rows) == {"fp32", "ort-int8"} and all(v != "" for r in rows.values() for v in r[1:]), out.stdout
