"""Separate network hosts on one machine, for tests of what crosses a network.

Each host is a network namespace with its own IP and network stack; all hosts hang off one bridge
that lives in a namespace of its own, so the machine's own network is untouched and nothing routes
outside. Every host runs its own raylet (`ray start`), and the hostname still resolves to 127.0.0.1
as on a stock machine, so a rank that binds to the hostname's address cannot be reached from the
other hosts: exactly what a real cluster meets. Needs root and iproute2 (CI runs as root).
"""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RAY = os.path.join(os.path.dirname(sys.executable), "ray")
RAY_PORT = 6379
# Declare a silent node dead within a few seconds, not the default half a minute.
FAST_HEALTH_CHECKS = {"RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "2000",
                      "RAY_health_check_failure_threshold": "5"}


def can_build_hosts() -> str | None:
    """None if this machine can build namespace hosts, else why not."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None:
        return "needs iproute2 (the `ip` command)"
    probe = f"sy-probe-{os.getpid()}"
    out = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if out.returncode != 0:
        return f"cannot create a network namespace: {out.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ip(*args: str) -> None:
    out = subprocess.run(["ip", *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {out.stderr.strip()}")


@dataclass
class Host:
    name: str  # the namespace
    ip: str
    link: str  # its veth end on the bridge


@dataclass
class Hosts:
    """A bridge namespace and hosts on 10.<x>.0.0/24; ``env`` is what every process on them gets."""

    workdir: str
    subnet: str = "10.77.0"
    tag: str = field(default_factory=lambda: f"{os.getpid() % 100000}")
    hosts: dict[str, Host] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    down: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.bridge = f"sybr{self.tag}"
        _ip("netns", "add", self.bridge)
        _ip("-n", self.bridge, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.bridge, "link", "set", "br0", "up")
        token = os.path.join(self.workdir, "ray_auth_token")
        with open(os.open(token, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
            f.write(secrets.token_hex(32))
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        self.env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=token, RAY_DEDUP_LOGS="0",
                        RAY_ENABLE_UV_RUN_RUNTIME_ENV="0", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
                        AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                        AWS_DEFAULT_REGION="us-east-1", **FAST_HEALTH_CHECKS)

    # ------------------------------------------------------------------ topology

    def add(self, name: str) -> Host:
        """A new host on the bridge, with the next free address."""
        index = len(self.hosts)
        ns, link = f"sy{self.tag}{name}", f"v{self.tag}{index}"
        host = Host(ns, f"{self.subnet}.{10 + index}", link)
        _ip("netns", "add", ns)
        _ip("-n", self.bridge, "link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _ip("-n", self.bridge, "link", "set", link, "master", "br0", "up")
        _ip("-n", ns, "addr", "add", f"{host.ip}/24", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        self.hosts[name] = host
        return host

    def cut(self, name: str) -> None:
        """Pull the host's cable: its link on the bridge goes down, its processes keep running."""
        _ip("-n", self.bridge, "link", "set", self.hosts[name].link, "down")
        self.down.add(name)

    def restore(self, name: str) -> None:
        _ip("-n", self.bridge, "link", "set", self.hosts[name].link, "up")
        self.down.discard(name)

    def workers_up(self) -> list[str]:
        """Worker hosts (all but the first, the head) whose cable is in."""
        return [n for n in list(self.hosts)[1:] if n not in self.down]

    # ------------------------------------------------------------------ processes

    def run(self, name: str, cmd: list[str], timeout: float = 600, check: bool = True, **kw):
        out = subprocess.run(["ip", "netns", "exec", self.hosts[name].name, *cmd], env=self.env, cwd=ROOT,
                             capture_output=True, text=True, timeout=timeout, **kw)
        if check and out.returncode != 0:
            raise AssertionError(f"{' '.join(cmd[:4])} on {name} exited {out.returncode}: "
                                 f"{(out.stderr or out.stdout)[-3000:]}")
        return out

    def popen(self, name: str, cmd: list[str], log: str):
        return subprocess.Popen(["ip", "netns", "exec", self.hosts[name].name, *cmd], env=self.env, cwd=ROOT,
                                stdout=open(log, "w"), stderr=subprocess.STDOUT)

    @property
    def head_address(self) -> str:
        return f"{next(iter(self.hosts.values())).ip}:{RAY_PORT}"

    def ray_start(self, name: str, cpus: int, head: bool = False) -> None:
        host = self.hosts[name]
        cmd = [RAY, "start", f"--node-ip-address={host.ip}", f"--num-cpus={cpus}", "--disable-usage-stats"]
        cmd += ["--head", f"--port={RAY_PORT}", "--include-dashboard=false"] if head else \
            [f"--address={self.head_address}"]
        self.run(name, cmd, timeout=180)

    def wait_nodes(self, alive: int, timeout: float = 120) -> None:
        """Until the head counts ``alive`` live nodes."""
        check = ("import ray,sys; ray.init(address=sys.argv[1], log_to_driver=False); "
                 "print(sum(n['Alive'] for n in ray.nodes()))")
        deadline = time.time() + timeout
        while time.time() < deadline:
            out = self.run(next(iter(self.hosts)), [sys.executable, "-c", check, self.head_address], check=False)
            if out.returncode == 0 and out.stdout.strip().splitlines()[-1:] == [str(alive)]:
                return
            time.sleep(1.0)
        raise AssertionError(f"the cluster never had {alive} live nodes")

    def sy(self, name: str, cluster: str, *args: str, check: bool = True, timeout: float = 600):
        """The switchyard CLI, run on host ``name``."""
        return self.run(name, [sys.executable, "-m", "orchestrator.cli", "--cluster", cluster, *args],
                        check=check, timeout=timeout)

    def teardown(self) -> None:
        """Kill every process in the hosts' namespaces (never `ray stop`, which hits every Ray on the machine)."""
        for host in self.hosts.values():
            pids = subprocess.run(["ip", "netns", "pids", host.name], capture_output=True, text=True).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
        time.sleep(0.5)
        for host in self.hosts.values():
            subprocess.run(["ip", "netns", "del", host.name], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.bridge], capture_output=True)
