"""Measurement helpers shared by the stages: latencies and peak memory of this process.

Following optimum-benchmark: on CUDA, latencies come from CUDA events recorded around the region and read after one
synchronize; on CPU from perf_counter. Every latency keeps its list of values; summaries carry median, min, max,
stdev and count. Memory is this process's own (torch's peak allocated on CUDA, peak RSS on CPU), never the device's.
"""
from __future__ import annotations

import functools
import os
import statistics
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import psutil


@functools.lru_cache(maxsize=1)
def process_started_at() -> float | None:
    """When this process started (epoch seconds, to 10 ms), from /proc: Linux only, else None. Read once.

    /proc gives the start in clock ticks since boot, rounded down; the time since boot is CLOCK_BOOTTIME's (exact),
    not /proc/uptime's (rounded down to 10 ms, which put the start up to 10 ms late)."""
    from pathlib import Path

    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        return time.time() - (time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, AttributeError):  # AttributeError: no CLOCK_BOOTTIME (not Linux)
        return None


def synchronize(device: str) -> None:
    if device == "cuda":
        import torch

        for i in range(torch.cuda.device_count()):  # every GPU the trial holds
            torch.cuda.synchronize(i)


class LatencyRecorder:
    """Records (start, end) marks; on CUDA as events, read after a single synchronize in :meth:`values_ms`."""

    def __init__(self, device: str):
        self.device = device
        self._marks: list = []

    def mark(self):
        if self.device == "cuda":
            import torch

            if torch.cuda.device_count() > 1:
                # a model split over several GPUs: an event on one GPU's stream misses the others' work, so every
                # GPU is synchronised and the host clock read
                synchronize(self.device)
                self._marks.append(time.perf_counter())
                return
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self._marks.append(ev)
        else:
            self._marks.append(time.perf_counter())

    def elapsed_ms(self) -> list[float]:
        """Milliseconds between consecutive marks."""
        if self.device == "cuda" and not all(isinstance(m, float) for m in self._marks):
            synchronize(self.device)
            return [a.elapsed_time(b) for a, b in zip(self._marks, self._marks[1:])]
        return [(b - a) * 1e3 for a, b in zip(self._marks, self._marks[1:])]


@dataclass
class Summary:
    values: list[float]
    median: float = field(init=False)
    min: float = field(init=False)
    max: float = field(init=False)
    stdev: float | None = field(init=False)

    def __post_init__(self):
        v = self.values
        self.median = statistics.median(v)
        self.min, self.max = min(v), max(v)
        self.stdev = statistics.stdev(v) if len(v) > 1 else None

    def metric(self, stage: str, name: str, unit: str, batch_size: int | None = None,
               transform: Callable[[float], float] | None = None) -> dict:
        """A metric row: value = median; stderr = stdev / sqrt(n) of the transformed values; min / max."""
        vals = [transform(x) for x in self.values] if transform else self.values
        s = Summary(vals)
        return {"stage": stage, "metric": name, "batch_size": batch_size, "value": s.median,
                "stderr": (s.stdev / len(vals) ** 0.5) if s.stdev is not None else None,
                "n": len(vals), "min": s.min, "max": s.max, "unit": unit}


def rss_bytes() -> int:
    return psutil.Process().memory_info().rss


class PeakMemory:
    """This process's peak memory over a region: CUDA peak allocated, or peak RSS on CPU.

    CPU: the kernel's high-water mark (VmHWM) is reset through /proc/self/clear_refs (Linux >= 4.0) so a reused
    worker reports this region's peak, not its lifetime's; where that is not allowed a 2 ms RSS sampler is used.
    """

    def __init__(self, device: str):
        self.device = device
        self.kind = "cuda_max_allocated" if device == "cuda" else "cpu_peak_rss"
        self.peak_bytes: int | None = None

    @contextmanager
    def track(self) -> Iterator["PeakMemory"]:
        if self.device == "cuda":
            import torch

            # every GPU the trial holds (one, or the whole GPUs of a trial bigger than one): the sum of their peaks
            gpus = range(torch.cuda.device_count())
            for i in gpus:
                torch.cuda.synchronize(i)
                torch.cuda.reset_peak_memory_stats(i)
            yield self
            for i in gpus:
                torch.cuda.synchronize(i)
            self.peak_bytes = int(sum(torch.cuda.max_memory_allocated(i) for i in gpus))
            return
        if _reset_hwm():
            yield self
            self.peak_bytes = _read_hwm()
            return
        self.kind = "cpu_peak_rss_sampled"
        stop = threading.Event()
        peak = [rss_bytes()]

        def sample():
            while not stop.wait(0.002):
                peak[0] = max(peak[0], rss_bytes())

        t = threading.Thread(target=sample, daemon=True)
        t.start()
        try:
            yield self
        finally:
            stop.set()
            t.join()
            self.peak_bytes = max(peak[0], rss_bytes())


def _reset_hwm() -> bool:
    try:
        with open(f"/proc/{os.getpid()}/clear_refs", "w") as fh:
            fh.write("5")
        return _read_hwm() is not None
    except OSError:
        return False


def _read_hwm() -> int | None:
    try:
        with open(f"/proc/{os.getpid()}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
