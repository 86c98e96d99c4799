"""Issue 6, point 2 and 4: 8 small trials (0.5B shape) launched with `auto` GPU shares (packed) and with
`--gpus-per-trial 1` (one trial per GPU at a time). Run by benchmarks/gpu/driver.py (pack).
SWEEPER_GPU_LEASE=0 turns the exclusive timing lease off (to measure what the lease costs a packed sweep).
SWEEPER_GPU_PACK_MODELS=2 adds the 0.5B body with a 4096-id vocabulary: 16 trials (point 7, multi-GPU throughput);
SWEEPER_GPU_PACK_MODELS=4 adds both again under a second path (a link the driver makes: the same weights, another
model id): 32 trials."""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import QWEN, QWEN_V4K, WIKITEXT  # noqa: E402

from sweeper import Benchmark, Model, Perplexity, Study  # noqa: E402

study = Study(
    name="gpu-packing",
    description="8 cells per model (1, 2 or 4 models: SWEEPER_GPU_PACK_MODELS): packed (auto shares) vs a whole GPU each",
    models=[Model(QWEN, label="qwen2.5-0.5b-shape"), Model(QWEN_V4K, label="qwen2.5-0.5b-body-v4k"),
            Model(QWEN + "-again", label="qwen2.5-0.5b-shape-again"),
            Model(QWEN_V4K + "-again", label="qwen2.5-0.5b-body-v4k-again")][:int(os.environ.get("SWEEPER_GPU_PACK_MODELS", "1"))],
    precisions=["fp16", "bf16", "int8", "nf4", "fp4"],
    compute_dtypes=["fp16", "bf16"],
    baseline="fp16",
    kl=False,
    benchmark=Benchmark(prompt_tokens=128, new_tokens=16, batch_sizes=(1,), repeats=3, warmup=1, graph_decode=False,
                        exclusive_timing=os.environ.get("SWEEPER_GPU_LEASE", "1") == "1"),
    perplexity=Perplexity(WIKITEXT, context=512, max_tokens=16384),
)
