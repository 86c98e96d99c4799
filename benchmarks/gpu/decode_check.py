"""In-process check of the benchmark stage on one model (no Ray): eager numbers, the CUDA-graph decode and its roofline.

    python3 benchmarks/gpu/decode_check.py MODEL_DIR [--precision fp16] [--compute fp16] [--graph-only]
Set CUDA_LAUNCH_BLOCKING=1 to locate a device-side error.
"""
import argparse
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--precision", default="fp16")
    ap.add_argument("--compute", default="fp16")
    ap.add_argument("--graph-only", action="store_true")
    ap.add_argument("--new-tokens", type=int, default=32)
    a = ap.parse_args()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sweeper import precisions
    from sweeper.stages.benchmark import _prompts, run_benchmark
    from sweeper.stages.decode_graph import graph_decode, measured_bandwidth_bytes_per_s, static_greedy_tokens
    from sweeper.stages.load import stored_bytes
    from sweeper.study import Benchmark

    t0 = time.perf_counter()
    kw = precisions.get(a.precision).from_pretrained_kwargs(a.compute)
    model = AutoModelForCausalLM.from_pretrained(a.model, device_map={"": 0}, **kw).eval()
    tok = AutoTokenizer.from_pretrained(a.model)
    wb = float(stored_bytes(model))
    print(f"{Path(a.model).name} {a.precision}/{a.compute}: loaded in {time.perf_counter() - t0:.1f}s, weights {wb / 1e9:.2f} GB",
          flush=True)
    if a.graph_only:
        one = _prompts(tok, model, 1, 128, 0).to(model.device)
        try:
            with torch.inference_mode():
                ref = model.generate(input_ids=one, attention_mask=torch.ones_like(one), max_new_tokens=8,
                                     min_new_tokens=8, do_sample=False, pad_token_id=2, eos_token_id=None)[0, 128:].tolist()
            st = static_greedy_tokens(model, one, 8)
            print("static step tokens == generate tokens:", st == ref, st, ref, flush=True)
        except Exception:
            traceback.print_exc()
        rows, problem = graph_decode(model, one, a.new_tokens, 3, wb, measured_bandwidth_bytes_per_s())
        print("graph_decode problem:", problem)
        for r in rows:
            print(r)
        torch.cuda.synchronize()
        return
    s = Benchmark(prompt_tokens=128, new_tokens=a.new_tokens, batch_sizes=(1, 8), repeats=3, warmup=1)
    rows, facts = run_benchmark(model, tok, s, "cuda", 0, lease=None, weight_bytes=wb)
    for r in rows:
        print(f"{r['metric']:28} b={r.get('batch_size')} {r['value']:.4g} (min {r.get('min')}, max {r.get('max')}) {r['unit']}")
    print(facts, flush=True)


if __name__ == "__main__":
    main()
