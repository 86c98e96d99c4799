"""The query engine behind ``sweep results``: views over one or more results directories, filtered with a Polars SQL
expression (``--where``) or queried with SQL (``--sql``), shaped (``--columns``, ``--sort``, ``--pivot``) and
formatted (``--format table|csv|json|markdown|parquet``).

Views (``--sql`` sees them as tables; ``view=`` picks one for the other options):

- ``summary`` (default): one readable row per trial (``--vs-baseline`` adds the derived columns of
  :func:`sweeper.analysis.compare`);
- ``trials``: the trial rows as stored; ``metrics``: long metric rows joined with each trial's study, model,
  precision and compute dtype; ``samples``: per-item rows;
- ``compare`` (summary + derived columns), ``significance``, ``pareto``, ``recommendations``: the analyses; with
  ``--sql`` they are computed only when the query names them.

``--where`` is parsed by :func:`polars.sql_expr` (a SQL boolean expression, ``==`` accepted for ``=``), so it cannot run
Python code: ``precision == 'nf4' and decode_tok_s > 10``.
"""
from __future__ import annotations

import fnmatch
import io
import logging
import math
import re
from pathlib import Path
from typing import Callable, Sequence

import polars as pl

from . import analysis
from .errors import UserError
from .results import Results, open_results

log = logging.getLogger(__name__)

FORMATS = ("table", "csv", "json", "markdown", "parquet")
VIEWS = ("summary", "trials", "metrics", "samples", "compare", "significance", "pareto", "recommendations")
_VALUE_COLUMNS = ("value", "stderr", "n", "min", "max", "unit")
_METRIC_CONTEXT = ("study", "model", "precision", "compute_dtype")

# What `sweep results` shows without --columns (``--columns all``: everything). The memory columns are named in this
# one list so that a rename of the memory metrics changes one line.
MEMORY_COLUMNS = ["footprint_gb", "peak_gb"]
DEFAULT_COLUMNS = ["study", "model", "precision", "compute_dtype", "status", "load_s", *MEMORY_COLUMNS,
                   "decode_tok_s", "batch_tok_s", "perplexity", "kl_mean"]
# --vs-baseline: the seeds' comparison (speed, memory, quality against the baseline, and a verdict)
DEFAULT_VS_BASELINE = ["study", "model", "precision", "compute_dtype", "status", "decode_tok_s", "speedup_decode",
                       MEMORY_COLUMNS[0], "memory_reduction", "retention_mean", "perplexity", "ppl_delta_pct",
                       "kl_mean", "verdict"]
# columns of the summary / compare views that are not a task's main metric
_NOT_TASKS = {"trial_id", "study", "model", "model_id", "precision", "compute_dtype", "is_baseline", "baseline_id",
              "status", "device", "device_name", "gpu_share", "error_stage", "error_type", "error", "batch_size",
              "batch_tok_s", "verdict", *[c for c, *_ in analysis.METRIC_COLUMNS], *analysis.DERIVED_COLUMNS}
# shorter headers, used only when a table is wider than the terminal
SHORT_HEADERS = {"compute_dtype": "compute", "load_s": "load s", "footprint_gb": "mem GB",
                 "peak_gb": "peak GB", "decode_tok_s": "dec tok/s", "batch_tok_s": "bat tok/s", "perplexity": "ppl",
                 "kl_mean": "KL", "speedup_decode": "speedup", "memory_reduction": "mem red", "retention_mean": "retain",
                 "ppl_delta_pct": "ppl +%", "precision": "prec", "trial_id": "trial"}
# repeated at the left of every block when a table is split to fit the terminal
KEY_COLUMNS = ("model", "precision", "compute_dtype")


def _one_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return msg[0] if msg else type(e).__name__


def _split(v: str | Sequence[str] | None) -> list[str]:
    if v is None:
        return []
    items = [v] if isinstance(v, str) else list(v)
    return [p.strip() for item in items for p in item.split(",") if p.strip()]


def _metrics_view(res: Results) -> pl.LazyFrame:
    t = res.trials
    ctx = [c for c in _METRIC_CONTEXT if c in t.collect_schema().names()]
    info = t.select(["trial_id", *ctx]).unique("trial_id", keep="first")
    m = res.metrics
    return m.join(info, on="trial_id", how="left").select(["trial_id", *ctx, *[c for c in m.collect_schema().names()
                                                                                 if c != "trial_id"]])


