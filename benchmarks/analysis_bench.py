"""Analysis benchmark: a synthetic results set of 100k trials x 50 metrics in the real layout, then summary, compare
(derived columns), Pareto, recommendations, significance and the report tables / renderers, timed.

    python benchmarks/analysis_bench.py --out /tmp/bench_results            # write the set (once) and time
    python benchmarks/analysis_bench.py --out /tmp/bench_results --reuse    # time an existing set again

Layout: the store's (docs/store.md): one commit of every trial, one segment file per kind, as compaction leaves a
large study (``--parts`` is kept for old command lines and ignored).

Shape (defaults): 1000 models x 100 cells (1 baseline + 99 quantized cells) = 100,000 trials, 2% of them failed;
50 metric rows per done trial (load 5, benchmark 9 incl. 4 batch sizes, perplexity 1, kl 4, tasks 5 x 2, prompts 21);
per-item samples for the trials of the first ``--sample-models`` models (5 tasks x ``--items`` items each).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import shutil
import time
from pathlib import Path

import numpy as np
import polars as pl

log = logging.getLogger("analysis_bench")

TASKS = ["arc_easy", "arc_challenge", "hellaswag", "piqa", "mmlu"]
CATEGORIES = ["code", "math", "summarization", "question_answering", "creative_writing", "logical_reasoning",
              "translation", "sentiment", "information_extraction", "instruction_following", "common_sense",
              "domain_knowledge"]
BATCH_SIZES = [1, 4, 8, 16]
PRECISIONS = ["fp32", "bf16", "int8", "nf4", "fp4", "w8a16", "w8a8", "w4a16", "awq", "gptq", "fp8"]


def make_results(out: Path, models: int = 1000, cells: int = 100, parts: int = 10, sample_models: int = 20,
                 items: int = 250, seed: int = 0) -> dict[str, int]:
    rng = np.random.default_rng(seed)
    n = models * cells
    model_idx = np.repeat(np.arange(models), cells)
    cell_idx = np.tile(np.arange(cells), models)
    trial_id = np.array([f"t{i:07d}" for i in range(n)])
    base_of = model_idx * cells  # cell 0 of each model is its baseline
    failed = (rng.random(n) < 0.02) & (cell_idx != 0)
    prec = np.array(PRECISIONS)[cell_idx % len(PRECISIONS)]
    prec[cell_idx == 0] = "fp16"
    cdt = np.where(cell_idx % 2 == 0, "fp16", "bf16")
    cdt[cell_idx == 0] = "fp16"
    trials = pl.DataFrame({
        "trial_id": trial_id, "study": "bench", "model": [f"model-{m:04d}" for m in model_idx],
        "model_id": [f"org/model-{m:04d}" for m in model_idx],
        "precision": prec, "compute_dtype": cdt, "precision_options": "{}", "is_baseline": cell_idx == 0,
        "baseline_id": trial_id[base_of], "status": np.where(failed, "failed", "done"),
        "error_stage": ["load" if f else None for f in failed],
        "error_type": ["OutOfMemoryError" if f else None for f in failed],
        "error": ["CUDA out of memory (synthetic)" if f else None for f in failed], "device": "cuda",
        "device_name": "NVIDIA H100 80GB HBM3", "host": [f"node{m % 8}" for m in model_idx], "gpu_share": 1.0,
        "started_at": "2025-01-01T00:00:00", "finished_at": "2025-01-01T00:10:00", "stage_load_s": 10.0,
        "stage_benchmark_s": 60.0, "torch_version": "2.13.0", "transformers_version": "4.56.0",
    })
    done = ~failed
    # per-trial factors relative to the model's baseline
    mem = np.where(cell_idx == 0, 1.0, rng.uniform(0.2, 1.0, n))
    speed = np.where(cell_idx == 0, 1.0, rng.uniform(0.4, 3.0, n))
    quality = np.where(cell_idx == 0, 1.0, rng.uniform(0.85, 1.01, n))
    base_fp = rng.uniform(1e9, 2e10, models)[model_idx]
    ids = trial_id[done]
    d = lambda a: a[done]  # noqa: E731
    rows: list[pl.DataFrame] = []

    def add(stage: str, metric: str, value: np.ndarray, task: str | None = None, batch_size: int | None = None) -> None:
        rows.append(pl.DataFrame({"trial_id": ids, "stage": stage, "task": task, "metric": metric,
                                  "batch_size": batch_size, "value": value, "stderr": None, "n": None, "min": None,
                                  "max": None, "unit": None},
                                 schema_overrides={"task": pl.String, "batch_size": pl.Int64, "stderr": pl.Float64,
                                                   "n": pl.Int64, "min": pl.Float64, "max": pl.Float64,
                                                   "unit": pl.String}))

    add("load", "load_s", d(30 / speed * rng.uniform(0.9, 1.1, n)))
    add("load", "footprint_bytes", d(base_fp * mem))
    add("load", "allocated_bytes", d(base_fp * mem * 1.02))
    add("load", "weights_bytes", d(base_fp * mem * 0.97))
    add("load", "num_params", d(base_fp / 2))
    add("benchmark", "prefill_ms", d(50 / speed), batch_size=1)
    add("benchmark", "decode_tok_s", d(40 * speed), batch_size=1)
    add("benchmark", "decode_ms_per_token", d(25 / speed), batch_size=1)
    add("benchmark", "sequence_ms", d(5000 / speed), batch_size=1)
    for bs in BATCH_SIZES:
        add("benchmark", "throughput_tok_s", d(40 * speed * bs ** 0.8), batch_size=bs)
    add("benchmark", "peak_memory_bytes", d(base_fp * mem * 1.2))
    add("perplexity", "token_perplexity", d(8 / quality))
    add("kl", "kl_mean", d((1 - quality).clip(0) * 2))
    add("kl", "kl_median", d((1 - quality).clip(0)))
    add("kl", "kl_p95", d((1 - quality).clip(0) * 6))
    add("kl", "top1_agreement", d(quality.clip(0, 1)))
    for i, t in enumerate(TASKS):
        acc = 0.4 + 0.1 * i
        add("tasks", "acc", d(acc * quality * rng.uniform(0.99, 1.01, n)), task=t)
        add("tasks", "acc_norm", d((acc + 0.02) * quality * rng.uniform(0.99, 1.01, n)), task=t)
    for c in CATEGORIES:
        add("prompts", "kl_mean", d((1 - quality).clip(0) * rng.uniform(1, 3, n)), task=c)
    for c in CATEGORIES[:9]:
        add("prompts", "avg_generated_tokens", d(rng.uniform(50, 120, n)), task=c)
    metrics = pl.concat(rows).sort("trial_id")

    # samples: per-item 0/1 for the first sample_models models' done trials
    sel = done & (model_idx < sample_models)
    s_ids = trial_id[sel]
    s_q = quality[sel]
    s_base = base_of[sel]
    srows = []
    for i, t in enumerate(TASKS):
        p_base = 0.42 + 0.1 * i
        u = np.random.default_rng([seed, i]).random((models, items))  # one draw per model and item, shared
        base_correct = u < p_base
        for j in range(len(s_ids)):
            m = s_base[j] // cells
            # a trial keeps the baseline's answer except with a probability growing with its quality loss
            flip = rng.random(items) < (1 - s_q[j]).clip(0) * 2 + 0.01
            correct = np.where(flip, ~base_correct[m], base_correct[m]) if s_ids[j] != trial_id[s_base[j]] \
                else base_correct[m]
            srows.append((s_ids[j], t, correct))
    samples = pl.DataFrame({
        "trial_id": np.repeat([r[0] for r in srows], items), "task": np.repeat([r[1] for r in srows], items),
        "doc_id": np.tile(np.arange(items), len(srows)), "metric": "acc_norm",
        "value": np.concatenate([r[2] for r in srows]).astype(float) if srows else np.array([]),
        "correct": np.concatenate([r[2] for r in srows]) if srows else np.array([], dtype=bool),
        "gold_loglik": -1.0, "filter": "none"})

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / "study.json").write_text(json.dumps({"name": "bench", "synthetic": True, "models": models,
                                                "cells": cells}) + "\n")
    from sweeper.store import ResultsStore  # committed as segments, the layout compaction leaves (docs/store.md)

    ResultsStore(out).import_trials(trials.to_arrow(), metrics.to_arrow(), samples.to_arrow())
    return {"trials": trials.height, "done": int(done.sum()), "metric_rows": metrics.height,
            "sample_rows": samples.height, "sample_trials": int(sel.sum())}


def _timed(name: str, fn, timings: dict[str, float]):
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    timings[name] = time.perf_counter() - t0
    # CPU seconds of this process too: on a shared machine wall time includes waiting for a CPU
    log.info("%-28s %8.2f s  (cpu %.2f s)", name, timings[name], time.process_time() - c0)
    return out


def run(out: Path) -> dict[str, float]:
    from sweeper import analysis
    from sweeper.report import build_report, render_html, render_markdown
    from sweeper.results import open_results

    res = open_results([str(out)], check=False)  # the timings are of the queries, not of checking the segments
    tm: dict[str, float] = {}
    summ = _timed("summary (collect)", lambda: res.summary().collect(), tm)
    cmp = _timed("compare (derived columns)", lambda: analysis.compare(res).collect(), tm)
    par = _timed("pareto (2 fronts per model)", lambda: analysis.pareto(cmp), tm)
    _timed("recommendations", lambda: analysis.recommend(cmp), tm)
    sig = _timed("significance (bootstrap)", lambda: analysis.significance(res), tm)
    data = _timed("report tables (build_report)", lambda: build_report(res), tm)
    md = _timed("render markdown", lambda: render_markdown(data), tm)
    html = _timed("render html", lambda: render_html(data), tm)
    log.info("rows: summary %d, compare %d x %d cols, pareto fronts %d/%d, significance pairs %d; "
             "markdown %.1f MB, html %.1f MB", summ.height, cmp.height, cmp.width,
             int(par.get_column("pareto_memory").fill_null(False).sum()),
             int(par.get_column("pareto_throughput").fill_null(False).sum()), sig.height, len(md) / 1e6,
             len(html) / 1e6)
    return tm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("/tmp/sweeper_bench_results"))
    ap.add_argument("--models", type=int, default=1000)
    ap.add_argument("--cells", type=int, default=100)
    ap.add_argument("--parts", type=int, default=10)
    ap.add_argument("--sample-models", type=int, default=20)
    ap.add_argument("--items", type=int, default=250)
    ap.add_argument("--reuse", action="store_true", help="time an existing set instead of writing a new one")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not a.reuse:
        t0 = time.perf_counter()
        info = make_results(a.out, a.models, a.cells, a.parts, a.sample_models, a.items)
        log.info("wrote %s in %.1f s: %s", a.out, time.perf_counter() - t0, info)
    log.info("machine: %s, %d CPUs, python %s, polars %s, %s", platform.machine(), os.cpu_count() or 0,
             platform.python_version(), pl.__version__, dt.date.today().isoformat())
    tm = run(a.out)
    log.info("total analysis %.2f s", sum(tm.values()))


if __name__ == "__main__":
    main()
