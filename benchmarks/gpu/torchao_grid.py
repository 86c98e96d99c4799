"""torchao precisions (w8a16, w8a8, w4a16, fp8, calibrated awq4) on the 0.5B shape, bf16 compute, with the bf16
baseline, on one H100. Run by benchmarks/gpu/driver.py (torchao). hqq runs in precisions_grid.py."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import BF16_PRECISION_GRID, QWEN  # noqa: E402

from sweeper import Model, Study  # noqa: E402

study = Study(
    name="gpu-torchao",
    description="0.5B shape x bf16 / torchao w8a16, w8a8, w4a16, fp8, awq4 (bf16 compute) on one H100",
    models=[Model(QWEN, label="qwen2.5-0.5b-shape")],
    precisions=["bf16", "w8a16", "w8a8", "w4a16", "fp8", "awq4"],
    **BF16_PRECISION_GRID,
)
