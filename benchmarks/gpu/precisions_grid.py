"""Issue 7 on the GPU: the 8B shape x bf16 / torchao w8a16, w4a16, fp8 / calibrated awq4 / hqq4, hqq8, and the 0.5B
shape x bf16 / hqq4 / hqq8 (its torchao cells ran in run7, torchao_grid.py), all bf16 compute, on one H100.
torchao w8a8 is left out of the 8B: its eager decode ran at 0.52 tok/s on the 0.5B shape (run7), so its benchmark
alone would outlast a device call. Run by benchmarks/gpu/driver.py (prec)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import GRAPH, LLAMA8B, QWEN, WIKITEXT  # noqa: E402

from sweeper import Benchmark, Model, Perplexity, Study  # noqa: E402

study = Study(
    name="gpu-precisions",
    description="8B and 0.5B shapes x bf16 / w8a16 / w4a16 / fp8 / awq4 / hqq4 / hqq8 (bf16 compute) on one H100",
    models=[Model(LLAMA8B, label="llama3-8b-shape"), Model(QWEN, label="qwen2.5-0.5b-shape")],
    precisions=["bf16", "w8a16", "w4a16", "fp8", "awq4", "hqq4", "hqq8"],
    precision_options={"awq4": {"calib_data": str(Path(WIKITEXT).with_name("valid.txt")), "calib_samples": 8}},
    compute_dtypes=["bf16"],
    baseline="bf16",
    kl=False,
    benchmark=Benchmark(prompt_tokens=128, new_tokens=32, batch_sizes=(1, 8), repeats=3, warmup=1, graph_decode=GRAPH),
    perplexity=Perplexity(WIKITEXT, context=512, max_tokens=4096),
)
