"""Connecting to the Ray cluster that cluster.yaml names.

``address: local`` attaches to a local Ray head started by ``switchyard up``
if one is running, and otherwise starts an embedded Ray inside this process
(gone when the process ends). ``auto`` and ``ray://`` attach to a real cluster;
then Switchyard's packages travel with the job as Ray py_modules.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile

import ray

from orchestrator.local_head import attaching_to, recorded_head, use_local_auth
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
                with attaching_to(head):
                    ray.init(address=head, **common)
            elif allow_embedded:
                ray.init(address="local", num_cpus=cluster.ray.num_cpus, include_dashboard=False,
                         _node_ip_address=cluster.ray.node_ip, **common)
            else:
                raise UsageError("no local Ray cluster is running; start one with `switchyard up`")
        else:
            _check_reachable(address)
            with _quiet_stderr() as said:  # Ray's C++ client retries loudly; the user gets one line
                try:
                    ray.init(address=address, runtime_env={"py_modules": _py_modules()}, **common)
                except ConnectionError:
                    if "InvalidAuthToken" in said():
                        raise ray.exceptions.AuthenticationError("InvalidAuthToken") from None
                    raise
    except ray.exceptions.AuthenticationError:
        raise UsageError(f"the Ray cluster at {address!r} refused this machine's auth token; set RAY_AUTH_TOKEN "
                         "or RAY_AUTH_TOKEN_PATH to the cluster's token (`ray get-auth-token` on its head)") from None
    except ConnectionError as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise UsageError(f"cannot reach the Ray cluster at {address!r} ({first}); check ray.address in cluster.yaml") from None
    return ray.get_runtime_context().gcs_address


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """A HOST:PORT or ray://HOST:PORT address must answer TCP at once: Ray itself retries for minutes."""
    import socket

    hostport = address.removeprefix("ray://")
    host, _, port = hostport.rpartition(":")
    if address == "auto" or not host or not port.isdigit():
        return
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except OSError as err:
        raise UsageError(f"cannot reach the Ray cluster at {address!r} ({err.strerror or type(err).__name__}); "
                         "check ray.address in cluster.yaml and that the head is up") from None


@contextlib.contextmanager
def _quiet_stderr():
    """Send this process's stderr (file descriptor 2, where Ray's C++ core logs) to a file meanwhile;
    yields a function returning what was written, which is dropped afterwards."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as f:
        os.dup2(f.fileno(), 2)
        said = lambda: (f.flush(), f.seek(0), f.read().decode("utf-8", "replace"))[-1]
        try:
            yield said
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def cluster_resources() -> dict[str, dict[str, dict[str, float]]]:
    """{node_id: {'address', 'total': {CPU, GPU}, 'free': {CPU, GPU}}} for alive nodes: what ``ray status`` shows.

    Usage comes from the GCS's cluster status (the source of ``ray status``), so CPUs held by anything
    on the cluster count as used: Switchyard's gangs, placement groups, and actors that are not ours.
    """
    from ray.autoscaler.v2.sdk import get_cluster_status

    status = get_cluster_status(ray.get_runtime_context().gcs_address, timeout=30)
    out = {}
    for node in status.active_nodes + status.idle_nodes:
        usage = {u.resource_name: u for u in (node.resource_usage.usage if node.resource_usage else [])}
        total = {k: float(usage[k].total) if k in usage else 0.0 for k in ("CPU", "GPU")}
        used = {k: float(usage[k].used) if k in usage else 0.0 for k in ("CPU", "GPU")}
        out[node.node_id] = {"address": node.ip_address, "total": total,
                             "free": {k: max(0.0, total[k] - used[k]) for k in total}}
    return out