def view_builders(res: Results, vs_baseline: bool = False) -> dict[str, Callable[[], pl.LazyFrame]]:
    """name -> function building that view (lazy where Polars allows; analyses are computed when called)."""
    def cmp() -> pl.LazyFrame:
        return analysis.compare(res)

    return {
        "summary": (cmp if vs_baseline else res.summary),
        "trials": lambda: res.trials,
        "metrics": lambda: _metrics_view(res),
        "samples": lambda: res.samples,
        "compare": cmp,
        "significance": lambda: analysis.significance(res).lazy(),
        "pareto": lambda: analysis.pareto(cmp()).lazy(),
        "recommendations": lambda: analysis.recommend(cmp()).lazy(),
    }


def _select_columns(df: pl.DataFrame, columns: list[str]) -> pl.DataFrame:
    names = df.columns
    picked: list[str] = []
    for c in columns:
        hits = [n for n in names if fnmatch.fnmatchcase(n, c)] if any(ch in c for ch in "*?[") else \
            ([c] if c in names else [])
        if not hits:
            raise UserError(f"--columns: no column {c!r}; available: {', '.join(names)}")
        picked.extend(h for h in hits if h not in picked)
    return df.select(picked)


def _sort(df: pl.DataFrame, sort: list[str]) -> pl.DataFrame:
    cols, desc = [], []
    for s in sort:
        d = s.startswith("-")
        c = s[1:] if d else s
        if c not in df.columns:
            raise UserError(f"--sort: no column {c!r} (prefix '-' sorts descending); available: {', '.join(df.columns)}")
        cols.append(c)
        desc.append(d)
    return df.sort(cols, descending=desc, nulls_last=True)


def _pivot(df: pl.DataFrame, on: str) -> pl.DataFrame:
    """Wide table: one column per value of ``on`` (for ``task``: per task and metric, ``<task>:<metric>``), values from
    ``value``, one row per remaining key (trial config)."""
    if on not in df.columns:
        raise UserError(f"--pivot: no column {on!r}; available: {', '.join(df.columns)}")
    if "value" not in df.columns:
        raise UserError(f"--pivot {on} needs a 'value' column (the metrics view, or a --sql query selecting value)")
    df = df.filter(pl.col(on).is_not_null())
    key = on
    if on == "task" and "metric" in df.columns:
        df = df.with_columns(pl.format("{}:{}", pl.col("task"), pl.col("metric")).alias("_col"))
        drop = {"task", "metric", "stage", "batch_size"}
        key = "_col"
    else:
        drop = {on}
    index = [c for c in df.columns if c not in drop and c not in _VALUE_COLUMNS and c != key]
    if not index:
        raise UserError(f"--pivot {on}: no columns left to index the rows by")
    if df.height == 0:
        return df.select(index)
    return df.pivot(on=key, index=index, values="value", aggregate_function="first")


def query_frame(dirs: str | Sequence[str], where: str | None = None, sql: str | None = None,
                columns: str | Sequence[str] | None = None, sort: str | Sequence[str] | None = None,
                pivot: str | None = None, vs_baseline: bool = False, view: str | None = None,
                limit: int | None = None) -> pl.DataFrame:
    """The rows ``sweep results`` shows, as a DataFrame. Order of operations: view (or ``sql``) -> ``where`` ->
    ``pivot`` -> ``sort`` -> ``columns`` -> ``limit``. Without ``view``, ``pivot`` works on the metrics view and
    everything else on the summary. Raises UserError (one line naming the bad query or column) on bad input."""
    res = open_results(dirs)
    builders = view_builders(res, vs_baseline=vs_baseline)
    if sql is not None and view is not None:
        raise UserError("give either --sql or --view, not both (--sql names its views itself)")
    if sql is not None:
        ctx = pl.SQLContext()
        for name, build in builders.items():
            if re.search(rf"\b{name}\b", sql, flags=re.IGNORECASE):
                ctx.register(name, build())
        try:
            lf = ctx.execute(sql)
            lf.collect_schema()
        except Exception as e:
            raise UserError(f"--sql {sql!r} failed: {_one_line(e)} (tables: {', '.join(VIEWS)})") from None
    else:
        v = view or ("metrics" if pivot else "summary")
        if v not in builders:
            raise UserError(f"unknown view {v!r}; choose one of {', '.join(VIEWS)}")
        lf = builders[v]()
    if where:
        try:
            expr = pl.sql_expr(where)
            lf = lf.filter(expr)
            lf.collect_schema()
        except Exception as e:
            raise UserError(f"--where {where!r} failed: {_one_line(e)}") from None
    try:
        df = lf.collect()
    except UserError:
        raise
    except pl.exceptions.PolarsError as e:
        what = f"--sql {sql!r}" if sql is not None else (f"--where {where!r}" if where else "query")
        raise UserError(f"{what} failed: {_one_line(e)}") from None
    if pivot:
        df = _pivot(df, pivot)
    if sort:
        df = _sort(df, _split(sort))
    picked = _split(columns)
    if picked == ["all"]:
        pass
    elif picked:
        df = _select_columns(df, picked)
    elif sql is None and pivot is None and (view or "summary") == "summary":
        df = default_columns(df, vs_baseline)
    if limit is not None:
        df = df.head(limit)
    return df


