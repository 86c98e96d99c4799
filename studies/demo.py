"""Demo study: runs offline on a CPU-only machine in a few minutes, with no hub access.

The model is a small *real* model (llama-4m: a 4.2M-parameter Llama trained on WikiText-2) shipped with the project
in demo/data/ in fp16, with a WikiText-2 slice (licence and source: demo/README.md). Set SWEEPER_DEMO_MODEL to use
another local causal LM folder, and SWEEPER_DEMO_DATA for another data folder of the same layout (wikitext-2/test.txt).
Numbers are CPU numbers (the trial rows say device=cpu).
"""
import os
from pathlib import Path

from sweeper import Benchmark, KLSettings, Perplexity, Study

DATA = Path(os.environ.get("SWEEPER_DEMO_DATA", Path(__file__).resolve().parents[1] / "demo" / "data"))
MODEL = os.environ.get("SWEEPER_DEMO_MODEL", str(DATA / "models" / "llama-4m"))

study = Study(
    name="demo",
    description="llama-4m on CPU: fp32 baseline vs bf16, bitsandbytes int8 / nf4 / fp4",
    models=["./" + os.path.relpath(MODEL, Path(__file__).parent) if not os.path.isabs(MODEL) else MODEL],
    precisions=["fp32", "bf16", "int8", "nf4", "fp4"],
    compute_dtypes=["fp32"],
    benchmark=Benchmark(prompt_tokens=64, new_tokens=16, batch_sizes=(1, 4), repeats=3, warmup=1),
    perplexity=Perplexity(path=str(DATA / "wikitext-2" / "test.txt"), context=256, max_tokens=8192),
    # KL to the fp32 baseline on a 1024-token WikiText slice + 2 prompts of each of the 12 suite categories
    kl=KLSettings(max_prompts_per_category=2, gen_tokens=16),
)
