"""Local inputs every Ray node that may run a trial must see, checked on those nodes before a sweep starts.

A study names local files by path: a model folder, task data, the perplexity text (also the KL token set's WikiText),
a calibration text. On a cluster (``--address``) each trial opens them on whichever node Ray places it, and a path that
exists on the launching machine but not on that node fails the node's trials one by one, hours into a sweep. So
`sweep launch` on a cluster runs one tiny task on each node that may run a trial (pinned to it, no CPU taken), which
reports which of the paths it cannot see, and stops with exit 2 naming the node and the paths before anything runs or
is written.

The files are not shipped to the nodes: a model folder is gigabytes (Ray's ``runtime_env`` uploads a working_dir no
larger than gRPC's message size, through the head, to every node), and clusters that run sweeps already mount or bake
in their models and data; copying them behind the user's back would also change where each trial reads them from.
Hub ids are not checked (each node downloads them through its own Hugging Face cache).

With sweeper/scheduler.py and sweeper/local_ray.py, one of the modules that import Ray (lazily, inside functions).
"""
from __future__ import annotations

import logging
import os
from typing import Iterable

from .errors import UserError
from .trials import TrialSpec

log = logging.getLogger(__name__)

ANSWER_TIMEOUT_S = 120.0  # a node that has not run the check by then is reported, and its trials find out alone


def local_inputs(trials: Iterable[TrialSpec]) -> list[tuple[str, str]]:
    """(what, path) of each local file or folder the trials read, as the study names it (a trial opens it by that
    name), once each in study order; paths that do not exist here are left out (a model id that is no folder here is
    a hub id; a missing data file is the task check's error)."""
    found: dict[str, str] = {}

    def add(what: str, path: str, exists) -> None:
        if path not in found and exists(os.path.expanduser(path)):
            found[path] = what

    for t in trials:
        if os.path.isdir(t.model.id):  # as the trial's loader decides it: a folder, else a hub id
            found.setdefault(t.model.id, "model folder")
        if t.perplexity is not None:
            add("perplexity text", t.perplexity.path, os.path.isfile)
        for task in t.tasks:
            data = task.data
            files = {"": data} if isinstance(data, str) else dict(data or {})
            for split, path in files.items():
                add(f"task {task.name} data" + (f" ({split})" if split else ""), path, os.path.exists)
        calib = t.precision_options.get("calib_data")
        if calib:
            add(f"{t.precision} calibration text", calib, os.path.isfile)
    return [(what, path) for path, what in found.items()]


def _missing(paths: list[str]) -> list[str]:
    """On a node: the paths of ``paths`` that do not exist there (``~`` is that node's home, as for the trial)."""
    return [p for p in paths if not os.path.exists(os.path.expanduser(p))]


def check_inputs_visible(trials: list[TrialSpec], address: str | None) -> None:
    """On a cluster (``address`` given), :class:`UserError` naming each node that may run a trial and cannot see a
    path of :func:`local_inputs` (one line). A private local instance (no ``address``) is this machine: no check.

    A node may run a trial when it is alive, has the CPUs a trial asks for and, on a cluster with GPUs (where every
    trial gets a GPU share), a GPU. The node this process is attached to shares its filesystem and is skipped, except
    through a Ray client (``ray://``: this process is no node)."""
    if not address or not trials:
        return
    inputs = local_inputs(trials)
    if not inputs:
        return
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    cpus = min(t.cpus for t in trials)
    with_gpus = float(ray.cluster_resources().get("GPU", 0)) > 0
    here = None if address.startswith("ray://") else ray.get_runtime_context().get_node_id()
    nodes = [n for n in ray.nodes() if n.get("Alive") and n["NodeID"] != here
             and n["Resources"].get("CPU", 0) >= cpus and (not with_gpus or n["Resources"].get("GPU", 0) > 0)]
    if not nodes:
        return
    paths = [p for _, p in inputs]
    from .local_ray import not_a_trial

    probe = ray.remote(num_cpus=0, max_retries=0, **not_a_trial())(_missing)
    refs = {probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(paths):
            n for n in nodes}
    ready, late = ray.wait(list(refs), num_returns=len(refs), timeout=ANSWER_TIMEOUT_S)
    for ref in late:
        ray.cancel(ref, force=True)
        log.warning("Ray node %s did not run the input check within %gs; its trials will report missing inputs "
                    "themselves", refs[ref]["NodeManagerAddress"], ANSWER_TIMEOUT_S)
    what = {p: w for w, p in inputs}
    problems = []
    for ref in ready:
        node = refs[ref]
        try:
            missing = ray.get(ref)
        except ray.exceptions.RayError as e:  # the node died in between: Ray's placement no longer counts on it
            log.warning("the input check on Ray node %s failed (%s)", node["NodeManagerAddress"],
                        str(e).splitlines()[0])
            continue
        if missing:
            problems.append(f"Ray node {node['NodeManagerAddress']} (node id {node['NodeID'][:12]}) cannot see "
                            + ", ".join(f"{what[p]} {p}" for p in missing))
    if problems:
        raise UserError("; ".join(sorted(problems)) + ": every node that may run a trial needs the study's local "
                        "inputs at the same path (copy or mount them there, or use a hub model id)")