def default_columns(df: pl.DataFrame, vs_baseline: bool = False) -> pl.DataFrame:
    """The columns that matter: DEFAULT_COLUMNS and each task's main metric, or (``vs_baseline``) DEFAULT_VS_BASELINE
    with :func:`sweeper.analysis.verdicts`, each model's baseline first; columns empty in every row are left out, and
    so is ``study`` when every row has the same."""
    if vs_baseline:
        df = analysis.verdicts(df).collect()
        if {"model", "is_baseline", "precision"} <= set(df.columns):  # each model's baseline first, as in the summary
            from .precisions import REGISTRY

            order = {name: i for i, name in enumerate(REGISTRY)}
            df = df.sort([pl.col("model"), pl.col("is_baseline").not_(),
                          pl.col("precision").replace_strict(order, default=len(order), return_dtype=pl.Int64)],
                         nulls_last=True, maintain_order=True)
    names = DEFAULT_VS_BASELINE if vs_baseline else DEFAULT_COLUMNS
    # task main metrics (the summary's one column per task); --vs-baseline has their retention instead
    tasks = [] if vs_baseline else [c for c in df.columns if c not in _NOT_TASKS and not c.startswith("retention_")]
    keep = [c for c in [*names, *tasks] if c in df.columns and df.get_column(c).null_count() < df.height]
    if "study" in keep and df.get_column("study").n_unique() < 2:
        keep.remove("study")
    return df.select(keep)


def terminal_width() -> int | None:
    """Characters a table may use: $COLUMNS, else the terminal's width; None (no limit) when output is not a terminal."""
    import os
    import shutil
    import sys

    if os.environ.get("COLUMNS", "").isdigit():
        return int(os.environ["COLUMNS"])
    return shutil.get_terminal_size().columns if sys.stdout.isatty() else None


def _render(df: pl.DataFrame, markdown: bool = False) -> str:
    opts = dict(tbl_rows=-1, tbl_cols=-1, tbl_hide_column_data_types=True, tbl_hide_dataframe_shape=True,
                tbl_width_chars=65_000, fmt_str_lengths=1_000,
                tbl_formatting="MARKDOWN" if markdown else "UTF8_FULL_CONDENSED")
    with pl.Config(**opts):
        return str(df) + "\n"


def _widest(text: str) -> int:
    return max((len(line) for line in text.splitlines()), default=0)


def fit_table(shown: pl.DataFrame, width: int | None, keys: Sequence[str] = KEY_COLUMNS) -> str:
    """``shown`` (strings) as a table of at most ``width`` characters a line: as it is if it fits; else with short
    headers (SHORT_HEADERS); else in blocks, one under the other, each repeating the ``keys`` columns present (model,
    precision, compute dtype) at its left; cells still too long are cut with '…'."""
    text = _render(shown)
    if width is None or _widest(text) <= width:
        return text
    shown = shown.rename({c: SHORT_HEADERS[c] for c in shown.columns
                          if c in SHORT_HEADERS and SHORT_HEADERS[c] not in shown.columns})
    text = _render(shown)
    if _widest(text) <= width:
        return text
    short = {SHORT_HEADERS.get(k, k) for k in keys}
    keys = [c for c in shown.columns if c in short] if len(shown.columns) > len(short) else []
    rest = [c for c in shown.columns if c not in keys]
    # a cell longer than what a block of the keys and that one column leaves is cut
    room = max(8, width - _widest(_render(shown.select(keys))) - 3 if keys else width - 4)
    shown = shown.with_columns([pl.when(pl.col(c).str.len_chars() > room)
                                .then(pl.col(c).str.slice(0, room - 1) + "…").otherwise(pl.col(c)).alias(c)
                                for c in rest])
    blocks: list[list[str]] = [[]]
    for c in rest:
        if blocks[-1] and _widest(_render(shown.select(keys + blocks[-1] + [c]))) > width:
            blocks.append([])
        blocks[-1].append(c)
    return "\n".join(_render(shown.select(keys + b)) for b in blocks)


