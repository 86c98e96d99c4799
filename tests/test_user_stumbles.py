"""A new user's stumbles (issue 25): every bad input is one line and exit 2 naming the input and what is allowed;
results of several folders never mix their numbers; numbers keep their significant digits; `-o` honours its
extension; `sweep status` counts what the folder holds. None of these starts Ray."""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import polars as pl
import pytest

from helpers import fast_benchmark, sweep, write_study
from sweeper.errors import UserError
from sweeper.query import format_frame, format_number, query_frame, run_query
from sweeper.store import ResultsStore
from test_analysis import _metric_rows, _trial_row, build_results


def _one_line_exit_2(r, *needles: str) -> str:
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stdout + r.stderr
    assert len(err) == 1 and err[0].startswith("sweep: error: "), r.stderr
    for n in needles:
        assert n in err[0], (n, err[0])
    return err[0]


@pytest.fixture()
def plain_study(tmp_path, tiny_model) -> Path:
    return write_study(tmp_path / "p.py", f"""
        study = Study(name="plain", models=[{str(tiny_model)!r}], precisions=["fp32", "nf4"], compute_dtypes=["fp32"],
                      benchmark={fast_benchmark()}, kl=False)
    """)


# ----- launch: bad input, before anything runs ---------------------------------------------------------------------

@pytest.mark.parametrize("where", ["/proc/sweeper-nope", "/sys/sweeper-nope/res"])
@pytest.mark.parametrize("dry", [True, False])
def test_unwritable_results_location(plain_study, where, dry):
    r = sweep("launch", str(plain_study), "--results", where, *(["--dry-run"] if dry else []))
    _one_line_exit_2(r, f"results dir {where} is not writable")
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("args, needles", [
    (["--limit", "2.5"], ["--limit 2.5", "whole number"]),
    (["--limit", "0"], ["--limit 0", "whole number"]),
    (["--gpus-per-trial", "0"], ["--gpus-per-trial 0", "fraction of a GPU"]),
    (["--gpus-per-trial", "1.5"], ["--gpus-per-trial 1.5", "whole"]),
    (["--only", "precision=NF4"], ["--only precision=NF4", "values present: precision: fp32, nf4"]),
])
def test_bad_launch_options_name_the_option(plain_study, args, needles):
    line = _one_line_exit_2(sweep("launch", str(plain_study), "--dry-run", *args), *needles)
    assert "study.limit" not in line and "Resources." not in line


def test_limit_on_a_study_without_tasks_is_refused(plain_study):
    _one_line_exit_2(sweep("launch", str(plain_study), "--dry-run", "--limit", "10"), "--limit 10", "no lm-eval tasks")


def test_a_quantized_only_study_says_its_baseline(tmp_path, tiny_model):
    s = write_study(tmp_path / "q.py", f"""
        study = Study(name="q", models=[{str(tiny_model)!r}], precisions=["nf4", "fp4"], compute_dtypes=["fp16"],
                      benchmark={fast_benchmark()}, kl=False)
    """)
    r = sweep("launch", str(s), "--dry-run", "--results", str(tmp_path / "r"))
    assert r.returncode == 0, r.stderr
    assert "baseline: nf4/fp16, a quantized precision" in r.stdout and "study.baseline" in r.stdout


@pytest.mark.parametrize("what", ["parquet", "dir", "results", "missing"])
def test_launch_and_status_of_something_not_a_study_file(tmp_path, what):
    target = {"parquet": tmp_path / "out.parquet", "dir": tmp_path / "d", "results": tmp_path / "res",
              "missing": tmp_path / "nosuch.py"}[what]
    if what == "parquet":
        target.write_bytes(b"PAR1\x00\x00\x15binary")
    elif what == "dir":
        target.mkdir()
    elif what == "results":
        ResultsStore(target).write_study({"name": "x", "trials": []})
    r = sweep("launch", str(target))
    line = _one_line_exit_2(r, str(target))
    assert "null bytes" not in line and "syntax error" not in line
    assert {"parquet": "not a study file", "dir": "not a study file", "results": "is a results dir",
            "missing": "does not exist"}[what] in line
    if what in ("parquet", "missing"):
        _one_line_exit_2(sweep("status", str(target)), str(target),
                         "does not exist" if what == "missing" else "not a study file")


