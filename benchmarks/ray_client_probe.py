"""Where a launch through a Ray client (`--address ray://...`) runs its trials on a preloading cluster (issue 22).

Starts the two-node test cluster (tests/cluster_harness.py, both nodes preloading as cluster.yaml starts them, the
head's Ray client server on base port + 8), launches 4 short trials through `ray://` (or, with --direct, through the
GCS address as on the head) and prints, per trial: its node, and when its Ray process started, finished its node
preload and began the load, in seconds since the launch began; then the raylets' log lines of processes that
ended, and whether each node got its preloaded processes back. Run as root (the harness's mount namespace):

    SWEEPER_HARNESS_PORT_BASE=6600 python3 benchmarks/ray_client_probe.py --rounds 3 [--direct]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

STUDY = '''from sweeper import Benchmark, Resources, Study
study = Study(name="client", models=[{model!r}], precisions=["fp32", "bf16", "fp16", "int8"], compute_dtypes=["fp32"],
              kl=False, resources=Resources(cpus_per_trial=1),
              benchmark=Benchmark(prompt_tokens=16, new_tokens=50, batch_sizes=(1,), repeats=2, warmup=0))
'''


def one_round(model: Path, direct: bool) -> None:
    from cluster_harness import TwoNodeCluster, _cmdline, _tagged, members
    from helpers import read_trials, sweep_popen

    with TwoNodeCluster(preload=True) as c, tempfile.TemporaryDirectory() as tmp:
        study = Path(tmp) / "study.py"
        study.write_text(STUDY.format(model=str(model)))
        began = c.preloaded_counts()
        results = c.results_root / "probe"
        t0 = time.time()
        proc = sweep_popen("launch", str(study), "--address", c.address if direct else c.client_address, "--results",
                           str(results), "--max-concurrent", "2", cwd=Path(tmp))
        out, _ = proc.communicate(timeout=900)
        print(f"launch rc {proc.returncode}, wall {time.time() - t0:.1f}s, progress lines {out.count('done in ')}")
        for r in sorted(read_trials(results).to_dicts(), key=lambda r: r["load_started_at"] or 0):
            def rel(v):
                return "-" if v is None else f"{v - t0:6.2f}"
            node = "head  " if r["ray_node_id"] == c.head_node_id else "worker"
            print(f"  {r['precision']:5s} {node} process started {rel(r['ray_worker_started_at'])} preloaded "
                  f"{rel(r['ray_worker_preloaded_at'])} load began {rel(r['load_started_at'])}")
        raylet = next(pid for pid in members(c.base_port) if _tagged(pid, {str(c.results_root)})
                      and b"raylet/raylet" in _cmdline(pid))
        root = Path(f"/proc/{raylet}/root")
        worker_logs = root / os.readlink(root / f"tmp/swh-{c.base_port}-worker/session_latest").lstrip("/") / "logs"
        for name, log in (("head", c.state_dir / "ray" / "session_latest" / "logs" / "raylet.out"),
                          ("worker", worker_logs / "raylet.out")):
            for line in log.read_text(errors="replace").splitlines():
                if "Disconnecting worker, graceful=true" in line:  # a process that ended by itself or idle-trimmed
                    print(f"  {name} raylet: {line[line.index('Disconnecting'):][:160]}")
        try:
            print(f"  preloaded again after the launch: {c.wait_preloaded(before=began, timeout_s=90)} "
                  f"(before it: {began})")
        except RuntimeError as e:
            print(f"  not preloaded again: {e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=REPO.parent / "shared" / "data" / "models" / "llama-4m")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--direct", action="store_true", help="join through the GCS address, not through ray://")
    a = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    print(time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "ray://" if not a.direct else "GCS address")
    for i in range(a.rounds):
        print(f"round {i + 1}")
        one_round(a.model, a.direct)


if __name__ == "__main__":
    main()
