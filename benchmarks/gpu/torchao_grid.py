"""torchao precisions (w8a16, w8a8, w4a16, fp8, calibrated awq4) on the 0.5B shape, bf16 compute, with the bf16
baseline, on one H100. Run by benchmarks/gpu/driver.py (torchao). (hqq is not in the GPU wheelhouse.)"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import GRAPH, QWEN, WIKITEXT  # noqa: E402

from sweeper import Benchmark, Model, Perplexity, Study  # noqa: E402

study = Study(
    name="gpu-torchao",
    description="0.5B shape x bf16 / torchao w8a16, w8a8, w4a16, fp8, awq4 (bf16 compute) on one H100",
    models=[Model(QWEN, label="qwen2.5-0.5b-shape")],
    precisions=["bf16", "w8a16", "w8a8", "w4a16", "fp8", "awq4"],
    precision_options={"awq4": {"calib_data": str(Path(WIKITEXT).with_name("valid.txt")), "calib_samples": 8}},
    compute_dtypes=["bf16"],
    baseline="bf16",
    kl=False,
    benchmark=Benchmark(prompt_tokens=128, new_tokens=32, batch_sizes=(1, 8), repeats=3, warmup=1, graph_decode=GRAPH),
    perplexity=Perplexity(WIKITEXT, context=512, max_tokens=4096),
)
