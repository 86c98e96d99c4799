"""Reading results: Polars LazyFrames over one or more results directories, and the one-row-per-trial summary.

    >>> from sweeper.results import open_results
    >>> r = open_results(["results/demo"])
    >>> r.summary().collect()
"""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import polars as pl

from .errors import UserError

# Summary columns: (column, stage, metric, batch size selector) -> value of that metric row.
SPEED_COLUMNS = [
    ("load_s", "load", "load_s"),
    ("footprint_gb", "load", "footprint_bytes"),
    ("peak_gb", "benchmark", "peak_memory_bytes"),
    ("prefill_ms", "benchmark", "prefill_ms"),
    ("decode_tok_s", "benchmark", "decode_tok_s"),
    ("sequence_ms", "benchmark", "sequence_ms"),
    ("perplexity", "perplexity", "token_perplexity"),
    ("kl_mean", "kl", "kl_mean"),
]
_BYTES_TO_GB = {"footprint_gb", "peak_gb"}
# The headline metric of an lm-eval task in the summary, first present wins.
TASK_MAIN_METRICS = ["acc_norm", "acc", "exact_match,strict-match", "exact_match,flexible-extract", "exact_match",
                     "word_perplexity"]


def top_level_tasks(tasks: Iterable[str]) -> dict[str, str]:
    """task -> the top-level task it belongs to. A task is a subtask when another present task followed by ``_`` is its
    prefix (lm-eval groups such as ``mmlu`` with ``mmlu_anatomy``); top-level tasks map to themselves."""
    names = sorted({t for t in tasks if t is not None})
    out: dict[str, str] = {}
    for t in names:
        parents = [g for g in names if g != t and t.startswith(g + "_")]
        out[t] = min(parents, key=len) if parents else t
    return out


def expand_dirs(dirs: list[str]) -> list[Path]:
    out: list[Path] = []
    for d in dirs:
        matches = sorted(glob.glob(os.path.expanduser(d))) if any(c in d for c in "*?[") else [d]
        for m in matches:
            p = Path(m)
            if not (p / "trials").is_dir() and not (p / "study.json").is_file() and not (p / "_log").is_dir():
                raise UserError(f"{m} is not a sweeper results directory (no study.json or trials/); "
                                "give the directory `sweep launch` wrote, e.g. results/<study>")
            out.append(p)
    if not out:
        raise UserError(f"no results directories match {' '.join(dirs)}")
    return out


def _scan(stores: list, sub: str) -> pl.LazyFrame | None:
    """The committed rows of kind ``sub`` of every store (a few files each: docs/store.md), or None if none has any."""
    frames = [lf for lf in (s.scan(sub) for s in stores) if lf is not None]
    if not frames:
        return None
    return frames[0] if len(frames) == 1 else pl.concat(frames, how="vertical")


def _empty(schema) -> pl.LazyFrame:
    """A frame with no rows and the columns (and types) a store file of this kind has."""
    return pl.LazyFrame(schema=pl.from_arrow(schema.empty_table()).schema)


def task_metric_rank() -> pl.Expr:
    """A metric's position in TASK_MAIN_METRICS (lower is preferred), null for any other metric."""
    return pl.col("metric").replace_strict({k: i for i, k in enumerate(TASK_MAIN_METRICS)}, default=None,
                                           return_dtype=pl.Int64)


def task_main_metrics(metrics: pl.LazyFrame) -> pl.DataFrame:
    """Long frame (trial_id, task, metric, value, stderr, n): each top-level task's main metric (the first of
    TASK_MAIN_METRICS that any trial has for that task, the same for every trial, so a column never mixes metrics).
    A trial without that metric for the task has no row."""
    m = (metrics.filter(pl.col("stage") == "tasks").select("trial_id", "task", "metric", "value", "stderr", "n")
         .with_columns(task_metric_rank().alias("_rank")).filter(pl.col("_rank").is_not_null()).collect())
    if m.height == 0:
        return pl.DataFrame(schema={"trial_id": pl.String, "task": pl.String, "metric": pl.String,
                                    "value": pl.Float64, "stderr": pl.Float64, "n": pl.Int64})
    top = top_level_tasks(m.get_column("task").unique().to_list())
    m = m.filter(pl.col("task").replace_strict(top, default=None) == pl.col("task"))
    main = m.group_by("task").agg(pl.col("_rank").min().alias("_best"))
    return (m.join(main, on="task").filter(pl.col("_rank") == pl.col("_best"))
            .unique(["trial_id", "task"], keep="first", maintain_order=True)
            .select("trial_id", "task", "metric", "value", "stderr", "n"))


