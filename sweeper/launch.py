"""What `sweep launch` does around the scheduler: validate, expand, check the results dir, resume, record.

Kept free of Ray so that the CLI's checks (and --dry-run) are fast and testable.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import shlex
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import interrupt
from .environment import scrub, scrub_argv, static_environment
from .errors import UserError
from .precisions import get as get_precision
from .resources import share_function, spread_shares
from .store import ResultsStore
from .study import Resources, Study
from .studyfile import load_study_file
from .trials import Dropped, TrialSpec, expand, trial_share

ONLY_KEYS = ("model", "precision", "compute_dtype")


@dataclass
class Plan:
    study: Study
    study_path: Path
    store: ResultsStore
    trials: list[TrialSpec]  # every trial of the (narrowed) study
    dropped: list[Dropped]
    status: dict[str, str]  # trial_id -> done / failed, from the store
    estimates: dict[str, float] = dataclasses.field(default_factory=dict)  # trial_id -> estimated peak bytes

    @property
    def pending(self) -> list[TrialSpec]:
        return [t for t in self.trials if self.status.get(t.trial_id) != "done"]


def apply_overrides(study: Study, limit: float | None, gpus_per_trial: float | None,
                    max_concurrent: int | None) -> tuple[Study, list[str]]:
    """CLI overrides of study settings, each reported (never silent)."""
    notes = []
    if limit is not None:
        if not (limit > 0 and (limit < 1 or float(limit).is_integer())):
            raise UserError(f"--limit {limit:g}: give a whole number of items per task (1, 2, ...) or a fraction of "
                            "each task's items in (0, 1)")
        if not study.tasks:
            raise UserError(f"--limit {limit:g}: study {study.name!r} has no lm-eval tasks, the only stage it limits")
        if all(t.limit is not None for t in study.tasks):
            raise UserError(f"--limit {limit:g}: every task of study {study.name!r} sets its own limit, which wins "
                            "over --limit")
        limit = int(limit) if limit >= 1 else limit
        notes.append(f"--limit {limit:g} overrides study.limit={study.limit}")
        study = dataclasses.replace(study, limit=limit)
    res = study.resources
    if gpus_per_trial is not None:
        if not (0 < gpus_per_trial <= 8 and (gpus_per_trial <= 1 or float(gpus_per_trial).is_integer())):
            raise UserError(f"--gpus-per-trial {gpus_per_trial:g}: give a fraction of a GPU in (0, 1] or a whole "
                            "number of GPUs (up to 8)")
        notes.append(f"--gpus-per-trial {gpus_per_trial:g} overrides study.resources.gpus_per_trial={res.gpus_per_trial}")
        res = dataclasses.replace(res, gpus_per_trial=gpus_per_trial)
    if max_concurrent is not None:
        notes.append(f"--max-concurrent {max_concurrent} overrides study.resources.max_concurrent={res.max_concurrent}")
        res = dataclasses.replace(res, max_concurrent=max_concurrent)
    return dataclasses.replace(study, resources=Resources(**dataclasses.asdict(res))), notes


def parse_only(only: tuple[str, ...]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for item in only:
        key, sep, value = item.partition("=")
        if not sep or key not in ONLY_KEYS or not value:
            raise UserError(f"--only {item!r}: expected KEY=VALUE with KEY one of {', '.join(ONLY_KEYS)}")
        out.setdefault(key, set()).update(value.split(","))
    return out


def narrow(trials: list[TrialSpec], only: dict[str, set[str]]) -> list[TrialSpec]:
    """The trials matching ``--only``, plus each kept model's baseline where KL needs its reference."""
    def keep(t: TrialSpec) -> bool:
        values = {"model": {t.model.name, t.model.id}, "precision": {t.precision}, "compute_dtype": {t.compute_dtype}}
        return all(values[k] & v for k, v in only.items())

    kept = [t for t in trials if keep(t)]
    needed = {t.baseline_id for t in kept if t.kl is not None}
    out = [t for t in trials if t in kept or t.trial_id in needed]
    if not out:
        given = " ".join(f"{k}={','.join(sorted(v))}" for k, v in only.items())
        present = {"model": lambda t: t.model.name, "precision": lambda t: t.precision,
                   "compute_dtype": lambda t: t.compute_dtype}
        values = "; ".join(f"{k}: {', '.join(dict.fromkeys(present[k](t) for t in trials))}" for k in only)
        raise UserError(f"--only {given} matches no trial of the study; values present: {values}")
    return out