def test_debug_shows_the_study_files_own_traceback(tmp_path):
    s = tmp_path / "broken.py"
    s.write_text("def helper():\n    return 1 / 0\n\nhelper()\n")
    r = sweep("launch", str(s), "--dry-run")
    _one_line_exit_2(r, "ZeroDivisionError", "line 2")
    d = sweep("--debug", "launch", str(s), "--dry-run")
    assert d.returncode != 0 and f'File "{s}", line 2, in helper' in d.stderr, d.stderr


def test_a_native_crash_names_where_it_happened(tmp_path):
    """A segfault in the launching process (here a study file's own; in CI once a library's, with nothing said) prints
    the Python stack of every thread on stderr."""
    s = tmp_path / "crash.py"
    s.write_text("import ctypes\n\n\ndef read_nowhere():\n    return ctypes.string_at(0)\n\n\nread_nowhere()\n")
    r = sweep("launch", str(s), "--dry-run")
    assert r.returncode == -signal.SIGSEGV, r.stdout + r.stderr
    assert "Fatal Python error: Segmentation fault" in r.stderr, r.stderr
    assert f'File "{s}", line 5 in read_nowhere' in r.stderr, r.stderr


def test_the_command_runs_where_stderr_is_no_file():
    """Called from Python whose stderr is no file (a notebook, click's CliRunner), `sweep` runs without the crash
    report (faulthandler needs a file descriptor) instead of failing on it."""
    from click.testing import CliRunner

    from sweeper.cli import main

    r = CliRunner().invoke(main, ["status", "/nonexistent-folder-x"])
    assert r.exit_code == 2 and "/nonexistent-folder-x does not exist" in r.output, (r.output, r.exception)


def test_dry_run_fresh_lists_every_trial_as_pending(tmp_path, plain_study):
    res = tmp_path / "r"
    # a folder where the fp32 trial is done
    store = ResultsStore(res)
    store.write_study({"name": "plain"})
    plan = sweep("launch", str(plain_study), "--dry-run", "--results", str(res))
    fp32_id = next(line.split()[1] for line in plan.stdout.splitlines() if " fp32 " in line and "│" in line)
    store.write_trial({**_trial_row("B"), "trial_id": fp32_id, "study": "plain"}, [])
    shown = sweep("launch", str(plain_study), "--dry-run", "--results", str(res))
    assert "done" in shown.stdout
    fresh = sweep("launch", str(plain_study), "--dry-run", "--fresh", "--results", str(res))
    assert fresh.returncode == 0, fresh.stderr
    table = [line for line in fresh.stdout.splitlines() if "│" in line and "trial_id" not in line]
    assert len(table) == 2 and all("pending" in line and "done" not in line for line in table), fresh.stdout
    assert "would be moved aside" in fresh.stdout


# ----- status -----------------------------------------------------------------------------------------------------

