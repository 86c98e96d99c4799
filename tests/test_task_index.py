"""The disk cache of lm-eval's task index: reused while the YAML files are unchanged, rebuilt when they change or the
cache file is damaged, bypassed when turned off; a TaskManager built through it knows the same tasks."""
from __future__ import annotations

import logging

import pytest

from sweeper.stages import task_index

TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files: {{test: /nonexistent.jsonl}}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{q}}}}"
doc_to_target: 0
doc_to_choice: ["a", "b"]
metric_list:
  - metric: acc
"""


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "index-cache"
    monkeypatch.setenv("SWEEPER_TASK_INDEX_CACHE", str(folder))
    return folder


@pytest.fixture
def tasks_dir(tmp_path):
    d = tmp_path / "tasks"
    (d / "sub").mkdir(parents=True)
    (d / "one.yaml").write_text(TASK_YAML.format(name="my_one"))
    (d / "sub" / "two.yaml").write_text(TASK_YAML.format(name="my_two"))
    return d


def counting_build():
    calls = []

    def build(paths, *, resolve_includes=True):
        calls.append(list(paths))
        return {f"task{len(calls)}": sorted(str(p) for p in paths)}

    return build, calls


def test_second_build_reads_the_cache(cache, tasks_dir):
    build, calls = counting_build()
    first = task_index.cached_build(build, [tasks_dir])
    second = task_index.cached_build(build, [tasks_dir])
    assert len(calls) == 1 and second == first
    assert len(list(cache.glob("*.pkl"))) == 1
    assert not list(cache.glob(".*.tmp"))  # the atomic write leaves no temp file


def test_edited_added_or_removed_yaml_rebuilds(cache, tasks_dir):
    build, calls = counting_build()
    task_index.cached_build(build, [tasks_dir])
    (tasks_dir / "one.yaml").write_text(TASK_YAML.format(name="my_one_renamed"))  # size changes
    task_index.cached_build(build, [tasks_dir])
    assert len(calls) == 2
    (tasks_dir / "three.yaml").write_text(TASK_YAML.format(name="my_three"))
    task_index.cached_build(build, [tasks_dir])
    assert len(calls) == 3
    (tasks_dir / "sub" / "two.yaml").unlink()
    task_index.cached_build(build, [tasks_dir])
    assert len(calls) == 4
    # files that are not task YAMLs do not count
    (tasks_dir / "notes.txt").write_text("x")
    task_index.cached_build(build, [tasks_dir])
    assert len(calls) == 4


def test_other_paths_or_options_have_their_own_entry(cache, tasks_dir, tmp_path):
    build, calls = counting_build()
    other = tmp_path / "other"
    other.mkdir()
    task_index.cached_build(build, [tasks_dir])
    task_index.cached_build(build, [tasks_dir, other])
    task_index.cached_build(build, [tasks_dir], resolve_includes=False)
    assert len(calls) == 3


def test_damaged_cache_file_is_rebuilt(cache, tasks_dir, caplog):
    build, calls = counting_build()
    first = task_index.cached_build(build, [tasks_dir])
    (pkl,) = cache.glob("*.pkl")
    pkl.write_bytes(b"\x80\x05not a pickle")
    with caplog.at_level(logging.WARNING, logger="sweeper.stages.task_index"):
        again = task_index.cached_build(build, [tasks_dir])
    assert len(calls) == 2 and again != first  # built again (the counting build returns a new key)
    assert "unreadable" in caplog.text and str(pkl) in caplog.text
    assert task_index.cached_build(build, [tasks_dir]) == again  # and the rewritten file is good
    assert len(calls) == 2


def test_off_always_builds(monkeypatch, tasks_dir, tmp_path):
    monkeypatch.setenv("SWEEPER_TASK_INDEX_CACHE", "off")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    build, calls = counting_build()
    task_index.cached_build(build, [tasks_dir])
    task_index.cached_build(build, [tasks_dir])
    assert len(calls) == 2
    assert not (tmp_path / "home").exists()


def test_unwritable_cache_still_returns_the_index(monkeypatch, tasks_dir, tmp_path, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("SWEEPER_TASK_INDEX_CACHE", str(blocker / "cache"))  # a folder under a file: mkdir fails
    build, calls = counting_build()
    with caplog.at_level(logging.WARNING, logger="sweeper.stages.task_index"):
        assert task_index.cached_build(build, [tasks_dir]) == {"task1": [str(tasks_dir)]}
    assert "could not cache" in caplog.text


def test_task_manager_through_the_cache_knows_the_same_tasks(cache, tasks_dir):
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks import manager as lm_manager

    plain = TaskManager(include_defaults=False, include_path=str(tasks_dir))
    built = task_index.make_task_manager(include_defaults=False, include_path=str(tasks_dir))
    assert lm_manager.TaskIndex.__name__ == "TaskIndex"  # the swap is undone
    (pkl,) = cache.glob("*.pkl")
    inode = pkl.stat().st_ino
    cached = task_index.make_task_manager(include_defaults=False, include_path=str(tasks_dir))
    assert pkl.stat().st_ino == inode  # read, not rewritten (a write replaces the file)
    assert plain.all_tasks == built.all_tasks == cached.all_tasks == ["my_one", "my_two"]
    assert cached.task_index["my_two"].yaml_path == plain.task_index["my_two"].yaml_path
    # the cached entries load real tasks
    assert cached._entry("my_one").cfg["doc_to_choice"] == ["a", "b"]


def test_default_cache_folder(monkeypatch, tmp_path):
    monkeypatch.delenv("SWEEPER_TASK_INDEX_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert task_index.cache_dir() == tmp_path / ".cache" / "sweeper" / "lm-eval-index"
    for off in ("off", "0", "OFF", "false"):
        monkeypatch.setenv("SWEEPER_TASK_INDEX_CACHE", off)
        assert task_index.cache_dir() is None


def test_parallel_build_gives_lm_evals_own_index(tasks_dir, caplog):
    """A cold build parses the YAML files in child processes and lets lm-eval assemble them: the index equals the one
    lm-eval builds itself, with the built-in tasks, an include folder overriding one of them, a duplicate within a
    folder and a broken file (skipped both ways)."""
    from pathlib import Path

    import lm_eval
    from lm_eval.tasks._index import TaskIndex

    (tasks_dir / "broken.yaml").write_text("task: [unclosed\n")
    (tasks_dir / "override.yaml").write_text(TASK_YAML.format(name="piqa"))
    (tasks_dir / "sub" / "dup.yaml").write_text(TASK_YAML.format(name="my_one"))
    paths = [Path(lm_eval.__file__).parent / "tasks", tasks_dir]
    from lm_eval.tasks import _index

    expected = TaskIndex.build(paths)
    parsed_here = []
    real_load_yaml = _index.load_yaml

    def counting_load_yaml(path, **kwargs):  # lm-eval's loader, as parallel_build finds it
        parsed_here.append(path)
        return real_load_yaml(path, **kwargs)

    _index.load_yaml = counting_load_yaml
    try:
        with caplog.at_level(logging.WARNING):
            got = task_index.parallel_build(TaskIndex.build, paths, workers=2)
    finally:
        _index.load_yaml = real_load_yaml
    assert "parsing them here" not in caplog.text  # the children parsed: no fallback to lm-eval's own parsing
    # the index came from the children's parsing: the parent parsed none of the ~14,000 files itself
    assert parsed_here == [], parsed_here[:5]
    assert got == expected and list(got) == list(expected)
    assert len(got) > 10000 and got["piqa"].yaml_path == tasks_dir / "override.yaml"
    assert got["my_one"].yaml_path == tasks_dir / "one.yaml"


def test_parallel_build_falls_back_when_a_child_fails(tasks_dir, monkeypatch, caplog):
    from lm_eval.tasks._index import TaskIndex

    monkeypatch.setattr(task_index, "_PARSE_CHILD", "import sys; sys.exit('no parsing here')")
    with caplog.at_level(logging.WARNING):
        got = task_index.parallel_build(TaskIndex.build, [tasks_dir], workers=2)
    assert got == TaskIndex.build([tasks_dir]) and set(got) == {"my_one", "my_two"}
    assert "no parsing here" in caplog.text and "parsing them here" in caplog.text


def test_only_the_most_recently_used_index_files_are_kept(cache, tmp_path, monkeypatch):
    import os

    monkeypatch.setattr(task_index, "KEEP", 3)
    build, calls = counting_build()
    folders, files = [], []
    for i in range(5):  # 5 different task folders: 5 different index files
        d = tmp_path / f"t{i}"
        d.mkdir()
        (d / "a.yaml").write_text(TASK_YAML.format(name=f"t{i}"))
        folders.append(d)
    for i, d in enumerate(folders[:3]):
        before = set(cache.glob("*.pkl"))
        task_index.cached_build(build, [d])
        (new,) = set(cache.glob("*.pkl")) - before
        os.utime(new, (1_000_000 + i, 1_000_000 + i))  # used in the order t0, t1, t2
        files.append(new)
    task_index.cached_build(build, [folders[0]])  # a hit: t0 becomes the most recently used
    assert len(calls) == 3 and files[0].stat().st_mtime > 2_000_000
    task_index.cached_build(build, [folders[3]])  # 4 files: the least recently used (t1) goes
    assert not files[1].exists() and files[0].exists() and files[2].exists()
    task_index.cached_build(build, [folders[4]])  # then t2
    assert len(list(cache.glob("*.pkl"))) == 3
    assert not files[2].exists() and files[0].exists()
    task_index.cached_build(build, [folders[0]])  # still cached: no rebuild
    assert len(calls) == 5
    foreign = cache / "someone-elses.pkl"  # only index files (named by their key) are ever pruned
    foreign.write_bytes(b"x")
    os.utime(foreign, (1, 1))
    task_index.cached_build(build, [folders[1]])
    assert foreign.exists() and len(list(cache.glob("*.pkl"))) == 4


CONCURRENT_BUILD = """
import os, sys, time
from sweeper.stages import task_index

def slow_build(paths, *, resolve_includes=True):
    with open(sys.argv[2], "a") as fh:  # one line per build, from whichever process built
        fh.write(f"{os.getpid()}\\n")
    time.sleep(2.0)
    return {"built_by": os.getpid()}

print(task_index.cached_build(slow_build, [sys.argv[1]])["built_by"])
"""


def test_processes_starting_together_build_a_missing_index_once(cache, tasks_dir, tmp_path):
    """Trials that start together on a node with no cached index: one builds it, the others wait and read it."""
    import os
    import subprocess
    import sys

    builds = tmp_path / "builds.txt"
    env = {**os.environ, "SWEEPER_TASK_INDEX_CACHE": str(cache)}
    procs = [subprocess.Popen([sys.executable, "-c", CONCURRENT_BUILD, str(tasks_dir), str(builds)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    builders = builds.read_text().split()
    assert len(builders) == 1, builders  # without the lock, each of the three builds
    assert {o[0].strip() for o in outs} == {builders[0]}  # every process got the one index that was built
    assert len(list(cache.glob("*.lock"))) == 1 and len(list(cache.glob("*.pkl"))) == 1
