"""The local Ray head ``switchyard up`` starts on this machine, and the token that guards it.

Everything here lives in Switchyard's state folder (next to the job store), never in the user's
HOME: the head's address (so the tool only attaches to the head it started) and the Ray auth token,
created with 0600 permissions on first use. Ray reads its auth settings from the environment when it
is imported, so ``use_local_auth`` must run before ``import ray``; nothing in this module imports it.
"""
from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
import socket
import subprocess
import sys

from specs.errors import UsageError

TOKEN_FILE = "ray_auth_token"
ADDRESS_FILE = "ray_address"


def state_dir(cluster) -> str:
    """Switchyard's own state on this machine: the folder that holds the job store."""
    return os.path.dirname(cluster.job_store)


def token_path(cluster) -> str:
    return os.path.join(state_dir(cluster), TOKEN_FILE)


def ensure_token(cluster) -> str:
    """The auth token file of this machine's local Ray, created (0600, 256 random bits) if missing."""
    path = token_path(cluster)
    if os.path.exists(path):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another command created it first
        return path
    except OSError as err:
        raise UsageError(f"cannot create the Ray auth token {path} ({err.strerror}); "
                         f"check that {os.path.dirname(path)} is writable") from None
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    return path


def use_local_auth(cluster, create: bool = False) -> None:
    """Token authentication for the local Ray: this process and every Ray process it starts use our token.

    A token the user set (RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH) wins; otherwise Switchyard's own file,
    which is created only when ``create`` is set (by the commands that start or reach Ray), so a
    command refused for bad input writes nothing.
    """
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    if not os.environ.get("RAY_AUTH_TOKEN") and not os.environ.get("RAY_AUTH_TOKEN_PATH"):
        os.environ["RAY_AUTH_TOKEN_PATH"] = token_path(cluster)
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if create and path == token_path(cluster):
        ensure_token(cluster)


# ---------------------------------------------------------------------- the head's address


def _address_file(cluster) -> str:
    return os.path.join(state_dir(cluster), ADDRESS_FILE)


def recorded_head(cluster) -> str | None:
    """The address of the local Ray head ``switchyard up`` started, if it is still answering."""
    path = _address_file(cluster)
    if not os.path.exists(path):
        return None
    address = open(path).read().strip()
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=1.0):
            return address
    except (OSError, ValueError):
        return None


def record_head(cluster, address: str | None) -> None:
    path = _address_file(cluster)
    if address is None:
        if os.path.exists(path):
            os.remove(path)
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(address)


# ---------------------------------------------------------------------- start / stop


def _ray_bin() -> str:
    return os.path.join(os.path.dirname(sys.executable), "ray")


# Ray replaces a loopback address with the machine's own, in `ray start --node-ip-address` and in the
# address ray.init attaches to, and then its servers listen on every interface. Its single-machine mode
# (this variable at 0, read when ray is imported) keeps a loopback head on loopback.
_SINGLE_MACHINE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@contextlib.contextmanager
def attaching_to(address: str):
    """Around ``ray.init(address=...)`` of a local head: a loopback address stays loopback."""
    from ray._private import ray_constants

    before = ray_constants.ENABLE_RAY_CLUSTER
    if _is_loopback(address.rpartition(":")[0]):
        ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name
        return host == "localhost"


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def start_head(cluster) -> str:
    """Start a local Ray head listening on ``ray.node_ip`` (127.0.0.1 by default); record and return its address."""
    use_local_auth(cluster, create=True)
    host = cluster.ray.node_ip
    port = _free_port(host)
    cmd = [_ray_bin(), "start", "--head", f"--port={port}", f"--node-ip-address={host}",
           "--disable-usage-stats", "--include-dashboard=false"]
    if cluster.ray.num_cpus:
        cmd.append(f"--num-cpus={cluster.ray.num_cpus}")
    env = dict(os.environ)
    if _is_loopback(host):
        env[_SINGLE_MACHINE] = "0"
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        tail = (out.stderr.strip().splitlines() or ["unknown error"])[-1]
        raise UsageError(f"could not start a local Ray head: {tail}")
    address = f"{host}:{port}"
    record_head(cluster, address)
    return address


def stop_session(session: str, timeout_s: float = 20.0) -> None:
    """End the processes of one local Ray session (the head `up` started), not every Ray on the machine.

    In Ray's own order (`ray stop`): the raylet first, then the agents and monitors, the GCS last. Sent all
    at once, the GCS waits on a raylet that is itself going away and hangs out the whole grace period."""
    import psutil

    buckets: list[list[psutil.Process]] = [[], [], []]
    for p in psutil.process_iter(["cmdline"]):
        try:
            cmdline = p.info["cmdline"] or []
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if p.pid == os.getpid() or not any(session in part for part in cmdline):
            continue
        program = os.path.basename(cmdline[0])
        buckets[0 if program == "raylet" else 2 if program == "gcs_server" else 1].append(p)
    for procs in buckets:
        for p in procs:
            try:
                p.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=timeout_s / len(buckets))
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
