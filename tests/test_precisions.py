"""torchao (w8a16, w8a8, w4a16, fp8) and HQQ (hqq4, hqq8) precisions: registry, true memory, end to end on CPU.

Real libraries throughout: torchao and hqq quantize a tiny Llama on CPU; fp8 has no CPU kernel and must be refused.
"""
from __future__ import annotations

import subprocess
import sys

import polars as pl
import pytest

from helpers import fast_benchmark, read_trials, sweep, write_study

pytest.importorskip("torchao")
pytest.importorskip("hqq")

NEW = ["w8a16", "w8a8", "w4a16", "fp8", "awq4", "hqq4", "hqq8"]


def test_registry_is_one_table_with_every_column():
    from sweeper import precisions

    rows = {r["name"]: r for r in precisions.table_rows()}
    assert set(NEW) <= set(rows)
    for name in NEW:
        for col in ("method", "weight_bits", "activation_bits", "group_size", "compute_dtype", "library", "hardware"):
            assert rows[name][col] not in (None, ""), (name, col)
    assert rows["w8a8"]["activation_bits"] == 8 and rows["w8a16"]["activation_bits"] == "compute dtype"
    assert rows["w4a16"]["group_size"] == 128 and rows["w4a16"]["weight_bits"] == 4
    assert "8.9" in rows["fp8"]["hardware"]
    # precisions whose decode syncs with the host say so (the benchmark stage reads the same field)
    assert [n for n, r in rows.items() if r["cuda_graph_decode"] == "no: host sync"] == ["int8", "w8a8"]
    # an ONNX Runtime session is no torch module to capture
    assert {n for n, r in rows.items() if r["cuda_graph_decode"] == "no: onnxruntime"} == {"ort-fp32", "ort-int8"}
    out = sweep("precisions", "--format", "csv")
    assert out.returncode == 0, out.stderr
    header = out.stdout.splitlines()[0].split(",")
    assert {"name", "method", "library", "weight_bits", "activation_bits", "group_size", "compute_dtype",
            "hardware", "cuda_graph_decode"} <= set(header)
    assert sum(line.split(",")[0] in NEW for line in out.stdout.splitlines()) == len(NEW)


