"""Which address and interface a rank's collectives use, and a reachability check before the rendezvous.

torch.distributed's gloo device and NCCL's bootstrap pick their address from the machine's hostname
unless told otherwise, and on many machines (Debian's default /etc/hosts among them) the hostname
resolves to 127.0.0.1: ranks on two hosts then try to reach each other on loopback and never connect.
Each rank therefore binds to the interface that holds the address Ray reports for its node (or the
interface cluster.yaml names), and before the rendezvous every rank checks it can open a TCP connection
to every other rank's node address, so a cluster whose hosts cannot reach each other fails once, with
a line naming the ranks, nodes and addresses, instead of timing out in gloo on every restart.
"""
from __future__ import annotations

import socket
import threading
from dataclasses import dataclass

from specs.errors import UsageError

PROBE_TIMEOUT_S = 5.0


class UnreachablePeers(UsageError):
    """Ranks of one job cannot open connections to each other: a network setup problem, not a fault to retry."""


def interface_for(ip: str) -> str | None:
    """The name of the network interface holding ``ip`` on this host, or None."""
    import psutil

    for name, addrs in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == ip for a in addrs):
            return name
    return None


def collective_env(node_ip: str, interface: str | None = None) -> dict[str, str]:
    """Environment that binds gloo and NCCL to this node's address: its interface, or the one configured."""
    name = interface or interface_for(node_ip)
    if name is None:
        raise UsageError(f"no network interface on this host holds the node address {node_ip} that Ray reports; "
                         "set workers.network_interface in cluster.yaml")
    return {"GLOO_SOCKET_IFNAME": name, "NCCL_SOCKET_IFNAME": name}


@dataclass
class Listener:
    """A TCP listener on the node's address that accepts and closes connections, for the reachability probe."""

    ip: str
    sock: socket.socket | None = None
    port: int = 0

    def open(self) -> int:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((self.ip, 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True, name="reachability-probe").start()
        return self.port

    def _serve(self) -> None:
        while self.sock is not None:
            try:
                conn, _ = self.sock.accept()
                conn.close()
            except OSError:
                return

    def close(self) -> None:
        sock, self.sock = self.sock, None
        if sock is not None:
            sock.close()


def probe(peers: list[tuple[int, str, int]], own_rank: int, timeout_s: float = PROBE_TIMEOUT_S) -> list[dict]:
    """Try a TCP connection to every other rank's (rank, ip, port); the failures as {rank, ip, port, error}."""
    failures = []
    for rank, ip, port in peers:
        if rank == own_rank:
            continue
        try:
            with socket.create_connection((ip, port), timeout=timeout_s):
                pass
        except OSError as err:
            failures.append({"rank": rank, "ip": ip, "port": port, "error": err.strerror or type(err).__name__})
    return failures


def unreachable_message(infos: list[dict], failures: dict[int, list[dict]]) -> str:
    """One line: which rank on which node could not reach which, at which address."""
    node = {i["rank"]: f"node {i['node'][:8]} ({i['ip']})" for i in infos}
    parts = [f"rank {src} on {node[src]} cannot reach rank {f['rank']} on {node[f['rank']]} at "
             f"{f['ip']}:{f['port']} ({f['error']})"
             for src, fails in sorted(failures.items()) for f in fails]
    more = f" and {len(parts) - 3} more" if len(parts) > 3 else ""
    return ("the job's hosts cannot reach each other: " + "; ".join(parts[:3]) + more
            + ". Check that the nodes' addresses Ray reports are routable between them and no firewall blocks "
              "TCP between them, or set workers.network_interface in cluster.yaml")
