"""Answers, not rows: every trial compared with its model's baseline cell, paired significance, Pareto fronts and
recommendations. All functions take a :class:`sweeper.results.Results` (``open_results(dirs)``).

    >>> from sweeper.results import open_results
    >>> from sweeper import analysis
    >>> res = open_results(["results/qwen"])
    >>> analysis.compare(res).collect()        # summary + derived columns (speedup_*, memory_reduction, retention_*, ...)
    >>> analysis.significance(res)             # per trial and task: accuracy difference, 95% CI, verdict
    >>> analysis.pareto(analysis.compare(res)) # per-model fronts over (retention, memory) and (retention, throughput)
    >>> analysis.recommend(analysis.compare(res))

Definitions (docs/analysis.md repeats them):

- ``speedup_decode`` = trial decode tok/s / baseline decode tok/s (eager ``generate``, batch 1);
  ``speedup_decode_graph`` = the same for the kernel-level decode (``decode_graph_tok_s``: the decode step replayed as
  a CUDA graph; null where a trial has none, its ``graph_decode_error`` says why); ``speedup_decode_no_kv`` the same
  without the KV cache (``Benchmark(kv_cache=(True, False))``); ``kv_cache_speedup`` = the trial's decode tok/s with
  the cache / without it (needs no baseline); ``speedup_throughput`` = trial batch
  tok/s / baseline batch tok/s at the same batch size (the trial's largest); ``speedup_prefill``,
  ``speedup_sequence``, ``speedup_load`` = baseline time / trial time. > 1 means faster.
- A trial's memory is ``weights_gb``: the bytes its loaded weights really occupy (``weights_bytes`` of the load stage,
  packed quantized storage and scales included; docs/measurement.md says why not ``get_memory_footprint()``, which
  stays apart as ``hf_footprint_gb``). ``memory_reduction`` = 1 - trial weights / baseline weights;
  ``memory_reduction_peak`` = the same for the benchmark's peak memory; ``compression_ratio`` = baseline weights /
  trial weights; ``gb_saved`` = baseline - trial weights_gb.
- ``retention_<task>`` = trial main metric / baseline main metric (baseline / trial for lower-is-better metrics such as
  word_perplexity); ``retention_mean`` = mean over the higher-is-better (accuracy-type) top-level tasks;
  ``retention_mean_ppl`` = mean over the lower-is-better (perplexity-type) top-level tasks.
- ``ppl_delta_pct`` = 100 * (trial token perplexity / baseline token perplexity - 1);
  ``ppl_delta_per_gb_saved`` = ppl_delta_pct / gb_saved (null where nothing is saved).
- ``baseline_status``: ``self`` (this is the baseline), ``ok``, ``missing`` (the baseline's trial is not in the
  loaded directories), ``failed`` (it is there but failed), ``none`` (the trial names no baseline). Derived columns are
  null unless ``self`` or ``ok``.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import polars as pl

from .results import (TASK_MAIN_METRICS, Results, stack_folders, task_main_metrics, task_metric_rank, task_tops,
                      with_top)

log = logging.getLogger(__name__)

# (column, stage, metric, scale) per-trial scalar metrics, in display units (bytes -> GB, decimal).
METRIC_COLUMNS: list[tuple[str, str, str, float]] = [
    ("load_s", "load", "load_s", 1.0),
    ("weights_gb", "load", "weights_bytes", 1e-9),  # the trial's memory: every memory column derives from it
    ("allocated_gb", "load", "allocated_bytes", 1e-9),
    ("hf_footprint_gb", "load", "footprint_bytes", 1e-9),  # model.get_memory_footprint(): shown, never derived from
    ("num_params", "load", "num_params", 1.0),
    ("peak_gb", "benchmark", "peak_memory_bytes", 1e-9),
    ("prefill_ms", "benchmark", "prefill_ms", 1.0),
    ("decode_tok_s", "benchmark", "decode_tok_s", 1.0),
    ("decode_graph_tok_s", "benchmark", "decode_graph_tok_s", 1.0),
    ("decode_ms_per_token", "benchmark", "decode_ms_per_token", 1.0),
    ("sequence_ms", "benchmark", "sequence_ms", 1.0),
    ("decode_tok_s_no_kv", "benchmark", "decode_tok_s_no_kv", 1.0),  # without the KV cache (Benchmark.kv_cache)
    ("sequence_ms_no_kv", "benchmark", "sequence_ms_no_kv", 1.0),
    ("perplexity", "perplexity", "token_perplexity", 1.0),
    ("kl_mean", "kl", "kl_mean", 1.0),
    ("kl_median", "kl", "kl_median", 1.0),
    ("kl_p95", "kl", "kl_p95", 1.0),
    ("top1_agreement", "kl", "top1_agreement", 1.0),
]
# Metrics where lower is better: their retention is baseline / trial, and they stay out of retention_mean.
LOWER_IS_BETTER = {"word_perplexity", "byte_perplexity", "bits_per_byte", "token_perplexity", "perplexity"}

CONFIG_COLUMNS = ["trial_id", "study", "model", "model_id", "precision", "compute_dtype", "is_baseline", "baseline_id",
                  "status", "device", "device_name", "runtime_provider", "gpu_share", "error_stage", "error_type", "error"]

# Derived columns in display order; retention_<task> columns are inserted before retention_mean.
DERIVED_COLUMNS = ["baseline_status", "speedup_decode", "speedup_decode_graph", "speedup_decode_no_kv",
                   "kv_cache_speedup", "speedup_throughput", "speedup_prefill", "speedup_sequence", "load_cold", "speedup_load",
                   "memory_reduction", "memory_reduction_peak", "compression_ratio", "gb_saved", "retention_mean",
                   "ppl_delta_pct", "ppl_delta_per_gb_saved"]

# Recommendation scenarios of the seed reports: (key, description).
SCENARIOS: list[tuple[str, str]] = [
    ("max_throughput_within_1pct", "Highest throughput within 1% retention loss"),
    ("min_memory_within_3pct", "Smallest memory within 3% retention loss"),
    ("best_quality", "Best quality (highest retention, quantized trials)"),
]  # no "fastest load": a load time says more about the caches (which trial of its worker process ran first, which
#    read the model files first) than about the precision

VERDICTS = ("better", "worse", "within noise")


# ----------------------------------------------------------------------------------------------------------- helpers
def _ensure(lf: pl.LazyFrame, cols: dict[str, pl.DataType]) -> pl.LazyFrame:
    """Add missing columns as typed nulls (old or partial trial files)."""
    present = set(lf.collect_schema().names())
    missing = [pl.lit(None, dtype=t).alias(c) for c, t in cols.items() if c not in present]
    return lf.with_columns(missing) if missing else lf


def _trials(res: Results) -> pl.LazyFrame:
    """The trial rows (every TRIALS_SCHEMA column, old files included), with is_baseline filled where an old row lacks
    it."""
    return res.trials.with_columns(
        pl.col("is_baseline").fill_null(pl.col("trial_id") == pl.col("baseline_id")).fill_null(False))


def _scalar_metrics(res: Results) -> pl.LazyFrame:
    m = res.metrics
    cols = []
    for col, stage, metric, scale in METRIC_COLUMNS:
        e = pl.col("value").filter((pl.col("stage") == stage) & (pl.col("metric") == metric)).first()
        cols.append((e * scale if scale != 1.0 else e).alias(col))
    return m.group_by("trial_id").agg(cols)


def _throughput(res: Results) -> pl.LazyFrame:
    """(trial_id, batch_size, value) of every batch throughput row."""
    return (res.metrics.filter((pl.col("stage") == "benchmark") & (pl.col("metric") == "throughput_tok_s"))
            .select("trial_id", "batch_size", "value").unique(["trial_id", "batch_size"], keep="first"))


def _with_baseline_status(lf: pl.LazyFrame, trials: pl.LazyFrame) -> pl.LazyFrame:
    """``lf`` (with trial_id, baseline_id) plus ``baseline_status`` (module docstring): the one definition of whether
    a trial's baseline is usable, shared by the derived columns and significance."""
    # the baseline cells: one row per trial id (the same cell may sit in two studies), done preferred
    base_status = (trials.select("trial_id", "status").sort(pl.col("status") == "done", descending=True)
                   .unique("trial_id", keep="first").rename({"trial_id": "baseline_id", "status": "_base_status"}))
    status = (pl.when(pl.col("baseline_id").is_null()).then(pl.lit("none"))
              .when(pl.col("_base_status").is_null()).then(pl.lit("missing"))
              .when(pl.col("_base_status") != "done").then(pl.lit("failed"))
              .when(pl.col("trial_id") == pl.col("baseline_id")).then(pl.lit("self"))
              .otherwise(pl.lit("ok")))
    return (lf.join(base_status, on="baseline_id", how="left").with_columns(status.alias("baseline_status"))
            .drop("_base_status"))


