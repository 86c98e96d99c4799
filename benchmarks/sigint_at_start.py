"""Ctrl-C a launch as Ray starts, N times: how many launches stopped (exit 130 within 10 s) and how many hung.

    python benchmarks/sigint_at_start.py --launches 30 --model ../shared/data/models/llama-4m

Each launch is started as a shell script's background job starts it (SIGINT ignored, which the launch undoes), and
gets SIGINT `--delay` seconds (default 0.5) after its "warm workers:" line: the moment of the first case of
tests/test_interrupt.py, when the main thread starts Ray while a second thread imports Ray Tune. A launch still
running 60 s after the signal counts as hung: the script prints its threads (py-spy, when installed) and its last
lines, kills it and goes on. Exit 1 if any hung.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path


def launch_once(cmd: list[str], delay: float, hang_s: float) -> tuple[str, float, list[str]]:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(line.rstrip("\n") for line in proc.stdout), daemon=True)
    reader.start()
    while proc.poll() is None and not any("warm workers:" in line for line in lines):
        time.sleep(0.02)
    time.sleep(delay)
    at = time.monotonic()
    proc.send_signal(signal.SIGINT)
    try:
        rc = proc.wait(hang_s)
    except subprocess.TimeoutExpired:
        if shutil.which("py-spy"):
            subprocess.run(["py-spy", "dump", "--pid", str(proc.pid)], check=False)
        proc.kill()
        proc.wait()
        return "hung", time.monotonic() - at, lines
    reader.join(5)
    return str(rc), time.monotonic() - at, lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--launches", type=int, default=30)
    ap.add_argument("--delay", type=float, default=0.5, help="seconds from the 'warm workers:' line to the SIGINT")
    ap.add_argument("--model", default=str(Path(__file__).resolve().parents[1].parent / "shared/data/models/llama-4m"))
    ap.add_argument("--hang-s", type=float, default=60.0)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sigint-at-start-"))
    study = work / "study.py"
    study.write_text(textwrap.dedent(f"""
        from sweeper import *
        study = Study(name="stop", models=[{args.model!r}], precisions=["fp32", "bf16", "int8", "nf4"],
                      compute_dtypes=["fp32"],
                      benchmark=Benchmark(prompt_tokens=64, new_tokens=32, batch_sizes=(1, 4), repeats=6, warmup=1),
                      kl=KLSettings(wiki_tokens=128, wiki_seq_len=64, max_prompts_per_category=1, gen_tokens=4,
                                    continuation_tokens=4))
    """))
    outcomes: dict[str, int] = {}
    stop_s: list[float] = []
    for i in range(args.launches):
        cmd = [sys.executable, "-m", "sweeper.cli", "launch", str(study), "--results", str(work / f"res{i}"),
               "--max-concurrent", "1"]
        outcome, took, lines = launch_once(cmd, args.delay, args.hang_s)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        if outcome == "130":
            stop_s.append(took)
        print(f"launch {i}: {outcome} after {took:.2f}s" + ("" if outcome == "130" else
                                                            "; its output:\n  " + "\n  ".join(lines[-60:])), flush=True)
    stop_s.sort()
    print(f"{args.launches} launches, SIGINT {args.delay}s after 'warm workers:': "
          + ", ".join(f"{k}: {v}" for k, v in sorted(outcomes.items()))
          + (f"; exit 130 took median {stop_s[len(stop_s) // 2]:.2f}s, max {stop_s[-1]:.2f}s" if stop_s else ""))
    shutil.rmtree(work, ignore_errors=True)
    return 1 if outcomes.get("hung") else 0


if __name__ == "__main__":
    sys.exit(main())