@dataclass
class Results:
    """The trials, metrics and samples of one or more results directories. Each is a LazyFrame with the store's
    columns even when the directories hold no file of that kind yet, so a query never fails on an empty sweep."""
    dirs: list[Path]
    _stores: list = field(default_factory=list, repr=False, compare=False)

    @property
    def stores(self) -> list:
        """The ResultsStore of each directory (its commit log read once, then re-read only as it grows)."""
        if len(self._stores) != len(self.dirs):
            from .store import ResultsStore

            self._stores[:] = [ResultsStore(d) for d in self.dirs]
        return self._stores

    @property
    def trials(self) -> pl.LazyFrame:
        from .store import TRIALS_SCHEMA

        lf = _scan(self.stores, "trials")
        return lf if lf is not None else _empty(TRIALS_SCHEMA)

    @property
    def metrics(self) -> pl.LazyFrame:
        from .store import METRICS_SCHEMA

        lf = _scan(self.stores, "metrics")
        return lf if lf is not None else _empty(METRICS_SCHEMA)

    @property
    def samples(self) -> pl.LazyFrame:
        from .store import SAMPLES_SCHEMA

        lf = _scan(self.stores, "samples")
        return lf if lf is not None else _empty(SAMPLES_SCHEMA)

    def summary(self) -> pl.LazyFrame:
        """One row per trial: config, status, the headline speed / memory / quality numbers, task main metrics."""
        m = self.metrics
        cols = []
        for col, stage, metric in SPEED_COLUMNS:
            e = pl.col("value").filter((pl.col("stage") == stage) & (pl.col("metric") == metric)).first()
            cols.append((e / 1e9 if col in _BYTES_TO_GB else e).alias(col))
        # batch throughput at the largest batch size measured
        bt = m.filter((pl.col("stage") == "benchmark") & (pl.col("metric") == "throughput_tok_s"))
        bt = (bt.sort("batch_size").group_by("trial_id").agg(
            pl.col("value").last().alias("batch_tok_s"), pl.col("batch_size").last().alias("batch_size")))
        wide = m.group_by("trial_id").agg(cols).join(bt, on="trial_id", how="left")
        # one column per top-level task (a group such as mmlu, not its 57 subtasks): its main metric
        tasks = task_main_metrics(m).select("trial_id", "task", "value")
        t = self.trials  # every TRIALS_SCHEMA column, even for old files or none
        keep = ["trial_id", "study", "model", "precision", "compute_dtype", "status", "device", "error_stage", "error"]
        out = t.select(keep + ["is_baseline"]).join(wide, on="trial_id", how="left")
        if tasks.height:
            pivot = tasks.pivot(on="task", index="trial_id", values="value")
            out = out.join(pivot.lazy(), on="trial_id", how="left")
        # each model's baseline first, then the registry's order (plain dtypes, bitsandbytes, torchao, ...)
        from .precisions import REGISTRY

        order = {name: i for i, name in enumerate(REGISTRY)}
        out = out.with_columns(pl.col("precision").replace_strict(order, default=len(order)).alias("_p"))
        return (out.sort(["study", "model", "is_baseline", "_p", "compute_dtype"],
                         descending=[False, False, True, False, False], nulls_last=True)
                .drop("_p", "is_baseline"))


def open_results(dirs: list[str] | str, check: bool = True) -> Results:
    """Results of one or more directories (globs allowed) as Polars LazyFrames.

    With ``check``, every file a query would read is checked first (docs/store.md: a regular file of its committed
    size, its schema, its trial id), so a damaged file is reported by name (UserError) instead of failing somewhere
    inside a query, hanging, or being mistaken for "no results".
    """
    from .store import damaged_error

    paths = expand_dirs([dirs] if isinstance(dirs, str) else list(dirs))
    res = Results(paths)
    if check:
        for store in res.stores:
            damaged = store.damaged_files()
            if damaged:
                raise damaged_error(damaged)
    return res
