"""Issue 6, point 3: is a trial's timing disturbed by neighbours on the same GPU, with the timing lease on and off?

One "victim" process loads a model and runs the benchmark stage (sweeper.stages.benchmark.run_benchmark, as a trial
does) ``--rounds`` times in each of three conditions:

  alone        no other process on the GPU; the lease on (as a trial runs by default)
  lease-on     ``--neighbours`` processes run forward passes back to back on the same GPU, each guarded by the timing
               lease exactly as the runner guards a packed trial (TimingLease.guard_forwards); the victim's stage
               holds the lease exclusively (Benchmark(exclusive_timing=True))
  lease-off    the same neighbours without the lease, and the victim without it (Benchmark(exclusive_timing=False))

Every round yields what a trial row would report (the median of ``repeats`` timings of prefill_ms, decode_tok_s,
sequence_ms and decode_graph_tok_s). Per condition and metric: the median over rounds, max/min over rounds (target
<= 1.05) and the median's ratio to the alone median. Neighbours count their forward passes, to show they ran.

    python3 benchmarks/gpu/timing_spread.py --model /tmp/gpu-models/qwen2.5-0.5b-shape --csv $OUT/timing.csv
"""
from __future__ import annotations

import argparse
import csv
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

METRICS = ("prefill_ms", "decode_tok_s", "sequence_ms", "decode_graph_tok_s")


def _load(model_path: str, device: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = torch.float16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, device_map={"": 0} if device == "cuda" else None)
    tok = AutoTokenizer.from_pretrained(model_path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model.eval(), tok


def neighbour(model_path: str, device: str, use_lease: bool, batch: int, tokens: int, ready, stop, counter) -> None:
    import torch

    from sweeper.timing_lease import TimingLease

    lease = TimingLease(device) if use_lease else None
    with (lease.shared() if lease else _Null()):
        model, _ = _load(model_path, device)
    if lease:
        lease.guard_forwards(model)
    ids = torch.randint(3, 4000, (batch, tokens), generator=torch.Generator().manual_seed(os.getpid())).to(model.device)
    ready.set()
    with torch.inference_mode():
        while not stop.is_set():
            model(input_ids=ids, use_cache=False)
            if not lease and device == "cuda":
                torch.cuda.synchronize()  # the same host behaviour as a guarded forward (which synchronises)
            with counter.get_lock():
                counter.value += 1
    if lease:
        lease.close()


class _Null:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


def victim_rounds(model, tok, device: str, rounds: int, use_lease: bool, settings, weight_bytes: float) -> list[dict]:
    from sweeper.stages.benchmark import run_benchmark
    from sweeper.timing_lease import TimingLease

    out = []
    for r in range(rounds):
        lease = TimingLease(device) if use_lease else None
        t0 = time.perf_counter()
        rows, facts = run_benchmark(model, tok, settings, device, seed=0, lease=lease, weight_bytes=weight_bytes)
        wall = time.perf_counter() - t0
        if lease:
            lease.close()
        rec = {"round": r, "stage_s": wall, "timing_wait_s": facts.get("timing_wait_s"),
               "graph_decode_error": facts.get("graph_decode_error")}
        for row in rows:
            if row["metric"] in METRICS and row.get("batch_size") in (None, 1):
                rec[row["metric"]] = row["value"]
                rec[row["metric"] + "_rep_min"] = row.get("min")
                rec[row["metric"] + "_rep_max"] = row.get("max")
        out.append(rec)
        time.sleep(0.3)  # let neighbours run between rounds, as between two trials' timed sections
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--neighbour-model", default=None, help="default: --model")
    ap.add_argument("--neighbours", type=int, default=3)
    ap.add_argument("--neighbour-batch", type=int, default=8)
    ap.add_argument("--neighbour-tokens", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--csv", default="timing_spread.csv")
    ap.add_argument("--conditions", default="alone,lease-on,lease-off")
    ap.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph decode")
    a = ap.parse_args()

    import torch

    from sweeper.stages.load import stored_bytes
    from sweeper.study import Benchmark

    device = "cuda" if torch.cuda.is_available() else "cpu"
    os.environ.setdefault("SWEEPER_LOCK_DIR", f"/tmp/timing-spread-{os.getpid()}")
    model, tok = _load(a.model, device)
    wb = float(stored_bytes(model))
    ctx = mp.get_context("spawn")
    records = []
    for cond in a.conditions.split(","):
        use_lease = cond != "lease-off"
        settings = Benchmark(prompt_tokens=128, new_tokens=a.new_tokens, batch_sizes=(1,), repeats=a.repeats, warmup=1,
                             exclusive_timing=use_lease, graph_decode=not a.no_graph)
        procs, stop, counter = [], ctx.Event(), ctx.Value("l", 0)
        if cond != "alone":
            readies = []
            for _ in range(a.neighbours):
                ready = ctx.Event()
                p = ctx.Process(target=neighbour, args=(a.neighbour_model or a.model, device, use_lease,
                                                        a.neighbour_batch, a.neighbour_tokens, ready, stop, counter))
                p.start()
                procs.append(p)
                readies.append(ready)
            for r in readies:
                if not r.wait(300):
                    raise SystemExit("a neighbour did not get ready in 300 s")
            time.sleep(1.0)
        c0 = counter.value
        t0 = time.perf_counter()
        recs = victim_rounds(model, tok, device, a.rounds, use_lease, settings, wb)
        elapsed = time.perf_counter() - t0
        forwards = counter.value - c0
        stop.set()
        for p in procs:
            p.join(60)
        for rec in recs:
            rec.update(condition=cond, neighbours=len(procs), neighbour_forwards=forwards, condition_s=elapsed)
        records += recs
        print(f"{cond}: {a.rounds} rounds in {elapsed:.1f}s, neighbour forwards during them: {forwards}", flush=True)
        for rec in recs:
            print("  " + ", ".join(f"{k}={rec.get(k)}" for k in ("round", *METRICS, "timing_wait_s", "graph_decode_error")),
                  flush=True)
        keys = sorted({k for r in records for k in r}, key=lambda k: (k not in ("condition", "round"), k))
        with open(a.csv, "w", newline="") as fh:  # rewritten after each condition: a killed run keeps what it had
            w = csv.DictWriter(fh, fieldnames=keys)
            w.writeheader()
            w.writerows(records)

    conds = list(dict.fromkeys(r["condition"] for r in records))
    base = {m: statistics.median([r[m] for r in records if r["condition"] == conds[0] and r.get(m) is not None] or [0])
            for m in METRICS}
    print(f"\nvictim {Path(a.model).name} fp16 on {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}; "
          f"{a.rounds} rounds x {a.repeats} repeats; neighbours: {a.neighbours} x forward batch "
          f"{a.neighbour_batch} x {a.neighbour_tokens} tokens")
    print(f"{'condition':10} {'metric':20} {'median':>10} {'max/min':>8} {'vs alone':>9} {'wait s':>7}")
    for c in conds:
        rs = [r for r in records if r["condition"] == c]
        wait = statistics.median([r["timing_wait_s"] or 0 for r in rs])
        for m in METRICS:
            v = [r[m] for r in rs if r.get(m) is not None]
            if not v:
                continue
            med = statistics.median(v)
            print(f"{c:10} {m:20} {med:10.3f} {max(v) / min(v):8.3f} {med / base[m] if base[m] else float('nan'):9.3f} "
                  f"{wait:7.3f}")


if __name__ == "__main__":
    main()