# ----------------------------------------------------------------------------------------------------------- compare
def compare(res: Results) -> pl.LazyFrame:
    """One row per trial: config, status, headline metrics (display units), task main metrics (one column per top-level
    task, named by the task), and the derived vs-baseline columns (module docstring). Never raises for a missing
    baseline: ``baseline_status`` says why the derived columns are null. Over several results dirs: each dir
    compared on its own (its own numbers; its own baseline, else the same baseline cell of another dir), stacked with
    a ``results_dir`` column."""
    if len(res.dirs) > 1:
        return stack_folders(res.folders(), compare)
    t = _trials(res)
    present = t.collect_schema().names()
    # a cold load: the first trial its worker process ran (imports, allocator and caches cold); later ones are warm
    cold = (pl.col("worker_trial_index") == 0) if "worker_trial_index" in present else pl.lit(None, dtype=pl.Boolean)
    cfg = t.select([c for c in CONFIG_COLUMNS + ["graph_decode_error"] if c in present] + [cold.alias("load_cold")])

    thr = _throughput(res)
    largest = (thr.sort("batch_size").group_by("trial_id")
               .agg(pl.col("batch_size").last().alias("batch_size"), pl.col("value").last().alias("batch_tok_s")))
    w = cfg.join(_scalar_metrics(res), on="trial_id", how="left").join(largest, on="trial_id", how="left")

    metric_cols = [c for c, *_ in METRIC_COLUMNS]
    base = (w.filter(pl.col("status") == "done").unique("trial_id", keep="first")
            .select([pl.col("trial_id").alias("baseline_id"), pl.col("load_cold").alias("load_cold_b")]
                    + [pl.col(c).alias(c + "_b") for c in metric_cols]))
    base_thr = thr.rename({"trial_id": "baseline_id", "value": "_base_batch_tok_s"})

    w = (_with_baseline_status(w, t)
         .join(base, on="baseline_id", how="left")
         .join(base_thr, on=["baseline_id", "batch_size"], how="left"))
    usable = pl.col("baseline_status").is_in(["ok", "self"])

    def ok(e: pl.Expr) -> pl.Expr:
        return pl.when(usable).then(e).otherwise(None)

    def ratio(num: pl.Expr, den: pl.Expr) -> pl.Expr:
        return ok(pl.when(den > 0).then(num / den).otherwise(None))

    gb_saved = ok(pl.col("weights_gb_b") - pl.col("weights_gb"))
    w = w.with_columns(
        ratio(pl.col("decode_tok_s"), pl.col("decode_tok_s_b")).alias("speedup_decode"),
        ratio(pl.col("decode_graph_tok_s"), pl.col("decode_graph_tok_s_b")).alias("speedup_decode_graph"),
        ratio(pl.col("decode_tok_s_no_kv"), pl.col("decode_tok_s_no_kv_b")).alias("speedup_decode_no_kv"),
        # within the trial, no baseline needed: what the KV cache buys
        pl.when(pl.col("decode_tok_s_no_kv") > 0).then(pl.col("decode_tok_s") / pl.col("decode_tok_s_no_kv"))
        .otherwise(None).alias("kv_cache_speedup"),
        ratio(pl.col("batch_tok_s"), pl.col("_base_batch_tok_s")).alias("speedup_throughput"),
        ratio(pl.col("prefill_ms_b"), pl.col("prefill_ms")).alias("speedup_prefill"),
        ratio(pl.col("sequence_ms_b"), pl.col("sequence_ms")).alias("speedup_sequence"),
        # only between two cold or two warm loads (unknown for rows without worker_trial_index: kept)
        pl.when(pl.col("load_cold").eq_missing(pl.col("load_cold_b")))
        .then(ratio(pl.col("load_s_b"), pl.col("load_s"))).alias("speedup_load"),
        (1 - ratio(pl.col("weights_gb"), pl.col("weights_gb_b"))).alias("memory_reduction"),
        (1 - ratio(pl.col("peak_gb"), pl.col("peak_gb_b"))).alias("memory_reduction_peak"),
        ratio(pl.col("weights_gb_b"), pl.col("weights_gb")).alias("compression_ratio"),
        gb_saved.alias("gb_saved"),
        ((ratio(pl.col("perplexity"), pl.col("perplexity_b")) - 1) * 100).alias("ppl_delta_pct"),
    ).with_columns(
        pl.when(pl.col("gb_saved") > 0).then(pl.col("ppl_delta_pct") / pl.col("gb_saved")).otherwise(None)
        .alias("ppl_delta_per_gb_saved"))

    # tasks: main metric per top-level task, retention against the baseline's same task and metric
    tm = task_main_metrics(res.metrics, res.trials)
    task_names: list[str] = sorted(tm.get_column("task").unique().to_list()) if tm.height else []
    if task_names:
        link = (t.select("trial_id", "baseline_id").unique("trial_id", keep="first").collect())
        bt = tm.select(pl.col("trial_id").alias("baseline_id"), "task", "metric", pl.col("value").alias("_bv"))
        long = tm.join(link, on="trial_id", how="left").join(bt, on=["baseline_id", "task", "metric"], how="left")
        lower = pl.col("metric").is_in(list(LOWER_IS_BETTER))
        long = long.with_columns(
            pl.when(lower).then(pl.when(pl.col("value") > 0).then(pl.col("_bv") / pl.col("value")))
            .otherwise(pl.when(pl.col("_bv") > 0).then(pl.col("value") / pl.col("_bv"))).alias("retention"),
            lower.alias("_lower"))
        values = long.pivot(on="task", index="trial_id", values="value", on_columns=task_names)
        ret = long.pivot(on="task", index="trial_id", values="retention", on_columns=task_names)
        ret = ret.rename({k: f"retention_{k}" for k in task_names})
        mean = long.group_by("trial_id").agg(
            pl.col("retention").filter(~pl.col("_lower")).mean().alias("_retention_mean"),
            pl.col("retention").filter(pl.col("_lower")).mean().alias("_retention_mean_ppl"))
        clash = [k for k in task_names if k in w.collect_schema().names()]
        if clash:
            values = values.rename({k: f"task_{k}" for k in clash})
        w = (w.join(values.lazy(), on="trial_id", how="left").join(ret.lazy(), on="trial_id", how="left")
             .join(mean.lazy(), on="trial_id", how="left")
             .with_columns([ok(pl.col(f"retention_{k}")).alias(f"retention_{k}") for k in task_names]
                           + [ok(pl.col("_retention_mean")).alias("retention_mean"),
                              ok(pl.col("_retention_mean_ppl")).alias("retention_mean_ppl")]))
    else:
        w = w.with_columns(pl.lit(None, dtype=pl.Float64).alias("retention_mean"),
                           pl.lit(None, dtype=pl.Float64).alias("retention_mean_ppl"))

    names = w.collect_schema().names()
    task_value_cols = [c for c in names if c in task_names or c in {f"task_{k}" for k in task_names}]
    retention_cols = [f"retention_{k}" for k in task_names]
    head = [c for c in CONFIG_COLUMNS if c in names]
    # why a trial has no kernel-level decode number, right after that number
    shown = metric_cols[:metric_cols.index("decode_graph_tok_s") + 1] + ["graph_decode_error"] \
        + metric_cols[metric_cols.index("decode_graph_tok_s") + 1:]
    order = (head + shown + ["batch_size", "batch_tok_s"] + task_value_cols
             + [c for c in DERIVED_COLUMNS if c != "retention_mean" and c not in ("ppl_delta_pct", "ppl_delta_per_gb_saved")]
             + retention_cols + ["retention_mean", "retention_mean_ppl", "ppl_delta_pct", "ppl_delta_per_gb_saved"])
    out = w.select(order)
    sort = [c for c in ("study", "model", "precision", "compute_dtype") if c in names]
    return out.sort(sort, nulls_last=True) if sort else out


