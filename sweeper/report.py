"""``sweep report DIR... -o report.html``: one self-contained HTML file (inline CSS and SVG, no scripts, no network)
or the same tables as Markdown.

Sections (HTML element ids): ``recommendations``, ``summary`` (seed-style: every metric with its "vs baseline"
column), ``significance``, ``pareto`` (retention vs memory and vs throughput per model), ``speed``, ``memory``,
``kl`` (per prompt-category KL heat map), ``failed`` (failed trials with reasons), ``environment``.

    >>> from sweeper.report import write_report
    >>> write_report(["results/qwen"], "qwen.html")
"""
from __future__ import annotations

import datetime as _dt
import html
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import polars as pl

from . import analysis
from .errors import UserError
from .results import Folder, Results, open_results

log = logging.getLogger(__name__)

FORMATS = ("html", "markdown")
SECTIONS = [("recommendations", "Recommendations"), ("summary", "Summary vs baseline"),
            ("significance", "Task metrics vs baseline: significance"), ("pareto", "Pareto fronts"),
            ("speed", "Speed vs baseline"), ("memory", "Memory"), ("kl", "KL divergence per prompt category"),
            ("failed", "Failed trials"), ("environment", "Environment")]
MAX_CHART_MODELS = 24   # per-model charts beyond this many models are left out (the tables keep every row)
MAX_BARS = 40           # trials per bar chart / heat map
MAX_POINTS = 2000       # points per scatter plot
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf"]
ENV_COLUMNS = ["device", "device_name", "host", "gpu_share", "timing_exclusive", "sweeper_git_sha"]


