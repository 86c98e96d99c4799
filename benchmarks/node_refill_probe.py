"""What Ray's raylet call behind sweeper/node_refill.py does, on one preloading node started here.

    python3 benchmarks/node_refill_probe.py [--port 6650]

Starts `ray start --head --num-cpus=2` with the node settings of cluster.yaml, then runs three jobs of two actors
(no runtime_env) each, timing their start and reading whether their processes had preloaded sweeper: the first on
the processes the node prestarted, the second after the first ended (none left), the third after
node_refill.refill. Then it refills a node that already has its processes (kept alive 60 s), with a 5 s
keep-alive, and counts the idle Ray processes as Ray ends the extra ones. Last, it changes the modification time of
one of sweeper's files (of the copy the node runs), counts the idle processes as they end (sweeper/node_preload.py's
watch), and runs a fourth job.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

JOB = '''
import os, sys, time, ray
ray.init(address="127.0.0.1:{port}", logging_level="ERROR")
@ray.remote(num_cpus=1)
class A:
    def where(self):
        return os.getpid(), getattr(sys.modules.get("sweeper.node_preload"), "preloaded_at", None)
t = time.perf_counter()
actors = [A.remote() for _ in range(2)]
got = [ray.get(a.where.remote()) for a in actors]
print(f"{{time.perf_counter() - t:.2f}}s; processes preloaded before the job: "
      f"{{[p is not None and p < {started} for _, p in got]}}; pids {{[pid for pid, _ in got]}}")
'''


def idle_processes() -> int:
    n = 0
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                n += (p / "cmdline").read_bytes().startswith(b"ray::IDLE")
            except OSError:
                pass
    return n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=6650)
    a = ap.parse_args()
    import ray

    from sweeper import local_ray, node_refill

    tmp = tempfile.mkdtemp(prefix="refill-probe-")
    code = Path(tmp) / "code"  # the node runs a copy of sweeper: the code change below must touch no checkout
    shutil.copytree(REPO / "sweeper", code / "sweeper", ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_enable_worker_prestart": "1",
           "RAY_preload_python_modules": local_ray.PRELOAD_MODULE, "PYTHONPATH": str(code)}
    os.environ["RAY_AUTH_MODE"] = "disabled"
    print(f"ray {ray.__version__}; {time.strftime('%Y-%m-%d %H:%M:%S %Z')}", flush=True)
    # --block: ending this process ends the node's, and no other Ray of the machine (`ray stop` would)
    node = subprocess.Popen(["ray", "start", "--head", "--block", f"--port={a.port}", "--num-cpus=2", "--num-gpus=0",
                             "--include-dashboard=false", f"--temp-dir={tmp}", f"--labels={local_ray.PRELOAD_LABEL}=1",
                             "--disable-usage-stats"], env=env, cwd=tmp, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    logs = Path(tmp) / "session_latest" / "logs"

    def wait_ready(n: int) -> float:
        t0 = time.monotonic()
        while (not logs.exists() or local_ray.preloaded_idle_workers(logs) < n) and time.monotonic() - t0 < 120:
            time.sleep(0.2)
        return time.monotonic() - t0

    def job(label: str) -> None:
        r = subprocess.run([sys.executable, "-c", JOB.format(port=a.port, started=time.time())], env=env, cwd=tmp,
                           capture_output=True, text=True)
        print(f"{label}: {r.stdout.strip() or r.stderr[-500:]}", flush=True)

    def refill(keep_alive: int) -> None:
        node_refill.KEEP_ALIVE_S = keep_alive
        ray.init(address=f"127.0.0.1:{a.port}", logging_level="ERROR")
        nodes = [n for n in ray.nodes() if n["Alive"]]
        ray.shutdown()
        print(f"  refill: {node_refill.refill(nodes, {n['NodeID']: 2 for n in nodes}) or 'asked'}", flush=True)

    try:
        print(f"node prestarted and preloaded 2 processes in {wait_ready(2):.1f}s", flush=True)
        job("job 1, the node's prestarted processes")
        time.sleep(2)
        job("job 2, after job 1 ended")
        time.sleep(2)
        refill(60)
        print(f"  the node preloaded 2 again in {wait_ready(4):.1f}s", flush=True)
        job("job 3, after the refill")
        time.sleep(2)
        refill(60)
        wait_ready(6)
        print(f"idle Ray processes with the node's 2 refilled: {idle_processes()}", flush=True)
        refilled_at = time.monotonic()
        refill(5)  # two more than one per CPU, kept alive 5 s, while the two before are kept alive 60 s
        wait_ready(8)
        seen = None
        while time.monotonic() - refilled_at < 80:
            n = idle_processes()
            if n != seen:
                print(f"  {time.monotonic() - refilled_at:.0f}s after a refill of a full node: {n} idle", flush=True)
                seen = n
            time.sleep(1)
        # sweeper's code changes on the node: its untaken preloaded processes end (node_preload's watch), and a
        # job then runs in processes that import the new code
        changed = code / "sweeper" / "trials.py"
        st = changed.stat()
        os.utime(changed, ns=(st.st_atime_ns, time.time_ns()))
        t0 = time.monotonic()
        while idle_processes() and time.monotonic() - t0 < 30:
            time.sleep(0.5)
        print(f"after a change of sweeper/trials.py: {idle_processes()} idle processes "
              f"{time.monotonic() - t0:.1f}s later", flush=True)
        job("job 4, after the code changed")
    finally:
        node.terminate()
        node.wait(60)


if __name__ == "__main__":
    main()
