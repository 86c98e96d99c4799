"""Gives every preloading node of a joined cluster its idle, preloaded trial processes back as a launch leaves it.

A node started as cluster.yaml starts it prestarts one worker process per CPU, which preloads sweeper
(sweeper/node_preload.py), only as the node comes up. A launch's trials take those processes, and Ray ends every
process of a job when the job ends, so without this the next launch on the same nodes found none: its trials ran in
processes Ray started for them, which preloaded first (slower than cold on 2 CPUs: docs/performance.md).

Ray's raylet can start more (``NodeManagerService.PrestartWorkers``: how many, for no job, kept alive how long), but
Ray 2.60's Python API does not expose it, so this calls it over gRPC as `ray memory` calls its raylets, through
Ray's own channel helper (its TLS and token settings). Processes started for no job serve whichever job comes next.
A node gets back as many processes as the launch's actors took there (:func:`processes_taken`: read from the GCS's
actor table, so a trial stopped by Ctrl-C in its first seconds counts too; one per CPU at most); should it still have
its own, Ray ends the idle ones beyond its soft limit (CPUs + local_ray.SPARE_PROCESSES on the configs' nodes) once
KEEP_ALIVE_S has passed. Only on the Ray versions this was tested with (TESTED_RAY): elsewhere the launch says it
left the nodes as they are. After Ctrl-C too, within the seconds the launch takes to leave.
Through a Ray client (``ray://``), where the raylets' addresses are the cluster's own and seldom reachable from the
launching machine, a task on the cluster asks them before the launch leaves (scheduler.disconnect).
"""
from __future__ import annotations

from collections import Counter
from typing import Any

TESTED_RAY = ("2.60.",)
# long enough that a refilled process outlives the end of the job that asked for it (Ray trims idle processes beyond
# its soft limit, and the job's own ones still count until they are ended)
KEEP_ALIVE_S = 60
RPC_TIMEOUT_S = 5.0  # for all nodes at once


def unsupported() -> str | None:
    """Why this Ray cannot refill the nodes, or None."""
    import ray

    if not ray.__version__.startswith(TESTED_RAY):
        return f"Ray {ray.__version__} (refilling is tested on {', '.join(v + 'x' for v in TESTED_RAY)})"
    try:
        import grpc  # noqa: F401 - Ray's raylet channel
        from ray.core.generated import gcs_pb2, node_manager_pb2
    except ImportError as e:
        return f"{e.name or 'grpcio'} is not installed"
    fields = node_manager_pb2.PrestartWorkersRequest.DESCRIPTOR.fields_by_name
    if not {"num_workers", "keep_alive_duration_secs", "job_id"} <= set(fields):
        return "this Ray's raylet takes no PrestartWorkers request"
    if not {"pid", "address", "serialized_runtime_env"} <= set(gcs_pb2.ActorTableData.DESCRIPTOR.fields_by_name):
        return "this Ray's actor table does not say where its actors ran"
    return None


def processes_taken() -> Counter:
    """By node id: how many processes this job's actors without a runtime_env ran in (Tune's trial actors, and the
    loop's actor under a Ray client). Those are the ones a preloading node's preloaded processes went to (or processes
    Ray started for them, which preload too), and each ends with the job. Read from the GCS's actor table, which keeps
    ended actors: a trial stopped by Ctrl-C before it reported counts too. Actors with a runtime_env (the launch's own:
    local_ray.not_a_trial) never take a preloaded process."""
    import ray
    from ray._private import state
    from ray.core.generated import gcs_pb2

    job = ray.JobID.from_hex(ray.get_runtime_context().get_job_id())
    processes = set()
    for raw in state.state._connect_and_get_accessor().get_actor_table(job, None):
        actor = gcs_pb2.ActorTableData.FromString(raw)
        if actor.pid and actor.serialized_runtime_env in ("", "{}"):  # pid 0: never started
            processes.add((actor.address.node_id.hex(), actor.pid))
    return Counter(node for node, _ in processes)


def refill(nodes: list[dict[str, Any]], taken: dict[str, int]) -> list[str]:
    """Ask each node (``ray.nodes()`` entries) to start, for no job, as many preloading processes as this launch
    took there (``taken``, by node id: :func:`processes_taken`; at most one per CPU), all at once and within
    RPC_TIMEOUT_S; returns a line per node that could not be asked. Ray starts them in the background. Needs no
    connection to Ray."""
    from ray._common.network_utils import build_address
    from ray._private.grpc_utils import init_grpc_channel
    from ray.core.generated import common_pb2, node_manager_pb2, node_manager_pb2_grpc

    def name(node: dict[str, Any]) -> str:
        return f"node {node.get('NodeManagerAddress')} ({str(node.get('NodeID'))[:8]})"

    problems, asked, channels = [], [], []
    for node in nodes:
        count = min(int(node.get("Resources", {}).get("CPU", 0)), taken.get(node.get("NodeID"), 0))
        if count < 1:
            continue
        try:
            channel = init_grpc_channel(build_address(node["NodeManagerAddress"], node["NodeManagerPort"]))
            channels.append(channel)
            asked.append((node, node_manager_pb2_grpc.NodeManagerServiceStub(channel).PrestartWorkers.future(
                node_manager_pb2.PrestartWorkersRequest(language=common_pb2.PYTHON, num_workers=count,
                                                        keep_alive_duration_secs=KEEP_ALIVE_S),
                timeout=RPC_TIMEOUT_S)))
        except Exception as e:  # noqa: BLE001 - TLS files, addresses: the node stays as it is
            problems.append(f"{name(node)}: {type(e).__name__}: {e}")
    for node, call in asked:
        try:
            call.result()
        except Exception as e:  # noqa: BLE001 - grpc.RpcError (unreachable, deadline): the node stays as it is
            detail = getattr(e, "details", lambda: None)() or str(e)
            problems.append(f"{name(node)}: {type(e).__name__}: {detail.splitlines()[0] if detail else ''}")
    for channel in channels:
        channel.close()
    return problems


def refill_what_this_job_took(nodes: list[dict[str, Any]]) -> list[str]:
    """:func:`refill` with :func:`processes_taken`, in a task of the job on the cluster (through a Ray client)."""
    return refill(nodes, processes_taken())
