"""The private Ray instance of a launch (sweeper/local_ray.py), with real Ray."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import sweeper
from sweeper import local_ray

PROBE = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, os.getcwd())  # as `python -m sweeper.cli` run from a checkout finds it
    import ray
    import sweeper
    from sweeper import scheduler

    scheduler.connect(num_cpus=1)

    @ray.remote
    class Where:  # no runtime_env, as Tune's trial actors on a private instance: it runs in a prestarted worker
        def sweeper(self):
            module = sys.modules.get("sweeper")
            return module.__file__ if module else None

    print("driver", sweeper.__file__)
    print("worker", ray.get(Where.remote().sweeper.remote()))
    scheduler.disconnect()
""")


def test_workers_preload_the_drivers_sweeper_not_an_installed_one(tmp_path):
    # a checkout that is not the installed sweeper: Ray's idle workers import their preloaded modules before the
    # driver's sys.path reaches them, so they must find this copy through the PYTHONPATH they inherit
    checkout = tmp_path / "checkout"
    shutil.copytree(Path(sweeper.__file__).parent, checkout / "sweeper",
                    ignore=shutil.ignore_patterns("__pycache__"))
    r = subprocess.run([sys.executable, "-c", PROBE], cwd=checkout, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "SWEEPER_RAY_AS_IS": "0"})
    assert r.returncode == 0, r.stdout + r.stderr
    lines = dict(line.split(" ", 1) for line in r.stdout.splitlines() if line.startswith(("driver ", "worker ")))
    assert lines["driver"].startswith(str(checkout)), lines
    assert lines["worker"].startswith(str(checkout)), lines  # preloaded, and from the driver's copy


def test_tune_actors_keep_their_runtime_env_without_an_instance_of_ours():
    from ray.tune.execution import class_cache

    tunes = dict(class_cache.DEFAULT_ENV_VARS)
    assert tunes == local_ray.TUNE_ACTOR_ENV  # what the instance's processes inherit in its place
    local_ray.forget()
    with local_ray.tune_actors_without_runtime_env() as dropped:
        assert dropped is False
        assert class_cache.DEFAULT_ENV_VARS == tunes
