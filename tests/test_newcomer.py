"""A newcomer's first hour (issue 20): the README's and docs/tutorial.md's commands, run in order in a `git clone` of
the committed tree in a folder with no ../shared beside it (so only what the repository ships is there), plus the
progress line's estimate of the time left."""
from __future__ import annotations

import os
import re
import resource
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import pytest

from sweeper.launch import concurrent_slots
from sweeper.scheduler import Progress
from sweeper.study import Study
from sweeper.trials import expand

from helpers import moto_s3

REPO = Path(__file__).resolve().parents[1]
TUTORIAL = REPO / "docs" / "tutorial.md"


# ------------------------------------------------------------------------------------------------- progress (no Ray)
def test_progress_estimates_the_time_left():
    p = Progress(total=6, labels={}, slots=2)
    assert p.time_left() is None and "left" not in p.line()  # nothing finished: no estimate yet
    now = time.time()
    p.done |= {"a", "b"}
    p.durations += [10.0, 20.0]  # mean 15 s
    p.running.add("c")
    p.began["c"] = now - 4  # 11 s to go
    # 3 pending x 15 s + 11 s over 2 slots
    assert p.time_left(now) == pytest.approx((3 * 15 + 11) / 2)
    assert "~0:28 left" in p.line()
    p.done |= {"c", "d", "e"}
    p.running.clear()
    p.durations += [15.0, 15.0, 15.0]
    assert p.time_left(now) == pytest.approx(15.0)  # the last trial: one slot's work, not half of it
    p.done.add("f")
    assert "left" not in p.line()


def test_concurrent_slots_from_the_cluster():
    trials, _ = expand(Study(name="x", models=["org/m"], precisions=["fp16", "int8", "nf4", "fp4"],
                             compute_dtypes=["fp16"]))
    assert concurrent_slots(trials, cluster_cpus=2, cluster_gpus=0) == 2  # 1 CPU each
    assert concurrent_slots(trials, cluster_cpus=16, cluster_gpus=0) == 4  # no more than there are trials
    assert concurrent_slots(trials, cluster_cpus=16, cluster_gpus=0, max_concurrent=3) == 3
    import dataclasses

    gpu = [dataclasses.replace(t, gpu_share=0.5) for t in trials]
    assert concurrent_slots(gpu, cluster_cpus=16, cluster_gpus=1) == 2  # two halves of one GPU
    assert concurrent_slots(gpu[:1], cluster_cpus=16, cluster_gpus=0.25) == 1


# ------------------------------------------------------------------------------------------------- a bare clone
@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    if not (REPO / ".git").exists():
        pytest.skip(f"{REPO} is not a git checkout: nothing to clone")
    dest = tmp_path_factory.mktemp("bare") / "sweeper"
    subprocess.run(["git", "clone", "-q", str(REPO), str(dest)], check=True, timeout=120)
    assert not (dest.parent / "shared").exists()
    return dest


