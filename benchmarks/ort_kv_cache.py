"""llama-4m decode speed for PyTorch fp32, ort-fp32 and ort-int8, each with the KV cache on and off, side by side
in one process, through the benchmark stage itself (sweeper.stages.benchmark.run_benchmark with
Benchmark(kv_cache=(True, False))), in rotating rounds so a slow minute of this shared machine hits every cell alike.

Models are loaded by the load stage (the ONNX export and its int8 quantization come from a cache folder, made on the
first run). Threads: torch and ONNX Runtime both use --threads intra-op threads.

    python3 benchmarks/ort_kv_cache.py --rounds 5 --threads 1 > benchmarks/logs/ort_kv_cache_cpu_run2.txt
"""
import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
MODEL = REPO.parent / "shared" / "data" / "models" / "llama-4m"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "sweeper-ort-bench-cache"))
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from sweeper import Benchmark, Study
    from sweeper.stages.benchmark import run_benchmark
    from sweeper.stages.load import load_model
    from sweeper.store import ResultsStore
    from sweeper.trials import expand

    settings = Benchmark(prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, batch_sizes=(1,), repeats=5,
                         warmup=1, kv_cache=(True, False))
    study = Study(name="ortbench", models=[str(MODEL)], precisions=["fp32", "ort-fp32", "ort-int8"],
                  compute_dtypes=["fp32"], benchmark=settings, kl=False)
    store = ResultsStore(args.cache)
    loaded = {}
    for spec in expand(study)[0]:
        lm = load_model(spec, "cpu", store)
        facts = {m["metric"]: m["value"] for m in lm.metrics}
        loaded[spec.precision] = lm
        print(f"# {spec.precision}: load_s {facts['load_s']:.2f}, weights_bytes {facts['weights_bytes']:.0f}, "
              f"export_cache_hit {facts.get('export_cache_hit', '-')}, provider {lm.facts.get('runtime_provider', 'torch')}")
    import onnxruntime

    print(f"# torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, threads {args.threads}, "
          f"prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens, repeats 5 per round, "
          f"loadavg at start {os.getloadavg()}")
    cells: dict[tuple[str, str], list[float]] = {}
    order = list(loaded)
    for r in range(args.rounds):
        for name in order[r % len(order):] + order[:r % len(order)]:
            lm = loaded[name]
            rows, _ = run_benchmark(lm.model, lm.tokenizer, settings, "cpu", seed=0)
            for row in rows:
                if row["metric"] in ("decode_tok_s", "decode_tok_s_no_kv"):
                    cells.setdefault((name, row["metric"]), []).append(row["value"])
        print(f"# round {r + 1} done, loadavg {os.getloadavg()}", flush=True)
    print("precision,kv_cache,decode_tok_s_median,rounds,per_round")
    med = {k: statistics.median(v) for k, v in cells.items()}
    for name in order:
        for metric, kv in (("decode_tok_s", "on"), ("decode_tok_s_no_kv", "off")):
            vals = cells[(name, metric)]
            print(f"{name},{kv},{med[(name, metric)]:.1f},{len(vals)},{' '.join(f'{v:.1f}' for v in vals)}")
    print("# ratios (medians)")
    base = med[("fp32", "decode_tok_s")]
    for name in order:
        on, off = med[(name, "decode_tok_s")], med[(name, "decode_tok_s_no_kv")]
        print(f"{name}: cache on / off = {on / off:.2f}x; vs PyTorch fp32 with cache: on {on / base:.2f}x, "
              f"off {off / base:.2f}x; vs PyTorch fp32 without cache: off {off / med[('fp32', 'decode_tok_s_no_kv')]:.2f}x")
    print(f"# finished {time.strftime('%Y-%m-%d %H:%M:%S')}")


if __name__ == "__main__":
    main()
