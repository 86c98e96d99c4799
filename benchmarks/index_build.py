"""A cold lm-eval task index: lm-eval's own build vs sweeper's parallel parse (sweeper.stages.task_index), side by side.

Rounds alternate which of the two goes first (so neither always meets a warmer file cache), in one process; each checks the two indexes
are equal. No cache is read or written.

    python benchmarks/index_build.py --rounds 4
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=4)
    a = ap.parse_args()

    import lm_eval
    from lm_eval.tasks._index import TaskIndex

    from sweeper.stages.task_index import parallel_build, parse_workers

    roots = [Path(lm_eval.__file__).parent / "tasks"]
    plain, parallel = [], []
    for r in range(a.rounds):
        timed: dict[str, float] = {}
        built: dict[str, dict] = {}
        # even rounds time lm-eval's build first, odd rounds the parallel one: neither always goes second (warmer)
        for which in (("plain", "parallel") if r % 2 == 0 else ("parallel", "plain")):
            t0 = time.perf_counter()
            built[which] = TaskIndex.build(roots) if which == "plain" else parallel_build(TaskIndex.build, roots)
            timed[which] = time.perf_counter() - t0
        plain.append(timed["plain"])
        parallel.append(timed["parallel"])
        print(f"round {r + 1} ({'lm-eval first' if r % 2 == 0 else 'parallel first'}): lm-eval build "
              f"{timed['plain']:.2f}s, parallel {timed['parallel']:.2f}s, {len(built['parallel'])} entries, "
              f"equal {built['parallel'] == built['plain']}", flush=True)
    print(f"{os.cpu_count()} CPUs, {parse_workers()} parse workers at most, lm-eval {lm_eval.__version__}: "
          f"median lm-eval build {statistics.median(plain):.2f}s, parallel {statistics.median(parallel):.2f}s, "
          f"ratio x{statistics.median(plain) / statistics.median(parallel):.2f}")


if __name__ == "__main__":
    main()
