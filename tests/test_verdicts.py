"""Verdicts that can be trusted (issue 24): each metric's significance is computed as lm-eval aggregates it, tasks group
as lm-eval ran them, failed baselines are skipped, perplexity-type task retention feeds the quality axis, and Pareto
ties are deterministic. Synthetic sets go through the real conversion (``sweeper.stages.tasks``) and the real store."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sweeper import analysis
from sweeper.report import build_report
from sweeper.results import open_results
from sweeper.stages.tasks import metric_rows, samples_table, task_groups
from sweeper.store import ResultsStore

from test_analysis import _metric_rows, _samples, _trial_row


def _sig(res) -> dict[tuple[str, str], dict]:
    return {(r["trial_id"], r["task"]): r for r in analysis.significance(res).to_dicts()}


def _write_lm_eval(store: ResultsStore, tid: str, results: dict, **row) -> None:
    """Store one trial's lm-eval output exactly as the tasks stage does (metric rows, samples, task_groups)."""
    store.write_trial(_trial_row(tid, task_groups=task_groups(results), **row), metric_rows(results, tid),
                      samples_table(results, tid))


# ------------------------------------------------------------------------------------------ groups: gsm8k + gsm8k_cot
def _gsm_results(cot_right: int, n: int = 200) -> dict:
    """simple_evaluate's output for gsm8k (100 of 200 right) and gsm8k_cot (cot_right of 200), two filters each, and
    the mmlu group (mmlu > mmlu_stem > two subjects; every subject 50 of 100) next to the standalone mmlu_pro."""
    results, samples = {}, {}
    for task, right in (("gsm8k", 100), ("gsm8k_cot", cot_right)):
        results[task] = {"alias": task}
        samples[task] = []
        for filt in ("strict-match", "flexible-extract"):
            results[task][f"exact_match,{filt}"] = right / n
            results[task][f"exact_match_stderr,{filt}"] = 0.03
            samples[task] += [{"doc_id": i, "filter": filt, "metrics": ["exact_match"],
                               "exact_match": 1.0 if i < right else 0.0} for i in range(n)]
    for task in ("mmlu_anatomy", "mmlu_astronomy", "mmlu_pro"):
        results[task] = {"alias": task, "acc,none": 0.5, "acc_stderr,none": 0.05}
        samples[task] = [{"doc_id": i, "filter": "none", "metrics": ["acc"], "acc": float(i % 2)} for i in range(100)]
    results["mmlu_stem"] = {"alias": "stem", "acc,none": 0.5, "acc_stderr,none": 0.04}
    results["mmlu"] = {"alias": "mmlu", "acc,none": 0.5, "acc_stderr,none": 0.04}
    return {"results": results, "samples": samples,
            "group_subtasks": {"mmlu": ["mmlu_stem"], "mmlu_stem": ["mmlu_anatomy", "mmlu_astronomy"]},
            "n-samples": {t: {"original": len(v) // (2 if t.startswith("gsm") else 1),
                              "effective": len(v) // (2 if t.startswith("gsm") else 1)} for t, v in samples.items()}}


@pytest.fixture(scope="module")
def gsm_res(tmp_path_factory):
    store = ResultsStore(tmp_path_factory.mktemp("gsm") / "r")
    _write_lm_eval(store, "B", _gsm_results(cot_right=100))
    _write_lm_eval(store, "T1", _gsm_results(cot_right=60))  # equal on gsm8k, loses 40 of 200 on gsm8k_cot
    return open_results([str(store.root)])


def test_standalone_tasks_are_not_folded_by_name(gsm_res):
    """gsm8k_cot and mmlu_pro are lm-eval tasks of their own: their own columns, retention and significance rows;
    mmlu's subjects and its nested mmlu_stem group stay inside mmlu (lm-eval's group_subtasks says so)."""
    cmp = analysis.compare(gsm_res).collect()
    t1 = cmp.filter(pl.col("trial_id") == "T1").to_dicts()[0]
    assert t1["gsm8k"] == pytest.approx(0.5) and t1["gsm8k_cot"] == pytest.approx(0.3)
    assert t1["retention_gsm8k"] == pytest.approx(1.0)
    assert t1["retention_gsm8k_cot"] == pytest.approx(0.6)
    retention = sorted(c for c in cmp.columns if c.startswith("retention_") and not c.startswith("retention_mean"))
    assert retention == ["retention_gsm8k", "retention_gsm8k_cot", "retention_mmlu", "retention_mmlu_pro"]
    assert t1["retention_mean"] == pytest.approx((1.0 + 0.6 + 1.0 + 1.0) / 4)  # the loss is seen
    summary = gsm_res.summary().collect()
    assert {"gsm8k", "gsm8k_cot", "mmlu", "mmlu_pro"} <= set(summary.columns)
    assert "mmlu_stem" not in summary.columns and "mmlu_anatomy" not in summary.columns

    sig = _sig(gsm_res)
    assert set(sig) == {("T1", "gsm8k"), ("T1", "gsm8k_cot"), ("T1", "mmlu"), ("T1", "mmlu_pro")}
    g, cot = sig[("T1", "gsm8k")], sig[("T1", "gsm8k_cot")]
    assert g["metric"] == "exact_match,strict-match" and g["n"] == 200
    assert g["diff"] == 0.0 and g["verdict"] == "within noise"  # agrees with its column (retention 1.0)
    assert cot["n"] == 200 and cot["diff"] == pytest.approx(-0.2) and cot["regressed"] == 40
    assert cot["verdict"] == "worse"
    assert sig[("T1", "mmlu")]["n"] == 200  # both subjects pooled under the group, nothing from mmlu_pro
    assert sig[("T1", "mmlu_pro")]["n"] == 100


def test_results_without_group_record_still_read(tmp_path):
    """A folder written before trials recorded task_groups (no such column in the trial files): every task is its own
    top level, nothing is folded by name."""
    from sweeper.store import metrics_table, trial_table

    root = tmp_path / "old"  # the layout of that time: one file per trial and kind (read as it is, docs/store.md)
    for sub in ("trials", "metrics", "samples"):
        (root / sub).mkdir(parents=True)
    for tid, cot in (("B", 100), ("T1", 60)):
        out = _gsm_results(cot)
        pq.write_table(trial_table(_trial_row(tid)).drop(["task_groups"]), root / "trials" / f"{tid}.parquet")
        pq.write_table(metrics_table(metric_rows(out, tid)), root / "metrics" / f"{tid}.parquet")
        pq.write_table(samples_table(out, tid), root / "samples" / f"{tid}.parquet")
    res = open_results([str(root)])
    assert "task_groups" not in pq.read_schema(root / "trials" / "B.parquet").names
    cmp = analysis.compare(res).collect()
    assert {"gsm8k", "gsm8k_cot", "mmlu_pro", "mmlu", "mmlu_stem", "mmlu_anatomy"} <= set(cmp.columns)
    sig = _sig(res)
    assert sig[("T1", "gsm8k")]["verdict"] == "within noise" and sig[("T1", "gsm8k_cot")]["verdict"] == "worse"


# ------------------------------------------------------------------------------------------ pair metrics: mcc
def _cola_results(flip: bool, n: int = 100) -> dict:
    gold = [i % 2 for i in range(n)]
    pred = [1 - g if flip else g for g in gold]
    return {"results": {"cola": {"alias": "cola", "mcc,none": -1.0 if flip else 1.0, "mcc_stderr,none": "N/A"}},
            "samples": {"cola": [{"doc_id": i, "filter": "none", "metrics": ["mcc"], "mcc": (gold[i], pred[i])}
                                 for i in range(n)]},
            "group_subtasks": {}, "n-samples": {"cola": {"original": n, "effective": n}}}


def test_mcc_is_computed_from_gold_and_prediction_pairs(tmp_path):
    """glue/cola keeps (gold, pred) per item: baseline MCC 1.0, trial -1.0 (every prediction flipped) is a real loss,
    not gold compared with gold (diff 0, 'within noise')."""
    store = ResultsStore(tmp_path / "cola")
    _write_lm_eval(store, "B", _cola_results(flip=False))
    _write_lm_eval(store, "T1", _cola_results(flip=True))
    r = _sig(open_results([str(store.root)]))[("T1", "cola")]
    assert r["verdict"] == "worse"
    assert (r["metric"], r["kind"], r["n"]) == ("mcc", "mcc", 100)
    assert r["baseline_score"] == pytest.approx(1.0) and r["trial_score"] == pytest.approx(-1.0)
    assert r["diff"] == pytest.approx(-2.0) and r["ci_high"] < 0
    assert r["verdict"] == "worse"
    assert r["diff_pct"] is None  # a ratio of correlations means nothing


def test_mcc_and_f1_match_sklearn_on_random_pairs():
    """The corpus formulas equal sklearn's (what lm-eval's mcc / f1 aggregations call), multi-class MCC included."""
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(3)
    for k in (2, 3):
        g, p = rng.integers(0, k, 300).astype(float), rng.integers(0, k, 300).astype(float)
        p[:150] = g[:150]
        labels = np.unique(np.concatenate([g, p]))
        mcc = analysis._corpus("mcc", analysis._features("mcc", g, p, labels).sum(0))
        assert mcc == pytest.approx(sk.matthews_corrcoef(g, p))
        if k == 2:
            f1 = analysis._corpus("f1", analysis._features("f1", g, p, labels).sum(0))
            assert f1 == pytest.approx(sk.f1_score(g, p))


def test_lambada_item_perplexity_is_exp_of_mean_loglik(tmp_path):
    """lambada's per-item "perplexity" is the item's log-likelihood (lm-eval: exp(-mean)); a trial with lower
    log-likelihoods has the higher perplexity: worse, not a "better" from a flipped mean of log-likelihoods."""
    def out(shift: float) -> dict:
        ll = [-1.0 - 0.01 * (i % 7) - shift for i in range(200)]
        return {"results": {"lambada_x": {"alias": "lambada_x", "perplexity,none": math.exp(-sum(ll) / 200)}},
                "samples": {"lambada_x": [{"doc_id": i, "filter": "none", "metrics": ["perplexity"],
                                           "perplexity": ll[i]} for i in range(200)]}, "group_subtasks": {}}

    store = ResultsStore(tmp_path / "lam")
    _write_lm_eval(store, "B", out(0.0))
    _write_lm_eval(store, "T1", out(0.05))
    res = open_results([str(store.root)])
    r = _sig(res)[("T1", "lambada_x")]
    assert r["verdict"] == "worse" and r["kind"] == "perplexity"
    value = {x["trial_id"]: x["value"] for x in res.metrics.collect().to_dicts()}
    assert r["trial_score"] == pytest.approx(value["T1"]) and r["baseline_score"] == pytest.approx(value["B"])
    assert r["diff_pct"] == pytest.approx(100 * (math.exp(0.05) - 1))


# ------------------------------------------------------------------------------------------ failed baseline
def test_significance_skips_a_failed_baseline(tmp_path):
    """A baseline that failed after its tasks stage keeps its samples; compare says baseline_status failed, and
    significance must not give a verdict from it either: it says why instead."""
    store = ResultsStore(tmp_path / "fb")
    store.write_trial(_trial_row("B", status="failed", error_stage="write", error_type="OSError", error="disk full"),
                      _metric_rows("B"), _samples("B"))
    store.write_trial(_trial_row("T2"), _metric_rows("T2"), _samples("T2"))  # would be "worse" (40 items lost)
    res = open_results([str(store.root)])
    assert analysis.compare(res).filter(pl.col("trial_id") == "T2").collect()["baseline_status"][0] == "failed"
    r = _sig(res)[("T2", "arc_easy")]
    assert r["verdict"] is None and r["diff"] is None  # today's code: "worse", from the failed baseline's items
    assert r["note"] == "the baseline trial B failed"


# ------------------------------------------------------------------------------------------ wikitext-only quality
def test_wikitext_only_study_has_quality_recommendations_and_fronts(tmp_path):
    """Only lower-is-better tasks (wikitext) and no perplexity stage: quality_retention is the task's retention
    (baseline / trial perplexity), so the scenarios and the Pareto fronts are filled."""
    store = ResultsStore(tmp_path / "wt")
    for tid, fp, ppl in (("B", 4e9, 20.0), ("T1", 2e9, 20.2), ("T2", 1e9, 25.0)):
        store.write_trial(_trial_row(tid), [
            {"trial_id": tid, "stage": "load", "metric": "weights_bytes", "value": fp},
            {"trial_id": tid, "stage": "load", "metric": "load_s", "value": 1.0},
            {"trial_id": tid, "stage": "tasks", "task": "wikitext", "metric": "word_perplexity", "value": ppl},
            {"trial_id": tid, "stage": "tasks", "task": "wikitext", "metric": "bits_per_byte", "value": 1.0}])
    cmp = analysis.compare(open_results([str(store.root)])).collect()
    ax = analysis.with_axes(cmp).collect()
    q = dict(zip(ax["trial_id"], ax["quality_retention"]))
    assert q["T1"] == pytest.approx(20.0 / 20.2) and q["T2"] == pytest.approx(20.0 / 25.0) and q["B"] == 1.0
    rec = {r["scenario"]: r["trial_id"] for r in analysis.recommend(cmp).to_dicts()}
    assert rec["best_quality"] == "T1" and rec["min_memory_within_3pct"] == "T1"
    front = {r["trial_id"]: r["pareto_memory"] for r in analysis.pareto(cmp).to_dicts()}
    assert front == {"B": True, "T1": True, "T2": True}


# ------------------------------------------------------------------------------------------ Pareto ties
def test_identical_pareto_points_are_all_on_the_front():
    """Identical points dominate nothing (the documented rule), so every copy is on the front, in any row order;
    a copy of a dominated point stays off."""
    rows = [("B", 4.0, 1.0, 10.0), ("nf4", 1.0, 0.95, 30.0), ("fp4", 1.0, 0.95, 30.0), ("int8", 2.0, 0.90, 5.0),
            ("int8b", 2.0, 0.90, 5.0)]
    base = pl.DataFrame({"model": ["m"] * 5, "trial_id": [r[0] for r in rows], "precision": [r[0] for r in rows],
                         "compute_dtype": ["fp16"] * 5, "is_baseline": [r[0] == "B" for r in rows],
                         "status": ["done"] * 5, "retention_mean": [r[2] for r in rows],
                         "weights_gb": [r[1] for r in rows], "batch_tok_s": [r[3] for r in rows],
                         "decode_tok_s": [r[3] for r in rows]})
    for order in (list(range(5)), [4, 3, 2, 1, 0], [2, 0, 4, 1, 3]):
        p = analysis.pareto(base[order])
        got = {r["trial_id"]: (r["pareto_memory"], r["pareto_throughput"]) for r in p.to_dicts()}
        assert got == {"B": (True, True), "nf4": (True, True), "fp4": (True, True), "int8": (False, False),
                       "int8b": (False, False)}, order


# ------------------------------------------------------------------------------------------ wikitext on llama-4m
@pytest.fixture(scope="module")
def wikitext_res(real_model, shared_data, tmp_path_factory):
    """llama-4m fp32 (baseline) and fp4 on lm-eval's wikitext (12 documents of the local WikiText-2 test file), run by
    the real trial runner (load, tasks stage through lm-eval, store)."""
    from sweeper.runner import run_trial
    from sweeper.study import Benchmark, Model, Study, Task
    from sweeper.trials import expand

    study = Study(name="wt", models=[Model(str(real_model))], precisions=["fp32", "fp4"], compute_dtypes=["fp32"],
                  baseline="fp32", kl=False, benchmark=Benchmark(enabled=False), eval_batch_size=4,
                  tasks=[Task("wikitext", data=str(shared_data / "wikitext-2" / "test.txt"), limit=12)])
    store = ResultsStore(tmp_path_factory.mktemp("wikitext") / "wt")
    store.write_study({"name": "wt"})
    trials, _ = expand(study)
    for spec in sorted(trials, key=lambda t: not t.is_baseline):
        assert run_trial(spec, store, device="cpu")["status"] == "done"
    return open_results([str(store.root)])


def test_wikitext_perplexity_verdict_is_worse_with_one_sign_everywhere(wikitext_res):
    res = wikitext_res
    trials = res.trials.collect()
    assert trials["task_groups"].to_list() == ["{}", "{}"]  # the tasks stage recorded lm-eval's (empty) groups
    cmp = analysis.compare(res).collect()
    by_prec = {r["precision"]: r for r in cmp.to_dicts()}
    base, fp4 = by_prec["fp32"], by_prec["fp4"]
    assert fp4["wikitext"] > base["wikitext"]  # fp4's word perplexity is higher: worse

    sig = analysis.significance(res).to_dicts()
    assert len(sig) == 1
    r = sig[0]
    assert r["verdict"] == "worse" and r["diff"] > 0  # today's code said "better", diff -247 (mean log-likelihoods)
    assert (r["trial_id"], r["task"], r["metric"], r["kind"], r["n"]) == (fp4["trial_id"], "wikitext",
                                                                           "word_perplexity", "perplexity", 12)
    # the scores are the corpus word perplexities lm-eval reported, not mean log-likelihoods
    assert r["trial_score"] == pytest.approx(fp4["wikitext"], rel=1e-9)
    assert r["baseline_score"] == pytest.approx(base["wikitext"], rel=1e-9)
    assert r["diff"] == pytest.approx(fp4["wikitext"] - base["wikitext"], rel=1e-9) and r["diff"] > 0
    assert r["ci_low"] > 0 and r["ci_low_pct"] > 0
    assert r["diff_pct"] == pytest.approx(100 * (fp4["wikitext"] / base["wikitext"] - 1), rel=1e-9)
    assert r["verdict"] == "worse"

    # independent check: numpy bootstrap over documents of the perplexity ratio (other draws, same distribution)
    s = res.samples.filter(pl.col("metric") == "word_perplexity").sort("doc_id").collect()
    ll = {t: s.filter(pl.col("trial_id") == t)["value"].to_numpy() for t in (base["trial_id"], fp4["trial_id"])}
    w = s.filter(pl.col("trial_id") == base["trial_id"])["weight"].to_numpy()
    rng = np.random.default_rng(12345)
    idx = rng.integers(0, w.size, size=(4000, w.size))
    ratio = np.exp(-(ll[fp4["trial_id"]][idx].sum(1) - ll[base["trial_id"]][idx].sum(1)) / w[idx].sum(1))
    lo, hi = np.percentile(100 * (ratio - 1), [2.5, 97.5])
    assert r["ci_low_pct"] == pytest.approx(lo, abs=0.6) and r["ci_high_pct"] == pytest.approx(hi, abs=0.6)

    # every lm-eval perplexity-type metric is recomputed from the items exactly as lm-eval aggregated it
    allm = res.samples.collect()
    for row in res.metrics.filter(pl.col("stage") == "tasks").collect().to_dicts():
        items = allm.filter((pl.col("trial_id") == row["trial_id"]) & (pl.col("metric") == row["metric"]))
        kind = analysis.metric_kind(row["metric"], weighted=True)
        f = analysis._features(kind, items["value"].to_numpy(), items["weight"].to_numpy(), np.empty(0))
        assert analysis._corpus(kind, f.sum(0)) == pytest.approx(row["value"], rel=1e-9), row["metric"]

    # the report: summary change, significance diff and change, verdict all say worse with a + sign
    data = build_report(res)
    summ = data.summary["llama-4m"].to_dicts()
    fp4_row = [x for x in summ if x["Precision"] == "fp4"][0]
    pct = f"+{100 * (fp4['wikitext'] / base['wikitext'] - 1):.1f}%"
    assert fp4_row["wikitext vs base"] == f"{pct} (worse)"
    show = data.significance.to_dicts()[0]
    assert show["diff"].startswith("+") and show["95% CI"].startswith("[+")
    assert show["change (95% CI)"].startswith(pct) and show["verdict"] == "worse"

    # wikitext is this study's only quality signal: recommendations and fronts use its retention
    rec = {x["scenario"]: x for x in analysis.recommend(cmp).to_dicts()}
    assert rec["best_quality"]["trial_id"] == fp4["trial_id"]
    assert rec["best_quality"]["quality_retention"] == pytest.approx(base["wikitext"] / fp4["wikitext"])
