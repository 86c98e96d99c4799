"""Where a launch's trial actors go on the two-node harness (tests/cluster_harness.py, both nodes preloading, one CPU
each) when trials are short: the GCS's actor table sampled every 0.5 s from a second driver, each node's free CPUs,
and the head's Ray logs kept (gcs_server.out says when an actor was created and when its placement group was removed).

    SWEEPER_HARNESS_PORT_BASE=6600 python3 benchmarks/tune_reuse_probe.py --launches 5 --out /tmp/probe

Per launch (a fresh cluster each): the wall and the trials each node ran; in OUT: ``launch-N.txt`` (the launch's
output), ``samples-N.txt`` (time, free CPUs per node, actors: class, state, node, pid) and ``logs-N/`` (the head's).
The study is benchmarks/warm_nodes.py's (12 trials of about 1 s).
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))

SAMPLER = '''
import json, sys, time
import ray
from ray._private import state
ray.init(address=sys.argv[1], logging_level="ERROR")
while True:
    free = {n[:6]: r.get("CPU", 0.0) for n, r in state.available_resources_per_node().items()}
    actors = [(a.get("ActorClassName"), a.get("State"), (a.get("Address") or {}).get("NodeID", "")[:6], a.get("Pid"))
              for a in state.actors().values()]
    print(round(time.time(), 1), json.dumps(free), json.dumps(actors), flush=True)
    time.sleep(0.5)
'''


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--launches", type=int, default=5)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    from cluster_harness import TwoNodeCluster
    from warm_nodes import MODEL, STUDY

    from sweeper.results import open_results

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="tune-reuse-"))
    study = work / "study.py"
    study.write_text(STUDY.format(model=str(MODEL)))
    for k in range(args.launches):
        with TwoNodeCluster(preload=True) as c:
            with open(out / f"samples-{k}.txt", "w") as samples:
                sampler = subprocess.Popen([sys.executable, "-c", SAMPLER, c.address], stdout=samples,
                                           stderr=subprocess.DEVNULL)
                time.sleep(3)
                results = c.results_root / f"r{k}"
                t0 = time.time()
                done = subprocess.run([sys.executable, "-m", "sweeper.cli", "launch", str(study), "--address",
                                       c.address, "--results", str(results)], cwd=work, capture_output=True, text=True)
                wall = time.time() - t0
                sampler.kill()
            (out / f"launch-{k}.txt").write_text(f"started {t0}\nhead node {c.head_node_id}\nworker node "
                                                 f"{c.worker_node_id}\n{done.stdout}\n--- stderr\n{done.stderr}")
            shutil.copytree(c.state_dir / "ray" / "session_latest" / "logs", out / f"logs-{k}", dirs_exist_ok=True)
            rows = open_results(str(results)).trials.collect().to_dicts()
            ran = {label: sum(r["ray_node_id"] == node for r in rows)
                   for label, node in (("head", c.head_node_id), ("worker", c.worker_node_id))}
            print(f"launch {k}: wall {wall:.1f}s, trials per node {ran}; head {c.head_node_id[:6]}, worker "
                  f"{c.worker_node_id[:6]}", flush=True)


if __name__ == "__main__":
    main()
