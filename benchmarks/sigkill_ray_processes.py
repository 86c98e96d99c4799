"""Which of a private Ray instance's processes outlive a `sweep launch` killed by SIGKILL mid-trial, and for how
long (the figure tests/test_e2e.py::test_resume_after_sigkill_redoes_nothing and docs/reliability.md quote).

    python3 benchmarks/sigkill_ray_processes.py > benchmarks/logs/sigkill_ray_processes.txt

llama-4m x fp32/bf16/int8/nf4, one trial at a time; the launch is killed 2 s after its first trial started, then
its descendant processes (listed just before the kill) are listed every 5 s until none runs (at most 150 s).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from helpers import descendant_pids, small_study  # noqa: E402


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="sigkill-ray-"))
    study = small_study(work / "s.py", REPO.parent / "shared" / "data" / "models" / "llama-4m",
                        ["fp32", "bf16", "int8", "nf4"], "sigkill")
    p = subprocess.Popen([sys.executable, "-m", "sweeper.cli", "launch", str(study), "--results", str(work / "res"),
                          "--max-concurrent", "1"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True)
    for line in p.stdout:
        if "started" in line:
            break
    time.sleep(2)
    procs = descendant_pids(p.pid)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    t0 = time.time()
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())} UTC; killed launch {p.pid}; {len(procs)} descendants")
    while True:
        left = descendant_pids(None, procs)
        names = sorted({cmd.split(b" ")[0][-40:].decode(errors="replace") for cmd in left.values()})
        print(f"{time.time() - t0:5.1f}s after the kill, {len(left)} left: {names}", flush=True)
        if not left or time.time() - t0 > 150:
            break
        time.sleep(5)


if __name__ == "__main__":
    main()
