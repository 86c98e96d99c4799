"""Reading results: Polars LazyFrames over one or more results directories, and the one-row-per-trial summary.

    >>> from sweeper.results import open_results
    >>> r = open_results(["results/demo"])
    >>> r.summary().collect()
"""
from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import polars as pl

from .errors import UserError

# Summary columns: (column, stage, metric) -> value of that metric row. A trial's memory is weights_gb, the bytes its
# loaded weights really occupy (docs/measurement.md); get_memory_footprint() is not shown here (torchao's tensor
# subclasses count at their unquantized size in it). Decode speed comes in two kinds: eager generate (decode_tok_s)
# and kernel-level (decode_graph_tok_s, CUDA-graph decode; graph_decode_error says why a trial has none).
SPEED_COLUMNS = [
    ("load_s", "load", "load_s"),
    ("weights_gb", "load", "weights_bytes"),
    ("peak_gb", "benchmark", "peak_memory_bytes"),
    ("prefill_ms", "benchmark", "prefill_ms"),
    ("decode_tok_s", "benchmark", "decode_tok_s"),
    ("decode_graph_tok_s", "benchmark", "decode_graph_tok_s"),
    ("decode_tok_s_no_kv", "benchmark", "decode_tok_s_no_kv"),  # Benchmark(kv_cache=False / (True, False))
    ("sequence_ms", "benchmark", "sequence_ms"),
    ("perplexity", "perplexity", "token_perplexity"),
    ("kl_mean", "kl", "kl_mean"),
]
_BYTES_TO_GB = {"weights_gb", "peak_gb"}
# The headline metric of an lm-eval task in the summary, first present wins.
TASK_MAIN_METRICS = ["acc_norm", "acc", "exact_match,strict-match", "exact_match,flexible-extract", "exact_match",
                     "word_perplexity"]


def _tops_of(groups: dict[str, list[str]], reported: set[str]) -> dict[str, str]:
    """task -> the top-level task it belongs to, for the tasks inside a group of ``groups`` (lm-eval's
    group_subtasks). The top is the outermost enclosing group that lm-eval reported numbers for (``reported``): a group
    with no aggregate of its own (glue) is no column, its tasks are."""
    parent = {c: g for g, children in groups.items() for c in children if c != g}
    out: dict[str, str] = {}
    for t in set(parent) | reported:
        top, cur, seen = t, t, {t}
        while cur in parent and parent[cur] not in seen:
            cur = parent[cur]
            seen.add(cur)
            if cur in reported:
                top = cur
        if top != t:
            out[t] = top
    return out


def task_tops(trials: pl.LazyFrame, metrics: pl.LazyFrame) -> pl.DataFrame:
    """(trial_id, task, top): every task that lm-eval ran inside a group, with the top-level task (group) it belongs
    to, from the ``task_groups`` each trial's tasks stage recorded (lm-eval's own group structure, never names:
    ``gsm8k_cot`` is no part of ``gsm8k``). A task with no row here is its own top level; so is every task of a trial
    without that record (older results)."""
    schema = {"trial_id": pl.String, "task": pl.String, "top": pl.String}
    names = trials.collect_schema().names()
    if "task_groups" not in names:
        return pl.DataFrame(schema=schema)
    rec = trials.select("trial_id", "task_groups").filter(pl.col("task_groups").is_not_null()).unique().collect()
    if rec.height == 0:
        return pl.DataFrame(schema=schema)
    # which tasks lm-eval reported numbers for, per distinct record (one per study, typically)
    reported = (metrics.filter(pl.col("stage") == "tasks").select("trial_id", "task").unique().collect()
                .join(rec, on="trial_id").group_by("task_groups").agg(pl.col("task").unique()))
    rep = {g: set(ts) for g, ts in reported.iter_rows()}
    rows: list[tuple[str, str, str]] = []
    for g in rec.get_column("task_groups").unique().to_list():
        try:
            groups = json.loads(g)
        except json.JSONDecodeError:
            continue
        if isinstance(groups, dict):
            rows += [(g, t, top) for t, top in _tops_of(groups, rep.get(g, set())).items()]
    tops = pl.DataFrame(rows, schema={"task_groups": pl.String, "task": pl.String, "top": pl.String}, orient="row")
    return rec.join(tops, on="task_groups").select("trial_id", "task", "top")


def with_top(frame: pl.DataFrame | pl.LazyFrame, tops: pl.DataFrame, name: str = "top") -> pl.DataFrame | pl.LazyFrame:
    """``frame`` (with trial_id and task) plus a column ``name``: the top-level task of each row's task."""
    t = tops.lazy() if isinstance(frame, pl.LazyFrame) else tops
    return (frame.join(t.rename({"top": "_top"}), on=["trial_id", "task"], how="left")
            .with_columns(pl.coalesce("_top", "task").alias(name)).drop("_top"))


