"""Issue 6, point 2: a share too small for one trial. Both trials get 0.1 of the GPU (8 GB of an H100): the 0.5B fits,
the 8B fp16 (16 GB of weights) must fail with OutOfMemory on its own while the 0.5B finishes."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import LLAMA8B, QWEN  # noqa: E402

from sweeper import Benchmark, Model, Resources, Study  # noqa: E402

study = Study(
    name="gpu-oom",
    models=[Model(QWEN, label="qwen2.5-0.5b-shape"), Model(LLAMA8B, label="llama3-8b-shape")],
    precisions=["fp16"],
    kl=False,
    benchmark=Benchmark(prompt_tokens=128, new_tokens=16, batch_sizes=(1,), repeats=2, warmup=1, graph_decode=False),
    resources=Resources(gpus_per_trial=0.1),
)
