"""`sweep results` query engine: views, --where/--sql, shaping, and every output format round-tripping."""
from __future__ import annotations

import io
import json
from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from sweeper.errors import UserError
from sweeper.query import query_frame, run_query
from test_analysis import build_results


@pytest.fixture(scope="module")
def rdir(tmp_path_factory) -> str:
    return str(build_results(tmp_path_factory.mktemp("q") / "hand"))


def test_default_view_is_one_row_per_trial(rdir):
    df = query_frame([rdir])
    assert sorted(df.get_column("trial_id").to_list()) == ["B", "F", "M", "T1", "T2", "T3"]
    assert {"model", "precision", "compute_dtype", "status", "decode_tok_s", "arc_easy"} <= set(df.columns)
    assert "speedup_decode" not in df.columns
    text = run_query([rdir])
    assert isinstance(text, str) and "int8" in text and "nf4" in text


def test_where_columns_sort_vs_baseline(rdir):
    df = query_frame([rdir], where="precision == 'nf4' and model = 'm1'", vs_baseline=True,
                     columns="precision,speedup_*,memory_reduction")
    assert df.columns == ["precision", "speedup_decode", "speedup_decode_no_kv", "speedup_throughput",
                          "speedup_prefill", "speedup_sequence", "speedup_load", "memory_reduction"]
    assert df.rows() == [("nf4", 1.5, None, 2.0, 2.0, 2.0, 1.25, 0.75)]  # no cache-off benchmark in these trials
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
    assert "| 30.0" in md  # nf4 decode tok/s, rounded display
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