def expand_dirs(dirs: list[str]) -> list[Path]:
    """The results dirs that ``dirs`` (paths or globs) name, each once (the same dir named twice, or by two globs, is
    read once: its rows would otherwise appear twice)."""
    from .location import is_uri, open_location

    out: list[Path | str] = []
    for d in dirs:
        if is_uri(d):  # an object store location (docs/store.md): its study.json or commit log, not globbed
            loc = open_location(d)
            if not loc.list("_log") and loc.lstat("study.json") is None:
                raise UserError(f"{d} is not a sweeper results location (no study.json or _log/); give the "
                                "location `sweep launch --results` wrote")
            if loc.root not in out:
                out.append(loc.root)
            continue
        matches = sorted(glob.glob(os.path.expanduser(d))) if any(c in d for c in "*?[") else [d]
        for m in matches:
            p = Path(m)
            if not (p / "trials").is_dir() and not (p / "study.json").is_file() and not (p / "_log").is_dir():
                raise UserError(f"{m} is not a sweeper results directory (no study.json, _log/ or trials/); "
                                "give the directory `sweep launch` wrote, e.g. results/<study>")
            if not any(isinstance(q, Path) and p.resolve() == q.resolve() for q in out):
                out.append(p)
    if not out:
        raise UserError(f"no results directories match {' '.join(dirs)}")
    return out


def stack_folders(folders: list["Folder"], build: Callable[["Folder"], pl.LazyFrame]) -> pl.LazyFrame:
    """``build(folder)`` of each results dir (:meth:`Results.folders`) stacked, with a ``results_dir`` column first and
    without the baselines a folder borrowed (they are another folder's rows). Rows of several dirs are never joined on
    trial_id: the same id in two dirs (a --fresh copy) keeps each dir's numbers."""
    frames = []
    for f in folders:
        lf = build(f)
        if f.borrowed and "trial_id" in lf.collect_schema().names():
            lf = lf.filter(~pl.col("trial_id").is_in(list(f.borrowed)))
        frames.append(lf.with_columns(pl.lit(str(f.dirs[0])).alias("results_dir")))
    return pl.concat(frames, how="diagonal_relaxed").select("results_dir", pl.all().exclude("results_dir"))


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


def task_main_metrics(metrics: pl.LazyFrame, trials: pl.LazyFrame) -> pl.DataFrame:
    """Long frame (trial_id, task, metric, value, stderr, n): each top-level task's main metric (the first of
    TASK_MAIN_METRICS that any trial has for that task, the same for every trial, so a column never mixes metrics).
    Top-level: not inside a group of the trial's recorded task_groups (:func:`task_tops`). A trial without that
    metric for the task has no row."""
    m = (metrics.filter(pl.col("stage") == "tasks").select("trial_id", "task", "metric", "value", "stderr", "n")
         .with_columns(task_metric_rank().alias("_rank")).filter(pl.col("_rank").is_not_null()).collect())
    if m.height == 0:
        return pl.DataFrame(schema={"trial_id": pl.String, "task": pl.String, "metric": pl.String,
                                    "value": pl.Float64, "stderr": pl.Float64, "n": pl.Int64})
    m = m.join(task_tops(trials, metrics), on=["trial_id", "task"], how="anti")
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
        """One row per trial: config, status, the headline speed / memory / quality numbers, task main metrics.
        Over several dirs: each dir's summary, stacked with a ``results_dir`` column."""
        if len(self.dirs) > 1:
            return stack_folders(self.folders(), lambda f: f.summary())
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
        tasks = task_main_metrics(m, self.trials).select("trial_id", "task", "value")
        t = self.trials  # every TRIALS_SCHEMA column, even for old files or none
        keep = ["trial_id", "study", "model", "precision", "compute_dtype", "status", "device", "error_stage", "error"]
        out = t.select(keep + ["is_baseline", "graph_decode_error"]).join(wide, on="trial_id", how="left")
        # why a trial has no kernel-level decode number, right after that number
        cols = out.collect_schema().names()
        cols.remove("graph_decode_error")
        cols.insert(cols.index("decode_graph_tok_s") + 1, "graph_decode_error")
        out = out.select(cols)
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

    def folders(self) -> list["Folder"]:
        """Each dir on its own (:class:`Folder`), with the done baselines it lacks borrowed from the first other dir
        that has them."""
        own = {d: Results([d]).trials.select("trial_id", "status", "baseline_id").collect() for d in self.dirs}
        done_in: dict[str, Path] = {}
        for d, t in own.items():
            for tid in t.filter(pl.col("status") == "done").get_column("trial_id").to_list():
                done_in.setdefault(tid, d)
        out = []
        for d, t in own.items():
            have = set(t.get_column("trial_id").to_list())
            bases = t.get_column("baseline_id").drop_nulls().to_list()
            need = sorted({b for b in bases if b not in have and b in done_in})
            out.append(Folder([d], borrowed={b: done_in[b] for b in need}))
        return out


@dataclass
class Folder(Results):
    """One results dir of several, read on its own, plus the done baseline trials it lacks, read from other dirs
    (``borrowed``: trial id -> dir). The same trial id is the same cell measured with the same settings
    (sweeper/trials.py), so a baseline another study measured serves; a trial id in two dirs keeps each dir's rows."""

    borrowed: dict[str, Path] = field(default_factory=dict)

    def _with_borrowed(self, own: pl.LazyFrame, kind: str) -> pl.LazyFrame:
        if not self.borrowed:
            return own
        extra = [getattr(Results([d]), kind).filter(pl.col("trial_id") == tid) for tid, d in self.borrowed.items()]
        return pl.concat([own, *extra], how="diagonal_relaxed")

    @property
    def trials(self) -> pl.LazyFrame:
        return self._with_borrowed(super().trials, "trials")

    @property
    def metrics(self) -> pl.LazyFrame:
        return self._with_borrowed(super().metrics, "metrics")

    @property
    def samples(self) -> pl.LazyFrame:
        return self._with_borrowed(super().samples, "samples")


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
