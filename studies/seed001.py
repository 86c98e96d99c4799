"""Seed 001's grid: PyTorch fp16 and bitsandbytes int8 vs ONNX Runtime fp32 and int8, each with and without the KV
cache, with WikiText-2 perplexity (../shared/seeds/001_82dd46975078dcf7.txt, "ONNX Runtime Results").

The seed measured distilgpt2 (a GPT-2-style model, 82M parameters) on a T4; this study names it on the hub. Set
SWEEPER_SEED001_MODEL to a local causal LM folder to run offline (e.g. ../shared/data/models/llama-4m, a Llama), and
SWEEPER_SEED001_DATA to another copy of the data folder. ort-fp32 and ort-int8 need ``pip install
'quant-sweeper[onnx]'`` (onnxruntime-gpu instead of onnxruntime for CUDAExecutionProvider); they compute in fp32 (int8
matmuls for ort-int8) whatever the compute dtype, and are compared with the fp16 PyTorch baseline.

    sweep launch studies/seed001.py
    sweep results results/seed001 --vs-baseline \\
        --columns precision,decode_tok_s,decode_tok_s_no_kv,kv_cache_speedup,speedup_decode,weights_gb,peak_gb,perplexity
    sweep report results/seed001 -o seed001.html     # the summary table is seed 001's, cache on and off
"""
import os
from pathlib import Path

from sweeper import Benchmark, Perplexity, Study

DATA = Path(os.environ.get("SWEEPER_SEED001_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
MODEL = os.environ.get("SWEEPER_SEED001_MODEL", "distilgpt2")

study = Study(
    name="seed001",
    description="seed 001: fp16 / bnb int8 / ONNX Runtime fp32 / int8, KV cache on and off, WikiText-2 perplexity",
    models=[MODEL],
    precisions=["fp16", "int8", "ort-fp32", "ort-int8"],
    compute_dtypes=["fp16"],  # the baseline's dtype and bitsandbytes int8's non-quantized modules
    # the seed generated 50-token answers one prompt at a time; without the cache each token recomputes the prompt
    benchmark=Benchmark(prompt_tokens=64, new_tokens=50, batch_sizes=(1, 4), repeats=5, warmup=1,
                        kv_cache=(True, False)),
    perplexity=Perplexity(path=str(DATA / "wikitext-2" / "test.txt"), context=512),
    kl=True,
)
