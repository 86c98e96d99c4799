"""Scale of the results store (issue 26): synthetic stores of 10k and 100k trials in the layout `sweep launch` leaves,
then the commands people run on them, timed (wall, CPU) with their peak memory.

    python benchmarks/store_scale.py --trials 10000 --out /tmp/scale10k            # make (once) and time
    python benchmarks/store_scale.py --trials 100000 --out /tmp/scale100k --reuse  # time an existing one again

The store: a real study file (hub-id models x 10 precisions, so `sweep launch` expands the same trial ids), its
study.json written by `launch.record_launch`, and per trial the row `runner.config_row` gives plus 65 metric rows
(load 5, benchmark 20 over 4 batch sizes, perplexity 1, KL 39 = 3 summary + 12 categories x 3), committed as
`sweep launch` commits them: segments of up to 10k trials (what compaction leaves), compacted as a launch compacts,
then a tail of 50 trials committed one by one (trials that finished after the last compaction).
Targets: each command <= 5 s at 10k and <= 30 s at 100k, peak RSS < 2 GB at 100k.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PRECISIONS = ["fp32", "bf16", "fp16", "int8", "nf4", "fp4", "w8a16", "w8a8", "w4a16", "hqq4"]
CATEGORIES = ["code", "math", "summarization", "question_answering", "creative_writing", "logical_reasoning",
              "translation", "sentiment", "information_extraction", "instruction_following", "common_sense",
              "domain_knowledge"]
TAIL = 50
CHUNK = 10_000


def study_file(out: Path, trials: int) -> Path:
    models = trials // len(PRECISIONS)
    path = out.parent / f"{out.name}-study.py"
    path.write_text(
        "from sweeper import *\n"
        f"study = Study(name={out.name!r}, models=[f'bench/m{{i:06d}}' for i in range({models})],\n"
        f"              precisions={PRECISIONS!r}, compute_dtypes=['fp32'], kl=False)\n")
    return path


def _metric_rows(tids: list[str], rng) -> pa.Table:
    """65 rows per trial: (stage, task, metric, batch_size) the stages write, random values."""
    shape = ([("load", None, m, None) for m in ("load_s", "footprint_bytes", "weights_bytes", "library_import_s",
                                                 "param_count")]
             + [("benchmark", None, m, b) for b in (1, 4, 8, 16) for m in ("prefill_ms", "decode_tok_s",
                                                                            "throughput_tok_s", "sequence_ms",
                                                                            "peak_memory_bytes")]
             + [("perplexity", None, "token_perplexity", None)]
             + [("kl", None, m, None) for m in ("kl_mean", "kl_p99", "top1_agreement")]
             + [("prompts", c, m, None) for c in CATEGORIES for m in ("kl_mean", "top1_agreement", "gen_match")])
    assert len(shape) == 65
    n, k = len(tids), len(shape)
    return pa.table({
        "trial_id": pa.array(np.repeat(np.array(tids, dtype=object), k), pa.string()),
        "stage": pa.array([s[0] for s in shape] * n, pa.string()),
        "task": pa.array([s[1] for s in shape] * n, pa.string()),
        "metric": pa.array([s[2] for s in shape] * n, pa.string()),
        "batch_size": pa.array([s[3] for s in shape] * n, pa.int64()),
        "value": pa.array(rng.random(n * k) * 1e3, pa.float64()),
        "stderr": pa.array(rng.random(n * k), pa.float64()),
        "n": pa.array(np.full(n * k, 5), pa.int64()),
        "min": pa.nulls(n * k, pa.float64()), "max": pa.nulls(n * k, pa.float64()),
        "unit": pa.array(["x"] * (n * k), pa.string()),
    })


def make(out: Path, trials: int) -> Path:
    from sweeper import launch as L
    from sweeper.runner import config_row
    from sweeper.store import TRIALS_SCHEMA, ResultsStore

    study = study_file(out, trials)
    p, _ = L.plan(str(study), str(out), with_tasks=False)
    out.mkdir(parents=True)
    L.record_launch(p, ["sweep", "launch", str(study)], None)
    store = ResultsStore(out)
    store.take_over("benchmark-generator")
    rng = np.random.default_rng(0)
    env = {"device": "cpu", "host": "bench", "torch_version": "2.13.0", "started_at": "2026-12-06T00:00:00+00:00"}
    bulk, tail = p.trials[:-TAIL], p.trials[-TAIL:]
    for start in range(0, len(bulk), CHUNK):
        chunk = bulk[start:start + CHUNK]
        # all done: a launch retries failed trials, so a store with any would not be "nothing to do"
        rows = [{**config_row(t), **env, "status": "done", "attempt": 1, "duration_s": float(rng.random() * 100)}
                for t in chunk]
        flat = [{k: (json.dumps(v, sort_keys=True) if isinstance(v, (dict, list, tuple)) else v) for k, v in r.items()}
                for r in rows]  # as store.trial_table flattens one row
        store.import_trials(pa.Table.from_pylist(flat, schema=TRIALS_SCHEMA),
                            _metric_rows([t.trial_id for t in chunk], rng))
        print(f"  {start + len(chunk)} trials", flush=True)
    while store.compact():
        pass
    for t in tail:
        m = _metric_rows([t.trial_id], rng).to_pylist()
        store.write_trial({**config_row(t), **env, "status": "done", "attempt": 1}, m)
    return study


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=10_000)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--reuse", action="store_true")
    ap.add_argument("--repeats", type=int, default=1)
    a = ap.parse_args()
    out = a.out.resolve()
    if a.reuse:
        study = out.parent / f"{out.name}-study.py"
    else:
        t0 = time.perf_counter()
        study = make(out, a.trials)
        print(f"made {a.trials} trials in {out} in {time.perf_counter() - t0:.0f}s")
    files = sum(1 for _ in out.rglob("*") if _.is_file())
    print(f"{out}: {files} files, {sum(f.stat().st_size for f in out.rglob('*') if f.is_file()) / 2**20:.0f} MiB")
    sweep = [sys.executable, "-m", "sweeper.cli"]
    commands = {
        "sweep results": [*sweep, "results", str(out)],
        "sweep results --vs-baseline": [*sweep, "results", str(out), "--vs-baseline"],
        "sweep results --view pareto": [*sweep, "results", str(out), "--view", "pareto"],
        "sweep status": [*sweep, "status", str(out)],
        "sweep launch (nothing to do)": [*sweep, "launch", str(study), "--results", str(out)],
    }
    print(f"load average before: {os.getloadavg()[0]:.1f} (2-core machine shared with other work: wall > CPU)")
    print(f"{'command':32s} {'wall s':>8s} {'cpu s':>8s} {'peak MB':>8s}")
    for name, cmd in commands.items():
        for _ in range(a.repeats):
            # each command in its own child; ru_maxrss of children is the largest so far, so one probe process each
            probe = [sys.executable, "-c", "import resource, subprocess, sys, time; t=time.perf_counter(); "
                     "r=subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True); "
                     "u=resource.getrusage(resource.RUSAGE_CHILDREN); "
                     "print(time.perf_counter()-t, u.ru_utime+u.ru_stime, u.ru_maxrss/1024, r.returncode); "
                     "sys.stderr.write(r.stderr[-400:] if r.returncode else '')", *cmd]
            r = subprocess.run(probe, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
            wall, cpu, rss, code = r.stdout.split()
            print(f"{name:32s} {float(wall):8.2f} {float(cpu):8.2f} {float(rss):8.0f}"
                  + ("" if code == "0" else f"  exit {code}: {r.stderr.strip()}"), flush=True)


if __name__ == "__main__":
    main()
