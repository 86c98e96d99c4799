"""Llama-3-8B, as in the seed report ../shared/seeds/000 (FP16 baseline; ARC-Easy, GSM8K, HellaSwag, PIQA).

The seed compares INT8-W8A16, INT8-W8A8, INT4-W4A16 (RTN and AWQ) and FP8-W8A8. The registry covers, so far, the
bitsandbytes counterparts: int8 (LLM.int8: 8-bit weights, 16-bit activations with fp16 outliers) and 4-bit nf4 / fp4
weights with 16-bit compute. Each fits one H100 80GB; `auto` GPU shares pack the 4-bit cells two to a GPU.
"""
from sweeper import Benchmark, Study, Task

study = Study(
    name="llama3-8b",
    description="Llama-3-8B: fp16 baseline vs bitsandbytes int8 / nf4 / fp4 (bf16 and fp16 compute)",
    models=["meta-llama/Meta-Llama-3-8B"],
    precisions=["fp16", "bf16", "int8", "nf4", "fp4"],
    compute_dtypes=["fp16", "bf16"],
    baseline="fp16",
    tasks=[Task("arc_easy"), Task("gsm8k", limit=250), Task("hellaswag", limit=1000), Task("piqa")],
    benchmark=Benchmark(prompt_tokens=256, new_tokens=128, batch_sizes=(1, 8, 32), repeats=5, warmup=2),
)
