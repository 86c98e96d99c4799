"""Analysis on a hand-built results set with known answers (written in the real layout by ResultsStore)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from sweeper import analysis
from sweeper.results import open_results
from sweeper.store import ResultsStore

# model m1: baseline fp16 B; int8 T1; nf4 T2; fp4/fp16 T3 (dominated on memory by T2); fp4/fp32 F (failed at load).
# model m2: nf4 M whose baseline "m2base00000" is not in the results.
CELLS = {
    #        load  weights peak   prefill decode seq   {bs: tok/s}        ppl   arc_easy hellaswag wikitext kl
    "B":  (10.0, 4e9, 5e9, 100.0, 20.0, 1000.0, {1: 20.0, 4: 60.0}, 10.0, 0.80, 0.50, 20.0, None),
    "T1": (5.0, 2e9, 4e9, 200.0, 10.0, 2000.0, {1: 10.0, 4: 30.0}, 10.5, 0.78, 0.50, 22.0, 0.01),
    "T2": (8.0, 1e9, 2e9, 50.0, 30.0, 500.0, {1: 30.0, 4: 120.0}, 12.0, 0.72, 0.45, 25.0, 0.05),
    "T3": (7.0, 1e9, 2e9, 50.0, 31.0, 480.0, {1: 31.0, 4: 130.0}, 14.0, 0.64, 0.40, 30.0, 0.2),
    "M":  (3.0, 1e9, 2e9, 40.0, 25.0, 400.0, {1: 25.0, 4: 100.0}, 11.0, 0.70, 0.50, 21.0, 0.03),
}
CONFIG = {
    "B": ("m1", "fp16", "fp16", True, "B"),
    "T1": ("m1", "int8", "fp16", False, "B"),
    "T2": ("m1", "nf4", "fp16", False, "B"),
    "T3": ("m1", "fp4", "fp16", False, "B"),
    "F": ("m1", "fp4", "fp32", False, "B"),
    "M": ("m2", "nf4", "fp16", False, "m2base00000"),
}
# kernel-level decode (CUDA graph) tok/s; T1 (int8) has none: its row says why (GRAPH_ERROR)
GRAPH = {"B": 100.0, "T2": 150.0, "T3": 160.0, "M": 90.0}
GRAPH_ERROR = "not attempted: bitsandbytes LLM.int8 finds outlier columns on the host"
# what get_memory_footprint() says for every trial (as for torchao's tensor subclasses): never a memory column's source
HF_FOOTPRINT = 4e9
CATEGORIES = ["code", "math", "translation"]
N_ITEMS = 400


def _trial_row(tid: str, status: str = "done", **extra) -> dict:
    model, prec, cd, is_base, base = CONFIG[tid]
    row = {"trial_id": tid, "study": "hand", "model": model, "model_id": f"org/{model}", "precision": prec,
           "compute_dtype": cd, "precision_options": "{}", "is_baseline": is_base, "baseline_id": base,
           "status": status, "error_stage": None, "error_type": None, "error": None, "device": "cpu",
           "device_name": "test-cpu", "host": "testhost", "gpu_share": 0.0, "started_at": "2025-01-01T00:00:00",
           "finished_at": "2025-01-01T00:01:00", "stage_load_s": 1.0, "torch_version": "2.13.0",
           "transformers_version": "4.99.0", "graph_decode_error": GRAPH_ERROR if tid == "T1" else None}
    row.update(extra)
    return row


def _metric_rows(tid: str) -> list[dict]:
    load, fp, peak, pre, dec, seq, thr, ppl, arc, hella, wiki, kl = CELLS[tid]
    r = [dict(stage="load", metric="load_s", value=load), dict(stage="load", metric="weights_bytes", value=fp),
         dict(stage="load", metric="footprint_bytes", value=HF_FOOTPRINT),
         dict(stage="load", metric="allocated_bytes", value=fp * 1.01), dict(stage="load", metric="num_params", value=1e9),
         dict(stage="benchmark", metric="prefill_ms", value=pre, batch_size=1),
         dict(stage="benchmark", metric="decode_tok_s", value=dec, batch_size=1),
         dict(stage="benchmark", metric="decode_ms_per_token", value=1000 / dec, batch_size=1),
         dict(stage="benchmark", metric="sequence_ms", value=seq, batch_size=1),
         dict(stage="benchmark", metric="peak_memory_bytes", value=peak),
         dict(stage="perplexity", metric="token_perplexity", value=ppl),
         # acc differs from acc_norm so a wrong main-metric choice shows in the retention numbers
         dict(stage="tasks", task="arc_easy", metric="acc", value=arc - 0.1, stderr=0.02, n=N_ITEMS),
         dict(stage="tasks", task="arc_easy", metric="acc_norm", value=arc, stderr=0.02, n=N_ITEMS),
         dict(stage="tasks", task="hellaswag", metric="acc_norm", value=hella, stderr=0.02, n=N_ITEMS),
         dict(stage="tasks", task="wikitext", metric="word_perplexity", value=wiki, n=62),
         dict(stage="tasks", task="wikitext", metric="bits_per_byte", value=1.0, n=62)]
    r += [dict(stage="benchmark", metric="throughput_tok_s", value=v, batch_size=bs) for bs, v in thr.items()]
    if tid in GRAPH:
        r += [dict(stage="benchmark", metric="decode_graph_tok_s", value=GRAPH[tid], batch_size=1)]
    if kl is not None:
        r += [dict(stage="kl", metric="kl_mean", value=kl), dict(stage="kl", metric="top1_agreement", value=1 - kl)]
        r += [dict(stage="prompts", task=c, metric="kl_mean", value=kl * (i + 1)) for i, c in enumerate(CATEGORIES)]
        r += [dict(stage="prompts", task=c, metric="success_rate", value=1.0) for c in CATEGORIES]
    return [{"trial_id": tid, **x} for x in r]


def _baseline_items() -> np.ndarray:
    return (np.arange(N_ITEMS) % 5 != 0).astype(float)  # 320 / 400 correct = 0.80


def _samples(tid: str) -> pa.Table:
    """arc_easy acc_norm per item: T1 differs from the baseline by noise (4 items lost, 2 gained), T2 loses 40 items.
    acc items are identical for all trials, so picking acc instead of acc_norm would make T2 'within noise'."""
    b = _baseline_items()
    v = b.copy()
    right = np.flatnonzero(b == 1)
    wrong = np.flatnonzero(b == 0)
    if tid == "T1":
        v[right[:4]] = 0
        v[wrong[:2]] = 1
    elif tid == "T2":
        v[right[:40]] = 0
    n = N_ITEMS
    rows = {"trial_id": [tid] * 2 * n, "task": ["arc_easy"] * 2 * n, "doc_id": list(range(n)) * 2,
            "metric": ["acc_norm"] * n + ["acc"] * n, "value": list(v) + list(b), "correct": [x == 1 for x in v] + [x == 1 for x in b],
            "gold_loglik": [-1.0] * 2 * n, "filter": ["none"] * 2 * n}
    return pa.Table.from_pydict(rows)


def build_results(root: Path) -> Path:
    """The hand-built results set; returns its directory."""
    store = ResultsStore(root)
    store.write_study({"name": "hand", "models": ["m1", "m2"]})
    for tid in ("B", "T1", "T2", "T3", "M"):
        store.write_trial(_trial_row(tid), _metric_rows(tid), _samples(tid) if tid in ("B", "T1", "T2") else None)
    store.write_trial(_trial_row("F", status="failed", error_stage="load", error_type="OutOfMemoryError",
                                 error="CUDA out of memory. Tried to allocate 2.00 GiB"), [])
    return root


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory) -> Path:
    return build_results(tmp_path_factory.mktemp("res") / "hand")


@pytest.fixture(scope="module")
def cmp(results_dir) -> pl.DataFrame:
    return analysis.compare(open_results([str(results_dir)])).collect()


def _row(cmp: pl.DataFrame, tid: str) -> dict:
    rows = cmp.filter(pl.col("trial_id") == tid).to_dicts()
    assert len(rows) == 1, (tid, rows)
    return rows[0]


def test_one_row_per_trial_and_baseline_status(cmp):
    assert sorted(cmp.get_column("trial_id").to_list()) == ["B", "F", "M", "T1", "T2", "T3"]
    status = dict(zip(cmp.get_column("trial_id"), cmp.get_column("baseline_status")))
    assert status == {"B": "self", "T1": "ok", "T2": "ok", "T3": "ok", "F": "ok", "M": "missing"}


def test_derived_columns_known_answers(cmp):
    t1 = _row(cmp, "T1")
    approx = pytest.approx
    assert t1["speedup_decode"] == approx(0.5)
    assert t1["speedup_throughput"] == approx(0.5)  # batch 4: 30 vs 60
    assert t1["batch_size"] == 4 and t1["batch_tok_s"] == approx(30.0)
    assert t1["speedup_prefill"] == approx(0.5)  # 100 ms / 200 ms
    assert t1["speedup_sequence"] == approx(0.5)
    assert t1["speedup_load"] == approx(2.0)
    assert t1["memory_reduction"] == approx(0.5)
    assert t1["memory_reduction_peak"] == approx(0.2)
    assert t1["compression_ratio"] == approx(2.0)
    assert t1["gb_saved"] == approx(2.0)
    assert t1["weights_gb"] == approx(2.0) and t1["peak_gb"] == approx(4.0)
    assert t1["hf_footprint_gb"] == approx(4.0)  # shown under its own name, never the source of memory_reduction
    assert t1["speedup_decode_graph"] is None and t1["graph_decode_error"] == GRAPH_ERROR
    assert t1["retention_arc_easy"] == approx(0.78 / 0.80)  # acc_norm is arc_easy's main metric, not acc
    assert t1["retention_hellaswag"] == approx(1.0)
    assert t1["retention_wikitext"] == approx(20.0 / 22.0)  # lower-is-better: baseline / trial
    assert t1["retention_mean"] == approx((0.78 / 0.80 + 1.0) / 2)  # wikitext stays out of the mean
    assert t1["ppl_delta_pct"] == approx(5.0)
    assert t1["ppl_delta_per_gb_saved"] == approx(2.5)
    assert t1["kl_mean"] == approx(0.01)

    t2 = _row(cmp, "T2")
    assert t2["speedup_decode"] == approx(1.5)
    assert t2["speedup_decode_graph"] == approx(1.5) and t2["decode_graph_tok_s"] == approx(150.0)
    assert _row(cmp, "T3")["speedup_decode_graph"] == approx(1.6)
    assert t2["speedup_throughput"] == approx(2.0)
    assert t2["memory_reduction"] == approx(0.75) and t2["compression_ratio"] == approx(4.0)
    assert t2["ppl_delta_pct"] == approx(20.0)
    assert t2["ppl_delta_per_gb_saved"] == approx(20.0 / 3.0)
    assert t2["retention_mean"] == approx(0.9)

    b = _row(cmp, "B")
    assert b["speedup_decode"] == approx(1.0) and b["memory_reduction"] == approx(0.0)
    assert b["retention_mean"] == approx(1.0) and b["ppl_delta_pct"] == approx(0.0)
    assert b["ppl_delta_per_gb_saved"] is None  # nothing saved


def test_missing_baseline_is_marked_not_crashing(cmp):
    m = _row(cmp, "M")
    assert m["baseline_status"] == "missing"
    assert m["decode_tok_s"] == pytest.approx(25.0)  # its own numbers are there
    for c in ("speedup_decode", "speedup_throughput", "memory_reduction", "compression_ratio", "retention_mean",
              "retention_arc_easy", "ppl_delta_pct"):
        assert m[c] is None, c


def test_failed_trial_has_reason_and_no_metrics(cmp):
    f = _row(cmp, "F")
    assert f["status"] == "failed" and f["error_stage"] == "load" and "out of memory" in f["error"]
    assert f["speedup_decode"] is None and f["retention_mean"] is None


def test_failed_baseline_is_marked(tmp_path):
    root = tmp_path / "r"
    store = ResultsStore(root)
    store.write_trial(_trial_row("B", status="failed", error_stage="load", error="boom"), [])
    store.write_trial(_trial_row("T1"), _metric_rows("T1"))
    cmp = analysis.compare(open_results([str(root)])).collect()
    assert _row(cmp, "T1")["baseline_status"] == "failed"
    assert _row(cmp, "T1")["speedup_decode"] is None


def test_baseline_found_across_directories(tmp_path, results_dir):
    # the same model's baseline in one dir, a trial in another: the join works over all loaded dirs
    a, b = ResultsStore(tmp_path / "a"), ResultsStore(tmp_path / "b")
    a.write_trial(_trial_row("B"), _metric_rows("B"))
    b.write_trial(_trial_row("T2"), _metric_rows("T2"))
    cmp = analysis.compare(open_results([str(tmp_path / "a"), str(tmp_path / "b")])).collect()
    assert _row(cmp, "T2")["speedup_throughput"] == pytest.approx(2.0)
    only_b = analysis.compare(open_results([str(tmp_path / "b")])).collect()
    assert _row(only_b, "T2")["baseline_status"] == "missing"


def test_significance_noise_and_real_difference(results_dir):
    sig = analysis.significance(open_results([str(results_dir)]))
    by = {(r["trial_id"], r["task"]): r for r in sig.to_dicts()}
    assert set(by) == {("T1", "arc_easy"), ("T2", "arc_easy")}
    t1, t2 = by[("T1", "arc_easy")], by[("T2", "arc_easy")]
    assert t1["metric"] == "acc_norm" and t1["n"] == N_ITEMS
    assert t1["diff"] == pytest.approx(-2 / N_ITEMS)
    assert (t1["improved"], t1["regressed"]) == (2, 4)
    assert t1["ci_low"] < 0 < t1["ci_high"]
    assert t1["verdict"] == "within noise"
    assert t2["diff"] == pytest.approx(-0.1)
    assert t2["ci_high"] < 0
    assert t2["verdict"] == "worse"
    # deterministic: the same seed gives the same interval
    again = analysis.significance(open_results([str(results_dir)]))
    assert again.equals(sig)


def test_bootstrap_interval_matches_normal_theory():
    """The paired bootstrap of a mean metric: its interval of the difference is the normal-theory one."""
    rng = np.random.default_rng(1)
    d = rng.choice([-1.0, 0.0, 1.0], p=[0.1, 0.8, 0.1], size=2000)
    t, b = (d == 1).astype(float), (d == -1).astype(float)  # 0/1 items whose differences are d
    one = np.ones_like(d)
    r = analysis.Bootstrap(n_boot=4000).paired("mean", np.column_stack([one, t]), np.column_stack([one, b]))
    se = d.std() / math.sqrt(d.size)
    assert r["diff"] == pytest.approx(d.mean())
    assert r["ci_low"] == pytest.approx(d.mean() - 1.96 * se, abs=0.006)
    assert r["ci_high"] == pytest.approx(d.mean() + 1.96 * se, abs=0.006)
    # continuous items (every item its own category); same answer in expectation
    c = rng.normal(0.3, 1.0, size=500)
    r = analysis.Bootstrap(n_boot=2000).paired("mean", np.column_stack([np.ones(500), c]),
                                               np.column_stack([np.ones(500), np.zeros(500)]))
    se = c.std() / math.sqrt(c.size)
    assert r["ci_low"] == pytest.approx(c.mean() - 1.96 * se, abs=0.02)
    assert r["ci_high"] == pytest.approx(c.mean() + 1.96 * se, abs=0.02)


def test_better_verdict_and_group_pooling(tmp_path):
    # mmlu group: samples per subtask, pooled under the group; the trial gains 60 of 200 items -> better
    store = ResultsStore(tmp_path / "g")
    n = 100

    def samples(tid: str, gain: int) -> pa.Table:
        rows: dict[str, list] = {k: [] for k in ("trial_id", "task", "doc_id", "metric", "value", "filter")}
        for sub in ("mmlu_a", "mmlu_b"):
            v = [1.0 if i < 50 + (gain if tid != "B" else 0) else 0.0 for i in range(n)]
            rows["trial_id"] += [tid] * n
            rows["task"] += [sub] * n
            rows["doc_id"] += list(range(n))  # doc ids repeat across subtasks: pairs must match on (subtask, doc)
            rows["metric"] += ["acc"] * n
            rows["value"] += v
            rows["filter"] += ["none"] * n
        return pa.Table.from_pydict(rows)

    def metrics(tid: str, acc: float) -> list[dict]:
        return [dict(trial_id=tid, stage="tasks", task=t, metric="acc", value=acc) for t in ("mmlu", "mmlu_a", "mmlu_b")]

    groups = {"mmlu": ["mmlu_a", "mmlu_b"]}  # lm-eval's group_subtasks, as the tasks stage records it
    store.write_trial(_trial_row("B", task_groups=groups), metrics("B", 0.5), samples("B", 0))
    store.write_trial(_trial_row("T1", task_groups=groups), metrics("T1", 0.8), samples("T1", 30))
    res = open_results([str(tmp_path / "g")])
    sig = analysis.significance(res)
    assert sig.select("trial_id", "task", "n", "verdict").to_dicts() == [
        {"trial_id": "T1", "task": "mmlu", "n": 200, "verdict": "better"}]
    cmp = analysis.compare(res).collect()
    assert [c for c in cmp.columns if c.startswith("retention_")] == ["retention_mmlu", "retention_mean",
                                                                    "retention_mean_ppl"]




def test_pareto_fronts(cmp):
    p = analysis.pareto(cmp)
    front = {r["trial_id"]: (r["pareto_memory"], r["pareto_throughput"]) for r in p.to_dicts()}
    assert "F" not in front  # failed trials are not candidates
    # memory: B (4 GB, 1.0), T1 (2 GB, .9875), T2 (1 GB, .9) on the front; T3 (1 GB, .8) is dominated by T2
    # throughput: B (60, 1.0), T2 (120, .9), T3 (130, .8) on the front; T1 (30, .9875) is dominated by B
    assert front["B"] == (True, True)
    assert front["T1"] == (True, False)
    assert front["T2"] == (True, True)
    assert front["T3"] == (False, True)
    assert front["M"] == (None, None)  # no baseline -> no retention -> not on a front


def test_recommendations(cmp):
    rec = analysis.recommend(cmp)
    m1 = {r["scenario"]: r["trial_id"] for r in rec.filter(pl.col("model") == "m1").to_dicts()}
    assert m1 == {"max_throughput_within_1pct": "B",  # T1 retains 98.75% < 99%
                  "min_memory_within_3pct": "T1",
                  "best_quality": "T1"}
    m2 = {r["scenario"]: (r["trial_id"], r["reason"]) for r in rec.filter(pl.col("model") == "m2").to_dicts()}
    assert m2["max_throughput_within_1pct"][0] is None and "99%" in m2["max_throughput_within_1pct"][1]
    assert "fastest_load" not in m2  # load times compare caches, not precisions (issue 25)
    # m1's int8 trial has no kernel-level decode, so its speed is eager, and the reason says so and why
    speed = rec.filter((pl.col("model") == "m1") & (pl.col("scenario") == "max_throughput_within_1pct")).row(0, named=True)
    assert speed["speed_kind"] == "eager" and speed["value"] == pytest.approx(60.0)
    assert speed["reason"].startswith("batch_tok_s (eager generate, batch 4) = 60.0; kernel-level not used")
    assert f"int8/fp16: {GRAPH_ERROR}" in speed["reason"]
    mem = rec.filter((pl.col("model") == "m1") & (pl.col("scenario") == "min_memory_within_3pct")).row(0, named=True)
    assert mem["value"] == pytest.approx(2.0) and mem["reason"].startswith("weights_gb = 2.0")


def test_recommendation_prefers_kernel_level_speed_where_every_trial_has_it():
    """Q is faster than B at kernel level (CUDA-graph decode) and slower in eager generate: with every trial of the
    model measured at kernel level, Q is the fastest; once one trial lacks it, the eager numbers decide (B)."""
    cmp = pl.DataFrame({
        "model": ["x", "x"], "trial_id": ["B", "Q"], "precision": ["fp16", "w4a16"], "compute_dtype": ["bf16"] * 2,
        "status": ["done"] * 2, "is_baseline": [True, False], "load_s": [1.0, 2.0], "weights_gb": [16.0, 5.8],
        "retention_mean": [1.0, 0.995], "ppl_delta_pct": [0.0, 0.5], "batch_tok_s": [None, None],
        "batch_size": [None, None], "decode_tok_s": [42.0, 41.0], "decode_graph_tok_s": [112.0, 167.0],
        "graph_decode_error": [None, None]}, schema_overrides={"batch_tok_s": pl.Float64, "batch_size": pl.Int64})
    fast = analysis.recommend(cmp).filter(pl.col("scenario") == "max_throughput_within_1pct").row(0, named=True)
    assert (fast["trial_id"], fast["speed_kind"], fast["value"]) == ("Q", "kernel-level", 167.0)
    assert fast["reason"].startswith("decode_graph_tok_s (kernel-level")
    no_graph = cmp.with_columns(pl.when(pl.col("trial_id") == "Q").then(None).otherwise(pl.col("decode_graph_tok_s"))
                                .alias("decode_graph_tok_s"),
                                pl.when(pl.col("trial_id") == "Q").then(pl.lit("TorchRuntimeError: capture failed"))
                                .alias("graph_decode_error"))
    eager = analysis.recommend(no_graph).filter(pl.col("scenario") == "max_throughput_within_1pct").row(0, named=True)
    assert (eager["trial_id"], eager["speed_kind"], eager["value"]) == ("B", "eager", 42.0)
    assert "w4a16/bf16: TorchRuntimeError: capture failed" in eager["reason"]


def test_empty_results_dir(tmp_path):
    (tmp_path / "e" / "trials").mkdir(parents=True)
    res = open_results([str(tmp_path / "e")])
    cmp = analysis.compare(res).collect()
    assert cmp.height == 0 and "speedup_decode" in cmp.columns
    assert analysis.significance(res).height == 0
    assert analysis.pareto(cmp).height == 0
    assert analysis.recommend(cmp).height == 0


def test_empty_results_dir_frames_have_the_store_columns(tmp_path):
    """A sweep with nothing written yet still answers queries: every frame has the columns a file would have."""
    from sweeper.store import METRICS_SCHEMA, SAMPLES_SCHEMA, TRIALS_SCHEMA

    (tmp_path / "e" / "trials").mkdir(parents=True)
    res = open_results([str(tmp_path / "e")])
    assert res.trials.collect_schema().names() == TRIALS_SCHEMA.names
    assert res.metrics.collect_schema().names() == METRICS_SCHEMA.names
    assert res.samples.collect_schema().names() == SAMPLES_SCHEMA.names
    summary = res.summary().collect()
    assert summary.height == 0 and {"precision", "decode_tok_s", "load_s"} <= set(summary.columns)


def test_summary_task_column_never_mixes_metrics(tmp_path):
    """One trial has acc_norm and acc for arc_easy, the other only acc: the summary's arc_easy column is acc_norm for
    both (null where a trial lacks it), as in compare, never acc_norm for one row and acc for the next."""
    store = ResultsStore(tmp_path / "mix")
    store.write_study({"name": "hand"})
    store.write_trial(_trial_row("B"), [{"trial_id": "B", "stage": "tasks", "task": "arc_easy", "metric": m, "value": v}
                                        for m, v in (("acc_norm", 0.8), ("acc", 0.7))])
    store.write_trial(_trial_row("T1"), [{"trial_id": "T1", "stage": "tasks", "task": "arc_easy", "metric": "acc",
                                          "value": 0.6}])
    res = open_results([str(tmp_path / "mix")])
    by = dict(zip(*res.summary().collect().select("trial_id", "arc_easy").to_dict(as_series=False).values()))
    assert by == {"B": 0.8, "T1": None}
    cmp = analysis.compare(res).collect()
    assert dict(zip(cmp["trial_id"], cmp["arc_easy"])) == by
