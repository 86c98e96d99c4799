"""Paths shared by the GPU study files: models built by make_models.py, offline data carried in .gpu/h100/data."""
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MODELS = Path(os.environ.get("SWEEPER_GPU_MODELS", "/tmp/gpu-models"))
DATA = Path(os.environ.get("SWEEPER_GPU_DATA", REPO / ".gpu" / "h100" / "data"))
QWEN = str(MODELS / "qwen2.5-0.5b-shape")
LLAMA8B = str(MODELS / "llama3-8b-shape")
QWEN_V4K = str(MODELS / "qwen2.5-0.5b-body-v4k")
WIKITEXT = str(DATA / "wikitext-2" / "test.txt")
GRAPH = os.environ.get("SWEEPER_GPU_GRAPH", "1") == "1"  # 0: no CUDA-graph decode in the sweeps
