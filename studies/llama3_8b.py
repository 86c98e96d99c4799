"""Llama-3-8B, as in the seed report ../shared/seeds/000 (FP16 baseline; ARC-Easy, GSM8K, HellaSwag, PIQA).

The seed's configurations and their registry names: INT8-W8A16 (RTN) -> w8a16, INT8-W8A8 -> w8a8, INT4-W4A16 ->
w4a16, INT4-W4A16-AWQ -> awq4, FP8-W8A8 -> fp8 (torchao; fp8 needs compute capability >= 8.9, e.g. an H100), plus
the bitsandbytes counterparts int8 (LLM.int8) and nf4. Quantized cells compute in bf16 (torchao's int4 kernels need
bf16); the baseline is fp16 as in the seed. Every cell fits one H100 80GB; `auto` GPU shares pack the small ones.
Needs `pip install -e ".[torchao]"` and hub access (or local copies: Model("/path/to/Meta-Llama-3-8B")).
"""
from sweeper import Benchmark, Study, Task

study = Study(
    name="llama3-8b",
    description="Llama-3-8B: fp16 baseline vs torchao w8a16 / w8a8 / w4a16 / awq4 / fp8 and bitsandbytes int8 / nf4",
    models=["meta-llama/Meta-Llama-3-8B"],
    precisions=["fp16", "w8a16", "w8a8", "w4a16", "awq4", "fp8", "int8", "nf4"],
    compute_dtypes=["bf16"],
    baseline="fp16",
    tasks=[Task("arc_easy"), Task("gsm8k", limit=250), Task("hellaswag", limit=1000), Task("piqa")],
    benchmark=Benchmark(prompt_tokens=256, new_tokens=128, batch_sizes=(1, 8, 32), repeats=5, warmup=2),
)
