"""`sweep results` query engine: views, --where/--sql, shaping, and every output format round-tripping."""
from __future__ import annotations

import io
import json
from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from helpers import sweep
from sweeper.errors import UserError
from sweeper.query import query_frame, run_query
from sweeper.store import ResultsStore
from test_analysis import _metric_rows, _trial_row, build_results


@pytest.fixture(scope="module")
def rdir(tmp_path_factory) -> str:
    return str(build_results(tmp_path_factory.mktemp("q") / "hand"))


def test_default_view_is_one_row_per_trial(rdir):
    df = query_frame([rdir], columns="all")
    assert sorted(df.get_column("trial_id").to_list()) == ["B", "F", "M", "T1", "T2", "T3"]
    assert {"trial_id", "study", "model", "precision", "compute_dtype", "status", "decode_tok_s", "arc_easy",
            "error", "prefill_ms", "sequence_ms"} <= set(df.columns)
    assert "speedup_decode" not in df.columns
    text = run_query([rdir])
    assert isinstance(text, str) and "int8" in text and "nf4" in text


def test_default_columns_are_the_ones_that_matter(rdir, tmp_path):
    df = query_frame([rdir])
    # no trial_id / study (one study) / device / error columns, and none empty in every row
    # speed in both kinds, eager and kernel-level, with why a trial has no kernel-level number (issue 23)
    assert df.columns == ["model", "precision", "compute_dtype", "status", "load_s", "weights_gb", "peak_gb",
                          "decode_tok_s", "decode_graph_tok_s", "graph_decode_error", "batch_tok_s", "perplexity",
                          "kl_mean", "arc_easy", "hellaswag", "wikitext"]
    assert df.height == 6
    # the default is for reading: an export keeps every column
    assert run_query([rdir], fmt="csv").splitlines()[0].split(",") == query_frame([rdir], columns="all").columns
    # a column empty in every row is dropped: results without KL or tasks show neither
    store = ResultsStore(tmp_path / "nokl")
    store.write_trial(_trial_row("B"), [m for m in _metric_rows("B") if m["stage"] not in ("kl", "tasks")])
    assert query_frame([str(tmp_path / "nokl")]).columns == [
        "model", "precision", "compute_dtype", "status", "load_s", "weights_gb", "peak_gb", "decode_tok_s",
        "decode_graph_tok_s", "batch_tok_s", "perplexity"]  # B has its kernel-level number: no why to show
    # two studies: the study column comes back
    other = ResultsStore(tmp_path / "other")
    other.write_trial({**_trial_row("T2"), "study": "other"}, _metric_rows("T2"))
    assert query_frame([rdir, str(tmp_path / "other")]).columns[:2] == ["results_dir", "study"]


def test_vs_baseline_is_the_seed_comparison_with_a_verdict(rdir):
    df = query_frame([rdir], vs_baseline=True)
    assert df.columns == ["model", "precision", "compute_dtype", "status", "decode_tok_s", "speedup_decode",
                          "decode_graph_tok_s", "speedup_decode_graph", "graph_decode_error", "weights_gb",
                          "memory_reduction", "retention_mean", "perplexity", "ppl_delta_pct",
                          "kl_mean", "verdict"]
    got = {(r["model"], r["precision"], r["compute_dtype"]): r["verdict"] for r in df.to_dicts()}
    assert got == {("m1", "fp16", "fp16"): "baseline",
                   ("m1", "int8", "fp16"): "smaller, slower, quality -1.2%",  # retention (0.78/0.80 + 1) / 2
                   ("m1", "nf4", "fp16"): "smaller, faster, quality -10.0%",
                   ("m1", "fp4", "fp16"): "smaller, faster, quality -20.0%",
                   ("m1", "fp4", "fp32"): "failed", ("m2", "nf4", "fp16"): "no baseline"}
    assert df.get_column("precision").to_list()[0] == "fp16"  # the baseline first
    assert "trial_id" in query_frame([rdir], vs_baseline=True, columns="all").columns


@pytest.mark.parametrize("args", [["results", "{rdir}"], ["results", "{rdir}", "--vs-baseline"],
                                  ["results", "{rdir}", "--columns", "all"], ["precisions"],
                                  ["precisions", "--long"]])
def test_tables_fit_100_columns(rdir, args):
    args = [a.format(rdir=rdir) for a in args]
    fitted = sweep(*args, env={"COLUMNS": "100"})
    assert fitted.returncode == 0, fitted.stderr
    assert max(len(line) for line in fitted.stdout.splitlines()) <= 100, fitted.stdout
    wide = sweep(*args, env={"COLUMNS": "1000"})
    for word in {w for line in wide.stdout.splitlines()[3:] for w in line.split() if w.isalnum() and len(w) > 2}:
        assert word in fitted.stdout, word  # nothing lost: every value of the wide table is in the fitted one
    if args[0] == "results":
        assert "fp4" in fitted.stdout and "failed" in fitted.stdout