# ----------------------------------------------------------------------------------------------------------- formatting
def _fixed(e: pl.Expr, d: int) -> pl.Expr:
    """Vectorised fixed-point formatting ('1.50'); null for null / NaN / inf."""
    scale = 10 ** d
    scaled = (e.abs() * scale).round(0).cast(pl.Int64, strict=False)
    ip = (scaled // scale).cast(pl.String)
    text = ip + pl.lit(".") + (scaled % scale).cast(pl.String).str.zfill(d) if d > 0 else ip
    sign = pl.when((e < 0) & (scaled > 0)).then(pl.lit("-")).otherwise(pl.lit(""))
    return pl.when(e.is_null() | ~e.is_finite()).then(None).otherwise(sign + text)


def _sig(e: pl.Expr) -> pl.Expr:
    """A measured value with 4 significant digits, each on its own (a 0.0058 GB footprint is not '0.006' next to
    '16.1', a KL of 0.00004 not '0.0000'); null for null."""
    from .query import format_number

    return e.map_elements(format_number, return_dtype=pl.String, skip_nulls=True)


def _signed(e: pl.Expr, d: int) -> pl.Expr:
    return pl.when(e >= 0).then(pl.lit("+") + _fixed(e, d)).otherwise(_fixed(e, d))


def _signed_pct(e: pl.Expr, d: int = 1) -> pl.Expr:
    return _signed(e, d) + pl.lit("%")


def _score(e: pl.Expr) -> pl.Expr:
    """A significance score: perplexity with 2 decimals, anything else with 4."""
    return pl.when(pl.col("kind") == "perplexity").then(_fixed(e, 2)).otherwise(_fixed(e, 4))


def _in_units(e: pl.Expr) -> pl.Expr:
    """A significance difference in its metric's units: points (x100) for mean / mcc / f1 metrics, perplexity with 2
    decimals, bits per byte with 4."""
    kind = pl.col("kind")
    return (pl.when(kind == "perplexity").then(_signed(e, 2))
            .when(kind == "bits_per_byte").then(_signed(e, 4))
            .otherwise(_signed(100 * e, 1) + pl.lit(" pts")))


def _vs(expr: pl.Expr, status: pl.Expr = pl.col("baseline_status")) -> pl.Expr:
    return (pl.when(status == "self").then(pl.lit("baseline"))
            .when(status.is_in(["missing", "failed", "none"])).then(pl.lit("n/a"))
            .otherwise(expr).fill_null("-"))


# ----------------------------------------------------------------------------------------------------------- data
@dataclass
class ReportData:
    """Everything the renderers need; every table is a DataFrame of display strings except ``compare``/``pareto``."""

    title: str
    dirs: list[str]
    studies: list[str]
    generated: str
    counts: dict[str, int]
    compare: pl.DataFrame
    pareto: pl.DataFrame
    recommendations: pl.DataFrame
    summary: dict[str, pl.DataFrame]
    significance: pl.DataFrame
    kl: pl.DataFrame                       # long: model, label, category, kl
    failed: pl.DataFrame
    environment: pl.DataFrame
    notes: list[str] = field(default_factory=list)
    summary_notes: dict[str, list[str]] = field(default_factory=dict)


def _label() -> pl.Expr:
    return pl.format("{}/{}", pl.col("precision").fill_null("?"), pl.col("compute_dtype").fill_null("?"))


def _summary_tables(cmp: pl.DataFrame, sig: pl.DataFrame, tasks: list[tuple[str, str]]) -> dict[str, pl.DataFrame]:
    verdict_cols = []
    df = cmp.filter(pl.col("status") == "done")
    if sig.height:
        v = sig.select("trial_id", "task", pl.col("verdict").replace({"within noise": "noise"}))
        v = v.pivot(on="task", index="trial_id", values="verdict", aggregate_function="first")
        v = v.rename({c: f"_verdict_{c}" for c in v.columns if c != "trial_id"})
        df = df.join(v, on="trial_id", how="left")
        verdict_cols = v.columns
    bs = pl.col("batch_size").cast(pl.String).fill_null("?")
    cols: list[pl.Expr] = [
        pl.col("model").alias("Model"), pl.col("precision").alias("Precision"),
        pl.col("compute_dtype").alias("Compute"),
        (_sig(pl.col("load_s")) + pl.when(pl.col("load_cold")).then(pl.lit(" cold"))
         .when(~pl.col("load_cold")).then(pl.lit(" warm")).otherwise(pl.lit(""))).fill_null("-").alias("Load (s)"),
        _vs(_fixed(pl.col("speedup_load"), 2) + pl.lit("x")).alias("Load vs base"),
        _sig(pl.col("weights_gb")).fill_null("-").alias("Weights (GB)"),
        _vs(_signed_pct(-100 * pl.col("memory_reduction"))).alias("Weights vs base"),
        _sig(pl.col("peak_gb")).fill_null("-").alias("Peak (GB)"),
        _vs(_signed_pct(-100 * pl.col("memory_reduction_peak"))).alias("Peak vs base"),
        _sig(pl.col("prefill_ms")).fill_null("-").alias("Prefill (ms)"),
        _vs(_fixed(pl.col("speedup_prefill"), 2) + pl.lit("x")).alias("Prefill vs base"),
        _sig(pl.col("decode_tok_s")).fill_null("-").alias("Decode (tok/s)"),
        _vs(_fixed(pl.col("speedup_decode"), 2) + pl.lit("x")).alias("Decode vs base"),
        _sig(pl.col("decode_graph_tok_s")).fill_null("-").alias("Decode kernel (tok/s)"),
        _vs(_fixed(pl.col("speedup_decode_graph"), 2) + pl.lit("x")).alias("Decode kernel vs base"),
        _sig(pl.col("decode_tok_s_no_kv")).fill_null("-").alias("Decode no KV (tok/s)"),
        _vs(_fixed(pl.col("speedup_decode_no_kv"), 2) + pl.lit("x")).alias("No KV vs base"),
        (_fixed(pl.col("kv_cache_speedup"), 2) + pl.lit("x")).fill_null("-").alias("KV cache speedup"),
        (_sig(pl.col("batch_tok_s")) + pl.lit(" @") + bs).fill_null("-").alias("Batch (tok/s)"),
        _vs(_fixed(pl.col("speedup_throughput"), 2) + pl.lit("x")).alias("Batch vs base"),
        _sig(pl.col("perplexity")).fill_null("-").alias("PPL"),
        _vs(_signed_pct(pl.col("ppl_delta_pct"), 2)).alias("PPL vs base"),
        _sig(pl.col("kl_mean")).fill_null("-").alias("KL mean"),
    ]
    for task, metric in tasks:
        col = task if task in cmp.columns else f"task_{task}"
        # the change of the metric itself (trial / baseline - 1), as significance's diff_pct: +5% perplexity is worse
        ret = pl.col(f"retention_{task}")
        change = _signed_pct(100 * ((1 / ret if metric in analysis.LOWER_IS_BETTER else ret) - 1))
        vc = f"_verdict_{task}"
        if vc in verdict_cols:
            change = change + pl.when(pl.col(vc).is_not_null()).then(pl.lit(" (") + pl.col(vc) + pl.lit(")")) \
                .otherwise(pl.lit(""))
        cols += [_sig(pl.col(col)).fill_null("-")
                 .alias(f"{task} {metric}"), _vs(change).alias(f"{task} vs base")]
    if tasks:
        cols += [_vs(_fixed(100 * pl.col("retention_mean"), 1) + pl.lit("%")).alias("Mean retention")]
    if "ppl_delta_per_gb_saved" in df.columns:
        cols += [_vs(_fixed(pl.col("ppl_delta_per_gb_saved"), 2)).alias("PPL %/GB saved")]
    out = df.sort(["model", "is_baseline", "precision", "compute_dtype"], descending=[False, True, False, False],
                  nulls_last=True).select(cols)
    # drop metric columns that are empty for every trial (e.g. no KL stage ran)
    keep = [c for c in out.columns if c in ("Model", "Precision", "Compute")
            or out.get_column(c).is_in(["-", "baseline"]).not_().any()]
    return {str(k[0]): g.drop("Model") for k, g in out.select(keep).partition_by("Model", as_dict=True,
                                                                                   maintain_order=True).items()}


def _environment(trials: pl.DataFrame) -> pl.DataFrame:
    cols = [c for c in trials.columns if c in ENV_COLUMNS or c.endswith("_version")]
    rows = []
    for c in cols:
        vc = trials.get_column(c).cast(pl.String).fill_null("(none)").value_counts(sort=True)
        vals = "; ".join(f"{v} ({n} trials)" for v, n in vc.iter_rows())
        rows.append({"Setting": c, "Values": vals})
    return pl.DataFrame(rows, schema={"Setting": pl.String, "Values": pl.String})


def _study_name(d: Path | str) -> str:
    if not isinstance(d, Path):  # an object store location: its study.json through the store
        from .store import ResultsStore

        try:
            return str((ResultsStore(d).read_study() or {}).get("name") or d.rsplit("/", 1)[-1])
        except UserError:
            return d.rsplit("/", 1)[-1]
    name = d.name
    p = d / "study.json"
    if p.is_file():
        try:
            name = json.loads(p.read_text()).get("name", name)
        except (json.JSONDecodeError, AttributeError):
            log.warning("unreadable %s; using the directory name", p)
    return str(name)


@dataclass
class _OneFolder(Folder):
    """One folder of a report over several: its models are named ``model (study @ folder)``, so that every per-model
    table, chart and recommendation compares the trials of one folder (one study's benchmark settings, its own
    baseline), even where two folders hold the same model or the same trial ids."""

    label: str = ""

    @property
    def trials(self) -> pl.LazyFrame:
        return super().trials.with_columns(pl.format("{} ({})", pl.col("model"), pl.lit(self.label)).alias("model"))


def _several_folders(res: Results, title: str | None, significance_kwargs: dict | None) -> ReportData:
    """The report of each folder on its own, its tables stacked (never joined across folders)."""
    parts = []
    for f in res.folders():
        d = f.dirs[0]
        one = _OneFolder(f.dirs, borrowed=f.borrowed, label=f"{_study_name(d)} @ {d}")
        parts.append((str(d), build_report(one, significance_kwargs=significance_kwargs)))

    def stack(frames: list[pl.DataFrame]) -> pl.DataFrame:
        frames = [f for f in frames if f.width]
        return pl.concat(frames, how="diagonal_relaxed") if frames else pl.DataFrame()

    studies = [p.studies[0] for _, p in parts]
    return ReportData(
        title=title or ("sweeper report: " + ", ".join(dict.fromkeys(studies))), dirs=[d for d, _ in parts],
        studies=studies, generated=parts[0][1].generated,
        counts={k: sum(p.counts[k] for _, p in parts) for k in parts[0][1].counts},
        compare=stack([p.compare for _, p in parts]), pareto=stack([p.pareto for _, p in parts]),
        recommendations=stack([p.recommendations for _, p in parts]),
        summary={m: df for _, p in parts for m, df in p.summary.items()},
        significance=stack([p.significance for _, p in parts]), kl=stack([p.kl for _, p in parts]),
        failed=stack([p.failed for _, p in parts]),
        environment=stack([p.environment.select(pl.lit(d).alias("Results dir"), pl.all()) for d, p in parts]),
        notes=[f"{d}: {n}" for d, p in parts for n in p.notes],
        summary_notes={m: n for _, p in parts for m, n in p.summary_notes.items()})


def build_report(dirs: str | Sequence[str] | Results, title: str | None = None,
                 significance_kwargs: dict | None = None) -> ReportData:
    """Compute every table of the report (no rendering)."""
    res = dirs if isinstance(dirs, Results) else open_results(dirs)
    if len(res.dirs) > 1:
        return _several_folders(res, title, significance_kwargs)
    cmp = analysis.compare(res).collect()
    sig = analysis.significance(res, **(significance_kwargs or {}))
    par = analysis.pareto(cmp)
    rec = analysis.recommend(cmp)
    tm = analysis.task_main_metrics(res.metrics, res.trials)
    tasks = sorted({(t, m) for t, m in tm.select("task", "metric").unique().iter_rows()}) if tm.height else []

    trials = res.trials.collect()
    studies = [_study_name(d) for d in res.dirs]

    kl = (res.metrics.filter((pl.col("stage") == "prompts") & (pl.col("metric") == "kl_mean"))
          .select("trial_id", pl.col("task").alias("category"), pl.col("value").alias("kl")).collect())
    kl = kl.join(cmp.select("trial_id", "model", "precision", "compute_dtype", "is_baseline"), on="trial_id") \
        .filter(~pl.col("is_baseline")).select("model", _label().alias("label"), "category", "kl")

    fcols = [c for c in ("model", "precision", "compute_dtype", "error_stage", "error_type", "error", "trial_id",
                         "study") if c in trials.columns]
    failed = (trials.filter(pl.col("status") != "done").select(fcols) if "status" in trials.columns
              else pl.DataFrame())
    failed = failed.select([pl.col(c).cast(pl.String).fill_null("-") for c in failed.columns])

    sig_show = sig.select(
        "model", "task", "precision", "compute_dtype", "metric", pl.col("n").cast(pl.String).fill_null("-"),
        _score(pl.col("baseline_score")).fill_null("-").alias("baseline"),
        _score(pl.col("trial_score")).fill_null("-").alias("trial"),
        _in_units(pl.col("diff")).fill_null("-").alias("diff"),
        (pl.lit("[") + _in_units(pl.col("ci_low")) + pl.lit(", ") + _in_units(pl.col("ci_high")) + pl.lit("]"))
        .fill_null("-").alias("95% CI"),
        (_signed_pct(pl.col("diff_pct"), 1) + pl.lit(" [") + _signed_pct(pl.col("ci_low_pct"), 1) + pl.lit(", ")
         + _signed_pct(pl.col("ci_high_pct"), 1) + pl.lit("]")).fill_null("-").alias("change (95% CI)"),
        pl.format("{} / {}", pl.col("improved").cast(pl.String).fill_null("-"),
                  pl.col("regressed").cast(pl.String).fill_null("-")).alias("items gained / lost"),
        pl.col("verdict").fill_null("not compared"), pl.col("note").fill_null(""))

    rec_show = rec.select(
        "model", pl.col("description").alias("scenario"),
        pl.when(pl.col("trial_id").is_null()).then(pl.lit("-")).otherwise(_label()).alias("choice"),
        pl.when(pl.col("quality_retention").is_null()).then(pl.lit("-"))
        .otherwise(_fixed(100 * pl.col("quality_retention"), 2) + pl.lit("%")).alias("quality retention"),
        pl.col("speed_kind").fill_null("-").alias("speed kind"), "reason", pl.col("trial_id").fill_null("-"))

    notes = []
    if trials.height and {"device", "gpu_share"} <= set(trials.columns):
        shared = trials.filter((pl.col("device") == "cuda") & (pl.col("gpu_share").cast(pl.Float64, strict=False) < 1))
        if shared.height:
            notes.append(f"{shared.height} trial(s) ran with a fractional GPU share (< 1 GPU): their timings are only "
                         "comparable if the timed section had the GPU alone.")
    if "device" in trials.columns and trials.get_column("device").n_unique() > 1:
        notes.append("Trials ran on different devices (" + ", ".join(
            sorted(str(x) for x in trials.get_column("device").unique().to_list())) + "): compare speed within one device.")
    missing = cmp.filter(pl.col("baseline_status").is_in(["missing", "failed", "none"]))
    if missing.height:
        notes.append(f"{missing.height} trial(s) have no usable baseline in these directories (baseline_status "
                     "missing / failed / none): their vs-baseline columns are empty.")
    why = {"missing": "is not in these directories", "failed": "failed", "none": ""}
    summary_notes: dict[str, list[str]] = {}
    for r in missing.filter(pl.col("status") == "done").iter_rows(named=True):
        summary_notes.setdefault(str(r["model"]), []).append(
            f"{r['precision']}/{r['compute_dtype']}: no baseline ({r['baseline_status']})"
            + (f": baseline trial {r['baseline_id']} {why[r['baseline_status']]}" if r["baseline_id"] else
               ": the trial names no baseline"))
    # a baseline borrowed from another folder of the report is shown beside this folder's trials, counted in its own
    own = trials.filter(~pl.col("trial_id").is_in(list(res.borrowed))) if isinstance(res, Folder) else trials
    counts = {"trials": own.height,
              "done": int((own.get_column("status") == "done").sum()) if "status" in own.columns else 0,
              "failed": failed.height, "models": cmp.get_column("model").n_unique() if cmp.height else 0}
    return ReportData(
        title=title or ("sweeper report: " + ", ".join(studies)), dirs=[str(d) for d in res.dirs], studies=studies,
        generated=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), counts=counts, compare=cmp,
        pareto=par, recommendations=rec_show, summary=_summary_tables(cmp, sig, tasks), significance=sig_show, kl=kl,
        failed=failed, environment=_environment(trials), notes=notes, summary_notes=summary_notes)


