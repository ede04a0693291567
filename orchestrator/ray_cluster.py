"""Connecting to the Ray cluster that cluster.yaml names.

``address: local`` attaches to a local Ray head started by ``switchyard up``
if one is running, and otherwise starts an embedded Ray inside this process
(gone when the process ends). ``auto`` and ``ray://`` attach to a real cluster;
then Switchyard's packages travel with the job as Ray py_modules.
"""
from __future__ import annotations

import logging
import os

import ray

from orchestrator.local_head import recorded_head, use_local_auth
from specs.errors import UsageError

_PACKAGES = ("orchestrator", "specs", "scaling", "workers", "models", "data")


def _py_modules() -> list:
    import importlib

    return [importlib.import_module(p) for p in _PACKAGES]


def connect(cluster, *, allow_embedded: bool = True) -> str:
    """Make sure this process is connected; return the cluster's GCS address.

    ``local`` attaches only to the head ``switchyard up`` started (its address is
    recorded next to the job store), never to an unrelated Ray on the machine.
    """
    if ray.is_initialized():
        return ray.get_runtime_context().gcs_address
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    common = dict(namespace=cluster.ray.namespace, log_to_driver=False, logging_level=logging.ERROR,
                  configure_logging=True)
    address = cluster.ray.address
    try:
        if address == "local":
            use_local_auth(cluster, create=True)
            head = recorded_head(cluster)
            if head is not None:
                ray.init(address=head, **common)
            elif allow_embedded:
                ray.init(address="local", num_cpus=cluster.ray.num_cpus, include_dashboard=False,
                         _node_ip_address=cluster.ray.node_ip, **common)
            else:
                raise UsageError("no local Ray cluster is running; start one with `switchyard up`")
        else:
            ray.init(address=address, runtime_env={"py_modules": _py_modules()}, **common)
    except ConnectionError as err:
        raise UsageError(f"cannot reach the Ray cluster at {address!r} ({err}); check ray.address in cluster.yaml") from None
    return ray.get_runtime_context().gcs_address


def cluster_resources() -> dict[str, dict[str, dict[str, float]]]:
    """{node_id: {'total': {...}, 'free': {...}}} for alive nodes, CPU/GPU only."""
    out = {}
    avail_by_node = {}
    try:
        from ray._private.state import state as _state

        avail_by_node = _state._available_resources_per_node()
    except Exception:
        avail_by_node = {}
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        nid = node["NodeID"]
        total = node.get("Resources", {})
        free = avail_by_node.get(nid, total)
        out[nid] = {
            "address": node.get("NodeManagerAddress"),
            "total": {k: float(total.get(k, 0.0)) for k in ("CPU", "GPU")},
            "free": {k: float(free.get(k, 0.0)) for k in ("CPU", "GPU")},
        }
    return out
