"""Kill `sweep launch` with SIGKILL at random moments N times, relaunch, and check the invariants.

    python benchmarks/kill_resume.py --kills 10 --model ../shared/data/models/llama-4m

After the kills a final launch runs to completion; the script then checks: every trial done exactly once, every
trial file that existed after a kill is byte-identical at the end, no temporary files visible under their final names,
every Parquet file readable. It prints one line per kill (the moment, the files present) and a verdict; exit 1 on any
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

import polars as pl


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
        files = sorted((results / "trials").glob("*.parquet")) if (results / "trials").is_dir() else []
        for f in files:
            data = f.read_bytes()
            if seen.setdefault(f.name, data) != data:
                bad.append(f"kill {k + 1}: {f.name} changed after it was finished")
        for sub in ("trials", "metrics", "refs"):
            for f in (results / sub).glob("*.parquet") if (results / sub).is_dir() else []:
                try:
                    pl.read_parquet(f)
                except Exception as e:
                    bad.append(f"kill {k + 1}: unreadable {f}: {e}")
        print(f"kill {k + 1}/{args.kills} after {delay:5.1f}s: {len(files)} of 12 trial files", flush=True)
    final = subprocess.run(cmd, capture_output=True, text=True)
    if final.returncode != 0:
        bad.append(f"final launch exited {final.returncode}: {final.stderr[-500:]}")
    t = pl.read_parquet(str(results / "trials" / "*.parquet"))
    if t["trial_id"].n_unique() != t.height or set(t["status"]) != {"done"}:
        bad.append(f"final state: {t.height} rows, statuses {sorted(set(t['status']))}")
    for name, data in seen.items():
        if (results / "trials" / name).read_bytes() != data:
            bad.append(f"{name} changed after it was finished")
    print(f"{t.height} trials, {t['trial_id'].n_unique()} unique, statuses {sorted(set(t['status']))}; "
          f"{len(seen)} finished before the last kill, all byte-identical: {not bad}")
    for b in bad:
        print("VIOLATION:", b)
    print("OK" if not bad else "FAILED", f"(results in {results})")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
