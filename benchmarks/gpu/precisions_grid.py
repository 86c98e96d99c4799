"""Issue 7 on the GPU: the 8B shape x bf16 / torchao w8a16, w4a16, fp8 / calibrated awq4 / hqq4, hqq8, and the 0.5B
shape x bf16 / hqq4 / hqq8 (its torchao cells ran in run7, torchao_grid.py), all bf16 compute, on one H100.
torchao w8a8 is left out of the 8B: its eager decode ran at 0.52 tok/s on the 0.5B shape (run7), so its benchmark
alone would outlast a device call. Run by benchmarks/gpu/driver.py (prec)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import BF16_PRECISION_GRID, LLAMA8B, QWEN  # noqa: E402

from sweeper import Model, Study  # noqa: E402

study = Study(
    name="gpu-precisions",
    description="8B and 0.5B shapes x bf16 / w8a16 / w4a16 / fp8 / awq4 / hqq4 / hqq8 (bf16 compute) on one H100",
    models=[Model(LLAMA8B, label="llama3-8b-shape"), Model(QWEN, label="qwen2.5-0.5b-shape")],
    precisions=["bf16", "w8a16", "w4a16", "fp8", "awq4", "hqq4", "hqq8"],
    **BF16_PRECISION_GRID,
)