def test_missing_library_is_listed_and_refused_at_validation(tmp_path):
    # A real interpreter where `import torchao` is impossible (sys.modules entry None blocks the import).
    code = """
import sys
sys.modules['torchao'] = None
import sweeper
from sweeper import precisions
from sweeper.errors import UserError
rows = {r['name']: r for r in precisions.table_rows()}
print('LIB', rows['w8a16']['library'])
try:
    sweeper.Study(name='x', models=['org/m'], precisions=['fp32', 'w8a16'])
except UserError as e:
    print('ERR', e)
sweeper.Study(name='x', models=['org/m'], precisions=['fp32', 'hqq4'])
print('HQQ OK')
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "LIB torchao (not installed)" in r.stdout
    assert "ERR precision 'w8a16' needs torchao: pip install 'quant-sweeper[torchao]'" in r.stdout
    assert "HQQ OK" in r.stdout


def test_hardware_and_settings_refusals():
    from sweeper import precisions

    fp8 = precisions.get("fp8")
    assert "needs a CUDA GPU" in fp8.hardware_problem("cpu", None, "bf16")
    assert "compute capability >= 8.9; this GPU has 8.0" in fp8.hardware_problem("cuda", (8, 0), "bf16")
    assert fp8.hardware_problem("cuda", (9, 0), "bf16") is None
    w4 = precisions.get("w4a16")
    assert w4.hardware_problem("cpu", None, "fp32") is None
    assert "bf16 only" in w4.hardware_problem("cuda", (9, 0), "fp16")
    assert w4.hardware_problem("cuda", (9, 0), "bf16") is None
    assert "allowed: 32, 64, 128" in w4.hardware_problem("cpu", None, "fp32", {"group_size": 256})
    assert w4.hardware_problem("cuda", (9, 0), "bf16", {"group_size": 256}) is None


def _linear_bytes_per_param(model_dir, precision: str, compute_dtype: str = "fp32") -> tuple[float, float, float]:
    """(stored bytes per quantized linear weight, stored total, get_memory_footprint) for one precision."""
    import torch
    from transformers import AutoModelForCausalLM

    from sweeper import precisions
    from sweeper.stages.load import stored_bytes

    p = precisions.get(precision)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), **p.from_pretrained_kwargs(compute_dtype, None, "cpu"))
    if p.post_load:
        model = p.post_load(model, compute_dtype, p.resolve_options(None), "cpu")
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    linear = {n for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")}
    linear_params = sum(base.get_submodule(n).weight.numel() for n in linear)
    other_bytes = sum(t.numel() * t.element_size() for n, t in base.named_parameters()
                      if n.rsplit(".", 1)[0] not in linear)
    total = stored_bytes(model)
    return (total - other_bytes) / linear_params, total, model.get_memory_footprint()


@pytest.mark.parametrize("precision, low, high", [
    ("w8a16", 1.0, 1.05),   # int8 + one fp32 scale per output row
    ("w8a8", 1.0, 1.05),
    ("w4a16", 0.5, 0.57),   # packed int4 + fp32 scale and zero per 128 weights (0.5625)
    ("hqq4", 0.5, 0.64),    # packed 4-bit + fp32 scale and zero per 64 weights (0.625)
    ("hqq8", 1.0, 1.13),
])
def test_stored_bytes_counts_what_is_really_stored(tiny_model, precision, low, high):
    per_param, total, footprint = _linear_bytes_per_param(tiny_model, precision)
    assert low <= per_param <= high, per_param
    if precision.startswith("w"):
        # torchao's wrapper tensors report their unquantized size to get_memory_footprint
        assert footprint > total


@pytest.fixture(scope="module")
def launched(tmp_path_factory, tiny_model, shared_data):
    tmp = tmp_path_factory.mktemp("prec")
    precs = ["fp32", "w8a16", "w8a8", "w4a16", "hqq4", "hqq8", "fp8"]
    study = write_study(tmp / "prec.py", f"""
        study = Study(
            name="prec",
            models=[{str(tiny_model)!r}],
            precisions={precs!r},
            compute_dtypes=["fp32"],
            benchmark={fast_benchmark()},
            perplexity=Perplexity({str(shared_data / "wikitext-2" / "test.txt")!r}, context=64, max_tokens=128),
            kl=False,
        )
    """)
    results = tmp / "res"
    r = sweep("launch", str(study), "--results", str(results))
    return r, results


def test_every_cpu_precision_runs_end_to_end(launched):
    r, results = launched
    assert r.returncode == 1, r.stdout + r.stderr  # 1: fp8 failed (refused), everything else done
    assert "summary: 6/7 done, 1 failed" in r.stdout, r.stdout
    trials = read_trials(results)
    status = dict(zip(trials["precision"], trials["status"]))
    assert {p for p, s in status.items() if s == "done"} == {"fp32", "w8a16", "w8a8", "w4a16", "hqq4", "hqq8"}
    m = pl.read_parquet(str(results / "metrics" / "*.parquet"))
    wide = (m.filter(pl.col("stage") == "load").pivot(on="metric", index="trial_id", values="value")
            .join(trials.select("trial_id", "precision"), on="trial_id"))
    stored = dict(zip(wide["precision"], wide["weights_bytes"]))
    footprint = dict(zip(wide["precision"], wide["footprint_bytes"]))
    assert stored["w4a16"] < stored["w8a16"] < stored["fp32"]
    assert stored["w8a8"] == stored["w8a16"]
    assert stored["hqq4"] < stored["hqq8"] < stored["fp32"]
    assert footprint["w8a16"] == footprint["fp32"]  # the model's own report misses torchao's packing ...
    assert stored["w8a16"] < footprint["w8a16"]     # ... the stored bytes do not
    # every load reports what it spent importing its library before the clock (whether a trial pays it depends on
    # what ran before it in its worker: tests/test_e2e.py checks that per worker for bitsandbytes)
    imported = dict(zip(wide["precision"], wide["library_import_s"]))
    assert set(imported) == {p for p, s in status.items() if s == "done"} and min(imported.values()) >= 0.0, imported
    ppl = m.filter(pl.col("metric") == "token_perplexity")
    assert ppl.height == 6 and ppl["value"].is_finite().all()
    assert (m.filter(pl.col("metric") == "decode_tok_s")["value"] > 0).all()


def test_fp8_on_cpu_is_a_failed_row_with_the_reason(launched):
    _, results = launched
    row = read_trials(results).filter(pl.col("precision") == "fp8").row(0, named=True)
    assert row["status"] == "failed" and row["error_stage"] == "load"
    assert row["error_type"] == "PrecisionUnsupported"
    assert "precision 'fp8' needs a CUDA GPU" in row["error"] and "8.9" in row["error"]
