"""What the launch's input check costs on a cluster (sweeper/cluster_inputs.py), on the two-node harness (CPU).

    python3 benchmarks/cluster_input_check.py --rounds 5 > benchmarks/logs/cluster_input_check_cpu.txt

Starts tests/cluster_harness.py's two-node cluster (the worker node in its own mount namespace, as root), connects a
driver as `sweep launch --address` does, and times ``check_inputs_visible`` on a study with a local model folder and a
perplexity text that both nodes see (so every round runs the worker node's task to the end): the first round on a
worker node with no idle Ray worker of this job (a process start), then the later rounds.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from cluster_harness import TwoNodeCluster  # noqa: E402

SHARED = REPO.parent / "shared" / "data"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    with TwoNodeCluster() as cluster:
        code = textwrap.dedent(f"""
            import json, time, ray
            from sweeper import Study, Perplexity
            from sweeper.cluster_inputs import check_inputs_visible, local_inputs
            from sweeper.trials import expand
            study = Study(name="check", models=[{str(SHARED / 'models' / 'llama-4m')!r}], precisions=["fp32"],
                          compute_dtypes=["fp32"], perplexity=Perplexity(path={str(SHARED / 'wikitext-2' / 'test.txt')!r}),
                          kl=False)
            trials, _ = expand(study)
            ray.init(address={cluster.address!r}, logging_level="ERROR", log_to_driver=False)
            times = []
            for _ in range({args.rounds}):
                t0 = time.perf_counter()
                check_inputs_visible(trials, {cluster.address!r})
                times.append(time.perf_counter() - t0)
            print(json.dumps({{"inputs": len(local_inputs(trials)), "nodes": len(ray.nodes()), "seconds": times}}))
        """)
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=REPO)
        if run.returncode != 0:
            sys.exit(run.stderr[-3000:])
        out = json.loads(run.stdout.strip().splitlines()[-1])
    s = out["seconds"]
    with open("/proc/loadavg") as fh:  # the machine is shared: say how busy it was
        print(f"load average at the end (1/5/15 min): {' '.join(fh.read().split()[:3])}")
    print(f"two-node harness ({out['nodes']} nodes), {out['inputs']} local inputs, {len(s)} checks in one driver")
    print("seconds per check: " + ", ".join(f"{x:.3f}" for x in s))
    print(f"first (worker process start on the worker node): {s[0]:.3f} s; median of the rest: "
          f"{statistics.median(s[1:]):.3f} s")


if __name__ == "__main__":
    main()
