"""Issue 6, point 3: where the spread of eager timings comes from when a trial is alone on its GPU.

Run4 found the eager numbers (prefill_ms, decode_tok_s of HF ``generate``) spreading 1.3-1.9 (max/min of round
medians) with no neighbour at all, while the CUDA-graph decode spread 1.005. This script runs, in one process and with
nothing else on the GPU, ``--rounds`` rounds; each round runs every variant once (in an order rotated per round):

  stage        sweeper.stages.benchmark.run_benchmark as a trial runs it (graph decode off)
  stage-nogc   the same with Python's garbage collector off during the stage (as timeit does)
  stage-pin    the same with this process pinned to one CPU core during the stage
  cpu-probe    a fixed pure-Python workload (no GPU, no torch): the host's own speed
  launch-probe 2000 tiny CUDA kernels launched back to back, then a synchronize: the host's launch rate

and reads the host's steal time (/proc/stat) around it. If cpu-probe spreads as much as the eager numbers and moves
with them round by round, the host's speed varies and no GPU-side design (lease, separate phase) can make eager
timings steadier; if stage-nogc or stage-pin is steady where stage is not, the benchmark stage should do that.

    python3 benchmarks/gpu/eager_noise.py --model /tmp/gpu-models/qwen2.5-0.5b-shape --csv $OUT/eager_noise.csv
"""
from __future__ import annotations

import argparse
import csv
import gc
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

STAGE_METRICS = ("prefill_ms", "decode_tok_s", "sequence_ms")


def steal_ticks() -> int | None:
    """Host-wide steal time so far (clock ticks): time the hypervisor ran something else on our virtual CPUs."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
        return int(fields[8])
    except (OSError, IndexError, ValueError):
        return None


def cpu_probe(repeats: int = 5) -> float:
    """Median ms of a fixed pure-Python loop."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        acc = 0
        for i in range(300_000):
            acc += i * i % 7
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def launch_probe(device: str, repeats: int = 5, kernels: int = 2000) -> float | None:
    """Median ms to launch ``kernels`` one-element adds and wait for them."""
    if device != "cuda":
        return None
    import torch

    x = torch.zeros(1, device="cuda")
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(kernels):
            x.add_(1.0)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


class _Pinned:
    """This process on one CPU core (the one it is on now) for the block."""

    def __enter__(self):
        self.saved = os.sched_getaffinity(0)
        core = os.sched_getcpu() if hasattr(os, "sched_getcpu") else min(self.saved)
        os.sched_setaffinity(0, {core})
        return self

    def __exit__(self, *exc):
        os.sched_setaffinity(0, self.saved)
        return False


class _NoGC:
    def __enter__(self):
        gc.collect()
        gc.disable()
        return self

    def __exit__(self, *exc):
        gc.enable()
        return False


def stage(model, tok, device: str, settings, wrapper=None) -> dict:
    from contextlib import nullcontext

    from sweeper.stages.benchmark import run_benchmark

    with (wrapper() if wrapper else nullcontext()):
        rows, _ = run_benchmark(model, tok, settings, device, seed=0, lease=None)
    return {r["metric"]: r["value"] for r in rows if r["metric"] in STAGE_METRICS and r.get("batch_size") in (None, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--csv", default="eager_noise.csv")
    a = ap.parse_args()

    import torch

    from sweeper.study import Benchmark

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from timing_spread import _load

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tok = _load(a.model, device)
    settings = Benchmark(prompt_tokens=128, new_tokens=a.new_tokens, batch_sizes=(1,), repeats=a.repeats, warmup=1,
                         exclusive_timing=False, graph_decode=False)
    variants = {
        "stage": lambda: stage(model, tok, device, settings),
        "stage-nogc": lambda: stage(model, tok, device, settings, _NoGC),
        "stage-pin": lambda: stage(model, tok, device, settings, _Pinned),
        "cpu-probe": lambda: {"ms": cpu_probe()},
        "launch-probe": lambda: {"ms": launch_probe(device)},
    }
    names = list(variants)
    stage(model, tok, device, settings)  # the process's first stage pays one-off set-up: not a round
    tick = os.sysconf("SC_CLK_TCK")
    records = []
    for r in range(a.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            s0, t0 = steal_ticks(), time.perf_counter()
            values = variants[name]()
            s1, wall = steal_ticks(), time.perf_counter() - t0
            rec = {"round": r, "variant": name, "wall_s": round(wall, 3),
                   "steal_s": (s1 - s0) / tick if s0 is not None and s1 is not None else None, **values}
            records.append(rec)
            print(", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items()), flush=True)
        keys = list(dict.fromkeys(k for rec in records for k in rec))
        with open(a.csv, "w", newline="") as fh:  # rewritten each round: a killed run keeps what it had
            w = csv.DictWriter(fh, fieldnames=keys)
            w.writeheader()
            w.writerows(records)

    print(f"\n{Path(a.model).name} fp16 on {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}, alone; "
          f"{a.rounds} rounds, each variant once per round; stage: {a.repeats} repeats, {a.new_tokens} new tokens; "
          f"{os.cpu_count()} CPUs")
    print(f"{'variant':13} {'metric':14} {'median':>10} {'max/min':>8}  round values")
    series: dict[tuple[str, str], list[float]] = {}
    for name in names:
        rs = [rec for rec in records if rec["variant"] == name]
        for m in [k for k in rs[0] if k not in ("round", "variant", "wall_s", "steal_s")]:
            v = [rec[m] for rec in rs if rec.get(m) is not None]
            if not v:
                continue
            series[(name, m)] = v
            print(f"{name:13} {m:14} {statistics.median(v):10.3f} {max(v) / min(v):8.3f}  "
                  + " ".join(f"{x:.2f}" for x in v))
    steal = [rec["steal_s"] for rec in records if rec.get("steal_s") is not None]
    if steal:
        print(f"steal time per variant run: median {statistics.median(steal):.3f} s, max {max(steal):.3f} s")
    probe = series.get(("cpu-probe", "ms"))
    if probe and len(probe) > 2:
        for key in [k for k in series if k[0].startswith("stage")]:
            print(f"round-by-round correlation of {key[0]} {key[1]} with cpu-probe ms: "
                  f"{statistics.correlation(series[key], probe):+.2f}")


if __name__ == "__main__":
    main()
