"""Two import-side costs the code's comments quote, measured on this machine (CPU is enough):

1. importing bitsandbytes in a worker-like process (hqq hidden, transformers' Auto classes imported first): plainly
   vs through sweeper.import_guard.import_precision_library (module-level torch.compile deferred), each in a fresh
   process, in alternating rounds;
2. walking lm-eval's task folder for the task-index cache key: lm-eval's own TaskIndex._iter_yaml_files vs
   sweeper.stages.task_index.index_key's os.walk.

    python3 benchmarks/import_costs.py --rounds 3 > benchmarks/logs/import_costs_cpu.txt
"""
import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

IMPORT = """
import sys, time
from sweeper.import_guard import for_precision, import_precision_library
for_precision("nf4")
from transformers import AutoModelForCausalLM
t0 = time.perf_counter()
if sys.argv[1] == "plain":
    import bitsandbytes
else:
    import_precision_library("bitsandbytes")
print(time.perf_counter() - t0, "torch._inductor.compile_fx" in sys.modules)
"""

WALK = """
import time
from pathlib import Path
import lm_eval.tasks
from lm_eval.tasks._index import TaskIndex
from sweeper.stages.task_index import index_key
root = Path(lm_eval.tasks.__file__).parent
t0 = time.perf_counter(); n = sum(1 for _ in TaskIndex._iter_yaml_files(root)); t1 = time.perf_counter()
index_key([root], True); t2 = time.perf_counter()
print(n, t1 - t0, t2 - t1)
"""


def run(code: str, *args: str) -> list[str]:
    r = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True, timeout=600)
    if r.returncode:
        raise SystemExit(r.stderr[-2000:])
    return r.stdout.split()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, python {sys.version.split()[0]}")
    times: dict[str, list[float]] = {"plain": [], "deferred": []}
    for i in range(a.rounds):
        for how in ("plain", "deferred"):
            secs, inductor = run(IMPORT, how)
            times[how].append(float(secs))
            print(f"round {i + 1} {how:8s} import bitsandbytes {float(secs):.3f} s, inductor imported: {inductor}")
    for how, ts in times.items():
        print(f"{how:8s} median {statistics.median(ts):.3f} s (min {min(ts):.3f}, max {max(ts):.3f})")
    walks = [run(WALK) for _ in range(a.rounds)]
    for n, lm, ours in walks:
        print(f"walk of {n} YAML files: lm-eval's _iter_yaml_files {float(lm):.3f} s, index_key {float(ours):.3f} s")


if __name__ == "__main__":
    main()
