"""Random-weight models of the Qwen2.5-0.5B and Llama-3-8B shapes, built on the GPU and saved as fp16 checkpoints.

Speed numbers depend on the shapes, not on the weights' values, so these stand in for the real checkpoints on a
machine without hub access. The tokenizer is llama-4m's (4096 ids; prompts use ids < 4096, the embedding and lm head
keep the real vocabulary size, so the per-token work is the real model's).

    python3 benchmarks/gpu/make_models.py --out /tmp/gpu-models --tokenizer .gpu/h100/llama-4m [--only qwen2.5-0.5b-shape]

Idempotent: a model folder with a config.json and weights is kept.
"""
from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

SHAPES = {
    # Qwen/Qwen2.5-0.5B config.json
    "qwen2.5-0.5b-shape": dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                               num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                               max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                               tie_word_embeddings=True, use_sliding_window=False),
    # the same body with the tokenizer's 4096-id vocabulary and a 2048-token context, for lm-eval runs
    # (benchmarks/time_to_table.py): generated ids decode to text, and lm-eval's rolling-window perplexity, which takes
    # full-vocabulary logits of max_length-token windows, fits a trial's share
    "qwen2.5-0.5b-body-v4k": dict(model_type="qwen2", vocab_size=4096, hidden_size=896, intermediate_size=4864,
                                  num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                                  max_position_embeddings=2048, rope_theta=1000000.0, rms_norm_eps=1e-6,
                                  tie_word_embeddings=True, use_sliding_window=False),
    # meta-llama/Meta-Llama-3-8B config.json
    "llama3-8b-shape": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                            num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                            max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
                            tie_word_embeddings=False),
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def build(name: str, out: Path, tokenizer: Path) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = out / name
    if (folder / "config.json").exists() and any(folder.glob("*.safetensors")):
        print(f"{name}: exists in {folder}")
        return folder
    t0 = time.perf_counter()
    kw = dict(SHAPES[name])
    cfg = AutoConfig.for_model(kw.pop("model_type"), **kw, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float16)
    n = sum(p.numel() for p in model.parameters())
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, max_shard_size="5GB")
    for f in TOKENIZER_FILES:
        shutil.copy(tokenizer / f, tmp / f)
    del model
    tmp.rename(folder)
    print(f"{name}: {n / 1e9:.3f}B params, built and saved in {time.perf_counter() - t0:.1f}s -> {folder}")
    return folder


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/gpu-models")
    ap.add_argument("--tokenizer", default=".gpu/h100/llama-4m")
    ap.add_argument("--only", action="append", choices=sorted(SHAPES))
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in a.only or SHAPES:
        build(name, out, Path(a.tokenizer))


if __name__ == "__main__":
    main()
