"""A launch with and without warm workers, side by side on this machine (CPU): wall time and each trial's start-up.

    python3 benchmarks/warm_workers.py --rounds 3 > benchmarks/logs/warm_workers_cpu.txt

The study: ../shared/data/models/llama-4m x fp32, bf16, nf4, int8 (compute fp32), perplexity over 2048 WikiText-2
tokens, the benchmark stage off, no KL, no tasks (so the trials are short and start-up shows). Each round runs
`sweep launch --fresh` once with warm workers and once with `--no-warm-workers`, alternating which goes first, with
`--num-cpus 2`. Reported per launch: its wall time; the first load's start, in seconds since the launch started; and,
per trial, Tune trial start -> load start and `stage_load_s` (medians over the launch's trials).
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"

STUDY = '''from sweeper import Benchmark, Perplexity, Study
study = Study(
    name="warm-bench",
    models=[{model!r}],
    precisions=["fp32", "bf16", "nf4", "int8"],
    compute_dtypes=["fp32"],
    kl=False,
    benchmark=Benchmark(enabled=False),
    perplexity=Perplexity({text!r}, context=128, max_tokens=2048),
)
'''


def launch(study: Path, results: Path, warm: bool) -> dict:
    from sweeper.results import open_results

    cmd = [sys.executable, "-m", "sweeper.cli", "launch", str(study), "--results", str(results), "--fresh",
           "--num-cpus", "2"] + ([] if warm else ["--no-warm-workers"])
    started = time.time()
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"launch failed ({done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    t = open_results(str(results)).trials.collect()  # the committed rows (docs/store.md)
    return {"warm": warm, "wall_s": wall, "first_load_s": t["load_started_at"].min() - started,
            "to_load_s": statistics.median((t["load_started_at"] - t["trainable_started_at"]).to_list()),
            "stage_load_s": statistics.median(t["stage_load_s"].to_list()),
            "in_warm_workers": int(t["warm_worker"].sum()), "trials": t.height}


def setup(prefix: str, note: str) -> tuple[Path, Path]:
    """A temporary folder with the study file in it; prints the machine and the study."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    study = work / "study.py"
    study.write_text(STUDY.format(model=str(DATA / "models" / "llama-4m"), text=str(DATA / "wikitext-2" / "test.txt")))
    print(f"python {sys.version.split()[0]}, {subprocess.run(['nproc'], capture_output=True, text=True).stdout.strip()}"
          f" CPUs; study: llama-4m x fp32/bf16/nf4/int8, perplexity 2048 tokens; --num-cpus 2{note}", flush=True)
    return work, study


def alternating(run, describe, first: bool = True) -> list[dict]:
    """``--rounds`` rounds of ``run(True)`` and ``run(False)``, which goes first alternating; each row printed as
    ``describe(round, flag, row)`` says."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    a, _ = ap.parse_known_args()  # the caller's own options are its business
    rows = []
    for r in range(a.rounds):
        for flag in ((first, not first) if r % 2 == 0 else (not first, first)):
            rows.append(run(flag))
            print(f"round {r + 1} {describe(flag, rows[-1])}", flush=True)
    return rows


def main() -> None:
    work, study = setup("warm-bench-", "")
    rows = alternating(lambda warm: launch(study, work / f"res-{int(warm)}", warm), lambda warm, row: (
        f"{'warm   ' if warm else 'no warm'}: wall {row['wall_s']:.1f}s, first load at {row['first_load_s']:.1f}s, "
        f"Tune trial -> load {row['to_load_s']:.2f}s, stage_load {row['stage_load_s']:.2f}s (medians), "
        f"{row['in_warm_workers']}/{row['trials']} in warm workers"))
    for key in ("wall_s", "first_load_s", "to_load_s", "stage_load_s"):
        w = statistics.median(r[key] for r in rows if r["warm"])
        c = statistics.median(r[key] for r in rows if not r["warm"])
        print(f"median {key}: warm {w:.2f} vs no warm {c:.2f} (no warm / warm x{c / w:.2f})" if w else
              f"median {key}: warm {w:.2f} vs no warm {c:.2f}")


if __name__ == "__main__":
    main()
