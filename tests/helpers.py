"""Helpers for tests that run the `sweep` command as a subprocess."""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import polars as pl


def sweep(*args: str, cwd: Path | None = None, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "sweeper.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=full_env)


def sweep_popen(*args: str, cwd: Path | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "sweeper.cli", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def wait_for(pred, timeout=300.0, every=0.1) -> bool:
    """Whether ``pred()`` became true within ``timeout`` seconds, asked every ``every`` seconds."""
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return True
        time.sleep(every)
    return False


def write_study(path: Path, body: str) -> Path:
    path.write_text("from sweeper import *\n" + textwrap.dedent(body))
    return path


def fast_benchmark() -> str:
    return "Benchmark(prompt_tokens=16, new_tokens=4, batch_sizes=(1, 2), repeats=2, warmup=0)"


def fast_kl() -> str:
    return "KLSettings(wiki_tokens=128, wiki_seq_len=64, max_prompts_per_category=1, gen_tokens=4, continuation_tokens=4)"


def small_study(path: Path, model: Path, precisions, name: str, kl: str = "False", extra: str = "") -> Path:
    """A study of one model over ``precisions`` at fp32 compute with the fast benchmark (``kl``: Python source)."""
    return write_study(path, f"""
        study = Study(
            name={name!r},
            models=[{str(model)!r}],
            precisions={list(precisions)!r},
            compute_dtypes=["fp32"],
            benchmark={fast_benchmark()},
            kl={kl},
            {extra}
        )
    """)


def read_trials(results: Path) -> pl.DataFrame:
    """The committed trial rows of a results folder (docs/store.md)."""
    from sweeper.results import open_results

    return open_results(str(results)).trials.collect()


def read_metrics(results: Path) -> pl.DataFrame:
    """The committed metric rows of a results folder."""
    from sweeper.results import open_results

    return open_results(str(results)).metrics.collect()


def committed_rows(results: Path) -> dict[str, bytes]:
    """trial_id -> the bytes of its committed row file (per-trial until compaction merges it), for the trials a
    results folder holds now; {} while it has none. Safe to call while a launch writes (commits are whole)."""
    from sweeper.store import ResultsStore

    if not Path(results).is_dir():
        return {}
    store = ResultsStore(results)
    return {tid: (Path(results) / live.files["trials"]).read_bytes() for tid, live in store.state().trials.items()}


@contextlib.contextmanager
def moto_s3(*buckets: str):
    """moto's standalone S3 server (a subprocess) on a free port of 127.0.0.1 outside 6000-6999 (the Ray test
    clusters' range), with ``buckets`` created; yields the AWS environment that reaches it (endpoint, dummy keys)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if not 6000 <= port < 7000:
            break
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "AKIASWEEPERTESTKEY01",
           "AWS_SECRET_ACCESS_KEY": "sweeper-test-secret-value-123", "AWS_DEFAULT_REGION": "us-east-1"}
    try:
        end = time.time() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.time() < end and proc.poll() is None, "moto's S3 server did not start"
                time.sleep(0.2)
        import boto3

        client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                              aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")
        for b in buckets:
            client.create_bucket(Bucket=b)
        yield env
    finally:
        proc.terminate()
        proc.wait(timeout=30)