def default_results_dir(study: Study) -> Path:
    return Path("results") / study.name


def check_same_study(store: ResultsStore, study: Study) -> None:
    """UserError when the results dir is not a folder or holds another study's results."""
    root = store.root
    if not store.remote and root.exists() and not root.is_dir():
        raise UserError(f"results dir {root} exists and is not a directory")
    existing = store.read_study()
    if existing is not None and existing.get("name") != study.name:
        raise UserError(f"results dir {root} belongs to study {existing.get('name')!r}, not {study.name!r}; "
                        "give another --results dir or launch that study")


def check_results_dir(store: ResultsStore, study: Study) -> None:
    root = store.root
    check_same_study(store, study)
    if store.remote:
        return  # an object store: the launch's lease is its first write, and says why it cannot write
    # the folder itself (or the nearest one that exists, where it will be made) and its parent (the launch's lock):
    # a file is made and removed in each, as os.access says yes to root on /proc or /sys
    def existing(d: Path) -> Path:
        return d if d.exists() else next((p for p in d.parents if p.exists()), Path("."))

    for probe_dir in dict.fromkeys([existing(root), existing(root.parent)]):
        why = _not_writable(probe_dir)
        if why:
            raise UserError(f"results dir {root} is not writable: {why}; give --results a folder where you can "
                            "write")


def _not_writable(d: Path) -> str | None:
    """Why no file can be made in folder ``d`` (None: one can)."""
    import tempfile

    if not d.is_dir():
        return f"{d} is a file, not a folder"
    try:
        with tempfile.NamedTemporaryFile(dir=d, prefix=".sweep-probe-"):
            pass
    except OSError as e:
        return f"cannot create a file in {d} ({e.strerror or e})"
    return None


def plan(study_path: str, results: str | None = None, only: tuple[str, ...] = (), limit: float | None = None,
         gpus_per_trial: float | None = None, max_concurrent: int | None = None,
         with_tasks: bool = True) -> tuple[Plan, list[str]]:
    """The study's trials and their status in the store, with the shares of a CPU-only cluster (0); checks
    everything it can before Ray starts. :func:`for_cluster` then gives the shares of the real cluster.

    ``with_tasks=False`` leaves out :func:`validate_study_tasks`, the one slow check (lm-eval's imports and task
    index: seconds, more on a cold cache): `sweep launch` runs it while Ray starts."""
    study = load_study_file(study_path)
    study, notes = apply_overrides(study, limit, gpus_per_trial, max_concurrent)
    if with_tasks:
        validate_study_tasks(study)
    store = ResultsStore(results or default_results_dir(study))
    check_results_dir(store, study)
    trials, dropped = expand(study)
    if only:
        trials = narrow(trials, parse_only(only))
    if study.baseline is None and all(get_precision(p).compute_dtype_matters for p in study.precisions):
        # never silently: every speedup and KL of the study is relative to this quantized trial
        base = study.baseline_cell()
        notes.append(f"baseline: {base[0]}/{base[1]}, a quantized precision (the study has no plain fp32/fp16/bf16 "
                     "one, so its first precision); set study.baseline='precision/compute_dtype' to choose another")
    return Plan(study=study, study_path=Path(study_path), store=store, trials=trials, dropped=dropped,
                status=store.trial_status(skip_damaged=True)), notes


def resume_command(study_file: str, results: str | None, only: tuple[str, ...] = (), limit: float | None = None) -> str:
    """The `sweep launch` command that resumes this launch: the options that name its results (--results, --only,
    --limit, which changes trial ids) repeated."""
    args = ["sweep", "launch", study_file]
    if results:
        args += ["--results", results]
    for o in only:
        args += ["--only", o]
    if limit is not None:
        args += ["--limit", f"{limit:g}"]
    return shlex.join(args)


