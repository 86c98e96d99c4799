"""Paths and settings shared by the GPU study files: models built by make_models.py, offline data carried in
.gpu/h100/data, and the benchmark / perplexity / AWQ calibration settings of the grid studies."""
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MODELS = Path(os.environ.get("SWEEPER_GPU_MODELS", "/tmp/gpu-models"))
DATA = Path(os.environ.get("SWEEPER_GPU_DATA", REPO / ".gpu" / "h100" / "data"))
QWEN = str(MODELS / "qwen2.5-0.5b-shape")
QWEN_V4K = str(MODELS / "qwen2.5-0.5b-body-v4k")
LLAMA8B = str(MODELS / "llama3-8b-shape")
WIKITEXT = str(DATA / "wikitext-2" / "test.txt")
GRAPH = os.environ.get("SWEEPER_GPU_GRAPH", "1") == "1"  # 0: no CUDA-graph decode in the sweeps

from sweeper import Benchmark, Perplexity  # noqa: E402

# grid.py, torchao_grid.py and precisions_grid.py measure with the same settings, so their rows compare
GRID_BENCHMARK = Benchmark(prompt_tokens=128, new_tokens=32, batch_sizes=(1, 8), repeats=3, warmup=1,
                           graph_decode=GRAPH)
GRID_PERPLEXITY = Perplexity(WIKITEXT, context=512, max_tokens=4096)
AWQ_OPTIONS = {"calib_data": str(Path(WIKITEXT).with_name("valid.txt")), "calib_samples": 8}
# the precision studies (torchao_grid.py, precisions_grid.py): bf16 compute against the bf16 baseline, grid settings
BF16_PRECISION_GRID = dict(precision_options={"awq4": AWQ_OPTIONS}, compute_dtypes=["bf16"], baseline="bf16", kl=False,
                           benchmark=GRID_BENCHMARK, perplexity=GRID_PERPLEXITY)
