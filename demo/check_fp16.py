"""Does demo/data's fp16 copy of llama-4m give the fp32 original's numbers? Token perplexity (the demo's settings:
first 8192 tokens of WikiText-2 test, 256-token windows) of both copies at fp32 / bnb int8 / nf4 / fp4 (compute fp32),
on CPU. Usage: python demo/check_fp16.py ORIGINAL_MODEL_DIR (e.g. ../shared/data/models/llama-4m)."""
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from sweeper.stages.perplexity import token_perplexity
from sweeper.study import Perplexity

HERE = Path(__file__).resolve().parent / "data"
SETTINGS = Perplexity(path=str(HERE / "wikitext-2" / "test.txt"), context=256, max_tokens=8192)
KW = {"fp32": {}, "int8": {"quantization_config": BitsAndBytesConfig(load_in_8bit=True)},
      "nf4": {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                         bnb_4bit_compute_dtype=torch.float32)},
      "fp4": {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4",
                                                         bnb_4bit_compute_dtype=torch.float32)}}

for label, path in (("fp32 original", Path(sys.argv[1])), ("fp16 copy (demo/data)", HERE / "models" / "llama-4m")):
    tok = AutoTokenizer.from_pretrained(path)
    for precision, kw in KW.items():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw).eval()
        ppl = next(m["value"] for m in token_perplexity(model, tok, SETTINGS) if m["metric"] == "token_perplexity")
        print(f"{label:24s} {precision:5s} token perplexity {ppl:.3f}", flush=True)