def test_status_counts_the_launch_selection_and_what_else_the_folder_holds(tmp_path, plain_study):
    res = tmp_path / "r"
    store = ResultsStore(res)
    ids = {}
    for prec in ("fp32", "nf4"):
        out = sweep("launch", str(plain_study), "--dry-run", "--results", str(res), "--only", f"precision={prec}")
        ids[prec] = next(line.split()[1] for line in out.stdout.splitlines() if f" {prec} " in line and "│" in line)
    store.write_study({"name": "plain", "trials": [{"trial_id": ids["nf4"], "model": "tiny-llama", "precision": "nf4",
                                                    "compute_dtype": "fp32"}]})
    store.write_trial({**_trial_row("T2"), "trial_id": ids["nf4"], "study": "plain"}, [])
    # a trial of another selection (as --limit makes: another id)
    store.write_trial({**_trial_row("T1"), "trial_id": "otherlimit01", "study": "plain", "status": "failed"}, [])
    s = sweep("status", str(plain_study), "--results", str(res), "--only", "precision=nf4")
    assert s.returncode == 0, s.stderr
    assert "1 trials: 1 done, 0 failed, 0 pending (study plain)" in s.stdout
    assert "also holds 1 other trial(s) (0 done, 1 failed)" in s.stdout
    whole = sweep("status", str(plain_study), "--results", str(res))
    assert "2 trials: 1 done, 0 failed, 1 pending (study plain)" in whole.stdout
    d = sweep("status", str(res))
    assert "1 trials: 1 done, 0 failed, 0 pending (launched here)" in d.stdout
    # a folder of another study is refused as launch refuses it
    other = tmp_path / "other"
    ResultsStore(other).write_study({"name": "someone-else"})
    _one_line_exit_2(sweep("status", str(plain_study), "--results", str(other)), "belongs to study 'someone-else'")
    _one_line_exit_2(sweep("status", str(res), "--only", "precision=nf4"), "go with a study file")


# ----- results over several folders ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_dirs(tmp_path_factory) -> tuple[Path, Path]:
    """Two folders holding the same trial ids (a --fresh copy): T2 measured 30 tok/s in A and 60 in B."""
    base = tmp_path_factory.mktemp("two")
    a = build_results(base / "hand")
    b = build_results(base / "hand.old-1")
    rows = [({**m, "value": 60.0} if m["metric"] == "decode_tok_s" else m) for m in _metric_rows("T2")]
    ResultsStore(b).write_trial(_trial_row("T2"), rows)
    return a, b


def test_several_folders_keep_their_own_numbers(two_dirs):
    a, b = two_dirs
    df = query_frame([str(a), str(b)], where="precision = 'nf4' and model = 'm1'")
    assert df.columns[0] == "results_dir"
    assert sorted(zip(df["results_dir"], df["decode_tok_s"])) == sorted([(str(a), 30.0), (str(b), 60.0)])
    cmp = query_frame([str(a), str(b)], vs_baseline=True, where="trial_id = 'T2'")
    # each compared with the baseline of its own folder (20 tok/s in both)
    assert sorted(zip(cmp["results_dir"], cmp["speedup_decode"])) == sorted([(str(a), 1.5), (str(b), 3.0)])
    # the Python API as well
    from sweeper import analysis
    from sweeper.results import open_results

    api = analysis.compare(open_results([str(a), str(b)])).filter(pl.col("trial_id") == "T2").collect()
    assert sorted(api["speedup_decode"]) == [1.5, 3.0]
    assert analysis.significance(open_results([str(a), str(b)]))["results_dir"].n_unique() == 2
    m = query_frame([str(a), str(b)], view="metrics", where="trial_id = 'T2' and metric = 'decode_tok_s'")
    assert sorted(m["value"]) == [30.0, 60.0] and m["results_dir"].n_unique() == 2
    rec = query_frame([str(a), str(b)], view="recommendations")
    assert rec["results_dir"].n_unique() == 2
    # the glob of both, and a folder named twice: each folder once
    assert query_frame([str(a.parent / "hand*")]).height == 12
    assert query_frame([str(a), str(a)]).height == 6 and "results_dir" not in query_frame([str(a), str(a)]).columns



