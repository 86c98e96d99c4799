"""Kill `sweep launch` with SIGKILL at random moments N times, relaunch, and check the invariants.

    python benchmarks/kill_resume.py --kills 10 --model ../shared/data/models/llama-4m

After the kills a final launch runs to completion; the script then checks: every trial done exactly once, every
trial committed done after a kill has the same row at the end (read through the store: docs/store.md), every
committed file whole. It prints one line per kill (the moment, the files present) and a verdict; exit 1 on any
violation. The same check with 3 kills runs in CI (tests/test_reliability.py).
"""
from __future__ import annotations

import argparse
import random
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from sweeper.results import open_results
from sweeper.store import ResultsStore


def committed(store: ResultsStore | None) -> dict[str, str]:
    """trial_id -> committed row (its repr: NaN equals NaN) of each done trial (a failed one may run again)."""
    if store is None:
        return {}
    done = [tid for tid, live in store.state().trials.items() if live.status == "done"]
    return {tid: repr(row) for tid, row in store.read_trial_rows(done).items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--model", default=str(Path(__file__).resolve().parents[1].parent / "shared/data/models/llama-4m"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-delay", type=float, default=40.0, help="kill within this many seconds of the launch")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="kill-resume-"))
    study = work / "study.py"
    study.write_text(textwrap.dedent(f"""
        from sweeper import *
        study = Study(name="kill-resume", models=[{args.model!r}],
                      precisions=["fp32", "fp16", "bf16", "int8", "nf4", "fp4"], compute_dtypes=["fp32", "bf16", "fp16"],
                      benchmark=Benchmark(prompt_tokens=32, new_tokens=16, batch_sizes=(1, 4), repeats=3, warmup=1),
                      kl=KLSettings(wiki_tokens=0, max_prompts_per_category=1, gen_tokens=2, continuation_tokens=2))
    """))
    results = work / "results"
    cmd = [sys.executable, "-m", "sweeper.cli", "launch", str(study), "--results", str(results), "--max-concurrent", "1"]
    seen: dict[str, bytes] = {}
    bad = []
    for k in range(args.kills):
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        delay = rng.uniform(0.5, args.max_delay)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        # the committed rows (docs/store.md): a finished trial's row never changes, whatever compaction merged
        store = ResultsStore(results) if results.is_dir() else None
        rows = committed(store)
        for tid, row in rows.items():
            if seen.setdefault(tid, row) != row:
                bad.append(f"kill {k + 1}: {tid} changed after it was finished")
        for f, why in store.damaged_files(full=True) if store is not None else []:
            bad.append(f"kill {k + 1}: unreadable {f}: {why}")
        print(f"kill {k + 1}/{args.kills} after {delay:5.1f}s: {len(rows)} of 12 trials committed", flush=True)
    final = subprocess.run(cmd, capture_output=True, text=True)
    if final.returncode != 0:
        bad.append(f"final launch exited {final.returncode}: {final.stderr[-500:]}")
    t = open_results(str(results)).trials.collect()
    if t["trial_id"].n_unique() != t.height or set(t["status"]) != {"done"}:
        bad.append(f"final state: {t.height} rows, statuses {sorted(set(t['status']))}")
    final_rows = committed(ResultsStore(results))
    for tid, row in seen.items():
        if final_rows.get(tid) != row:
            bad.append(f"{tid} changed after it was finished")
    print(f"{t.height} trials, {t['trial_id'].n_unique()} unique, statuses {sorted(set(t['status']))}; "
          f"{len(seen)} finished before the last kill, all unchanged: {not bad}")
    for b in bad:
        print("VIOLATION:", b)
    print("OK" if not bad else "FAILED", f"(results in {results})")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
