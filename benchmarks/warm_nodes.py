"""Per-trial start-up on each node of the two-node harness (tests/cluster_harness.py): the launching (head) node
against a worker node that shares neither /tmp nor the results folder with it.

    SWEEPER_HARNESS_PORT_BASE=6600 python3 benchmarks/warm_nodes.py --rounds 2 [--preload] [-- --no-warm-workers]

The study: ../shared/data/models/llama-4m x fp32, bf16, fp16, int8, nf4, fp4 x compute fp32, bf16, fp16 (the fast test
benchmark, no KL, one CPU a trial; each node has one CPU, so one trial at a time runs on each). Per launch it prints,
per node: the trials it ran, how many ran in a process warmed before the trial (``warm_worker``), and the medians of
the driver's "scheduled" event (``_tune/events.jsonl``) -> the row's ``load_started_at`` and of the first trial of
each process; and the launch's wall time. With --preload, each next launch starts once every node has its preloaded
processes again (as many as the launch's trials took there: sweeper/node_refill.py), as a user's next launch a while
later finds them. Arguments after ``--`` go to `sweep launch`.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO.parent / "shared" / "data" / "models" / "llama-4m"
sys.path.insert(0, str(REPO / "tests"))

STUDY = '''from sweeper import Benchmark, Resources, Study
study = Study(name="warm-nodes", models=[{model!r}], precisions=["fp32", "bf16", "fp16", "int8", "nf4", "fp4"],
              compute_dtypes=["fp32", "bf16", "fp16"], kl=False, resources=Resources(cpus_per_trial=1),
              benchmark=Benchmark(prompt_tokens=16, new_tokens=4, batch_sizes=(1, 2), repeats=2, warmup=0))
'''


def one_launch(cluster, study: Path, name: str, extra: list[str]) -> dict[str, int]:
    """One launch, printed; returns how many Ray processes its trials ran in on each node ("head", "worker")."""
    from sweeper.results import open_results

    results = cluster.results_root / name
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "sweeper.cli", "launch", str(study), "--address", cluster.address,
                           "--results", str(results), *extra], cwd=study.parent, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"launch failed ({done.returncode}):\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    scheduled, fits = {}, []
    for line in (results / "_tune" / "events.jsonl").read_text().splitlines():
        e = json.loads(line)
        if e["event"] == "scheduled":
            scheduled[e["trial_id"]] = e["at"]
        elif e["event"] == "fit":
            fits.append(e["at"])
    rows = open_results(str(results)).trials.collect().to_dicts()
    print(f"{name}: wall {wall:.1f}s, {len(rows)} trials", flush=True)
    took = {label: len({r["ray_worker_started_at"] for r in rows if r["ray_node_id"] == node})
            for label, node in (("head", cluster.head_node_id), ("worker", cluster.worker_node_id))}
    for label, node in (("head  ", cluster.head_node_id), ("worker", cluster.worker_node_id)):
        mine = [r for r in rows if r["ray_node_id"] == node]
        if not mine:
            print(f"  {label}: no trial")
            continue
        startup = [r["load_started_at"] - scheduled[r["trial_id"]] for r in mine]
        first = [r["load_started_at"] - scheduled[r["trial_id"]] for r in mine if r["worker_trial_index"] == 0]
        # the load's own imports (transformers' model classes, ...) fall after load_started_at in a cold process
        loaded = [r["load_started_at"] + r["stage_load_s"] - scheduled[r["trial_id"]] for r in mine
                  if r["worker_trial_index"] == 0]
        # a process Ray started before Tune began: one the node (or the launch's connect) started ahead, not for a trial
        ahead = {r["ray_worker_started_at"] < min(fits) for r in mine}
        print(f"  {label}: {len(mine)} trials, {sum(bool(r['warm_worker']) for r in mine)} warm, "
              f"{sum(r.get('ray_worker_preloaded_at') is not None for r in mine)} preloaded, "
              f"Ray processes started before Tune: {sorted(ahead)}, "
              f"{len({r['worker_pid'] for r in mine})} processes; scheduled -> load start median "
              f"{statistics.median(startup):.3f}s (max {max(startup):.3f}s), first trial of a process median "
              f"{statistics.median(first):.3f}s (to the load's end {statistics.median(loaded):.3f}s)", flush=True)
        for r in sorted(mine, key=lambda r: r["load_started_at"])[:2]:  # where the first trials' start-up went
            print(f"    trial {r['worker_trial_index']} of pid {r['worker_pid']}: scheduled -> trainable "
                  f"{r['trainable_started_at'] - scheduled[r['trial_id']]:.3f}s, trainable -> load "
                  f"{r['load_started_at'] - r['trainable_started_at']:.3f}s; its process started "
                  f"{scheduled[r['trial_id']] - r['process_started_at']:.3f}s before it was scheduled"
                  + ("" if r.get("warm_worker_ready_at") is None else
                     f", warmed up in {r['warm_worker_ready_at'] - r['process_started_at']:.3f}s")
                  + ("" if r.get("ray_worker_preloaded_at") is None else
                     f", preloaded in {r['ray_worker_preloaded_at'] - r['ray_worker_started_at']:.3f}s"), flush=True)
    return took


def idle_rss_mb(cluster) -> list[int]:
    """Resident memory of the cluster's idle Ray worker processes (`ray::IDLE`), in MB."""
    from cluster_harness import members

    out = []
    for pid in members(cluster.base_port):
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::IDLE"):
                rss = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                           if line.startswith("VmRSS:"))
                out.append(int(rss.split()[1]) // 1000)
        except (OSError, StopIteration):
            continue
    return sorted(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--preload", action="store_true",
                    help="start both nodes as cluster.yaml does: idle workers that preload sweeper.node_preload")
    args, extra = ap.parse_known_args()
    extra = [a for a in extra if a != "--"]
    from cluster_harness import TwoNodeCluster

    work = Path(tempfile.mkdtemp(prefix="warm-nodes-"))
    study = work / "study.py"
    study.write_text(STUDY.format(model=str(MODEL)))
    print(f"python {sys.version.split()[0]}; two-node harness, 1 CPU a node, preload {args.preload}; launch args: "
          f"{extra}", flush=True)
    with TwoNodeCluster(preload=args.preload) as cluster:
        if args.preload:  # what the preloaded idle processes hold, before any launch
            print(f"idle Ray processes of the two nodes, resident MB: {idle_rss_mb(cluster)}", flush=True)
        for r in range(args.rounds):
            before = cluster.preloaded_counts() if args.preload else None
            took = one_launch(cluster, study, f"round{r + 1}", extra)
            if args.preload and r + 1 < args.rounds:  # the next launch comes once the nodes preloaded again
                t0 = time.monotonic()
                counts = cluster.wait_preloaded(before=before, more=took, timeout_s=90)
                print(f"  nodes preloaded again {time.monotonic() - t0:.1f}s after the launch ended: {counts}",
                      flush=True)


if __name__ == "__main__":
    main()
