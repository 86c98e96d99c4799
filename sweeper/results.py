"""Reading results: Polars LazyFrames over one or more results directories, and the one-row-per-trial summary.

    >>> from sweeper.results import open_results
    >>> r = open_results(["results/demo"])
    >>> r.summary().collect()
"""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass
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
            if not (p / "trials").is_dir() and not (p / "study.json").is_file():
                raise UserError(f"{m} is not a sweeper results directory (no study.json or trials/); "
                                "give the directory `sweep launch` wrote, e.g. results/<study>")
            out.append(p)
    if not out:
        raise UserError(f"no results directories match {' '.join(dirs)}")
    return out


def _scan(paths: list[Path], sub: str) -> pl.LazyFrame | None:
    files = [str(f) for p in paths for f in sorted((p / sub).glob("*.parquet"))]
    if not files:
        return None
    if sub == "trials":  # every trial file follows TRIALS_SCHEMA, so one scan reads them all
        from .store import TRIALS_SCHEMA

        schema = pl.from_arrow(TRIALS_SCHEMA.empty_table()).schema
        return pl.scan_parquet(files, schema=schema, missing_columns="insert", extra_columns="ignore")
    return pl.scan_parquet(files, missing_columns="insert", extra_columns="ignore")


@dataclass
class Results:
    dirs: list[Path]

    @property
    def trials(self) -> pl.LazyFrame:
        lf = _scan(self.dirs, "trials")
        if lf is None:
            return pl.LazyFrame(schema={"trial_id": pl.String, "study": pl.String, "model": pl.String,
                                        "precision": pl.String, "compute_dtype": pl.String, "status": pl.String})
        return lf

    @property
    def metrics(self) -> pl.LazyFrame:
        from .store import METRICS_SCHEMA

        lf = _scan(self.dirs, "metrics")
        return lf if lf is not None else pl.LazyFrame(schema=pl.Schema(pl.from_arrow(METRICS_SCHEMA.empty_table()).schema))

    @property
    def samples(self) -> pl.LazyFrame | None:
        return _scan(self.dirs, "samples")

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
        # one column per task: its main metric
        tasks = m.filter(pl.col("stage") == "tasks").with_columns(
            pl.col("metric").replace_strict({k: i for i, k in enumerate(TASK_MAIN_METRICS)}, default=None).alias("_rank"))
        tasks = (tasks.filter(pl.col("_rank").is_not_null()).sort("_rank").group_by(["trial_id", "task"])
                 .agg(pl.col("value").first()).collect())
        t = self.trials
        keep = ["trial_id", "study", "model", "precision", "compute_dtype", "status", "device", "error_stage", "error"]
        present = t.collect_schema().names()
        out = t.select([c for c in keep if c in present]).join(wide, on="trial_id", how="left")
        if tasks.height:
            # one column per top-level task (a group such as mmlu, not its 57 subtasks)
            top = top_level_tasks(tasks.get_column("task").unique().to_list())
            tasks = tasks.filter(pl.col("task").replace_strict(top, default=None) == pl.col("task"))
            pivot = tasks.pivot(on="task", index="trial_id", values="value")
            out = out.join(pivot.lazy(), on="trial_id", how="left")
        if "study" not in present:
            return out
        # each model's baseline first, then the registry's order (plain dtypes, bitsandbytes, torchao, ...)
        from .precisions import REGISTRY

        order = {name: i for i, name in enumerate(REGISTRY)}
        base = t.select("trial_id", "is_baseline") if "is_baseline" in present else None
        if base is not None:
            out = out.join(base, on="trial_id", how="left")
        out = out.with_columns(pl.col("precision").replace_strict(order, default=len(order)).alias("_p"))
        keys = ["study", "model"] + (["is_baseline"] if base is not None else []) + ["_p", "compute_dtype"]
        desc = [False, False] + ([True] if base is not None else []) + [False, False]
        out = out.sort(keys, descending=desc, nulls_last=True).drop("_p")
        return out.drop("is_baseline") if base is not None else out


def open_results(dirs: list[str] | str, check: bool = True) -> Results:
    """Results of one or more directories (globs allowed) as Polars LazyFrames.

    With ``check``, every file's Parquet footer is read first, so a damaged file is reported by name (UserError)
    instead of failing somewhere inside a query or being mistaken for "no results".
    """
    from .store import ResultsStore

    paths = expand_dirs([dirs] if isinstance(dirs, str) else list(dirs))
    if check:
        for p in paths:
            damaged = ResultsStore(p).damaged_files()
            if damaged:
                f, why = damaged[0]
                more = f" (and {len(damaged) - 1} more)" if len(damaged) > 1 else ""
                raise UserError(f"damaged result file {f}{more}: {why}; `sweep launch` on its study quarantines it "
                                "and reruns the trial")
    return Results(paths)