def with_axes(cmp: pl.LazyFrame | pl.DataFrame) -> pl.LazyFrame:
    """Add the two axes the Pareto fronts and recommendations use:

    - ``quality_retention`` = retention_mean (accuracy-type tasks), else retention_mean_ppl (perplexity-type tasks
      such as wikitext), else baseline / trial token perplexity (perplexity stage);
    - ``throughput_tok_s`` = batch throughput at the largest batch size, or decode tok/s where there is none."""
    lf = cmp.lazy()
    names = lf.collect_schema().names()
    none = pl.lit(None, dtype=pl.Float64)
    ppl_ret = (pl.when(pl.col("ppl_delta_pct").is_not_null()).then(100 / (100 + pl.col("ppl_delta_pct")))
               if "ppl_delta_pct" in names else none)
    task_ppl_ret = pl.col("retention_mean_ppl") if "retention_mean_ppl" in names else none
    return lf.with_columns(pl.coalesce(pl.col("retention_mean"), task_ppl_ret, ppl_ret).alias("quality_retention"),
                           pl.coalesce(pl.col("batch_tok_s"), pl.col("decode_tok_s")).alias("throughput_tok_s"))


def _model_keys(lf: pl.LazyFrame) -> list[str]:
    """What a front or a ranking is per: the model, and the results dir where ``compare`` stacked several (two dirs'
    trials are never ranked together)."""
    return ["results_dir", "model"] if "results_dir" in lf.collect_schema().names() else ["model"]