def _display(df: pl.DataFrame) -> pl.DataFrame:
    """Floats rounded to 4 significant digits (per column, from its largest magnitude) and nulls blank, for reading."""
    out = []
    for name, dtype in df.schema.items():
        c = pl.col(name)
        if dtype.is_float():
            col = df.get_column(name)
            finite = col.filter(col.is_finite()).abs()
            mx = float(finite.max()) if finite.len() else 0.0  # type: ignore[arg-type]
            decimals = 4 if mx == 0 else min(max(0, 3 - math.floor(math.log10(mx))), 6)
            out.append(c.round(decimals).cast(pl.String).fill_null("").alias(name))
        elif dtype == pl.String:
            out.append(c.fill_null(""))
        elif dtype.is_nested() or dtype == pl.Object:
            out.append(c.cast(pl.String, strict=False).fill_null("").alias(name))
        else:
            out.append(c.cast(pl.String).fill_null("").alias(name))
    return df.select(out)


def format_frame(df: pl.DataFrame, fmt: str = "table", output: str | Path | None = None,
                 width: int | None = None, keys: Sequence[str] = KEY_COLUMNS) -> str | bytes:
    """Render ``df`` as ``fmt``. Text formats return the text (also written to ``output`` when given); parquet needs
    ``output`` and returns the file's bytes. A ``table`` fits in ``width`` characters (:func:`fit_table`)."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    if fmt == "parquet":
        if output is None:
            raise UserError("--format parquet writes a binary file: give an output path with -o/--output FILE")
        buf = io.BytesIO()
        df.write_parquet(buf)
        data = buf.getvalue()
        _write(Path(output), data)
        return data
    if fmt == "csv":
        text = df.write_csv()
    elif fmt == "json":
        text = df.write_json()
    else:
        shown = _display(df)
        text = _render(shown, markdown=True) if fmt == "markdown" else fit_table(shown, width, keys)
        if df.height == 0:
            text += "(no rows)\n"
    if output is not None:
        _write(Path(output), text.encode())
    return text


def _write(path: Path, data: bytes) -> None:
    from .store import atomic_write_bytes

    try:
        atomic_write_bytes(path, data)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None
    log.info("wrote %s (%d bytes)", path, len(data))


def run_query(dirs: str | Sequence[str], where: str | None = None, sql: str | None = None,
              columns: str | Sequence[str] | None = None, sort: str | Sequence[str] | None = None,
              pivot: str | None = None, fmt: str = "table", vs_baseline: bool = False,
              output: str | Path | None = None, view: str | None = None, limit: int | None = None) -> str | bytes:
    """``sweep results DIR... [--where EXPR | --sql QUERY] [--columns a,b] [--sort -col] [--pivot task]
    [--format table|csv|json|markdown|parquet] [--vs-baseline] [-o FILE] [--view NAME] [--limit N]``.

    Returns the text to print (text formats; also written to ``output`` when given) or the Parquet bytes (parquet,
    written to ``output``, which it requires). Raises UserError with one line on bad input."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    if fmt == "parquet" and output is None:
        raise UserError("--format parquet writes a binary file: give an output path with -o/--output FILE")
    if columns is None and fmt in ("csv", "json", "parquet"):
        columns = "all"  # an export keeps every column (trial_id to join on); the default columns are for reading
    df = query_frame(dirs, where=where, sql=sql, columns=columns, sort=sort, pivot=pivot, vs_baseline=vs_baseline,
                     view=view, limit=limit)
    return format_frame(df, fmt=fmt, output=output, width=terminal_width() if output is None else None)


__all__ = ["run_query", "query_frame", "format_frame", "fit_table", "terminal_width", "default_columns",
           "view_builders", "FORMATS", "VIEWS"]