def test_api_fronts_and_choices_over_several_folders_stay_per_folder(two_dirs):
    """analysis.pareto / recommend of a compare over two folders (docs/analysis.md: no front or ranking mixes two
    directories' trials): each folder's rows are those of that folder alone, T2 at 30 tok/s in one and 60 in the
    other never on one front."""
    from sweeper import analysis
    from sweeper.results import open_results

    a, b = two_dirs
    both = analysis.compare(open_results([str(a), str(b)]))
    for fn, keys in ((analysis.pareto, ["trial_id"]), (analysis.recommend, ["model", "scenario"])):
        stacked = fn(both)
        assert stacked.columns[0] == "results_dir", (fn.__name__, stacked.columns)
        for d in (a, b):
            own = fn(analysis.compare(open_results([str(d)])))
            mine = stacked.filter(pl.col("results_dir") == str(d)).drop("results_dir")
            assert mine.sort(keys).equals(own.sort(keys)), (fn.__name__, d, mine, own)

def test_report_of_two_folders_labels_study_and_folder(two_dirs, tmp_path):
    a, b = two_dirs
    r = sweep("report", str(a), str(b), "-o", str(tmp_path / "r.md"))
    assert r.returncode == 0, r.stderr
    md = (tmp_path / "r.md").read_text()
    assert not md.lstrip().startswith("<"), "-o r.md wrote HTML"
    assert f"m1 (hand @ {a})" in md and f"m1 (hand @ {b})" in md
    # each folder's own decode speedup of T2: 1.50x in one, 3.00x in the other, never a mix
    assert "1.50x" in md and "3.00x" in md



def test_report_counts_a_borrowed_baseline_once(tmp_path):
    """A folder whose baseline is done in another folder shows that baseline beside its trials, but the report's
    trial count counts it once (in the folder that ran it): 6 trials in one, 1 in the other = 7, not 8."""
    from test_analysis import _samples

    a = build_results(tmp_path / "a")  # B (baseline), T1, T2, T3, M done, F failed
    c = tmp_path / "c"
    store = ResultsStore(c)
    store.write_study({"name": "other"})
    store.write_trial({**_trial_row("T2"), "study": "other"}, _metric_rows("T2"), _samples("T2"))  # baseline B lacking
    r = sweep("report", str(a), str(c), "-o", str(tmp_path / "r.md"))
    assert r.returncode == 0, r.stderr
    md = (tmp_path / "r.md").read_text()
    assert "7 trials (6 done, 1 failed" in md, md[:400]
    assert f"m1 (other @ {c})" in md  # the borrowed baseline still serves the other folder's comparison

# ----- numbers, -o, options that do not apply ----------------------------------------------------------------------

def test_numbers_keep_significant_digits_per_value():
    df = pl.DataFrame({"load_s": [0.0835, 12.5], "prefill_ms": [11.45, 250.0], "footprint_gb": [0.0058, 16.1],
                       "quality_retention": [0.9995, 1.0], "tiny": [5.8e-5, 3.0]})
    text = format_frame(df, "markdown")
    for shown in ("0.0835", "11.45", "0.0058", "0.9995", "5.8e-05", "12.5", "250", "16.1"):
        assert shown in text, (shown, text)
    assert format_number(0.0) == "0" and format_number(299.5) == "299.5" and format_number(12345.6) == "12346"