# ----------------------------------------------------------------------------------------------------------- SVG
def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Round tick values covering [lo, hi] (the first tick <= lo, the last >= hi)."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    if hi <= lo:
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=raw)
    first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    return [round(k * step, 12) for k in range(first, last + 1)]


def _tick_label(v: float) -> str:
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 10:
        return f"{v:.0f}" if v == int(v) else f"{v:.1f}"
    return f"{v:.3g}"


def svg_scatter(points: list[dict], x_label: str, y_label: str, title: str, chart_id: str,
                width: int = 520, height: int = 340) -> str:
    """Scatter plot; points: dicts with x, y, label, front (bool), color. Front points are joined by a line."""
    pts = [p for p in points if p["x"] is not None and p["y"] is not None
           and math.isfinite(p["x"]) and math.isfinite(p["y"])][:MAX_POINTS]
    ml, mr, mt, mb = 64, 16, 30, 46
    pw, ph = width - ml - mr, height - mt - mb
    e = html.escape
    parts = [f'<svg class="chart" data-chart="{e(chart_id)}" role="img" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}"><title>{e(title)}</title>',
             f'<text x="{width / 2:.0f}" y="18" text-anchor="middle" class="ct">{e(title)}</text>']
    if not pts:
        parts.append(f'<text x="{width / 2:.0f}" y="{height / 2:.0f}" text-anchor="middle">no data</text></svg>')
        return "".join(parts)
    xs, ys = [p["x"] for p in pts], [p["y"] for p in pts]
    # 4% padding so points on the extremes are not drawn on the axes
    px, py = (max(xs) - min(xs)) * 0.04, (max(ys) - min(ys)) * 0.04
    xt, yt = _ticks(min(xs) - px, max(xs) + px), _ticks(min(ys) - py, max(ys) + py)
    x0, x1, y0, y1 = xt[0], xt[-1], yt[0], yt[-1]

    def sx(v: float) -> float:
        return ml + (v - x0) / ((x1 - x0) or 1) * pw

    def sy(v: float) -> float:
        return mt + ph - (v - y0) / ((y1 - y0) or 1) * ph

    parts.append(f'<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" class="plot"/>')
    for v in xt:
        parts.append(f'<line x1="{sx(v):.1f}" x2="{sx(v):.1f}" y1="{mt}" y2="{mt + ph}" class="grid"/>'
                     f'<text x="{sx(v):.1f}" y="{mt + ph + 16}" text-anchor="middle" class="tk">{_tick_label(v)}</text>')
    for v in yt:
        parts.append(f'<line x1="{ml}" x2="{ml + pw}" y1="{sy(v):.1f}" y2="{sy(v):.1f}" class="grid"/>'
                     f'<text x="{ml - 6}" y="{sy(v) + 4:.1f}" text-anchor="end" class="tk">{_tick_label(v)}</text>')
    parts.append(f'<text x="{ml + pw / 2:.0f}" y="{height - 8}" text-anchor="middle" class="al">{e(x_label)}</text>'
                 f'<text transform="translate(14 {mt + ph / 2:.0f}) rotate(-90)" text-anchor="middle" class="al">'
                 f'{e(y_label)}</text>')
    front = sorted((p for p in pts if p.get("front")), key=lambda p: p["x"])
    if len(front) > 1:
        path = " ".join(f"{sx(p['x']):.1f},{sy(p['y']):.1f}" for p in front)
        parts.append(f'<polyline points="{path}" class="front"/>')
    for p in pts:
        r = 6 if p.get("front") else 4
        cls = "pt front-pt" if p.get("front") else "pt"
        parts.append(f'<circle cx="{sx(p["x"]):.1f}" cy="{sy(p["y"]):.1f}" r="{r}" fill="{p.get("color", PALETTE[0])}" '
                     f'class="{cls}"><title>{e(p["label"])}: x={p["x"]:.4g}, y={p["y"]:.4g}'
                     f'{" (Pareto front)" if p.get("front") else ""}</title></circle>')
        if p.get("front") and len(pts) <= 40:
            parts.append(f'<text x="{sx(p["x"]) + 8:.1f}" y="{sy(p["y"]) - 6:.1f}" class="pl">{e(p["label"])}</text>')
    parts.append("</svg>")
    return "".join(parts)


