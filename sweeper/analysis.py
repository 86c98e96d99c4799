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

- ``speedup_decode`` = trial decode tok/s / baseline decode tok/s (batch 1); ``speedup_decode_no_kv`` the same
  without the KV cache (``Benchmark(kv_cache=(True, False))``); ``kv_cache_speedup`` = the trial's decode tok/s with
  the cache / without it (needs no baseline); ``speedup_throughput`` = trial batch
  tok/s / baseline batch tok/s at the same batch size (the trial's largest); ``speedup_prefill``,
  ``speedup_sequence``, ``speedup_load`` = baseline time / trial time. > 1 means faster.
- ``memory_reduction`` = 1 - trial footprint / baseline footprint (``footprint_bytes`` of the load stage);
  ``memory_reduction_peak`` = the same for the benchmark's peak memory; ``compression_ratio`` = baseline footprint /
  trial footprint; ``gb_saved`` = (baseline - trial footprint) / 1e9.
- ``retention_<task>`` = trial main metric / baseline main metric (baseline / trial for lower-is-better metrics such as
  word_perplexity); ``retention_mean`` = mean over the higher-is-better (accuracy-type) top-level tasks.
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

from .results import TASK_MAIN_METRICS, Results, task_main_metrics, task_metric_rank, top_level_tasks

log = logging.getLogger(__name__)

# (column, stage, metric, scale) per-trial scalar metrics, in display units (bytes -> GB, decimal).
METRIC_COLUMNS: list[tuple[str, str, str, float]] = [
    ("load_s", "load", "load_s", 1.0),
    ("footprint_gb", "load", "footprint_bytes", 1e-9),
    ("allocated_gb", "load", "allocated_bytes", 1e-9),
    ("weights_gb", "load", "weights_bytes", 1e-9),
    ("num_params", "load", "num_params", 1.0),
    ("peak_gb", "benchmark", "peak_memory_bytes", 1e-9),
    ("prefill_ms", "benchmark", "prefill_ms", 1.0),
    ("decode_tok_s", "benchmark", "decode_tok_s", 1.0),
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
DERIVED_COLUMNS = ["baseline_status", "speedup_decode", "speedup_decode_no_kv", "kv_cache_speedup", "speedup_throughput", "speedup_prefill", "speedup_sequence",
                   "speedup_load", "memory_reduction", "memory_reduction_peak", "compression_ratio", "gb_saved",
                   "retention_mean", "ppl_delta_pct", "ppl_delta_per_gb_saved"]

# Recommendation scenarios of the seed reports: (key, description).
SCENARIOS: list[tuple[str, str]] = [
    ("max_throughput_within_1pct", "Highest throughput within 1% retention loss"),
    ("min_memory_within_3pct", "Smallest memory within 3% retention loss"),
    ("best_quality", "Best quality (highest retention, quantized trials)"),
    ("fastest_load", "Fastest load"),
]

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


# ----------------------------------------------------------------------------------------------------------- compare
def compare(res: Results) -> pl.LazyFrame:
    """One row per trial: config, status, headline metrics (display units), task main metrics (one column per top-level
    task, named by the task), and the derived vs-baseline columns (module docstring). Never raises for a missing
    baseline: ``baseline_status`` says why the derived columns are null."""
    t = _trials(res)
    present = t.collect_schema().names()
    cfg = t.select([c for c in CONFIG_COLUMNS if c in present])

    thr = _throughput(res)
    largest = (thr.sort("batch_size").group_by("trial_id")
               .agg(pl.col("batch_size").last().alias("batch_size"), pl.col("value").last().alias("batch_tok_s")))
    w = cfg.join(_scalar_metrics(res), on="trial_id", how="left").join(largest, on="trial_id", how="left")

    # the baseline cells: one row per trial id (the same cell may sit in two studies), done preferred
    base_status = (t.select("trial_id", "status").sort(pl.col("status") == "done", descending=True)
                   .unique("trial_id", keep="first").rename({"trial_id": "baseline_id", "status": "_base_status"}))
    metric_cols = [c for c, *_ in METRIC_COLUMNS]
    base = (w.filter(pl.col("status") == "done").unique("trial_id", keep="first")
            .select([pl.col("trial_id").alias("baseline_id")] + [pl.col(c).alias(c + "_b") for c in metric_cols]))
    base_thr = thr.rename({"trial_id": "baseline_id", "value": "_base_batch_tok_s"})

    w = (w.join(base_status, on="baseline_id", how="left")
         .join(base, on="baseline_id", how="left")
         .join(base_thr, on=["baseline_id", "batch_size"], how="left"))
    status = (pl.when(pl.col("baseline_id").is_null()).then(pl.lit("none"))
              .when(pl.col("_base_status").is_null()).then(pl.lit("missing"))
              .when(pl.col("_base_status") != "done").then(pl.lit("failed"))
              .when(pl.col("trial_id") == pl.col("baseline_id")).then(pl.lit("self"))
              .otherwise(pl.lit("ok")))
    w = w.with_columns(status.alias("baseline_status"))
    usable = pl.col("baseline_status").is_in(["ok", "self"])

    def ok(e: pl.Expr) -> pl.Expr:
        return pl.when(usable).then(e).otherwise(None)

    def ratio(num: pl.Expr, den: pl.Expr) -> pl.Expr:
        return ok(pl.when(den > 0).then(num / den).otherwise(None))

    gb_saved = ok(pl.col("footprint_gb_b") - pl.col("footprint_gb"))
    w = w.with_columns(
        ratio(pl.col("decode_tok_s"), pl.col("decode_tok_s_b")).alias("speedup_decode"),
        ratio(pl.col("decode_tok_s_no_kv"), pl.col("decode_tok_s_no_kv_b")).alias("speedup_decode_no_kv"),
        # within the trial, no baseline needed: what the KV cache buys
        pl.when(pl.col("decode_tok_s_no_kv") > 0).then(pl.col("decode_tok_s") / pl.col("decode_tok_s_no_kv"))
        .otherwise(None).alias("kv_cache_speedup"),
        ratio(pl.col("batch_tok_s"), pl.col("_base_batch_tok_s")).alias("speedup_throughput"),
        ratio(pl.col("prefill_ms_b"), pl.col("prefill_ms")).alias("speedup_prefill"),
        ratio(pl.col("sequence_ms_b"), pl.col("sequence_ms")).alias("speedup_sequence"),
        ratio(pl.col("load_s_b"), pl.col("load_s")).alias("speedup_load"),
        (1 - ratio(pl.col("footprint_gb"), pl.col("footprint_gb_b"))).alias("memory_reduction"),
        (1 - ratio(pl.col("peak_gb"), pl.col("peak_gb_b"))).alias("memory_reduction_peak"),
        ratio(pl.col("footprint_gb_b"), pl.col("footprint_gb")).alias("compression_ratio"),
        gb_saved.alias("gb_saved"),
        ((ratio(pl.col("perplexity"), pl.col("perplexity_b")) - 1) * 100).alias("ppl_delta_pct"),
    ).with_columns(
        pl.when(pl.col("gb_saved") > 0).then(pl.col("ppl_delta_pct") / pl.col("gb_saved")).otherwise(None)
        .alias("ppl_delta_per_gb_saved"))

    # tasks: main metric per top-level task, retention against the baseline's same task and metric
    tm = task_main_metrics(res.metrics)
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
        mean = (long.filter(~pl.col("_lower")).group_by("trial_id")
                .agg(pl.col("retention").mean().alias("_retention_mean")))
        clash = [k for k in task_names if k in w.collect_schema().names()]
        if clash:
            values = values.rename({k: f"task_{k}" for k in clash})
        w = (w.join(values.lazy(), on="trial_id", how="left").join(ret.lazy(), on="trial_id", how="left")
             .join(mean.lazy(), on="trial_id", how="left")
             .with_columns([ok(pl.col(f"retention_{k}")).alias(f"retention_{k}") for k in task_names]
                           + [ok(pl.col("_retention_mean")).alias("retention_mean")]))
    else:
        w = w.with_columns(pl.lit(None, dtype=pl.Float64).alias("retention_mean"))

    names = w.collect_schema().names()
    task_value_cols = [c for c in names if c in task_names or c in {f"task_{k}" for k in task_names}]
    retention_cols = [f"retention_{k}" for k in task_names]
    head = [c for c in CONFIG_COLUMNS if c in names]
    order = (head + metric_cols + ["batch_size", "batch_tok_s"] + task_value_cols
             + [c for c in DERIVED_COLUMNS if c != "retention_mean" and c not in ("ppl_delta_pct", "ppl_delta_per_gb_saved")]
             + retention_cols + ["retention_mean", "ppl_delta_pct", "ppl_delta_per_gb_saved"])
    out = w.select(order)
    sort = [c for c in ("study", "model", "precision", "compute_dtype") if c in names]
    return out.sort(sort, nulls_last=True) if sort else out


def with_axes(cmp: pl.LazyFrame | pl.DataFrame) -> pl.LazyFrame:
    """Add the two axes the Pareto fronts and recommendations use:

    - ``quality_retention`` = retention_mean, or baseline / trial token perplexity where a trial has no tasks;
    - ``throughput_tok_s`` = batch throughput at the largest batch size, or decode tok/s where there is none."""
    lf = cmp.lazy()
    names = lf.collect_schema().names()
    ppl_ret = (pl.when(pl.col("ppl_delta_pct").is_not_null()).then(100 / (100 + pl.col("ppl_delta_pct")))
               if "ppl_delta_pct" in names else pl.lit(None, dtype=pl.Float64))
    return lf.with_columns(pl.coalesce(pl.col("retention_mean"), ppl_ret).alias("quality_retention"),
                           pl.coalesce(pl.col("batch_tok_s"), pl.col("decode_tok_s")).alias("throughput_tok_s"))


# ----------------------------------------------------------------------------------------------------------- Pareto
def pareto(cmp: pl.LazyFrame | pl.DataFrame) -> pl.DataFrame:
    """Per model, which done trials are on the Pareto front of (quality_retention up, footprint_gb down) and of
    (quality_retention up, throughput_tok_s up). Trials lacking an axis value are not on that front (null).

    Columns: model, trial_id, precision, compute_dtype, is_baseline, quality_retention, footprint_gb,
    throughput_tok_s, pareto_memory, pareto_throughput."""
    lf = with_axes(cmp).filter(pl.col("status") == "done")
    keep = ["model", "trial_id", "precision", "compute_dtype", "is_baseline", "quality_retention", "footprint_gb",
            "throughput_tok_s"]
    lf = lf.select(keep).with_row_index("_i")

    def front(x: str, x_descending: bool, name: str) -> pl.LazyFrame:
        # sort by the x axis from best to worst (ties: best quality first); a point is on the front when its quality
        # beats every point with a better-or-equal x, i.e. the running max before it.
        s = (lf.filter(pl.col(x).is_not_null() & pl.col("quality_retention").is_not_null())
             .sort(["model", x, "quality_retention"], descending=[False, x_descending, True])
             .with_columns(pl.col("quality_retention").cum_max().shift(1).over("model").alias("_prev"))
             .with_columns((pl.col("_prev").is_null() | (pl.col("quality_retention") > pl.col("_prev"))).alias(name)))
        return s.select("_i", name)

    out = (lf.join(front("footprint_gb", False, "pareto_memory"), on="_i", how="left")
           .join(front("throughput_tok_s", True, "pareto_throughput"), on="_i", how="left")
           .sort("_i").drop("_i"))
    return out.collect()


# ----------------------------------------------------------------------------------------------------------- recommend
def recommend(cmp: pl.LazyFrame | pl.DataFrame) -> pl.DataFrame:
    """Per model and scenario (SCENARIOS), the recommended trial among the model's done trials, from point estimates:

    - max_throughput_within_1pct: highest throughput_tok_s with quality_retention >= 0.99;
    - min_memory_within_3pct: smallest footprint_gb with quality_retention >= 0.97;
    - best_quality: highest quality_retention among the non-baseline trials (ties: smaller footprint);
    - fastest_load: smallest load_s.

    Columns: model, scenario, description, trial_id, precision, compute_dtype, value (the optimised quantity),
    quality_retention, reason. A scenario with no candidate has a null trial_id and says why in ``reason``."""
    lf = with_axes(cmp).filter(pl.col("status") == "done")
    models = lf.select("model").unique().sort("model")
    specs = [
        ("max_throughput_within_1pct", pl.col("quality_retention") >= 0.99, "throughput_tok_s", True,
         "no trial with quality retention >= 99% and a throughput"),
        ("min_memory_within_3pct", pl.col("quality_retention") >= 0.97, "footprint_gb", False,
         "no trial with quality retention >= 97% and a footprint"),
        ("best_quality", ~pl.col("is_baseline"), "quality_retention", True, "no quantized trial with a quality metric"),
        ("fastest_load", pl.lit(True), "load_s", False, "no trial with a load time"),
    ]
    desc = dict(SCENARIOS)
    parts = []
    for key, cond, col, descending, why in specs:
        tie = pl.col("footprint_gb") if key == "best_quality" else pl.col("quality_retention")
        tie_desc = key != "best_quality"
        best = (lf.filter(cond & pl.col(col).is_not_null())
                .sort(["model", col, tie], descending=[False, descending, tie_desc], nulls_last=True)
                .group_by("model", maintain_order=True).first()
                .select("model", "trial_id", "precision", "compute_dtype", pl.col(col).alias("value"),
                        "quality_retention"))
        parts.append(models.join(best, on="model", how="left").with_columns(
            pl.lit(key).alias("scenario"), pl.lit(desc[key]).alias("description"),
            pl.when(pl.col("trial_id").is_null()).then(pl.lit(why))
            .otherwise(pl.format("{} = {}", pl.lit(col), pl.col("value").round(4).cast(pl.String)))
            .alias("reason")))
    out = pl.concat(parts).select("model", "scenario", "description", "trial_id", "precision", "compute_dtype",
                                  "value", "quality_retention", "reason")
    order = {k: i for i, (k, _) in enumerate(SCENARIOS)}
    return (out.with_columns(pl.col("scenario").replace_strict(order, return_dtype=pl.Int64).alias("_o"))
            .sort(["model", "_o"]).drop("_o").collect())


# ----------------------------------------------------------------------------------------------------------- significance
@dataclass(frozen=True)
class Bootstrap:
    """Paired percentile bootstrap of the mean per-item difference (trial - baseline) over the items both ran."""

    n_boot: int = 2000
    seed: int = 0
    confidence: float = 0.95

    def interval(self, d: np.ndarray) -> tuple[float, float]:
        """Percentile interval of the mean of ``d`` (per-item differences)."""
        n = d.size
        if n == 0:
            return (math.nan, math.nan)
        vals, counts = np.unique(d, return_counts=True)
        if vals.size <= 64:
            return self.interval_counts(vals, counts)
        rng = np.random.default_rng([self.seed, n])
        means = np.empty(self.n_boot)
        step = max(1, 4_000_000 // n)
        for i in range(0, self.n_boot, step):
            k = min(step, self.n_boot - i)
            means[i:i + k] = d[rng.integers(0, n, size=(k, n))].mean(axis=1)
        return self._quantiles(means)

    def interval_counts(self, vals: np.ndarray, counts: np.ndarray) -> tuple[float, float]:
        """The same interval when the differences take few distinct values (0/1 accuracies give -1, 0, 1): resampling
        n items with replacement is a multinomial draw over the distinct values, the same distribution in
        O(n_boot * k) instead of O(n_boot * n)."""
        n = int(counts.sum())
        if n == 0:
            return (math.nan, math.nan)
        # the same resampling stream for every pair with the same n, independent of processing order
        rng = np.random.default_rng([self.seed, n])
        order = np.argsort(vals)  # value order fixed, so the same counts always give the same draws
        vals = np.asarray(vals, dtype=float)[order]
        counts = np.asarray(counts)[order]
        draws = rng.multinomial(n, counts / n, size=self.n_boot)
        return self._quantiles(draws @ vals / n)

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
    # old samples files may lack columns (missing ones are inserted by the scan only when some file has them)
    s = _ensure(res.samples, {"task": pl.String, "doc_id": pl.String, "metric": pl.String, "value": pl.Float64,
                              "correct": pl.Boolean, "filter": pl.String})
    s = s.select(
        "trial_id", "task",
        pl.when(pl.col("filter").is_null() | (pl.col("filter") == "none")).then(pl.col("metric"))
        .otherwise(pl.format("{},{}", pl.col("metric"), pl.col("filter"))).alias("metric"),
        pl.col("doc_id").cast(pl.String).alias("doc"),
        pl.coalesce(pl.col("value").cast(pl.Float64, strict=False), pl.col("correct").cast(pl.Float64)).alias("score"),
    ).filter(pl.col("score").is_not_null() & pl.col("metric").is_not_null())
    return s.collect()


def significance(res: Results, n_boot: int = 2000, seed: int = 0, confidence: float = 0.95) -> pl.DataFrame:
    """Per trial (not the baseline) and top-level task: the difference of the task's main per-item metric to the
    baseline over the items both ran (pooled over subtasks for groups such as mmlu), with a paired percentile bootstrap
    interval (``n_boot`` resamples, fixed ``seed``), and a verdict: ``better`` / ``worse`` when the whole interval is
    above / below zero (sign flipped for lower-is-better metrics), else ``within noise``.

    Columns: trial_id, model, precision, compute_dtype, baseline_id, task, metric, n, baseline_score, trial_score,
    diff, ci_low, ci_high, improved, regressed (items right only in the trial / only in the baseline, for 0/1
    metrics), verdict."""
    schema = {"trial_id": pl.String, "model": pl.String, "precision": pl.String, "compute_dtype": pl.String,
              "baseline_id": pl.String, "task": pl.String, "metric": pl.String, "n": pl.Int64,
              "baseline_score": pl.Float64, "trial_score": pl.Float64, "diff": pl.Float64, "ci_low": pl.Float64,
              "ci_high": pl.Float64, "improved": pl.Int64, "regressed": pl.Int64, "verdict": pl.String}
    s = _samples_long(res)
    if s.height == 0:
        return pl.DataFrame(schema=schema)
    top = top_level_tasks(s.get_column("task").unique().to_list()
                          + res.metrics.filter(pl.col("stage") == "tasks").select(pl.col("task").unique())
                          .collect().get_column("task").to_list())
    s = s.with_columns(pl.col("task").replace_strict(top, default=pl.col("task")).alias("group"),
                       pl.format("{}/{}", pl.col("task"), pl.col("doc")).alias("doc"))
    # main per-item metric per group, the same for trial and baseline
    ranked = s.select("group", "metric").unique().with_columns(task_metric_rank().alias("_rank"))
    ranked = ranked.with_columns(pl.col("_rank").fill_null(len(TASK_MAIN_METRICS)))
    main = ranked.sort(["group", "_rank", "metric"]).group_by("group", maintain_order=True).first().select("group", "metric")
    s = s.join(main, on=["group", "metric"]).select("trial_id", pl.col("group").alias("task"), "metric", "doc", "score")
    s = s.unique(["trial_id", "task", "metric", "doc"], keep="first")

    t = _trials(res).filter((pl.col("status") == "done") & ~pl.col("is_baseline") & pl.col("baseline_id").is_not_null())
    t = t.select("trial_id", "model", "precision", "compute_dtype", "baseline_id").unique("trial_id").collect()
    trial_s = s.join(t.select("trial_id", "baseline_id"), on="trial_id")
    base_s = s.rename({"trial_id": "baseline_id", "score": "_b"})
    paired = trial_s.join(base_s, on=["baseline_id", "task", "metric", "doc"])
    if paired.height == 0:
        return pl.DataFrame(schema=schema)
    boot = Bootstrap(n_boot=n_boot, seed=seed, confidence=confidence)
    keys = ["trial_id", "task", "metric"]
    paired = paired.with_columns((pl.col("score") - pl.col("_b")).alias("d"))
    binary = pl.col("score").is_in([0.0, 1.0]).all() & pl.col("_b").is_in([0.0, 1.0]).all()
    agg = paired.group_by(keys, maintain_order=True).agg(
        pl.len().alias("n"), pl.col("score").mean().alias("trial_score"), pl.col("_b").mean().alias("baseline_score"),
        pl.col("d").mean().alias("diff"), pl.col("d").n_unique().alias("_k"), binary.alias("_binary"),
        ((pl.col("score") == 1) & (pl.col("_b") == 0)).sum().cast(pl.Int64).alias("improved"),
        ((pl.col("score") == 0) & (pl.col("_b") == 1)).sum().cast(pl.Int64).alias("regressed"))
    # pairs whose differences take few values: bootstrap from (value, count) lists, no per-item arrays in Python
    few = agg.filter(pl.col("_k") <= 64).select(keys)
    counts = (paired.join(few, on=keys).group_by([*keys, "d"]).agg(pl.len().alias("c"))
              .group_by(keys).agg("d", "c"))
    intervals = {(r[0], r[1], r[2]): boot.interval_counts(np.asarray(r[3], dtype=float), np.asarray(r[4]))
                 for r in counts.iter_rows()}
    many = agg.filter(pl.col("_k") > 64).select(keys)
    if many.height:
        for (tid, task, metric), g in paired.join(many, on=keys).group_by(keys):
            intervals[(tid, task, metric)] = boot.interval(g.get_column("d").to_numpy())
    rows = []
    for r in agg.iter_rows(named=True):
        lo, hi = intervals[(r["trial_id"], r["task"], r["metric"])]
        lower_better = r["metric"] in LOWER_IS_BETTER
        if (lo > 0 and not lower_better) or (hi < 0 and lower_better):
            verdict = "better"
        elif (hi < 0 and not lower_better) or (lo > 0 and lower_better):
            verdict = "worse"
        else:
            verdict = "within noise"
        rows.append({"trial_id": r["trial_id"], "task": r["task"], "metric": r["metric"], "n": r["n"],
                     "baseline_score": r["baseline_score"], "trial_score": r["trial_score"], "diff": r["diff"],
                     "ci_low": lo, "ci_high": hi, "improved": r["improved"] if r["_binary"] else None,
                     "regressed": r["regressed"] if r["_binary"] else None, "verdict": verdict})
    out = pl.DataFrame(rows, schema={k: v for k, v in schema.items() if k not in
                                     ("model", "precision", "compute_dtype", "baseline_id")})
    out = out.join(t, on="trial_id", how="left").select(list(schema))
    log.debug("significance: %d trial x task pairs", out.height)
    return out.sort(["model", "task", "precision", "compute_dtype"], nulls_last=True)


__all__: Sequence[str] = ["compare", "with_axes", "pareto", "recommend", "significance", "Bootstrap",
                          "task_main_metrics", "top_level_tasks", "SCENARIOS", "METRIC_COLUMNS", "DERIVED_COLUMNS"]
