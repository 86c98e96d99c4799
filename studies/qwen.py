"""Qwen2.5 under bitsandbytes quantization, as in the seed report ../shared/seeds/003 (a Qwen2.5 notebook):
fp32 and fp16, and nf4 / fp4 / int8 each with fp32 and fp16 compute: 8 cells (plain dtypes are one cell each).

Tasks: MMLU, ARC-Easy, ARC-Challenge through lm-eval (hub datasets; point Task(data=...) at local files offline,
see docs/tasks.md). Baseline: fp32, as in the seed's table. Needs a GPU for sensible run times.
"""
from sweeper import Benchmark, Study, Task

study = Study(
    name="qwen",
    description="Qwen2.5-0.5B: fp32/fp16 vs bitsandbytes nf4/fp4/int8 x compute fp32/fp16",
    models=["Qwen/Qwen2.5-0.5B"],
    precisions=["fp32", "fp16", "nf4", "fp4", "int8"],
    compute_dtypes=["fp32", "fp16"],
    baseline="fp32",
    tasks=[Task("mmlu", limit=200), Task("arc_easy", limit=200), Task("arc_challenge", limit=200)],
    benchmark=Benchmark(prompt_tokens=128, new_tokens=64, batch_sizes=(1, 8), repeats=5, warmup=2),
)
