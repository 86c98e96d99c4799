"""The private instance's trials in Ray's idle workers preloaded ahead, against the socket pool and against neither,
on this machine (CPU): launch walls side by side (issue 22).

    python3 benchmarks/private_preload_cpu.py --ray-tree /path/to/patched/checkout --rounds 2 [--at-once 1]

``--ray-tree``: a checkout of this repository with benchmarks/logs/private_preload.patch applied (its launches, with
SWEEPER_PRIVATE_PRELOAD=1, start as many Ray workers as trials run at once right after Ray is up, each preloading
sweeper.node_preload for the study); the pool and the plain runs use this checkout. The study is
benchmarks/warm_workers.py's (llama-4m x fp32/bf16/nf4/int8, perplexity only), ``--num-cpus 2``; ``--at-once 1``
adds ``--max-concurrent 1``. Each round runs the three launches in turn. Reported per launch: wall; the first load's
start in seconds since the launch began; median Tune trial -> load start; the rows that ran in a process warmed
ahead (a pool worker, or a preloaded Ray worker).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from warm_workers import DATA, STUDY  # noqa: E402


def launch(label: str, tree: Path, study: Path, results: Path, extra: list[str], env: dict[str, str]) -> dict:
    from sweeper.results import open_results

    cmd = [sys.executable, "-m", "sweeper.cli", "launch", str(study), "--results", str(results), "--fresh",
           "--num-cpus", "2", *extra]
    started, t0 = time.time(), time.perf_counter()
    done = subprocess.run(cmd, cwd=tree, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(tree), **env})
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{label}: launch failed ({done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    t = open_results(str(results)).trials.collect()
    warm = [line for line in done.stdout.splitlines() if line.startswith("warm workers")]
    row = {"label": label, "wall_s": wall, "first_load_s": t["load_started_at"].min() - started,
           "to_load_s": statistics.median((t["load_started_at"] - t["trainable_started_at"]).to_list()),
           "warm_rows": int((t["warm_worker"] | t["ray_worker_preloaded_at"].is_not_null()).sum()), "trials": t.height,
           "said": warm}
    print(f"{label:5s} wall {wall:5.1f}s, first load at {row['first_load_s']:5.1f}s, Tune trial -> load "
          f"{row['to_load_s']:.2f}s (median), {row['warm_rows']}/{t.height} rows warmed ahead {warm}", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ray-tree", required=True, type=Path)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--at-once", type=int, choices=(1, 2), default=2)
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="private-preload-"))
    study = work / "study.py"
    study.write_text(STUDY.format(model=str(DATA / "models" / "llama-4m"), text=str(DATA / "wikitext-2" / "test.txt")))
    extra = ["--max-concurrent", "1"] if a.at_once == 1 else []
    print(f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}; --num-cpus 2, {a.at_once} trial(s) at once; "
          f"ray tree {a.ray_tree}", flush=True)
    runs = [("pool", REPO, extra, {}), ("ray", a.ray_tree, extra, {"SWEEPER_PRIVATE_PRELOAD": "1"}),
            ("cold", REPO, extra + ["--no-warm-workers"], {})]
    rows = []
    for r in range(a.rounds):
        for label, tree, args, env in runs:
            rows.append(launch(label, tree, study, work / f"res-{label}", args, env))
    for label, *_ in runs:
        walls = [x["wall_s"] for x in rows if x["label"] == label]
        print(f"median wall {label}: {statistics.median(walls):.2f}s ({', '.join(f'{w:.1f}' for w in walls)})")


if __name__ == "__main__":
    main()
