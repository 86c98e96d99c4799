"""The environment a trial ran in, recorded with its row. Only allow-listed facts are collected (never environment
variables), and :func:`scrub` removes anything named like a secret from dicts that are stored."""
from __future__ import annotations

import functools
import importlib.metadata
import platform
import re
import socket
import subprocess
from pathlib import Path
from typing import Any

_SECRET_RE = re.compile(r"(token|secret|passw|api[_-]?key|access[_-]?key|credential|auth)", re.I)
PACKAGES = ("torch", "transformers", "accelerate", "bitsandbytes", "ray", "lm_eval", "polars", "pyarrow")


def scrub(d: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``d`` without keys that look like secrets (recursively)."""
    return {k: (scrub(v) if isinstance(v, dict) else v) for k, v in d.items() if not _SECRET_RE.search(str(k))}


def scrub_argv(argv: list[str]) -> list[str]:
    """A command line with the values of secret-looking options (and user:password@ in URLs) masked."""
    out, mask_next = [], False
    for a in argv:
        if mask_next:
            out.append("***")
            mask_next = False
            continue
        key, eq, _ = a.partition("=")
        if a.startswith("-") and _SECRET_RE.search(key):
            out.append(f"{key}=***" if eq else a)
            mask_next = not eq
            continue
        out.append(re.sub(r"://[^/@\s]+@", "://***@", a))
    return out


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg.replace("_", "-"))
    except importlib.metadata.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=1)
def git_sha() -> str | None:
    """The sweeper checkout's commit, if it runs from one."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


@functools.lru_cache(maxsize=1)
def static_environment() -> dict[str, Any]:
    from . import __version__

    env: dict[str, Any] = {
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "python_version": platform.python_version(),
        "sweeper_version": __version__,
        "sweeper_git_sha": git_sha(),
    }
    for p in PACKAGES:
        env[f"{p}_version"] = _version(p)
    return env


def device_environment(device: str) -> dict[str, Any]:
    import torch

    env: dict[str, Any] = {"device": device, "torch_threads": torch.get_num_threads()}
    if device == "cuda":
        i = torch.cuda.current_device()
        props = torch.cuda.get_device_properties(i)
        # the physical GPU (which of a node's GPUs Ray gave the trial), e.g. to tell packed trials' GPUs apart
        env.update(device_name=props.name, device_uuid=str(getattr(props, "uuid", "")) or None,
                   device_memory_bytes=int(props.total_memory),
                   device_capability=f"{props.major}.{props.minor}", cuda_version=torch.version.cuda)
        # every GPU the trial holds (one, or the whole GPUs of a trial bigger than one): Ray makes only those visible
        n = torch.cuda.device_count()
        env.update(gpu_count=n, gpu_devices=",".join(
            f"{torch.cuda.get_device_properties(j).name} {str(getattr(torch.cuda.get_device_properties(j), 'uuid', ''))}".strip()
            for j in range(n)))
    else:
        env.update(device_name=platform.processor() or platform.machine(), device_uuid=None, device_memory_bytes=None,
                   device_capability=None, cuda_version=None, gpu_count=0, gpu_devices=None)
    return env
