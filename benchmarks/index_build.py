"""A cold lm-eval task index: lm-eval's own build vs sweeper's parallel parse (sweeper.stages.task_index), side by side.

Rounds alternate the two (so neither always meets a warmer file cache), in one process; each checks the two indexes
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
        t0 = time.perf_counter()
        expected = TaskIndex.build(roots)
        t1 = time.perf_counter()
        got = parallel_build(TaskIndex.build, roots)
        t2 = time.perf_counter()
        plain.append(t1 - t0)
        parallel.append(t2 - t1)
        print(f"round {r + 1}: lm-eval build {t1 - t0:.2f}s, parallel {t2 - t1:.2f}s, "
              f"{len(got)} entries, equal {got == expected}", flush=True)
    print(f"{os.cpu_count()} CPUs, {parse_workers()} parse workers at most, lm-eval {lm_eval.__version__}: "
          f"median lm-eval build {statistics.median(plain):.2f}s, parallel {statistics.median(parallel):.2f}s, "
          f"ratio x{statistics.median(plain) / statistics.median(parallel):.2f}")


if __name__ == "__main__":
    main()