# ----------------------------------------------------------------------------------------------------------- Pareto
def pareto(cmp: pl.LazyFrame | pl.DataFrame) -> pl.DataFrame:
    """Per model, which done trials are on the Pareto front of (quality_retention up, weights_gb down) and of
    (quality_retention up, throughput_tok_s up). Trials lacking an axis value are not on that front (null).

    Columns: model, trial_id, precision, compute_dtype, is_baseline, quality_retention, weights_gb,
    throughput_tok_s, pareto_memory, pareto_throughput (``results_dir`` first, and fronts per dir and model, when
    ``cmp`` stacks several dirs)."""
    lf = with_axes(cmp).filter(pl.col("status") == "done")
    by = _model_keys(lf)
    keep = [*by, "trial_id", "precision", "compute_dtype", "is_baseline", "quality_retention", "weights_gb",
            "throughput_tok_s"]
    lf = lf.select(keep).with_row_index("_i")

    def front(x: str, x_descending: bool, name: str) -> pl.LazyFrame:
        # p is dominated when another point has x better-or-equal and quality >= with one of them strictly better, so
        # p is on the front iff its quality is the best among the points with the same x and beats every point with a
        # strictly better x. Identical points dominate nothing: all of them are on the front (order-independent).
        q = pl.col("quality_retention")
        pts = lf.filter(pl.col(x).is_not_null() & q.is_not_null())
        by_x = (pts.group_by(*by, x).agg(q.max().alias("_best"))
                .sort([*by, x], descending=[False] * len(by) + [x_descending])
                .with_columns(pl.col("_best").cum_max().shift(1).over(by).alias("_prev")))
        s = (pts.join(by_x, on=[*by, x])
             .with_columns(((q == pl.col("_best")) & (pl.col("_prev").is_null() | (q > pl.col("_prev")))).alias(name)))
        return s.select("_i", name)

    out = (lf.join(front("weights_gb", False, "pareto_memory"), on="_i", how="left")
           .join(front("throughput_tok_s", True, "pareto_throughput"), on="_i", how="left")
           .sort("_i").drop("_i"))
    return out.collect()


