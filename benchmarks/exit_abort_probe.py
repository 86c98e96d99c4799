"""How often does `sweep results` on a bucket with a damaged object abort as it exits? (sweeper/location.py's
open_regular: a Parquet reader over the Python bytes object made Arrow's pool threads free it, which needs the GIL,
and one that did so while the interpreter was exiting aborted the process with SIGABRT.)

    python3 benchmarks/exit_abort_probe.py s3|gs RUNS RESULTS_FOLDER

RESULTS_FOLDER: a finished local results folder (of `sweep launch studies/demo.py`, say); a copy goes to a local
emulator (moto for s3, fake-gcs-server for gs) with one metrics object damaged, then `sweep results` runs RUNS times.
"""
from __future__ import annotations

import collections
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import GcsBucket, S3Bucket, fake_gcs, moto_s3  # noqa: E402

scheme, runs, folder = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
with (moto_s3 if scheme == "s3" else fake_gcs)("bucket-x") as env:
    bucket = (S3Bucket if scheme == "s3" else GcsBucket)("bucket-x", env)
    victim = sorted(folder.glob("data/*.metrics.parquet"))[0]
    for p in folder.rglob("*"):
        if p.is_file():
            bucket.put(f"damaged/{p.relative_to(folder)}", b"not parquet at all" if p == victim else p.read_bytes())
    codes = collections.Counter()
    for _ in range(runs):
        r = subprocess.run([sys.executable, "-m", "sweeper.cli", "results", f"{scheme}://bucket-x/damaged"],
                           env={**os.environ, **env}, capture_output=True, text=True)
        codes[(r.returncode, (r.stderr.strip().splitlines() or [""])[-1][:60])] += 1
    print(scheme, runs, dict(codes), flush=True)
