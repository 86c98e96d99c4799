"""How often does `sweep results` on a bucket or folder with a damaged file abort as it exits? (sweeper/location.py's
open_regular: a Parquet reader over Python bytes (an object's, or a Python file object's reads) made Arrow's pool
threads free them, which needs the GIL, and one that did so while the interpreter was exiting aborted the process
with SIGABRT.)

    python3 benchmarks/exit_abort_probe.py s3|gs|local RUNS RESULTS_FOLDER

RESULTS_FOLDER: a finished local results folder (of `sweep launch studies/demo.py`, say); a copy goes to a local
emulator (moto for s3, fake-gcs-server for gs) with one metrics object damaged, or to a temporary folder (local) with
a FIFO in place of one metrics file, then `sweep results` runs RUNS times.
"""
from __future__ import annotations

import collections
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import GcsBucket, S3Bucket, fake_gcs, moto_s3  # noqa: E402

from sweeper.store import ResultsStore  # noqa: E402

scheme, runs, folder = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
# the first trial's committed metrics file
victim = folder / sorted(live.files["metrics"] for live in ResultsStore(folder).state().trials.values())[0]
with (moto_s3("bucket-x") if scheme == "s3" else fake_gcs("bucket-x") if scheme == "gs"
      else contextlib.nullcontext({})) as env, tempfile.TemporaryDirectory() as tmp:
    if scheme == "local":
        where = str(Path(tmp) / "damaged")
        shutil.copytree(folder, where)
        # a FIFO in its place (as tests/test_store.py::test_fifo_is_refused_not_waited_on, which met the abort)
        (Path(where) / victim.relative_to(folder)).unlink()
        os.mkfifo(Path(where) / victim.relative_to(folder))
    else:
        bucket = (S3Bucket if scheme == "s3" else GcsBucket)("bucket-x", env)
        for p in folder.rglob("*"):
            if p.is_file():
                bucket.put(f"damaged/{p.relative_to(folder)}", b"not parquet at all" if p == victim else p.read_bytes())
        where = f"{scheme}://bucket-x/damaged"
    codes = collections.Counter()
    for _ in range(runs):
        r = subprocess.run([sys.executable, "-m", "sweeper.cli", "results", where],
                           env={**os.environ, **env}, capture_output=True, text=True)
        codes[(r.returncode, (r.stderr.strip().splitlines() or [""])[-1][:60])] += 1
    print(scheme, runs, dict(codes), flush=True)