# ----------------------------------------------------------------------------------------------------------- recommend
def recommend(cmp: pl.LazyFrame | pl.DataFrame) -> pl.DataFrame:
    """Per model and scenario (SCENARIOS), the recommended trial among the model's done trials, from point estimates:

    - max_throughput_within_1pct: the fastest trial with quality_retention >= 0.99. Speed is kernel-level
      (decode_graph_tok_s, CUDA-graph decode at batch 1) where every done trial of the model has it, else eager
      (throughput_tok_s: generate's batch throughput at the largest batch size, or its batch-1 decode); ``speed_kind``
      says which, and ``reason`` names the column and, for eager, why kernel-level was not used;
    - min_memory_within_3pct: smallest weights_gb (the true bytes of the loaded weights) with quality_retention >= 0.97;
    - best_quality: highest quality_retention among the non-baseline trials (ties: smaller weights_gb).

    Columns: model, scenario, description, trial_id, precision, compute_dtype, value (the optimised quantity),
    quality_retention, speed_kind, reason. A scenario with no candidate has a null trial_id and says why in
    ``reason``. ``results_dir`` first, and choices per dir and model, when ``cmp`` stacks several dirs."""
    lf = with_axes(cmp).filter(pl.col("status") == "done")
    by = _model_keys(lf)
    lf = _ensure(lf, {"decode_graph_tok_s": pl.Float64, "graph_decode_error": pl.String, "batch_tok_s": pl.Float64,
                      "batch_size": pl.Int64})
    kernel = pl.col("decode_graph_tok_s").is_not_null().all().over(by)
    eager_src = (pl.when(pl.col("batch_tok_s").is_not_null())
                 .then(pl.format("batch_tok_s (eager generate, batch {})", pl.col("batch_size").cast(pl.String)))
                 .otherwise(pl.lit("decode_tok_s (eager generate, batch 1)")))
    lf = lf.with_columns(
        pl.when(kernel).then(pl.col("decode_graph_tok_s")).otherwise(pl.col("throughput_tok_s")).alias("_speed"),
        pl.when(kernel).then(pl.lit("kernel-level")).otherwise(pl.lit("eager")).alias("_speed_kind"),
        pl.when(kernel).then(pl.lit("decode_graph_tok_s (kernel-level: CUDA-graph decode, batch 1)"))
        .otherwise(eager_src).alias("_speed_src"))
    # per model, why kernel-level was not used: the trials without it and their graph_decode_error
    no_kernel = (lf.filter(pl.col("decode_graph_tok_s").is_null())
                 .group_by(by).agg(pl.format("{}/{}: {}", pl.col("precision"), pl.col("compute_dtype"),
                                                  pl.col("graph_decode_error").fill_null("no decode_graph_tok_s row"))
                                        .sort().str.join("; ").alias("_why_eager")))
    lf = lf.join(no_kernel, on=by, how="left")
    models = lf.select(by).unique().sort(by)
    specs = [
        ("max_throughput_within_1pct", pl.col("quality_retention") >= 0.99, "_speed", True,
         "no trial with quality retention >= 99% and a speed"),
        ("min_memory_within_3pct", pl.col("quality_retention") >= 0.97, "weights_gb", False,
         "no trial with quality retention >= 97% and a weights_gb"),
        ("best_quality", ~pl.col("is_baseline"), "quality_retention", True, "no quantized trial with a quality metric"),
    ]
    desc = dict(SCENARIOS)
    parts = []
    for key, cond, col, descending, why in specs:
        tie = pl.col("weights_gb") if key == "best_quality" else pl.col("quality_retention")
        tie_desc = key != "best_quality"
        speed = key == "max_throughput_within_1pct"
        what = pl.col("_speed_src") if speed else pl.lit(col)
        note = (pl.when(pl.col("_speed_kind") == "eager")
                .then(pl.lit("; kernel-level not used, missing for ") + pl.col("_why_eager")).otherwise(pl.lit(""))
                if speed else pl.lit(""))
        best = (lf.filter(cond & pl.col(col).is_not_null())
                .sort([*by, col, tie], descending=[False] * len(by) + [descending, tie_desc], nulls_last=True)
                .group_by(by, maintain_order=True).first()
                .select(*by, "trial_id", "precision", "compute_dtype", pl.col(col).alias("value"),
                        "quality_retention",
                        (pl.col("_speed_kind") if speed else pl.lit(None, dtype=pl.String)).alias("speed_kind"),
                        what.alias("_what"), note.alias("_note")))
        parts.append(models.join(best, on=by, how="left").with_columns(
            pl.lit(key).alias("scenario"), pl.lit(desc[key]).alias("description"),
            pl.when(pl.col("trial_id").is_null()).then(pl.lit(why))
            .otherwise(pl.format("{} = {}{}", pl.col("_what"), pl.col("value").round(4).cast(pl.String),
                                 pl.col("_note")))
            .alias("reason")))
    out = pl.concat(parts).select(*by, "scenario", "description", "trial_id", "precision", "compute_dtype",
                                  "value", "quality_retention", "speed_kind", "reason")
    order = {k: i for i, (k, _) in enumerate(SCENARIOS)}
    return (out.with_columns(pl.col("scenario").replace_strict(order, return_dtype=pl.Int64).alias("_o"))
            .sort([*by, "_o"]).drop("_o").collect())


# ----------------------------------------------------------------------------------------------------------- significance
# Per-item records and the corpus metric of each kind (docs/analysis.md, "Significance"). A kind says what an item
# contributes (a feature vector per item, summed over the items of a resample) and how the metric follows from those
# sums, exactly as lm-eval aggregates that metric over the items.
PERPLEXITY_METRICS = {"word_perplexity": "perplexity", "byte_perplexity": "perplexity", "bits_per_byte": "bits_per_byte"}
# lambada's per-item "perplexity" is the item's log-likelihood alone; lm-eval aggregates it as exp(-mean)
ITEM_PERPLEXITY = "perplexity"
PAIR_METRICS = {"mcc", "f1"}  # lm-eval keeps (gold, pred) per item: the store has gold in value, pred in weight


def metric_kind(metric: str, weighted: bool) -> str | None:
    """How significance scores ``metric`` (lm-eval's name, ``,filter`` allowed): ``mean`` (per-item value, corpus
    metric = mean: acc, exact_match, per-item f1), ``perplexity`` / ``bits_per_byte`` (per item: log-likelihood and
    word/byte count; lambada's ``perplexity``: log-likelihood, each item counting 1), ``mcc`` / ``f1`` (per item:
    gold and prediction). ``weighted``: every item has a ``weight``.
    None: no per-item definition (left out of significance, with the reason)."""
    base = metric.split(",", 1)[0]
    if base == ITEM_PERPLEXITY and not weighted:
        return "perplexity"  # every item counts 1: exp(-sum(loglik) / n)
    if base in PERPLEXITY_METRICS:
        return PERPLEXITY_METRICS[base] if weighted else None
    if base in PAIR_METRICS:
        return base if weighted else ("mean" if base == "f1" else None)
    return None if weighted else "mean"


