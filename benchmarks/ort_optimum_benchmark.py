"""The cells of benchmarks/ort_kv_cache.py (llama-4m decode tok/s for PyTorch fp32, ort-fp32 and ort-int8, each with
the KV cache on and off) measured by optimum-benchmark instead of the sweeper's benchmark stage, as an outside check
of that script's ratios.

optimum-benchmark needs transformers < 5 while this project uses transformers 5, so this runs in its own virtual
environment and imports nothing from sweeper (docs/performance.md, "ONNX Runtime and the KV cache on CPU"):

    python3 -m venv /tmp/obvenv
    /tmp/obvenv/bin/pip install torch==2.13.0
    /tmp/obvenv/bin/pip install optimum-benchmark==0.6.0 "optimum-onnx[onnxruntime]==0.1.0" "transformers<5"
    (resolves to optimum 2.1.0, transformers 4.57.6, onnxruntime 1.32.0; the logged runs had transformers 4.53.3;
    see shim_ort_supported_tasks and docs/performance.md)
    /tmp/obvenv/bin/python benchmarks/ort_optimum_benchmark.py --rounds 3 --threads 1 \
        > benchmarks/logs/ort_optimum_benchmark_cpu.txt

Same shape as benchmarks/ort_kv_cache.py: a 64-token prompt (random ids, batch 1), 32 new tokens (greedy, min = max),
5 timed generations after 1 warmup per cell and round, one intra-op thread. Cells run in rotating rounds so a slow
minute of this shared machine hits every cell alike; the medians over rounds are compared. The model is the real
folder (no_weights=False). ORT cells export it with optimum (export=True) in each launch; int8 is optimum's dynamic
quantization with the same settings as sweeper.quantize.onnx_export (quantize_dynamic, QOperator, per-channel QInt8
weights, uint8 activations). Decode tok/s is optimum-benchmark's per-token decode throughput (tokens after the first
over the time after the first token).
"""
import argparse
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODEL = REPO.parent / "shared" / "data" / "models" / "llama-4m"


def shim_ort_supported_tasks() -> None:
    """optimum-benchmark 0.6.0's onnxruntime backend imports ``ORT_SUPPORTED_TASKS`` from ``optimum.pipelines``, which
    only optimum < 2 has; optimum < 2 (1.27.0) in turn fails to import with torch 2.13 (its exporter imports
    ``torch.onnx.symbolic_opset14._attention_scale``, gone from torch). With optimum 2.x + optimum-onnx the same table
    lives in optimum.onnxruntime.pipelines as ORT_TASKS_MAPPING (task -> ORTModel classes); the backend only reads
    ``task_dict["class"][0].__name__`` from it, so that table is handed over under the old name."""
    import optimum.pipelines
    from optimum.onnxruntime.pipelines import ORT_TASKS_MAPPING

    if not hasattr(optimum.pipelines, "ORT_SUPPORTED_TASKS"):
        optimum.pipelines.ORT_SUPPORTED_TASKS = {t: {"class": c} for t, c in ORT_TASKS_MAPPING.items()}


def cell_config(name: str, kv: bool, threads: int, io_binding: bool | None = None):
    from optimum_benchmark import ORTConfig, PyTorchConfig

    common = dict(model=str(MODEL), device="cpu", task="text-generation", no_weights=False)
    if name == "fp32":
        # optimum-benchmark 0.6.0's pytorch backend passes inter_op_num_threads to torch.set_num_threads (and intra to
        # set_num_interop_threads); the script sets torch's threads itself before any launch instead.
        return PyTorchConfig(**common, torch_dtype="float32")
    # io_binding None: optimum-benchmark's default (on for CPUExecutionProvider with a transformers model)
    ort = dict(common, export=True, use_cache=kv, use_io_binding=io_binding,
               session_options={"intra_op_num_threads": threads, "inter_op_num_threads": 1})
    if name == "ort-fp32":
        return ORTConfig(**ort)
    return ORTConfig(**ort, quantization=True,
                     quantization_config={"is_static": False, "format": "QOperator", "mode": "IntegerOps",
                                          "per_channel": True, "weights_dtype": "QInt8",
                                          "activations_dtype": "QUInt8"})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--no-io-binding", action="store_true", help="ORT cells with use_io_binding=False (a diagnostic)")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    import onnxruntime
    from importlib.metadata import version
    import transformers
    shim_ort_supported_tasks()
    from optimum_benchmark import Benchmark, BenchmarkConfig, InferenceConfig, InlineConfig

    print(f"# optimum-benchmark {version('optimum-benchmark')}, torch {torch.__version__}, onnxruntime "
          f"{onnxruntime.__version__}, transformers {transformers.__version__}, threads {args.threads}, prompt "
          f"{args.prompt_tokens} tokens, {args.new_tokens} new tokens, 5 timed generations + 1 warmup per cell "
          f"and round, ORT io binding {'off' if args.no_io_binding else 'default'}, "
          f"loadavg at start {os.getloadavg()}", flush=True)
    names = ["fp32", "ort-fp32", "ort-int8"]
    cells: dict[tuple[str, bool], list[float]] = {}
    for r in range(args.rounds):
        for name in names[r % 3:] + names[:r % 3]:
            for kv in (True, False) if r % 2 == 0 else (False, True):
                scenario = InferenceConfig(
                    latency=True, memory=False, iterations=5, duration=0, warmup_runs=1,
                    input_shapes={"batch_size": 1, "sequence_length": args.prompt_tokens},
                    generate_kwargs={"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens,
                                     "do_sample": False, "use_cache": kv})
                config = BenchmarkConfig(name=f"{name}-kv{int(kv)}", launcher=InlineConfig(), scenario=scenario,
                                         backend=cell_config(name, kv, args.threads,
                                                                    False if args.no_io_binding else None))
                report = Benchmark.launch(config)
                tok_s = report.decode.throughput.value
                cells.setdefault((name, kv), []).append(tok_s)
                print(f"# round {r + 1} {name} kv_cache {'on' if kv else 'off'}: decode {tok_s:.1f} tok/s",
                      flush=True)
        print(f"# round {r + 1} done, loadavg {os.getloadavg()}", flush=True)
    print("precision,kv_cache,decode_tok_s_median,rounds,per_round")
    med = {k: statistics.median(v) for k, v in cells.items()}
    for name in names:
        for kv in (True, False):
            vals = cells[(name, kv)]
            print(f"{name},{'on' if kv else 'off'},{med[(name, kv)]:.1f},{len(vals)},"
                  f"{' '.join(f'{v:.1f}' for v in vals)}")
    print("# ratios (medians)")
    base = med[("fp32", True)]
    for name in names:
        on, off = med[(name, True)], med[(name, False)]
        print(f"{name}: cache on / off = {on / off:.2f}x; vs PyTorch fp32 with cache: on {on / base:.2f}x, "
              f"off {off / base:.2f}x; vs PyTorch fp32 without cache: off {off / med[('fp32', False)]:.2f}x")
    print(f"# finished {time.strftime('%Y-%m-%d %H:%M:%S')}")


if __name__ == "__main__":
    sys.exit(main())