class Background:
    """``fn(*args)`` on a daemon thread (an interrupted launch does not wait for it), then ``then()`` if it passed;
    :meth:`result` waits for it and raises its exception in the caller's thread. (`sweep launch` imports Ray Tune as
    ``then`` of its task check: on the same thread, as imports on two threads at once can meet half-initialised
    modules.)"""

    def __init__(self, fn, *args, then=None):
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn, args, then), name=f"sweep-{fn.__name__}",
                                        daemon=True)
        self._thread.start()

    def _run(self, fn, args, then) -> None:
        try:
            fn(*args)
            if then is not None:
                then()
        except BaseException as e:  # handed to the caller by result()
            self._error = e

    def wait(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def result(self) -> None:
        """Wait for ``fn``; raise its exception, or KeyboardInterrupt if a Ctrl-C came meanwhile and its own
        exception was lost (see sweeper/interrupt.py: the thread could be waiting for a lock it left held)."""
        while self._thread.is_alive():
            self._thread.join(0.1)
            interrupt.checkpoint()
        interrupt.checkpoint()
        if self._error is not None:
            raise self._error


def validate_study_tasks(study: Study) -> None:
    """:class:`UserError` for an unknown lm-eval task or bad task data (lm-eval's index is only built when a study
    has tasks)."""
    if study.tasks:
        from .stages.tasks import validate_tasks

        validate_tasks(study.tasks, num_fewshot=study.num_fewshot)


def for_cluster(p: Plan, gpu_share_for=None, cluster_gpus: float = 0, node_gpus: float | None = None) -> Plan:
    """``p`` on the cluster Ray reported (``cluster_gpus`` > 0: GPUs): each trial's GPU share (``auto`` shares
    spread over the GPUs; whole GPUs for a trial bigger than one), and the store's status read again (after --fresh
    or a quarantine). ``node_gpus``: GPUs of the largest node; a trial that needs more is refused (:class:`UserError`)."""
    study = p.study
    pinned = study.resources.gpus_per_trial
    if cluster_gpus > 0 and node_gpus is not None and pinned != "auto" and pinned > node_gpus:
        raise UserError(f"gpus_per_trial={pinned:g}: the largest node of the cluster has {node_gpus:g} GPU(s); a "
                        "trial runs on one node: give at most that many")
    trials = [dataclasses.replace(t, gpu_share=trial_share(study, t.model, t.precision, t.compute_dtype, gpu_share_for,
                                                           cluster_gpus > 0)) for t in p.trials]
    known = getattr(gpu_share_for, "estimates", {})
    estimates = {t.trial_id: known[(t.model.name, t.precision, t.compute_dtype)] for t in trials
                 if (t.model.name, t.precision, t.compute_dtype) in known}
    status = p.store.trial_status(skip_damaged=True)
    if cluster_gpus > 0 and study.resources.gpus_per_trial == "auto":
        pending = [i for i, t in enumerate(trials) if status.get(t.trial_id) != "done"]
        spread = spread_shares([trials[i].gpu_share for i in pending], cluster_gpus, study.resources.max_concurrent)
        for i, share in zip(pending, spread):
            trials[i] = dataclasses.replace(trials[i], gpu_share=share)
    return dataclasses.replace(p, trials=trials, status=status, estimates=estimates)


def preload_note(preloading: int, nodes: int, job_runtime_env: bool = False) -> str:
    """The launch's word on a joined cluster's preloading nodes (sweeper/node_preload.py, docs/cluster.md)."""
    if preloading and job_runtime_env:
        return ("; the nodes preload trial processes, but this job's runtime_env keeps its trials out of them "
                "(docs/cluster.md)")
    if preloading == nodes:
        return f"; every node preloads trial processes ({nodes} of {nodes})"
    if preloading:
        return (f"; {preloading} of {nodes} nodes preload trial processes, so none is used (every node needs the "
                "sweeper-preload label and settings: docs/cluster.md)")
    return ""


def start_warm_workers(p: Plan, num_cpus: int | None, env: dict[str, str], address: str | None = None,
                       fresh: bool = False, emit=None):
    """Start warm workers (sweeper/warm_pool.py) on this machine, one per trial that can run here at once, sized with
    this machine's GPUs as :func:`for_cluster` sizes the cluster's; None when no trial could use one: the launch
    joins a cluster through a Ray client (``ray://``: this machine is no Ray node), or none fits here. A pool that
    cannot start is reported through ``emit`` and the launch goes on without it (its trials run in Ray's workers)."""
    from .resources import local_gpus, share_function
    from .warm_pool import WarmPool, worker_keys

    if address and address.startswith("ray://"):
        return None
    gpus = local_gpus()
    here = for_cluster(p, share_function(min(gpus.values()) * 2**20) if gpus else None, len(gpus))
    trials = here.trials if fresh else here.pending  # --fresh moves the results aside: every trial runs
    keys = worker_keys(trials, list(gpus), num_cpus or os.cpu_count() or 1, p.study.resources.max_concurrent)
    if not keys:
        return None
    try:
        return WarmPool.start(keys, trials, env)
    except OSError as e:
        if emit is not None:
            emit(f"warning: warm workers not started ({e}); trials run in Ray's workers")
        return None


def pool_serves_this_node(pool, p: Plan, cluster, fresh: bool = False) -> bool:
    """Whether the launch's warm workers can take any trial of ``p`` (sized for the cluster) on this machine, as Ray
    counts this node's resources (``cluster``: :class:`sweeper.scheduler.ClusterInfo`)."""
    from .warm_pool import serves_this_node

    return serves_this_node(pool.keys, p.trials if fresh else p.pending, cluster.here_cpus, cluster.here_gpus)


def warm_logs_dir(store: ResultsStore, pool) -> Path | None:
    """Where a launch keeps its warm workers' logs: ``<results>/_warm/<when the pool started>/``; None when the
    results folder does not exist (the launch stopped before it wrote anything: it creates no folder for logs)."""
    if not store.work.is_dir():
        return None
    return store.work / "_warm" / _dt.datetime.fromtimestamp(pool.started_at).strftime("%Y%m%d-%H%M%S")


def prepare_store(store: ResultsStore, token: str) -> list[str]:
    """Under the launch lock, before any trial runs: make this launch the owner of the results location (from now on
    commits of any earlier launch's leftover processes count for nothing), migrate a folder of the old layout, quarantine
    damaged files (their trials run again), delete what killed writers left, and compact. Returns the lines to print."""
    store.forget()  # --fresh may have moved the folder since the plan read it
    lines = []
    if store.is_legacy():
        store.token = token
        for path, dest, why in store.migrate_legacy():
            lines.append(f"damaged result file {path} ({why}): moved to {dest}")
        lines.append(f"{store.root}: migrated to the commit-log layout (docs/store.md)")
    else:
        store.take_over(token, host=socket.gethostname(), pid=os.getpid())
    for path, dest, why in store.quarantine_damaged():
        lines.append(f"damaged result file {path} ({why})" + (f": moved to {dest}" if dest else "")
                     + "; its trial runs again")
    store.remove_stale_temp_files()
    while store.compact():
        pass
    return lines


def check_fresh(store: ResultsStore) -> None:
    """--fresh is for folders: an object store has no rename, and moving a study aside would copy every object."""
    if store.remote:
        raise UserError(f"--fresh with results location {store.root}: give a new prefix instead (an object store "
                        "cannot move a study aside)")


def move_aside(store: ResultsStore) -> Path | None:
    """--fresh: move existing results to <dir>.old-<timestamp> (never deleted)."""
    check_fresh(store)
    if not store.root.exists():
        return None
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    dest = store.root.with_name(f"{store.root.name}.old-{stamp}")
    store.root.rename(dest)
    return dest


def record_launch(p: Plan, argv: list[str], address: str | None) -> None:
    """study.json: the expanded study as launched, plus the history of launches."""
    previous = p.store.read_study() or {}
    launches = previous.get("launches", [])
    launches.append({"at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "argv": scrub_argv(argv),
                     "address": address, "host": socket.gethostname(), "pending": len(p.pending),
                     **{k: v for k, v in static_environment().items() if k.endswith("_version") or k == "sweeper_git_sha"}})
    known = {t["trial_id"]: t for t in previous.get("trials", [])}
    for t in p.trials:
        known[t.trial_id] = {"trial_id": t.trial_id, "model": t.model.name, "model_id": t.model.id,
                             "precision": t.precision, "compute_dtype": t.compute_dtype, "is_baseline": t.is_baseline,
                             "gpu_share": t.gpu_share}
    doc = {
        "name": p.study.name, "study_file": str(p.study_path.resolve()),
        "study_source": p.study_path.read_text(),
        "study": scrub(json.loads(json.dumps(dataclasses.asdict(p.study), default=str))),
        "trials": list(known.values()), "dropped": [dataclasses.asdict(d) for d in p.dropped], "launches": launches,
    }
    p.store.loc.ensure()
    p.store.write_study(doc)


def trial_table(p: Plan) -> list[dict[str, Any]]:
    return [{"trial_id": t.trial_id, "model": t.model.name, "precision": t.precision,
             "compute_dtype": t.compute_dtype, "baseline": "yes" if t.is_baseline else "",
             "gpu_share": t.gpu_share, **_gpu_columns(p, t), "status": p.status.get(t.trial_id, "pending")}
            for t in p.trials]


def _gpu_columns(p: Plan, t: TrialSpec) -> dict[str, Any]:
    """Where GPUs are known: how many the trial holds ("0.25" of one, or whole GPUs of one node) and its estimate."""
    if not p.estimates and not t.gpu_share:
        return {}
    est = p.estimates.get(t.trial_id)
    return {"gpus": f"{t.gpu_share:g}" if t.gpu_share < 1 else f"{int(t.gpu_share)} whole",
            "est_peak_gb": round(est / 1e9, 1) if est is not None else None}


def parse_node_gpus(text: str) -> tuple[int, float]:
    """``--node-gpus 4x80GB``: (GPUs, bytes of each, 1 GB = 1e9) of the node a dry run sizes trials for."""
    import re

    m = re.fullmatch(r"\s*(\d+)\s*[xX*]\s*(\d+(?:\.\d+)?)\s*(GB|G)?\s*", text)
    if not m or int(m.group(1)) < 1 or float(m.group(2)) <= 0:
        raise UserError(f"--node-gpus {text!r}: give GPUs x memory per GPU in GB, e.g. 4x80GB")
    return int(m.group(1)), float(m.group(2)) * 1e9


def size_for_node(p: Plan, node_gpus: int, gpu_memory_bytes: float) -> Plan:
    """``p`` sized for one node of ``node_gpus`` GPUs of ``gpu_memory_bytes`` each (`sweep launch --dry-run`)."""
    return for_cluster(p, share_function(gpu_memory_bytes, node_gpus), node_gpus, node_gpus)


def concurrent_slots(trials: list[TrialSpec], cluster_cpus: float, cluster_gpus: float,
                     max_concurrent: int | None = None) -> int:
    """How many of ``trials`` the cluster runs at once, for the progress line's estimate: by the largest GPU share and
    by ``cpus``; at most ``max_concurrent`` and the number of trials; at least 1."""
    if not trials:
        return 1
    gpu = [t.gpu_share for t in trials if t.gpu_share]
    by_gpu = int(cluster_gpus // max(gpu)) if gpu else len(trials)
    by_cpu = int(cluster_cpus // max(max(t.cpus for t in trials), 1e-9)) if cluster_cpus else 1
    return max(1, min(by_gpu, by_cpu, max_concurrent or len(trials), len(trials)))