@pytest.mark.parametrize("name, check", [
    ("x.csv", lambda t: t.splitlines()[0].startswith("trial_id,")),
    ("x.json", lambda t: isinstance(json.loads(t), list)),
    ("x.md", lambda t: t.startswith("| trial_id")),
])
def test_output_extension_picks_the_format(two_dirs, tmp_path, name, check):
    a, _ = two_dirs
    out = tmp_path / name
    r = sweep("results", str(a), "--columns", "trial_id,precision", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert check(out.read_text()), out.read_text()
    p = sweep("results", str(a), "-o", str(tmp_path / "x.parquet"))
    assert p.returncode == 0 and pl.read_parquet(tmp_path / "x.parquet").height == 6


def test_output_extension_mismatch_is_refused(two_dirs, tmp_path):
    a, _ = two_dirs
    _one_line_exit_2(sweep("results", str(a), "--format", "table", "-o", str(tmp_path / "x.csv")),
                     "-o", "x.csv", "means csv", "--format table")
    _one_line_exit_2(sweep("report", str(a), "--format", "html", "-o", str(tmp_path / "r.md")), "means markdown")
    assert not (tmp_path / "x.csv").exists()


@pytest.mark.parametrize("args, needles", [
    (["--vs-baseline", "--pivot", "task"], ["--vs-baseline", "--pivot task"]),
    (["--vs-baseline", "--view", "metrics"], ["--vs-baseline", "--view metrics"]),
    (["--columns", "precision,speedup_*"], ["speedup_*", "--vs-baseline"]),
    (["--where", "interval 3"], ["--where", "single quotes"]),
    (["--where", "precision = nf4"], ["--where", "single quotes"]),
])
def test_query_options_that_do_not_apply_say_so(two_dirs, args, needles):
    a, _ = two_dirs
    line = _one_line_exit_2(sweep("results", str(a), *args), *needles)
    assert "{" not in line, line  # no parser structure


def test_pivot_task_puts_the_task_columns_first(tmp_path):
    # the first trial's KL prompt-category rows come before its task rows (as the stages run: KL, then tasks)
    a = build_results(tmp_path / "hand")
    prompts = [dict(trial_id="B", stage="prompts", task=c, metric="kl_mean", value=0.0)
               for c in ("code", "math", "translation")]
    ResultsStore(a).write_trial(_trial_row("B"), prompts + _metric_rows("B"))
    df = query_frame([str(a)], pivot="task")
    pivoted = [c for c in df.columns if ":" in c]
    kinds = ["prompt" if c.split(":")[0] in ("code", "math", "translation") else "task" for c in pivoted]
    assert kinds == sorted(kinds, key=lambda k: k != "task"), pivoted


def test_progress_prefix_is_minutes_and_seconds():
    import re

    from sweeper.scheduler import Progress

    p = Progress(total=3, labels={})
    p.started -= 70
    line = p.line("x")
    assert re.match(r"\[1:1\d\] done 0/3", line) and "[0m" not in line and "m1" not in line, line


def test_load_speedups_only_between_loads_alike(tmp_path):
    """A warm load (a later trial of its worker process) is not compared with a cold one, and no 'fastest load' is
    recommended; the report says which loads were cold and which warm."""
    a = build_results(tmp_path / "hand")
    store = ResultsStore(a)
    for tid, index in (("B", 0), ("T1", 1), ("T2", 0)):
        store.write_trial(_trial_row(tid, worker_trial_index=index), _metric_rows(tid))
    cmp = query_frame([str(a)], vs_baseline=True, where="model = 'm1' and status = 'done'", columns="all")
    by_id = {r["trial_id"]: r for r in cmp.to_dicts()}
    assert by_id["T1"]["load_cold"] is False and by_id["T1"]["speedup_load"] is None  # warm vs the cold baseline
    assert by_id["T2"]["load_cold"] is True and by_id["T2"]["speedup_load"] == pytest.approx(10.0 / 8.0)
    rec = query_frame([str(a)], view="recommendations")
    assert "fastest_load" not in rec["scenario"].to_list()
    r = sweep("report", str(a), "-o", str(tmp_path / "r.md"))
    assert r.returncode == 0, r.stderr
    md = (tmp_path / "r.md").read_text()
    assert "| 10 cold " in md and "| 5 warm " in md, md


def test_report_keeps_small_values(tmp_path):
    a = build_results(tmp_path / "hand")
    rows = [({**m, "value": 5.8e6} if m["metric"] == "weights_bytes" else m) for m in _metric_rows("T1")]
    ResultsStore(a).write_trial(_trial_row("T1"), rows)
    assert sweep("report", str(a), "--format", "markdown", "-o", str(tmp_path / "r.md")).returncode == 0
    assert "| 0.0058 " in (tmp_path / "r.md").read_text()