def svg_bars(labels: list[str], series: dict[str, list[float | None]], title: str, x_label: str, chart_id: str,
             ref: float | None = None, width: int = 640) -> str:
    """Horizontal grouped bar chart: one group per label, one bar per series; optional reference line (e.g. 1.0x)."""
    labels = labels[:MAX_BARS]
    names = list(series)
    bar_h, gap = 12, 8
    group_h = bar_h * len(names) + gap
    ml, mr, mt, mb = 150, 60, 30 + 16 * ((len(names) + 2) // 3), 40
    height = mt + mb + group_h * max(len(labels), 1)
    pw = width - ml - mr
    vals = [v for s in series.values() for v in s[:len(labels)] if v is not None and math.isfinite(v)]
    e = html.escape
    parts = [f'<svg class="chart" data-chart="{e(chart_id)}" role="img" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}"><title>{e(title)}</title>',
             f'<text x="{width / 2:.0f}" y="18" text-anchor="middle" class="ct">{e(title)}</text>']
    for i, n in enumerate(names):
        lx, ly = ml + (i % 3) * 160, 34 + 16 * (i // 3)
        parts.append(f'<rect x="{lx}" y="{ly - 9}" width="10" height="10" fill="{PALETTE[i % len(PALETTE)]}"/>'
                     f'<text x="{lx + 14}" y="{ly}" class="tk">{e(n)}</text>')
    if not vals:
        parts.append(f'<text x="{width / 2:.0f}" y="{mt + 20}" text-anchor="middle">no data</text></svg>')
        return "".join(parts)
    xt = _ticks(0.0, max(vals + ([ref] if ref else [])))
    x1 = xt[-1] or 1.0

    def sx(v: float) -> float:
        return ml + max(v, 0) / x1 * pw

    for v in xt:
        parts.append(f'<line x1="{sx(v):.1f}" x2="{sx(v):.1f}" y1="{mt}" y2="{height - mb}" class="grid"/>'
                     f'<text x="{sx(v):.1f}" y="{height - mb + 16}" text-anchor="middle" class="tk">{_tick_label(v)}</text>')
    for gi, lab in enumerate(labels):
        gy = mt + gi * group_h
        parts.append(f'<text x="{ml - 6}" y="{gy + group_h / 2:.1f}" text-anchor="end" class="tk">{e(lab)}</text>')
        for si, n in enumerate(names):
            v = series[n][gi] if gi < len(series[n]) else None
            if v is None or not math.isfinite(v):
                continue
            y = gy + si * bar_h
            parts.append(f'<rect x="{ml}" y="{y}" width="{max(sx(v) - ml, 0.5):.1f}" height="{bar_h - 2}" '
                         f'fill="{PALETTE[si % len(PALETTE)]}" class="bar"><title>{e(lab)} {e(n)}: {v:.4g}</title></rect>'
                         f'<text x="{sx(v) + 3:.1f}" y="{y + bar_h - 3}" class="bl">{v:.3g}</text>')
    if ref is not None:
        parts.append(f'<line x1="{sx(ref):.1f}" x2="{sx(ref):.1f}" y1="{mt - 4}" y2="{height - mb}" class="ref"/>')
    parts.append(f'<text x="{ml + pw / 2:.0f}" y="{height - 6}" text-anchor="middle" class="al">{e(x_label)}</text></svg>')
    return "".join(parts)


def _heat_color(v: float, vmax: float) -> str:
    t = 0.0 if vmax <= 0 else min(max(v / vmax, 0.0), 1.0)
    # white -> orange -> dark red
    r = int(255 - 80 * t)
    g = int(255 - 215 * t)
    b = int(255 - 225 * t)
    return f"rgb({r},{g},{b})"


def svg_heatmap(rows: list[str], cols: list[str], values: dict[tuple[str, str], float], title: str,
                chart_id: str) -> str:
    rows = rows[:MAX_BARS]
    cw, rh, ml, mt = 70, 22, 150, 110
    width = max(ml + cw * len(cols) + 20, 20 + 7 * len(title))
    height = mt + rh * len(rows) + 20
    vmax = max((v for v in values.values() if v is not None and math.isfinite(v)), default=0.0)
    e = html.escape
    parts = [f'<svg class="chart" data-chart="{e(chart_id)}" role="img" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}"><title>{e(title)}</title>',
             f'<text x="10" y="18" class="ct">{e(title)}</text>']
    for j, c in enumerate(cols):
        x = ml + j * cw + cw / 2
        parts.append(f'<text transform="translate({x:.0f} {mt - 6}) rotate(-45)" class="tk">{e(c)}</text>')
    for i, r in enumerate(rows):
        y = mt + i * rh
        parts.append(f'<text x="{ml - 6}" y="{y + rh / 2 + 4:.0f}" text-anchor="end" class="tk">{e(r)}</text>')
        for j, c in enumerate(cols):
            v = values.get((r, c))
            fill = "#eee" if v is None or not math.isfinite(v) else _heat_color(v, vmax)
            txt = "-" if v is None or not math.isfinite(v) else f"{v:.3g}"
            parts.append(f'<rect x="{ml + j * cw}" y="{y}" width="{cw - 1}" height="{rh - 1}" fill="{fill}" class="cell">'
                         f'<title>{e(r)} / {e(c)}: {txt}</title></rect>'
                         f'<text x="{ml + j * cw + cw / 2:.0f}" y="{y + rh / 2 + 4:.0f}" text-anchor="middle" '
                         f'class="cv">{txt}</text>')
    parts.append("</svg>")
    return "".join(parts)


# ----------------------------------------------------------------------------------------------------------- renderers
CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#222;max-width:1600px}
h1{font-size:1.6em}h2{border-bottom:2px solid #ddd;padding-bottom:4px;margin-top:2em}h3{margin-bottom:.3em}
table{border-collapse:collapse;font-size:13px;margin:8px 0 16px}th,td{border:1px solid #ccc;padding:3px 7px;text-align:left}
th{background:#f3f3f3;position:sticky;top:0}td.n{text-align:right;font-variant-numeric:tabular-nums}
tr:nth-child(even) td{background:#fafafa}.note{background:#fff8e1;border-left:4px solid #f0b400;padding:6px 10px;margin:6px 0}
.wrap{overflow-x:auto}.charts{display:flex;flex-wrap:wrap;gap:16px}
svg.chart{background:#fff;border:1px solid #e5e5e5}svg .plot{fill:#fcfcfc;stroke:#bbb}svg .grid{stroke:#eee}
svg .tk{font-size:11px;fill:#444}svg .al{font-size:12px;fill:#222}svg .ct{font-size:13px;font-weight:600}
svg .front{fill:none;stroke:#d62728;stroke-width:1.5;stroke-dasharray:4 2}svg .pt{stroke:#fff;stroke-width:1;opacity:.85}
svg .front-pt{stroke:#d62728;stroke-width:2}svg .pl{font-size:10px;fill:#333}svg .bl{font-size:10px;fill:#333}
svg .ref{stroke:#222;stroke-width:1.2;stroke-dasharray:3 3}svg .cv{font-size:10px}
td.v-worse{color:#b00020;font-weight:600}td.v-better{color:#0a7d28;font-weight:600}
"""


_NUMERIC = re.compile(r"^[-+]?(\d|\.\d)|^\[")


def _html_table(df: pl.DataFrame, cls: str = "") -> str:
    e = html.escape
    if df.height == 0:
        return '<p class="empty">(none)</p>'
    head = "".join(f"<th>{e(c)}</th>" for c in df.columns)
    body = []
    for row in df.iter_rows():
        cells = []
        for c, v in zip(df.columns, row):
            s = "" if v is None else str(v)
            k = ["n"] if _NUMERIC.match(s) else []
            if c == "verdict" or c.endswith(" vs base"):
                if "worse" in s:
                    k.append("v-worse")
                elif "better" in s:
                    k.append("v-better")
            cls_attr = f' class="{" ".join(k)}"' if k else ""
            cells.append(f"<td{cls_attr}>{e(s)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f'<div class="wrap"><table class="{cls}"><thead><tr>{head}</tr></thead><tbody>' + "".join(body) + \
        "</tbody></table></div>"


def _md_table(df: pl.DataFrame) -> str:
    if df.height == 0:
        return "(none)\n"

    def cell(v: object) -> str:
        return ("" if v is None else str(v)).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(c) for c in df.columns) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(df.width)) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.iter_rows()]
    return "\n".join(lines) + "\n"


def _models(data: ReportData) -> list[str]:
    return sorted(m for m in data.compare.get_column("model").unique().to_list() if m is not None) \
        if data.compare.height else []


def _pareto_charts(data: ReportData, model: str, color: dict[str, str]) -> str:
    p = data.pareto.filter(pl.col("model") == model)
    out = []
    for x, front, xl, cid in (("weights_gb", "pareto_memory", "weights (GB), lower is better", "memory"),
                              ("throughput_tok_s", "pareto_throughput", "throughput (tok/s), higher is better",
                               "throughput")):
        pts = [{"x": r[x], "y": None if r["quality_retention"] is None else 100 * r["quality_retention"],
                "label": f"{r['precision']}/{r['compute_dtype']}", "front": bool(r[front]),
                "color": color.get(r["precision"], PALETTE[0])} for r in p.iter_rows(named=True)]
        out.append(svg_scatter(pts, xl, "quality retention (%)", f"{model}: retention vs {cid}",
                               f"pareto-{cid}-{model}"))
    return "".join(out)


# the speed chart's series: both decode kinds side by side, each against the baseline's same kind
SPEED_SERIES = (("decode eager", "speedup_decode"), ("decode kernel-level", "speedup_decode_graph"),
                ("batch tok/s", "speedup_throughput"), ("prefill", "speedup_prefill"), ("load", "speedup_load"))
SPEED_NOTE = ("Decode speed in two kinds: eager (HF generate, what its users get) is host-bound at batch 1 (Python and "
              "kernel launches set its pace, not the weights' format), while kernel-level (the same decode step "
              "replayed as a CUDA graph, GPU time) shows what the quantized kernels do.")


def _no_kernel_notes(rows: pl.DataFrame) -> list[str]:
    """One line per done trial without a kernel-level decode number, with the reason its row records."""
    if "decode_graph_tok_s" not in rows.columns:
        return []
    miss = rows.filter(pl.col("decode_graph_tok_s").is_null())
    return [f"{r['label']}: no kernel-level decode ({r.get('graph_decode_error') or 'no decode_graph_tok_s row'})"
            for r in miss.iter_rows(named=True)]


def _model_rows(data: ReportData, model: str) -> pl.DataFrame:
    return (data.compare.filter((pl.col("model") == model) & (pl.col("status") == "done"))
            .sort(["is_baseline", "precision", "compute_dtype"], descending=[True, False, False])
            .with_columns(_label().alias("label")).head(MAX_BARS))


def render_html(data: ReportData) -> str:
    e = html.escape
    models = _models(data)
    chart_models = models[:MAX_CHART_MODELS]
    precs = sorted({p for p in data.compare.get_column("precision").to_list() if p} if data.compare.height else set())
    color = {p: PALETTE[i % len(PALETTE)] for i, p in enumerate(precs)}
    cut = (f'<p class="note">Charts show the first {MAX_CHART_MODELS} of {len(models)} models; the tables have all.</p>'
           if len(models) > MAX_CHART_MODELS else "")
    sec: dict[str, str] = {}
    sec["recommendations"] = ("<p>Computed from point estimates over each model's done trials; quality retention is the "
                              "mean retention of the accuracy-type tasks, else of the perplexity-type tasks (baseline/"
                              "trial perplexity), else baseline/trial token perplexity. Check the significance section "
                              "before trusting a small difference.</p>"
                              + _html_table(data.recommendations))
    sec["summary"] = ("<p>Speed columns are baseline-relative speedups (x, &gt;1 is faster); memory columns are the change "
                      "in %; task columns the change of the task's main metric (with the paired-bootstrap verdict).</p>"
                      + "".join(f"<h3>{e(m)}</h3>" + "".join(f'<p class="note">{e(n)}</p>'
                                                              for n in data.summary_notes.get(m, []))
                                + _html_table(df, "summary") for m, df in data.summary.items()))
    sec["significance"] = ("<p>Paired percentile bootstrap over the items both the trial and its baseline ran (2000 "
                           "resamples, fixed seed), each resample recomputing the task's metric as lm-eval aggregates "
                           "it (accuracy: mean; perplexity: from the documents' log-likelihoods and word counts); "
                           "<b>better</b>/<b>worse</b> only when the whole 95% interval of the difference lies on "
                           "that side of zero (for perplexity, lower is better). diff is in points for accuracy-type "
                           "metrics, in the metric's units otherwise; change is trial / baseline - 1.</p>"
                           + _html_table(data.significance))
    sec["pareto"] = cut + "".join(f"<h3>{e(m)}</h3><div class=\"charts\">{_pareto_charts(data, m, color)}</div>"
                                  for m in chart_models)
    speed, memory = [], []
    for m in chart_models:
        r = _model_rows(data, m)
        labels = r.get_column("label").to_list()
        speed.append(svg_bars(labels, {k: r.get_column(c).to_list() for k, c in SPEED_SERIES},
                              f"{m}: speedup vs baseline", "speedup (x, 1 = baseline)", f"speed-{m}", ref=1.0))
        speed += [f'<p class="note">{e(n)}</p>' for n in _no_kernel_notes(r)]
        memory.append(svg_bars(labels, {"weights GB": r.get_column("weights_gb").to_list(),
                                        "peak GB": r.get_column("peak_gb").to_list()},
                               f"{m}: memory", "GB", f"memory-{m}"))
    sec["speed"] = (cut + f"<p>{e(SPEED_NOTE)}</p>" + '<div class="charts">' + "".join(speed) + "</div>")
    sec["memory"] = cut + '<div class="charts">' + "".join(memory) + "</div>"
    heat = []
    for m in chart_models:
        k = data.kl.filter(pl.col("model") == m)
        if k.height == 0:
            continue
        rows = list(dict.fromkeys(k.sort("label").get_column("label").to_list()))
        cols = list(dict.fromkeys(k.get_column("category").to_list()))
        vals = {(a, b): v for a, b, v in k.select("label", "category", "kl").iter_rows()}
        heat.append(svg_heatmap(rows, cols, vals, f"{m}: mean token KL to the baseline per prompt category",
                                f"kl-{m}"))
    sec["kl"] = cut + ("".join(heat) if heat else "<p>No prompt-suite KL rows (stage <code>prompts</code>).</p>")
    sec["failed"] = _html_table(data.failed)
    sec["environment"] = (f"<p>Directories: {e(', '.join(data.dirs))}</p>"
                          + "".join(f'<p class="note">{e(n)}</p>' for n in data.notes)
                          + _html_table(data.environment))
    c = data.counts
    head = (f"<h1>{e(data.title)}</h1><p>Generated {e(data.generated)} by sweeper from {len(data.dirs)} results "
            f"director{'y' if len(data.dirs) == 1 else 'ies'}: {c['trials']} trials ({c['done']} done, {c['failed']} "
            f"failed), {c['models']} model(s).</p>")
    toc = "<ul>" + "".join(f'<li><a href="#{k}">{e(t)}</a></li>' for k, t in SECTIONS) + "</ul>"
    body = "".join(f'<section id="{k}"><h2>{e(t)}</h2>{sec[k]}</section>' for k, t in SECTIONS)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{e(data.title)}</title>'
            f"<style>{CSS}</style></head><body>{head}{toc}{body}</body></html>\n")


def render_markdown(data: ReportData) -> str:
    c = data.counts
    out = [f"# {data.title}\n",
           f"Generated {data.generated} from {', '.join(data.dirs)}: {c['trials']} trials ({c['done']} done, "
           f"{c['failed']} failed), {c['models']} model(s).\n"]
    for k, t in SECTIONS:
        out.append(f"\n## {t}\n")
        if k == "recommendations":
            out.append(_md_table(data.recommendations))
        elif k == "summary":
            for m, df in data.summary.items():
                out.append(f"\n### {m}\n\n" + "".join(f"> {n}\n" for n in data.summary_notes.get(m, []))
                           + ("\n" if data.summary_notes.get(m) else "") + _md_table(df))
        elif k == "significance":
            out.append("Paired percentile bootstrap (2000 resamples, fixed seed) of the task's metric as lm-eval "
                       "aggregates it, 95% interval of the difference (points for accuracy-type metrics, else the "
                       "metric's units; change = trial / baseline - 1; lower perplexity is better).\n\n"
                       + _md_table(data.significance))
        elif k == "pareto":
            p = data.pareto.filter(pl.col("pareto_memory").fill_null(False) | pl.col("pareto_throughput").fill_null(False))
            out.append(_md_table(p.select(
                "model", "precision", "compute_dtype",
                (_fixed(100 * pl.col("quality_retention"), 2) + pl.lit("%")).fill_null("-").alias("quality retention"),
                _sig(pl.col("weights_gb")).fill_null("-").alias("weights GB"),
                _sig(pl.col("throughput_tok_s")).fill_null("-").alias("throughput tok/s"),
                pl.when(pl.col("pareto_memory")).then(pl.lit("yes")).otherwise(pl.lit("")).alias("front: memory"),
                pl.when(pl.col("pareto_throughput")).then(pl.lit("yes")).otherwise(pl.lit("")).alias("front: throughput"))))
        elif k == "speed":
            notes = [n for m in _models(data) for n in _no_kernel_notes(_model_rows(data, m))]
            out.append(SPEED_NOTE + " Speedups of both kinds are in the summary tables (\"vs base\" columns); the "
                       "HTML report charts them.\n" + "".join(f"\n> {n}\n" for n in notes))
        elif k == "memory":
            out.append("Weights (the true bytes of the loaded weights) and peak memory are in the summary tables; the "
                       "HTML report charts them.\n")
        elif k == "kl":
            if data.kl.height:
                w = data.kl.sort(["model", "label"]).with_columns(_sig(pl.col("kl")).alias("kl")).pivot(on="category", index=["model", "label"],
                                                                       values="kl", aggregate_function="first")
                out.append(_md_table(w.rename({"label": "precision/compute"})))
            else:
                out.append("No prompt-suite KL rows.\n")
        elif k == "failed":
            out.append(_md_table(data.failed))
        elif k == "environment":
            out.append("".join(f"> {n}\n>\n" for n in data.notes) + "\n" + _md_table(data.environment))
    return "".join(out)


def write_report(dirs: str | Sequence[str] | Results, output: str | Path, fmt: str = "html",
                 title: str | None = None) -> Path:
    """``sweep report DIR... -o FILE [--format html|markdown] [--title T]``: build and write the report atomically;
    returns the path written. Raises UserError on a bad format, directory or output path."""
    from .store import atomic_write_bytes

    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    data = build_report(dirs, title=title)
    text = render_html(data) if fmt == "html" else render_markdown(data)
    out = Path(output)
    try:
        atomic_write_bytes(out, text.encode("utf-8"))
    except OSError as e:
        raise UserError(f"cannot write report {out}: {e.strerror or e}") from None
    log.info("wrote %s report %s (%d bytes)", fmt, out, len(text))
    return out


__all__ = ["write_report", "build_report", "render_html", "render_markdown", "ReportData", "SECTIONS", "FORMATS",
           "svg_scatter", "svg_bars", "svg_heatmap"]
