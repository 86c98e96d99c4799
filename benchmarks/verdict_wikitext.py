"""The perplexity verdict of issue 24, end to end on this machine (CPU): llama-4m fp32 (baseline) and fp4 on lm-eval's
wikitext task over the first 12 documents of ../shared/data/wikitext-2/test.txt (no benchmark, no KL), then what
compare, significance and the report say about it.

    python3 benchmarks/verdict_wikitext.py --out /tmp/verdict_wt > benchmarks/logs/verdict_wikitext_cpu.txt
    python3 benchmarks/verdict_wikitext.py --out /tmp/verdict_wt --reuse   (analyse an existing folder again)
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import polars as pl  # noqa: E402

from sweeper import analysis  # noqa: E402
from sweeper.report import build_report  # noqa: E402
from sweeper.results import open_results  # noqa: E402

DATA = REPO.parent / "shared" / "data"


def run(out: Path) -> None:
    from sweeper.runner import run_trial
    from sweeper.store import ResultsStore
    from sweeper.study import Benchmark, Model, Study, Task
    from sweeper.trials import expand

    study = Study(name="verdict_wt", models=[Model(str(DATA / "models" / "llama-4m"))], precisions=["fp32", "fp4"],
                  compute_dtypes=["fp32"], baseline="fp32", kl=False, benchmark=Benchmark(enabled=False),
                  eval_batch_size=4, tasks=[Task("wikitext", data=str(DATA / "wikitext-2" / "test.txt"), limit=12)])
    store = ResultsStore(out)
    store.write_study({"name": study.name})
    trials, _ = expand(study)
    for spec in sorted(trials, key=lambda t: not t.is_baseline):
        t0 = time.perf_counter()
        row = run_trial(spec, store, device="cpu")
        print(f"trial {spec.precision}: {row['status']} in {time.perf_counter() - t0:.1f} s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("/tmp/verdict_wt"))
    ap.add_argument("--reuse", action="store_true")
    a = ap.parse_args()
    if not a.reuse:
        run(a.out)
    res = open_results([str(a.out)])
    pl.Config.set_tbl_cols(40)
    pl.Config.set_tbl_width_chars(400)
    pl.Config.set_fmt_str_lengths(60)
    cmp = analysis.compare(res).collect()
    print("compare:")
    print(cmp.select("precision", "wikitext", "retention_wikitext", "retention_mean_ppl"))
    print("significance:")
    sig = analysis.significance(res)
    print(sig.select("precision", "task", "metric", "kind", "n", "baseline_score", "trial_score", "diff", "ci_low",
                     "ci_high", "diff_pct", "ci_low_pct", "ci_high_pct", "verdict"))
    data = build_report(res)
    print("report summary:")
    print(data.summary["llama-4m"].select("Precision", pl.selectors.starts_with("wikitext")))
    print("report significance:")
    print(data.significance.select("precision", "baseline", "trial", "diff", "95% CI", "change (95% CI)", "verdict"))
    print("recommendations:")
    print(analysis.recommend(cmp).select("scenario", "precision", "value", "quality_retention", "reason"))


if __name__ == "__main__":
    main()