def test_where_columns_sort_vs_baseline(rdir):
    df = query_frame([rdir], where="precision == 'nf4' and model = 'm1'", vs_baseline=True,
                     columns="precision,speedup_*,memory_reduction")
    assert df.columns == ["precision", "speedup_decode", "speedup_decode_graph", "speedup_decode_no_kv",
                          "speedup_throughput", "speedup_prefill", "speedup_sequence", "speedup_load", "memory_reduction"]
    assert df.rows() == [("nf4", 1.5, 1.5, None, 2.0, 2.0, 2.0, 1.25, 0.75)]  # no cache-off benchmark in these trials
    s = query_frame([rdir], where="status = 'done'", sort="-decode_tok_s", columns=["trial_id"])
    assert s.get_column("trial_id").to_list() == ["T3", "T2", "M", "B", "T1"]


def test_globs_expand_to_dirs(rdir):
    df = query_frame([str(Path(rdir).parent / "h*")])
    assert df.height == 6


@pytest.mark.parametrize("fmt", ["csv", "json", "parquet"])
def test_formats_round_trip(rdir, tmp_path, fmt):
    expected = query_frame([rdir], vs_baseline=True, sort="trial_id",
                           columns="trial_id,model,precision,status,is_baseline,decode_tok_s,speedup_*,retention_mean,error")
    out = tmp_path / f"out.{fmt}"
    got = run_query([rdir], vs_baseline=True, sort="trial_id", fmt=fmt, output=str(out),
                    columns="trial_id,model,precision,status,is_baseline,decode_tok_s,speedup_*,retention_mean,error")
    if fmt == "csv":
        back = pl.read_csv(io.StringIO(got), schema=expected.schema)
        assert out.read_text() == got
    elif fmt == "json":
        back = pl.DataFrame(json.loads(got), schema=expected.schema)
    else:
        assert isinstance(got, bytes) and out.read_bytes() == got
        back = pl.read_parquet(out)
    assert_frame_equal(back, expected)


def test_markdown_and_table(rdir):
    md = run_query([rdir], fmt="markdown", columns="model,precision,compute_dtype,decode_tok_s")
    lines = md.strip().splitlines()
    assert lines[0].replace(" ", "") == "|model|precision|compute_dtype|decode_tok_s|"
    assert set(lines[1].replace("|", "")) <= {"-", ":"}
    assert len(lines) == 2 + 6
    assert "| 30 " in md  # nf4 decode tok/s: 4 significant digits, trailing zeros dropped
    assert "null" not in md  # nulls are blank, not 'null'


def test_pivot_task_seed_style(rdir):
    df = query_frame([rdir], pivot="task", where="stage = 'tasks'")
    assert {"arc_easy:acc", "arc_easy:acc_norm", "hellaswag:acc_norm", "wikitext:word_perplexity"} <= set(df.columns)
    assert df.filter(pl.col("trial_id") == "T2").get_column("arc_easy:acc_norm").item() == pytest.approx(0.72)
    assert df.height == 5  # the failed trial has no task rows


def test_sql_over_views(rdir):
    df = query_frame([rdir], sql="SELECT s.precision, COUNT(*) AS n FROM summary s WHERE status = 'done' "
                                 "GROUP BY s.precision ORDER BY s.precision")
    assert df.rows() == [("fp16", 1), ("fp4", 1), ("int8", 1), ("nf4", 2)]
    j = query_frame([rdir], sql="SELECT t.precision, m.value FROM trials t JOIN metrics m USING (trial_id) "
                                "WHERE m.metric = 'decode_tok_s' AND t.model = 'm1' ORDER BY m.value")
    assert j.get_column("value").to_list() == [10.0, 20.0, 30.0, 31.0]
    v = query_frame([rdir], sql="SELECT trial_id, verdict FROM significance ORDER BY trial_id")
    assert v.rows() == [("T1", "within noise"), ("T2", "worse")]
    n = query_frame([rdir], sql="SELECT COUNT(*) AS n FROM samples")
    assert n.item() == 3 * 2 * 400


def test_bad_sql_names_the_query(rdir):
    bad = "SELEC precision FROM summary"
    with pytest.raises(UserError) as e:
        run_query([rdir], sql=bad)
    assert bad in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UserError, match="no_such_col"):
        run_query([rdir], sql="SELECT no_such_col FROM summary")
    with pytest.raises(UserError, match="nope"):
        run_query([rdir], sql="SELECT * FROM nope")


@pytest.mark.parametrize("kwargs, match", [
    (dict(where="no_such_col > 1"), "no_such_col"),
    (dict(where="precision ==== 'x'"), "--where"),
    (dict(columns="model,bogus"), "bogus"),
    (dict(sort="-bogus"), "bogus"),
    (dict(pivot="bogus"), "bogus"),
    (dict(fmt="xml"), "xml"),
    (dict(fmt="parquet"), "output"),
    (dict(view="bogus"), "bogus"),
])
def test_user_errors_are_one_line(rdir, kwargs, match):
    with pytest.raises(UserError, match=match) as e:
        run_query([rdir], **kwargs)
    assert "\n" not in str(e.value)


def test_not_a_results_dir(tmp_path):
    with pytest.raises(UserError, match="not a sweeper results directory"):
        run_query([str(tmp_path)])
