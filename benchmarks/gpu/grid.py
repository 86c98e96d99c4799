"""Issue 6, point 1 and 5: Qwen2.5-0.5B and Llama-3-8B shapes (random weights) x fp16, bf16, int8, nf4, fp4 x compute
fp16 / bf16, on one H100, with the eager and CUDA-graph decode numbers. Run by benchmarks/gpu/driver.py (grid)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import GRID_BENCHMARK, GRID_PERPLEXITY, LLAMA8B, QWEN  # noqa: E402

from sweeper import Model, Study  # noqa: E402

study = Study(
    name="gpu-grid",
    description="0.5B and 8B shapes x fp16/bf16/int8/nf4/fp4 x compute fp16/bf16 on one H100",
    models=[Model(QWEN, label="qwen2.5-0.5b-shape"), Model(LLAMA8B, label="llama3-8b-shape")],
    precisions=["fp16", "bf16", "int8", "nf4", "fp4"],
    compute_dtypes=["fp16", "bf16"],
    baseline="fp16",
    kl=False,
    benchmark=GRID_BENCHMARK,
    perplexity=GRID_PERPLEXITY,
)
