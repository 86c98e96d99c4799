"""Gives every preloading node of a joined cluster its idle, preloaded trial processes back as a launch leaves it.

A node started as cluster.yaml starts it prestarts one worker process per CPU, which preloads sweeper
(sweeper/node_preload.py), only as the node comes up. A launch's trials take those processes, and Ray ends every
process of a job when the job ends, so without this the next launch on the same nodes found none: its trials ran in
processes Ray started for them, which preloaded first (slower than cold on 2 CPUs: docs/performance.md).

Ray's raylet can start more (``NodeManagerService.PrestartWorkers``: how many, for no job, kept alive how long), but
Ray 2.60's Python API does not expose it, so this calls it over gRPC as `ray memory` calls its raylets, through
Ray's own channel helper (its TLS and token settings). Processes started for no job serve whichever job comes next;
once KEEP_ALIVE_S has passed, Ray ends the idle ones beyond one per CPU, so launches never pile them up. Only on the
Ray versions this was tested with (TESTED_RAY): elsewhere the launch says it left the nodes as they are.
"""
from __future__ import annotations

from typing import Any

TESTED_RAY = ("2.60.",)
# long enough that a refilled process outlives the end of the job that asked for it (Ray trims idle processes beyond
# one per CPU, and the job's own ones still count until they are ended)
KEEP_ALIVE_S = 60
RPC_TIMEOUT_S = 5.0


def unsupported() -> str | None:
    """Why this Ray cannot refill the nodes, or None."""
    import ray

    if not ray.__version__.startswith(TESTED_RAY):
        return f"Ray {ray.__version__} (refilling is tested on {', '.join(v + 'x' for v in TESTED_RAY)})"
    try:
        import grpc  # noqa: F401 - Ray's raylet channel
        from ray.core.generated import node_manager_pb2
    except ImportError as e:
        return f"{e.name} is not installed"
    fields = node_manager_pb2.PrestartWorkersRequest.DESCRIPTOR.fields_by_name
    if not {"num_workers", "keep_alive_duration_secs", "job_id"} <= set(fields):
        return "this Ray's raylet takes no PrestartWorkers request"
    return None


def refill(nodes: list[dict[str, Any]]) -> list[str]:
    """Ask each node (``ray.nodes()`` entries) to start, for no job, one preloading process per CPU it has; returns a
    line per node that could not be asked. Ray starts them in the background: this returns at once."""
    from ray._private.grpc_utils import init_grpc_channel
    from ray.core.generated import common_pb2, node_manager_pb2, node_manager_pb2_grpc

    problems = []
    for node in nodes:
        count = int(node.get("Resources", {}).get("CPU", 0))
        if count < 1:
            continue
        channel = init_grpc_channel(f"{node['NodeManagerAddress']}:{node['NodeManagerPort']}")
        try:
            node_manager_pb2_grpc.NodeManagerServiceStub(channel).PrestartWorkers(
                node_manager_pb2.PrestartWorkersRequest(language=common_pb2.PYTHON, num_workers=count,
                                                        keep_alive_duration_secs=KEEP_ALIVE_S),
                timeout=RPC_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - grpc.RpcError and channel errors: the node stays as it is
            problems.append(f"node {node.get('NodeManagerAddress')} ({str(node.get('NodeID'))[:8]}): "
                            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        finally:
            channel.close()
    return problems