def _env(clone: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWEEPER_")}  # no pointer to data elsewhere
    return {**env, "PYTHONPATH": str(clone), "PYTHONUNBUFFERED": "1", "COLUMNS": "100", "HF_HUB_OFFLINE": "1"}


def _argv(command: str) -> list[str]:
    words = shlex.split(command, comments=True)
    assert words[0] == "sweep", command
    return [sys.executable, "-m", "sweeper.cli", *words[1:]]


def run(clone: Path, command: str, timeout: int = 600) -> subprocess.CompletedProcess:
    r = subprocess.run(_argv(command), cwd=clone, env=_env(clone), capture_output=True, text=True, timeout=timeout)
    # tables fit COLUMNS=100 (a launch's notes, such as a dropped cell's reason, are left to the terminal to wrap)
    tables = [line for line in r.stdout.splitlines() if line[:1] in "┌│╞└"]
    assert max((len(line) for line in tables), default=0) <= 100, r.stdout
    return r


def blocks(markdown: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", markdown, flags=re.S | re.M)


def sweep_lines(block: str) -> list[str]:
    return [line.split(" #")[0].strip() for line in block.splitlines() if line.strip().startswith("sweep ")]


def test_readme_commands_run_from_a_bare_clone(clone):
    readme = (clone / "README.md").read_text()
    assert len(readme.encode()) <= 8500
    top, cluster = readme.split("## On a cluster")
    commands = [c for b in blocks(top, "bash") for c in sweep_lines(b)]
    assert commands == ["sweep launch studies/demo.py", "sweep results results/demo",
                        "sweep results results/demo --vs-baseline"]
    # the demo as the README gives it, narrowed to the baseline and nf4 to keep the suite short
    launch = run(clone, commands[0] + " --only precision=nf4")
    assert launch.returncode == 0, launch.stdout + launch.stderr
    progress = [line for line in launch.stdout.splitlines() if line.startswith("[")]
    assert any(re.search(r", ~\d+:\d\d left  done in", line) for line in progress), progress
    assert "verdict" in launch.stdout and "smaller" in launch.stdout  # the closing seed-style table
    assert "summary: 2/2 done" in launch.stdout
    table = run(clone, commands[1])
    assert table.returncode == 0 and "nf4" in table.stdout and "trial_id" not in table.stdout
    vs = run(clone, commands[2])
    assert vs.returncode == 0 and "baseline" in vs.stdout and "quality" in vs.stdout
    # a relaunch with nothing pending says so at once, without starting Ray or warm workers. Its CPU time is what is
    # checked (0.6 s; benchmarks/logs/newcomer_demo_clone.txt): on a shared machine the wall time also counts waiting
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    again = run(clone, commands[0] + " --only precision=nf4")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    assert again.returncode == 0 and "nothing to do: all 2 trials are done" in again.stdout, again.stdout
    assert "ray:" not in again.stdout and "warm workers" not in again.stdout
    assert cpu < 2.0, f"nothing-to-do relaunch used {cpu:.2f} s of CPU"
    # the README's Python: the study example is a valid study, the Polars query reads the demo's results
    (clone / "readme_study.py").write_text(blocks(readme, "python")[0])
    study = run(clone, "sweep launch readme_study.py --dry-run")
    assert study.returncode == 0 and "qwen-small: 3 trial(s)" in study.stdout, study.stdout + study.stderr
    snippet = blocks(readme, "python")[1].strip().splitlines()
    ns: dict = {}
    cwd = os.getcwd()
    os.chdir(clone)
    try:
        exec("\n".join(snippet[:-1]), ns)
        assert eval(snippet[-1], ns).height == 2  # decode_tok_s of the two trials
    finally:
        os.chdir(cwd)
    # the cluster command needs a cluster, the hub and a bucket: checked as far as a dry run goes, against moto's S3
    (cmd,) = [c for b in blocks(cluster, "bash") for c in sweep_lines(b)]
    bucket = re.search(r"s3://([^/\s]+)/", cmd).group(1)
    with moto_s3(bucket) as aws, mock.patch.dict(os.environ, aws):
        dry = run(clone, cmd + " --dry-run")
    assert dry.returncode == 0 and f"results in s3://{bucket}/qwen" in dry.stdout, dry.stdout + dry.stderr


def test_tutorial_commands_run_in_order_from_a_bare_clone(clone):
    text = (clone / "docs" / "tutorial.md").read_text()
    sections = [s for s in re.split(r"^## ", text, flags=re.M)[1:] if not s.startswith("Aside")]
    ci = (clone / ".ci" / "run").read_text()
    study = clone / "studies" / "mine.py"
    seen = []
    for section in sections:
        title = section.splitlines()[0]
        for code in blocks(section, "python"):
            if code.startswith("from sweeper"):
                study.write_text(code)
            else:  # the step's edit: the new precisions line replaces the old one
                (line,) = code.splitlines()
                study.write_text(re.sub(r"^    precisions=.*$", line, study.read_text(), flags=re.M))
        for block in blocks(section, "bash"):
            if title.startswith("1. Install"):  # CI runs these: .ci/run installs the same way
                for line in block.splitlines():
                    cmd = line.split("#")[0].strip()
                    assert cmd.startswith(("python3 -m venv", "pip install")), cmd
                    if cmd.startswith("pip install"):
                        assert cmd.replace("pip install", "python -m pip install -q") in ci, cmd
                continue
            for cmd in sweep_lines(block):
                seen.append(cmd)
                if title.startswith("5.") and cmd == "sweep launch studies/mine.py" and seen.count(cmd) == 3:
                    _launch_and_interrupt(clone, cmd)
                    continue
                r = run(clone, cmd)
                assert r.returncode == 0, (cmd, r.stdout, r.stderr)
                _check(title, cmd, seen.count(cmd), r.stdout, clone)
    assert seen.count("sweep launch studies/mine.py") == 5 and (clone / "mine.html").is_file()


def _launch_and_interrupt(clone: Path, cmd: str) -> None:
    """Ctrl-C once the first trial has started: exit 130, the way to resume said, something still pending."""
    p = subprocess.Popen(_argv(cmd), cwd=clone, env=_env(clone), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True)
    lines = []
    for line in p.stdout:
        lines.append(line)
        if "started" in line:
            p.send_signal(signal.SIGINT)
            break
    out = "".join(lines) + p.communicate(timeout=300)[0]
    assert p.returncode == 130 and "again to resume" in out, out


def _check(title: str, cmd: str, nth: int, out: str, clone: Path) -> None:
    if cmd == "sweep launch studies/mine.py --dry-run":
        assert "study mine: 2 trial(s)" in out and "ray:" not in out
    elif cmd == "sweep launch studies/mine.py" and nth == 1:
        assert "summary: 2/2 done" in out and "verdict" in out
    elif cmd == "sweep launch studies/mine.py" and nth == 2:
        assert "running 1 trial(s) (2 already done, skipped)" in out and "int8" in out
    elif cmd == "sweep status studies/mine.py" and title.startswith("5."):
        m = re.search(r"5 trials: (\d) done, 0 failed, (\d) pending", out)
        assert m and int(m.group(2)) >= 1, out  # what the Ctrl-C left
    elif cmd == "sweep launch studies/mine.py" and nth == 4:
        assert "summary: 5/5 done" in out and "already done, skipped" in out
    elif cmd == "sweep launch studies/mine.py" and nth == 5:
        assert "nothing to do: all 5 trials are done in results/mine" in out
    elif cmd.startswith("sweep results results/mine"):
        assert "nf4" in out and "llama-4m" in out


def test_demo_environment_variables_point_it_elsewhere(tmp_path, tiny_model):
    demo = str(REPO / "studies" / "demo.py")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWEEPER_")}
    shipped = subprocess.run([sys.executable, "-m", "sweeper.cli", "launch", demo, "--dry-run"], cwd=tmp_path,
                             env=env, capture_output=True, text=True, timeout=120)
    assert shipped.returncode == 0 and "llama-4m" in shipped.stdout, shipped.stdout + shipped.stderr
    other = subprocess.run([sys.executable, "-m", "sweeper.cli", "launch", demo, "--dry-run"], cwd=tmp_path,
                           env={**env, "SWEEPER_DEMO_MODEL": str(tiny_model)}, capture_output=True, text=True,
                           timeout=120)
    assert other.returncode == 0 and "tiny-llama" in other.stdout and "llama-4m" not in other.stdout, other.stdout
    empty = subprocess.run([sys.executable, "-m", "sweeper.cli", "launch", demo, "--dry-run"], cwd=tmp_path,
                           env={**env, "SWEEPER_DEMO_DATA": str(tmp_path)}, capture_output=True, text=True,
                           timeout=120)
    assert empty.returncode == 2 and str(tmp_path / "models" / "llama-4m") in empty.stderr, empty.stderr
