"""A launch's private Ray instance as sweep starts it vs as Ray comes: Tune trial start-up side by side (CPU).

    python3 benchmarks/ray_idle_workers.py --rounds 3 > benchmarks/logs/ray_idle_workers_cpu.txt
    python3 benchmarks/ray_idle_workers.py --memory --rounds 3 > benchmarks/logs/ray_idle_workers_memory_cpu.txt

A local `sweep launch` starts its Ray instance as sweeper/local_ray.py says: the trials' environment inherited (no
job runtime_env), Tune's actor runtime_env dropped where it changes nothing, Ray's idle workers importing Ray Tune and
sweeper's scheduler ahead, and no API server: Ray then runs each Tune trial in a worker process it started with the
instance. SWEEPER_RAY_AS_IS=1 starts Ray as it comes (a fresh process per Tune trial actor, which imports Ray, then
Ray Tune when it unpickles the trial; the API server started and waited for). The study is warm_workers.py's (llama-4m x 4 precisions,
perplexity only, `--num-cpus 2`), launched with warm workers, alternating which way goes first. Reported per launch:
its wall time; Tune's start (the phase's "fit" event in `_tune/events.jsonl`) -> the first and the median Tune trial
function start; the median Ray worker process start relative to Tune's start (negative: up before Tune started); the
first load and the `ray:` line (Ray ready), in seconds since the launch started.

`--memory`: instead of launches, a private instance started as a launch starts it (`scheduler.connect(num_cpus=2)`)
both ways, alternating; after 15 s (the idle workers have preloaded) the resident memory of each idle Ray worker.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from warm_workers import REPO, alternating, setup  # noqa: E402


def launch(study: Path, results: Path, fresh_workers: bool) -> dict:
    from sweeper.results import open_results

    cmd = [sys.executable, "-m", "sweeper.cli", "launch", str(study), "--results", str(results), "--fresh",
           "--num-cpus", "2"]
    env = {**os.environ, "SWEEPER_RAY_AS_IS": "1" if fresh_workers else "0"}
    started = time.time()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    out, ray_ready = [], None
    for line in proc.stdout:
        out.append(line)
        if line.startswith("ray:") and ray_ready is None:
            ray_ready = time.perf_counter() - t0
    rc = proc.wait()
    wall = time.perf_counter() - t0
    if rc != 0:
        raise SystemExit(f"launch failed ({rc}):\n{''.join(out)[-4000:]}")
    t = open_results(str(results)).trials.collect()  # the committed rows (docs/store.md)
    events = [json.loads(line) for line in (results / "_tune" / "events.jsonl").read_text().splitlines()]
    fit = next(e for e in events if e["event"] == "fit")
    assert fit["actor_runtime_env"] == fresh_workers, fit
    entered = (t["trainable_started_at"] - fit["at"]).to_list()
    return {"fresh": fresh_workers, "wall_s": wall, "first_trial_s": min(entered),
            "trial_s": statistics.median(entered),
            "ray_worker_s": statistics.median((t["ray_worker_started_at"] - fit["at"]).to_list()),
            "first_load_s": t["load_started_at"].min() - started, "ray_ready_s": ray_ready, "trials": t.height}


MEMORY_PROBE = """
import time, psutil
from sweeper import scheduler
scheduler.connect(num_cpus=2)
time.sleep(15)
for p in psutil.process_iter(["cmdline", "memory_info"]):
    if "ray::IDLE" in " ".join(p.info["cmdline"] or []):
        print("idle_worker_rss_mb", round(p.info["memory_info"].rss / 2**20, 1))
scheduler.disconnect()
"""


def worker_memory(fresh_workers: bool) -> dict:
    env = {**os.environ, "SWEEPER_RAY_AS_IS": "1" if fresh_workers else "0"}
    r = subprocess.run([sys.executable, "-c", MEMORY_PROBE], cwd=REPO, capture_output=True, text=True, env=env,
                       timeout=300)
    rss = [float(line.split()[1]) for line in r.stdout.splitlines() if line.startswith("idle_worker_rss_mb")]
    if r.returncode != 0 or not rss:
        raise SystemExit(f"memory probe failed ({r.returncode}):\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
    return {"fresh": fresh_workers, "rss_mb": statistics.median(rss), "workers": len(rss)}


def main() -> None:
    if "--memory" in sys.argv:
        sys.argv.remove("--memory")
        rows = alternating(worker_memory, lambda fresh, row: (
            f"{'Ray as is  ' if fresh else 'sweep Ray  '}: idle Ray worker RSS {row['rss_mb']:.1f} MB (median of "
            f"{row['workers']})"), first=False)
        for fresh in (False, True):
            print(f"median idle worker RSS, {'Ray as is' if fresh else 'sweep Ray'}: "
                  f"{statistics.median(r['rss_mb'] for r in rows if r['fresh'] == fresh):.1f} MB")
        return
    work, study = setup("idle-bench-", ", warm workers")
    rows = alternating(lambda fresh: launch(study, work / f"res-{int(fresh)}", fresh), lambda fresh, row: (
        f"{'Ray as is  ' if fresh else 'sweep Ray  '}: wall {row['wall_s']:.1f}s, Ray ready at "
        f"{row['ray_ready_s']:.1f}s, Tune start -> first trial {row['first_trial_s']:.2f}s, median trial "
        f"{row['trial_s']:.2f}s, median Ray worker started {row['ray_worker_s']:+.2f}s, first load at "
        f"{row['first_load_s']:.1f}s ({row['trials']} trials)"), first=False)
    for key in ("wall_s", "ray_ready_s", "first_trial_s", "trial_s", "ray_worker_s", "first_load_s"):
        idle = statistics.median(r[key] for r in rows if not r["fresh"])
        fresh = statistics.median(r[key] for r in rows if r["fresh"])
        print(f"median {key}: sweep Ray {idle:.2f} vs Ray as is {fresh:.2f}")


if __name__ == "__main__":
    main()