def _features(kind: str, v: np.ndarray, w: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-item feature rows (n x f) whose column sums determine the corpus metric (:func:`_corpus`)."""
    one = np.ones_like(v)
    if kind == "mean":
        return np.column_stack([one, v])
    if kind in ("perplexity", "bits_per_byte"):  # sum of counts (1 per item where none is kept), sum of log-likelihoods
        return np.column_stack([np.where(np.isnan(w), 1.0, w), v])
    if kind == "f1":  # binary, positive label 1 (sklearn's f1_score, as lm-eval's f1 aggregation)
        return np.column_stack([(v == 1) & (w == 1), (v != 1) & (w == 1), (v == 1) & (w != 1)]).astype(float)
    # mcc: one-hot gold, one-hot prediction, correct, count (multi-class Matthews correlation, as sklearn's)
    g = (v[:, None] == labels[None, :]).astype(float)
    p = (w[:, None] == labels[None, :]).astype(float)
    return np.column_stack([g, p, (v == w).astype(float), one])


def _corpus(kind: str, s: np.ndarray) -> np.ndarray:
    """The corpus metric from summed features ``s`` (... x f), vectorised over resamples."""
    with np.errstate(divide="ignore", invalid="ignore"):
        if kind == "mean":
            return s[..., 1] / s[..., 0]
        if kind == "perplexity":  # lm-eval's weighted_perplexity: exp(-sum(loglik) / sum(count))
            return np.exp(-s[..., 1] / s[..., 0])
        if kind == "bits_per_byte":  # lm-eval's bits_per_byte: -sum(loglik) / sum(bytes) / ln 2
            return -s[..., 1] / s[..., 0] / math.log(2)
        if kind == "f1":
            tp, fp, fn = s[..., 0], s[..., 1], s[..., 2]
            den = 2 * tp + fp + fn
            return np.where(den > 0, 2 * tp / np.where(den > 0, den, 1), 0.0)
        k = (s.shape[-1] - 2) // 2
        t, p, c, n = s[..., :k], s[..., k:2 * k], s[..., 2 * k], s[..., 2 * k + 1]
        cov = c * n - (p * t).sum(-1)
        den = np.sqrt((n * n - (p * p).sum(-1)) * (n * n - (t * t).sum(-1)))
        return np.where(den > 0, cov / np.where(den > 0, den, 1), 0.0)  # sklearn: 0 where undefined


@dataclass(frozen=True)
class Bootstrap:
    """Paired percentile bootstrap over the items both ran: each resample draws the same items for the trial and its
    baseline and recomputes each side's corpus metric (:meth:`paired`)."""

    n_boot: int = 2000
    seed: int = 0
    confidence: float = 0.95

    def paired(self, kind: str, trial: np.ndarray, base: np.ndarray, counts: np.ndarray | None = None) -> dict[str, float]:
        """Paired bootstrap of the corpus metric of ``kind`` from per-item feature rows (:func:`_features`) of the trial
        and the baseline (row i = the same item; with ``counts``, row i stands for counts[i] items). Returns
        trial_score, baseline_score, diff (trial - baseline, the metric's units) with its interval ci_low / ci_high,
        and diff_pct = 100 * (trial / baseline - 1) with its interval (NaN where the baseline's metric is not positive
        in some resample, and for mcc).

        Resampling n items with replacement is a multinomial draw over the distinct (trial, baseline) item rows, so
        0/1 items cost O(n_boot * 4), and the stream depends only on the seed and n (reproducible, order-free)."""
        f = trial.shape[1]
        rows = np.hstack([trial, base])
        if counts is None:
            rows, counts = np.unique(rows, axis=0, return_counts=True)
        n = int(counts.sum())
        point_t, point_b = _corpus(kind, counts @ rows[:, :f]), _corpus(kind, counts @ rows[:, f:])
        rng = np.random.default_rng([self.seed, n])
        diff, rel = np.empty(self.n_boot), np.empty(self.n_boot)
        step = max(1, 4_000_000 // rows.shape[0])
        for i in range(0, self.n_boot, step):
            k = min(step, self.n_boot - i)
            sums = rng.multinomial(n, counts / n, size=k) @ rows
            mt, mb = _corpus(kind, sums[:, :f]), _corpus(kind, sums[:, f:])
            diff[i:i + k] = mt - mb
            with np.errstate(divide="ignore", invalid="ignore"):
                rel[i:i + k] = np.where(mb > 0, 100 * (mt / mb - 1), np.nan)
        lo, hi = self._quantiles(diff)
        rel_ok = kind != "mcc" and point_b > 0 and not np.isnan(rel).any()
        rlo, rhi = self._quantiles(rel) if rel_ok else (math.nan, math.nan)
        return {"trial_score": float(point_t), "baseline_score": float(point_b), "diff": float(point_t - point_b),
                "ci_low": lo, "ci_high": hi,
                "diff_pct": float(100 * (point_t / point_b - 1)) if rel_ok else math.nan,
                "ci_low_pct": rlo, "ci_high_pct": rhi}

    def _quantiles(self, means: np.ndarray) -> tuple[float, float]:
        # numpy's default ('linear') percentile, on one sorted copy
        m = np.sort(means)
        a = (1 - self.confidence) / 2
        out = []
        for q in (a, 1 - a):
            pos = q * (m.size - 1)
            lo = int(math.floor(pos))
            hi = min(lo + 1, m.size - 1)
            out.append(float(m[lo] + (m[hi] - m[lo]) * (pos - lo)))
        return (out[0], out[1])


def _samples_long(res: Results) -> pl.DataFrame:
    """Per-item records (trial_id, task, metric, doc, value, weight); ``metric`` has ``,filter`` unless it is none."""
    # old samples files may lack columns (missing ones are inserted by the scan only when some file has them)
    s = _ensure(res.samples, {"task": pl.String, "doc_id": pl.String, "metric": pl.String, "value": pl.Float64,
                              "weight": pl.Float64, "correct": pl.Boolean, "filter": pl.String})
    s = s.select(
        "trial_id", "task",
        pl.when(pl.col("filter").is_null() | (pl.col("filter") == "none")).then(pl.col("metric"))
        .otherwise(pl.format("{},{}", pl.col("metric"), pl.col("filter"))).alias("metric"),
        pl.col("doc_id").cast(pl.String).alias("doc"),
        pl.coalesce(pl.col("value").cast(pl.Float64, strict=False), pl.col("correct").cast(pl.Float64)).alias("value"),
        pl.col("weight").cast(pl.Float64, strict=False),
    ).filter(pl.col("value").is_not_null() & pl.col("metric").is_not_null())
    return s.collect()


SIGNIFICANCE_SCHEMA = {
    "trial_id": pl.String, "model": pl.String, "precision": pl.String, "compute_dtype": pl.String,
    "baseline_id": pl.String, "task": pl.String, "metric": pl.String, "kind": pl.String, "n": pl.Int64,
    "baseline_score": pl.Float64, "trial_score": pl.Float64, "diff": pl.Float64, "ci_low": pl.Float64,
    "ci_high": pl.Float64, "diff_pct": pl.Float64, "ci_low_pct": pl.Float64, "ci_high_pct": pl.Float64,
    "improved": pl.Int64, "regressed": pl.Int64, "verdict": pl.String, "note": pl.String}


def _verdict(kind: str, metric: str, lo: float, hi: float) -> str:
    lower_better = kind in ("perplexity", "bits_per_byte") or metric.split(",", 1)[0] in LOWER_IS_BETTER
    if (lo > 0 and not lower_better) or (hi < 0 and lower_better):
        return "better"
    if (hi < 0 and not lower_better) or (lo > 0 and lower_better):
        return "worse"
    return "within noise"


def significance(res: Results, n_boot: int = 2000, seed: int = 0, confidence: float = 0.95) -> pl.DataFrame:
    """Per trial (not the baseline) and top-level task: the task's main metric computed from the per-item records as
    lm-eval aggregates it (mean for acc / exact_match, exp(-sum loglik / sum words) for word_perplexity, MCC from
    (gold, pred) pairs, ...: :func:`metric_kind`), for the trial and its baseline over the items both ran (pooled over
    a group's subtasks, groups as lm-eval ran them), with a paired percentile bootstrap interval of the difference
    (``n_boot`` resamples, fixed ``seed``) and a verdict: ``better`` / ``worse`` when the whole interval is on the
    better / worse side of zero for that metric's direction (lower perplexity is better), else ``within noise``.

    Columns: trial_id, model, precision, compute_dtype, baseline_id, task, metric, kind, n, baseline_score,
    trial_score, diff (trial - baseline, metric units), ci_low, ci_high, diff_pct (100 * (trial / baseline - 1)),
    ci_low_pct, ci_high_pct, improved, regressed (items right only in the trial / only in the baseline, for 0/1
    metrics), verdict, note. A (trial, task) that cannot be compared (baseline failed or missing, no baseline items,
    a metric without a per-item definition) has a null verdict and says why in ``note``."""
    if len(res.dirs) > 1:  # each dir on its own (see compare)
        return stack_folders(res.folders(), lambda f: significance(f, n_boot, seed, confidence).lazy()).collect()
    schema = SIGNIFICANCE_SCHEMA
    s = _samples_long(res)
    if s.height == 0:
        return pl.DataFrame(schema=schema)
    s = with_top(s, task_tops(res.trials, res.metrics), "group").with_columns(
        pl.format("{}/{}", pl.col("task"), pl.col("doc")).alias("doc"))
    # main per-item metric per group, the same for trial and baseline
    ranked = s.select("group", "metric").unique().with_columns(task_metric_rank().alias("_rank"))
    ranked = ranked.with_columns(pl.col("_rank").fill_null(len(TASK_MAIN_METRICS)))
    main = ranked.sort(["group", "_rank", "metric"]).group_by("group", maintain_order=True).first().select("group", "metric")
    s = s.join(main, on=["group", "metric"]).select("trial_id", pl.col("group").alias("task"), "metric", "doc",
                                                    "value", "weight")
    s = s.unique(["trial_id", "task", "metric", "doc"], keep="first")

    trials = _trials(res)
    t = trials.filter((pl.col("status") == "done") & ~pl.col("is_baseline") & pl.col("baseline_id").is_not_null())
    t = _with_baseline_status(t.select("trial_id", "model", "precision", "compute_dtype", "baseline_id")
                              .unique("trial_id"), trials).collect()
    keys = ["trial_id", "task", "metric"]
    trial_s = s.join(t.select("trial_id", "baseline_id", "baseline_status"), on="trial_id")
    tasks = trial_s.select(*keys, "baseline_id", "baseline_status").unique(keys)
    base_s = s.rename({"trial_id": "baseline_id", "value": "_bv", "weight": "_bw"})
    paired = (trial_s.filter(pl.col("baseline_status") == "ok")
              .join(base_s, on=["baseline_id", "task", "metric", "doc"]))
    boot = Bootstrap(n_boot=n_boot, seed=seed, confidence=confidence)
    rows = []
    done: set[tuple] = set()
    # the distinct (trial, baseline) item records with their counts, sorted (the bootstrap's canonical category order),
    # in one numpy copy; then a slice per (trial, task, metric): no per-group DataFrame
    item = ["value", "weight", "_bv", "_bw"]
    distinct = (paired.group_by([*keys, *item]).agg(pl.len().alias("_c"))
                .sort([*keys, *item], nulls_last=True).with_row_index("_r"))
    bounds = distinct.group_by(keys, maintain_order=True).agg(pl.col("_r").first().alias("_start"),
                                                              pl.len().alias("_k"))
    cols = {c: distinct.get_column(c).cast(pl.Float64).to_numpy() for c in item}
    all_counts = distinct.get_column("_c").to_numpy()
    for tid, task, metric, start, k in bounds.iter_rows():
        done.add((tid, task, metric))
        v, w, bv, bw = (cols[c][start:start + k] for c in item)
        c = all_counts[start:start + k]
        weighted = not (np.isnan(w).any() or np.isnan(bw).any())  # a null weight reads as NaN
        kind = metric_kind(metric, weighted)
        row = {"trial_id": tid, "task": task, "metric": metric, "kind": kind, "n": int(c.sum())}
        if kind is None:
            rows.append({**row, "note": f"{metric}: no per-item definition of its corpus metric (per-item records "
                         f"{'are (value, weight) pairs' if weighted else 'lack the pair or count lm-eval aggregates'})"})
            continue
        labels = np.unique(np.concatenate([v, w, bv, bw])) if kind in PAIR_METRICS else np.empty(0)
        if kind == "f1" and not np.isin(labels, (0.0, 1.0)).all():
            rows.append({**row, "note": "f1 over labels other than 0/1 (lm-eval's f1 is binary)"})
            continue
        stats = boot.paired(kind, _features(kind, v, w, labels), _features(kind, bv, bw, labels), c)
        binary = kind == "mean" and np.isin(v, (0.0, 1.0)).all() and np.isin(bv, (0.0, 1.0)).all()
        rows.append({**row, **stats, "verdict": _verdict(kind, metric, stats["ci_low"], stats["ci_high"]),
                     "improved": int(c[(v == 1) & (bv == 0)].sum()) if binary else None,
                     "regressed": int(c[(v == 0) & (bv == 1)].sum()) if binary else None})
    why = {"failed": "the baseline trial {} failed", "missing": "the baseline trial {} is not in the loaded directories"}
    for tid, task, metric, bid, status in tasks.iter_rows():
        if (tid, task, metric) not in done:
            note = why[status].format(bid) if status in why else \
                f"the baseline trial {bid} has no per-item records of {metric} for this task"
            rows.append({"trial_id": tid, "task": task, "metric": metric, "note": note})
    if not rows:
        return pl.DataFrame(schema=schema)
    info = ("model", "precision", "compute_dtype", "baseline_id")
    out = pl.DataFrame(rows, schema={k: v for k, v in schema.items() if k not in info})
    out = out.with_columns(pl.col(c).fill_nan(None) for c in ("diff_pct", "ci_low_pct", "ci_high_pct"))
    out = out.join(t.select("trial_id", *info), on="trial_id", how="left").select(list(schema))
    log.debug("significance: %d trial x task pairs", out.height)
    return out.sort(["model", "task", "precision", "compute_dtype"], nulls_last=True)


__all__: Sequence[str] = ["compare", "with_axes", "pareto", "recommend", "significance", "Bootstrap", "metric_kind",
                          "task_main_metrics", "task_tops", "verdicts", "SCENARIOS", "METRIC_COLUMNS", "DERIVED_COLUMNS"]


# ----------------------------------------------------------------------------------------------------------- verdict
# a trial within this fraction of its baseline's speed or memory counts as the same (CPU timings move by a few %)
SAME_WITHIN = 0.05


def verdicts(cmp: pl.LazyFrame | pl.DataFrame) -> pl.LazyFrame:
    """``cmp`` with a ``verdict`` column in the seed reports' words: memory (smaller / larger), decode speed (faster /
    slower; within ``SAME_WITHIN`` of the baseline: neither said) and quality from ``quality_retention``
    (:func:`with_axes`): ``quality kept`` (>= 99%), else ``quality -N%``; ``same`` where none of these is said. A
    baseline says ``baseline``, a failed trial ``failed``, a trial without its baseline ``no baseline``."""
    lf = with_axes(cmp)

    def word(x: pl.Expr, up: str, down: str) -> pl.Expr:
        return pl.when(x > 1 + SAME_WITHIN).then(pl.lit(up)).when(x < 1 - SAME_WITHIN).then(pl.lit(down))

    q = pl.col("quality_retention")
    quality = (pl.when(q >= 0.99).then(pl.lit("quality kept"))
               .when(q.is_not_null()).then(pl.format("quality -{}%", ((1 - q) * 100).round(1))))
    parts = pl.concat_str([word(1 / (1 - pl.col("memory_reduction")), "smaller", "larger"),
                           word(pl.col("speedup_decode"), "faster", "slower"), quality], separator=", ",
                          ignore_nulls=True)
    v = (pl.when(pl.col("status") != "done").then(pl.lit("failed"))
         .when(pl.col("baseline_status") == "self").then(pl.lit("baseline"))
         .when(pl.col("baseline_status") != "ok").then(pl.lit("no baseline"))
         .when(parts == "").then(pl.lit("same"))
         .otherwise(parts))
    return lf.with_columns(v.alias("verdict")).drop("quality_retention", "throughput_tok_s")
