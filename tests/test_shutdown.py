"""A Ray shutdown that hangs must not hold `sweep launch` open: every result is on disk before it is called."""
from __future__ import annotations

import threading
import time


def test_hung_ray_shutdown_is_given_up_after_the_timeout(monkeypatch):
    import ray

    from sweeper import scheduler

    release = threading.Event()
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "shutdown", lambda: release.wait(30))  # stands in for a shutdown that never returns
    said: list[str] = []
    t0 = time.perf_counter()
    stopped = scheduler.disconnect(timeout_s=0.5, emit=said.append)
    release.set()
    assert stopped is False
    assert time.perf_counter() - t0 < 5
    assert said == ["warning: Ray did not stop within 0.5s; leaving it (every result is already written)"]


def test_prompt_shutdown_reports_stopped(monkeypatch):
    import ray

    from sweeper import scheduler

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    said: list[str] = []
    assert scheduler.disconnect(timeout_s=5, emit=said.append) is True
    assert said == []
