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
import functools
import io
import logging
import math
import re
from pathlib import Path
from typing import Callable, Sequence

import polars as pl

from . import analysis
from .errors import UserError
from .results import Results, open_results, stack_folders

log = logging.getLogger(__name__)

FORMATS = ("table", "csv", "json", "markdown", "parquet")
VIEWS = ("summary", "trials", "metrics", "samples", "compare", "significance", "pareto", "recommendations")
_VALUE_COLUMNS = ("value", "stderr", "n", "min", "max", "unit")
_METRIC_CONTEXT = ("study", "model", "precision", "compute_dtype")

# What `sweep results` shows without --columns (``--columns all``: everything). The memory columns are named in this
# one list so that a rename of the memory metrics changes one line.
MEMORY_COLUMNS = ["weights_gb", "peak_gb"]  # weights_gb: the true bytes of the loaded weights
# speed in two kinds: eager generate and kernel-level (CUDA-graph decode; dropped where no trial has it, and with it the
# column saying why a trial has none)
DEFAULT_COLUMNS = ["results_dir", "study", "model", "precision", "compute_dtype", "status", "load_s", *MEMORY_COLUMNS,
                   "decode_tok_s", "decode_graph_tok_s", "graph_decode_error", "decode_tok_s_no_kv", "batch_tok_s",
                   "perplexity", "kl_mean"]
# --vs-baseline: the seeds' comparison (speed, memory, quality against the baseline, and a verdict)
DEFAULT_VS_BASELINE = ["results_dir", "study", "model", "precision", "compute_dtype", "status", "decode_tok_s",
                       "speedup_decode", "decode_graph_tok_s", "speedup_decode_graph", "graph_decode_error",
                       "decode_tok_s_no_kv", "speedup_decode_no_kv", "kv_cache_speedup",
                       MEMORY_COLUMNS[0], "memory_reduction", "retention_mean", "perplexity", "ppl_delta_pct",
                       "kl_mean", "verdict"]
# columns of the summary / compare views that are not a task's main metric
_NOT_TASKS = {"batch_size", "batch_tok_s", "verdict", "results_dir", "graph_decode_error", *analysis.CONFIG_COLUMNS,
              *[c for c, *_ in analysis.METRIC_COLUMNS], *analysis.DERIVED_COLUMNS}
# shorter headers, used only when a table is wider than the terminal
SHORT_HEADERS = {"compute_dtype": "compute", "load_s": "load s", "weights_gb": "mem GB",
                 "decode_graph_tok_s": "kernel tok/s", "speedup_decode_graph": "kernel speedup",
                 "graph_decode_error": "no kernel: why", "decode_tok_s_no_kv": "no-KV tok/s",
                 "speedup_decode_no_kv": "no-KV speedup", "kv_cache_speedup": "KV gain",
                 "peak_gb": "peak GB", "decode_tok_s": "dec tok/s", "batch_tok_s": "bat tok/s", "perplexity": "ppl",
                 "kl_mean": "KL", "speedup_decode": "speedup", "memory_reduction": "mem red", "retention_mean": "retain",
                 "ppl_delta_pct": "ppl +%", "precision": "prec", "trial_id": "trial"}
# repeated at the left of every block when a table is split to fit the terminal
KEY_COLUMNS = ("model", "precision", "compute_dtype")


def _one_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    line = msg[0] if msg else type(e).__name__
    # the SQL parser's own structures (`Interval { value: Value(...) ... }`) say nothing to a user
    return re.sub(r"\s*\b[A-Z]\w*\s*\{.*$", "", line)[:300] or type(e).__name__


WHERE_HELP = ("a SQL boolean expression over the view's columns, strings in single quotes, e.g. "
              "\"precision = 'nf4' and decode_tok_s > 10\"")


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
    """name -> function building that view (lazy where Polars allows; analyses are computed when called).

    Over several results dirs each view is built in each dir on its own and the rows stacked, with a ``results_dir``
    column first: the same trial id in two dirs (a --fresh copy, or the same cell in two studies) keeps each dir's
    numbers, and each trial is compared with the baseline of its own dir (else the same baseline cell of another)."""
    if len(res.dirs) > 1:
        folders = res.folders()
        return {name: functools.partial(stack_folders, folders,
                                        lambda f, name=name: _view_builders(f, vs_baseline)[name]())
                for name in VIEWS}
    return _view_builders(res, vs_baseline)


def _view_builders(res: Results, vs_baseline: bool = False) -> dict[str, Callable[[], pl.LazyFrame]]:
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


# the columns --vs-baseline adds (sweeper.analysis.compare): named without it, the error says so
_DERIVED = ("speedup_*", "*_vs_baseline", "*_delta", "*_ratio", "*retention*", "baseline_*", "*_reduction*")


