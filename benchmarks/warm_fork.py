"""Warm workers forked from one parent that imported once, vs each worker importing everything itself, side by side
on this machine (CPU): seconds from the pool's start until every worker is ready, and the CPU seconds they used.

    python3 benchmarks/warm_fork.py --rounds 3 > benchmarks/logs/warm_fork_cpu.txt
    python3 benchmarks/warm_fork.py --rounds 2 --gpu --workers 8 --model .gpu/h100/llama-4m   (on a GPU machine)
    python3 benchmarks/warm_fork.py --rounds 3 --launches > benchmarks/logs/warm_fork_launches_cpu.txt

Each round starts a pool of ``--workers`` CPU warm workers (sweeper.warm_pool.WarmPool) for trials of llama-4m with an
lm-eval task (so the workers import lm-eval and read its task index, as in a study with tasks) once with
``SWEEPER_WARM_FORK=1`` (the default) and once with ``0``, alternating which goes first; it claims every worker (a
claim waits for the worker's ready message), then reads the CPU time of the pool's processes from /proc before it
stops them. ``--gpu``: the workers are pinned to GPU 0, and the "fork" side sets ``SWEEPER_WARM_FORK=always`` (the
parent imports first and forks them if that is safe, else starts each after its imports; without it GPU workers are
always started at once); each worker's warm-up steps and the parent's line are printed.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from warm_workers import alternating  # noqa: E402

DATA = REPO.parent / "shared" / "data"


def options():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--gpu", action="store_true", help="workers pinned to GPU 0")
    ap.add_argument("--model", default=str(DATA / "models" / "llama-4m"))
    ap.add_argument("--launches", action="store_true",
                    help="compare whole `sweep launch`es (benchmarks/warm_workers.py's study) instead of pool starts")
    a, _ = ap.parse_known_args()  # --rounds is alternating()'s
    return a


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def start_pool(fork: bool, a) -> dict:
    from sweeper.study import Benchmark, Study, Task
    from sweeper.trials import expand
    from sweeper.warm_pool import WarmPool, claim

    # GPU workers: "always" makes the parent import first and try to fork them (it forks only CPU workers otherwise)
    os.environ["SWEEPER_WARM_FORK"] = ("always" if a.gpu else "1") if fork else "0"
    study = Study(name="fork-bench", models=[a.model], precisions=["fp32", "nf4"],
                  compute_dtypes=["fp32"], kl=False, benchmark=Benchmark(enabled=False), tasks=[Task("piqa")])
    key = "gpu:0" if a.gpu else "cpu"
    t0, started = time.perf_counter(), time.time()
    with WarmPool.start([key] * a.workers, expand(study)[0]) as pool:
        workers = [claim(pool.descriptor, key) for _ in range(a.workers)]
        claimed = time.perf_counter() - t0
        if any(w is None for w in workers):
            raise SystemExit(f"a worker did not start: {(pool.folder / 'parent.log').read_text()[-2000:]}")
        ready = max(w.ready["ready_at"] for w in workers) - started
        cpu = cpu_seconds(pool.procs[0].pid) + sum(cpu_seconds(w.pid) for w in workers)
        forked = {w.ready["forked"] for w in workers}
        for w in workers:
            print(f"  worker {w.pid}: ready {w.ready['ready_at'] - started:.2f}s, {json.dumps(w.ready['steps'])}",
                  flush=True)
            w.close()
        parent = (pool.folder / "parent.log").read_text(errors="replace").splitlines()
        print("  " + next((line for line in reversed(parent) if line.startswith("warm pool ")), "?"), flush=True)
    return {"fork": fork, "ready_s": ready, "claimed_s": claimed, "cpu_s": cpu, "forked": forked}


def medians(rows: list[dict], keys: tuple[str, ...]) -> None:
    for key in keys:
        f = statistics.median(r[key] for r in rows if r["fork"])
        s = statistics.median(r[key] for r in rows if not r["fork"])
        print(f"median {key}: fork {f:.2f} vs spawn {s:.2f} (spawn / fork x{s / f:.2f})")


def launches() -> None:
    from warm_workers import launch, setup

    work, study = setup("warm-fork-bench-", "")

    def run(fork: bool) -> dict:
        os.environ["SWEEPER_WARM_FORK"] = "1" if fork else "0"
        return {**launch(study, work / f"res-{int(fork)}", True), "fork": fork}

    rows = alternating(run, lambda fork, row: (
        f"{'fork ' if fork else 'spawn'}: wall {row['wall_s']:.1f}s, first load at {row['first_load_s']:.1f}s, "
        f"Tune trial -> load {row['to_load_s']:.2f}s (median), {row['in_warm_workers']}/{row['trials']} in warm workers"))
    medians(rows, ("wall_s", "first_load_s"))


def main() -> None:
    a = options()
    if a.launches:
        launches()
        return
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs; {a.workers} {'GPU 0' if a.gpu else 'CPU'} warm "
          f"workers for {Path(a.model).name} x fp32/nf4 with an lm-eval task (torch, transformers, bitsandbytes, "
          f"lm-eval and its task index)", flush=True)
    rows = alternating(lambda fork: start_pool(fork, a), lambda fork, row: (
        f"{'fork ' if fork else 'spawn'}: all {a.workers} ready {row['ready_s']:.2f}s after the pool's start, "
        f"claimed {row['claimed_s']:.2f}s, CPU {row['cpu_s']:.1f}s (forked: {sorted(row['forked'])})"))
    medians(rows, ("ready_s", "cpu_s"))


if __name__ == "__main__":
    main()
