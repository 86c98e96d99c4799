"""Issue 23 on the GPU: the seed-000-shaped study (../shared/seeds/000: Llama-3-8B, fp16 baseline) with random weights
in the Llama-3-8B shape: fp16 baseline vs bitsandbytes int8, nf4 and torchao w8a16, w4a16, fp8, bf16 compute, on one
H100. Its `sweep results --vs-baseline` shows true memory (weights_gb) and both speed kinds (eager decode_tok_s,
kernel-level decode_graph_tok_s). Run by benchmarks/gpu/seed000_run.sh."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import GRID_BENCHMARK, GRID_PERPLEXITY, LLAMA8B  # noqa: E402

from sweeper import Model, Study  # noqa: E402

study = Study(
    name="seed000-shape",
    description="Llama-3-8B shape (random weights): fp16 baseline vs int8, nf4, w8a16, w4a16, fp8 (bf16 compute)",
    models=[Model(LLAMA8B, label="llama3-8b-shape")],
    precisions=["fp16", "int8", "nf4", "w8a16", "w4a16", "fp8"],
    compute_dtypes=["bf16"],
    baseline="fp16",
    kl=False,
    benchmark=GRID_BENCHMARK,
    perplexity=GRID_PERPLEXITY,
)