def _select_columns(df: pl.DataFrame, columns: list[str], vs_baseline: bool = True) -> pl.DataFrame:
    names = df.columns
    picked: list[str] = []
    for c in columns:
        hits = [n for n in names if fnmatch.fnmatchcase(n, c)] if any(ch in c for ch in "*?[") else \
            ([c] if c in names else [])
        if not hits:
            hint = ("; columns against the baseline such as speedup_* come with --vs-baseline"
                    if not vs_baseline and (any(fnmatch.fnmatchcase(c, d) for d in _DERIVED) or
                                            any(fnmatch.fnmatchcase(d.strip("*"), c) for d in _DERIVED)) else "")
            raise UserError(f"--columns: no column {c!r}{hint}; available: {', '.join(names)}")
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
    if on == "task" and "stage" in df.columns:  # lm-eval tasks before the KL prompt categories (stage prompts)
        df = df.sort(pl.col("stage") != "tasks", maintain_order=True)
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
    if sql is not None and view is not None:
        raise UserError("give either --sql or --view, not both (--sql names its views itself)")
    if vs_baseline and (pivot or view in ("trials", "metrics", "samples", "significance")):
        what = f"--pivot {pivot}" if pivot else f"--view {view}"
        raise UserError(f"--vs-baseline adds columns to the summary (the default view); it does not apply to {what}. "
                        "Leave it out, or use it with --view summary / compare / pareto / recommendations")
    res = open_results(dirs)
    builders = view_builders(res, vs_baseline=vs_baseline)
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
            raise UserError(f"--where {where!r} failed: {_one_line(e)}; give {WHERE_HELP}") from None
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
        df = _select_columns(df, picked, vs_baseline or view in ("compare", "pareto", "recommendations")
                             or sql is not None)
    elif sql is None and pivot is None and (view or "summary") == "summary":
        df = default_columns(df, vs_baseline)
    if limit is not None:
        df = df.head(limit)
    return df


def format_number(v: float | None, digits: int = 4) -> str:
    """``v`` with ``digits`` significant digits, each value on its own (a small value next to a large one is never
    rounded to zero): 0.0835, 11.45, 299.5, 12346, 5.8e-05; trailing zeros dropped; None -> ""."""
    if v is None:
        return ""
    if not math.isfinite(v) or v == 0:
        return str(v) if not math.isfinite(v) else "0"
    mag = math.floor(math.log10(abs(v)))
    if mag < -4:
        mantissa, exp = f"{v:.{digits - 1}e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{exp}"  # 5.800e-05 -> 5.8e-05
    text = f"{v:.{max(0, digits - 1 - mag)}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def default_columns(df: pl.DataFrame, vs_baseline: bool = False) -> pl.DataFrame:
    """The columns that matter: DEFAULT_COLUMNS and each task's main metric, or (``vs_baseline``) DEFAULT_VS_BASELINE
    with :func:`sweeper.analysis.verdicts`, each model's baseline first; columns empty in every row are left out, and
    so are ``results_dir`` / ``study`` when every row has the same."""
    if vs_baseline:
        df = analysis.verdicts(df).collect()
        if {"model", "is_baseline", "precision"} <= set(df.columns):  # each model's baseline first, as in the summary
            from .precisions import REGISTRY

            order = {name: i for i, name in enumerate(REGISTRY)}
            by_dir = [pl.col("results_dir")] if "results_dir" in df.columns else []
            df = df.sort([*by_dir, pl.col("model"), pl.col("is_baseline").not_(),
                          pl.col("precision").replace_strict(order, default=len(order), return_dtype=pl.Int64)],
                         nulls_last=True, maintain_order=True)
    names = DEFAULT_VS_BASELINE if vs_baseline else DEFAULT_COLUMNS
    # task main metrics (the summary's one column per task); --vs-baseline has their retention instead
    tasks = [] if vs_baseline else [c for c in df.columns if c not in _NOT_TASKS and not c.startswith("retention_")]
    keep = [c for c in [*names, *tasks] if c in df.columns and df.get_column(c).null_count() < df.height]
    for c in ("results_dir", "study"):  # said only where rows differ in it
        if c in keep and df.get_column(c).n_unique() < 2:
            keep.remove(c)
    if "decode_graph_tok_s" not in keep and "graph_decode_error" in keep:
        keep.remove("graph_decode_error")  # every trial lacks it: the why belongs to --columns all
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
    """Floats with 4 significant digits (each value on its own, never rounded to zero) and nulls blank, for reading."""
    out = []
    for name, dtype in df.schema.items():
        c = pl.col(name)
        if dtype.is_float():
            out.append(pl.Series(name, [format_number(v) for v in df.get_column(name).to_list()], dtype=pl.String))
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


RESULTS_EXTENSIONS = {".csv": "csv", ".json": "json", ".md": "markdown", ".markdown": "markdown",
                      ".parquet": "parquet", ".pq": "parquet", ".txt": "table"}


def output_format(fmt: str | None, output: str | Path | None, extensions: dict[str, str] = RESULTS_EXTENSIONS,
                  default: str = "table") -> str:
    """The format to write: ``fmt`` when given, else the one ``output``'s extension names, else ``default``. An
    extension that names another format than ``fmt`` is refused (a file named x.csv never holds a table)."""
    ext = Path(output).suffix.lower() if output else ""
    named = extensions.get(ext)
    if fmt is None:
        return named or default
    if named is not None and named != fmt:
        raise UserError(f"-o {output}: its extension {ext} means {named}, not --format {fmt}; give a file ending in "
                        f"{'/'.join(e for e, f in extensions.items() if f == fmt) or 'another extension'}, "
                        "or leave --format out to write what the extension says")
    return fmt


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


__all__ = ["run_query", "query_frame", "format_frame", "format_number", "output_format", "fit_table", "terminal_width",
           "default_columns", "view_builders", "FORMATS", "VIEWS"]
