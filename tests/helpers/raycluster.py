"""A real three-node Ray cluster for the Ray engine's tests, each node in a network
namespace of its own.

The namespaces are joined by veth pairs to a bridge in this namespace (10.77.0.1, which
only routes): the head at 10.77.0.2, the workers at 10.77.0.3 and up. Each has its own
``/etc/hosts`` (the host name resolves to the node's address, which is how Ray finds it
there) and an unreachable resolver (``/etc/netns/NS``), so nothing of Ray's reaches beyond
loopback and the bridge. The control plane runs in the head's namespace, as it would on the
head machine (a Ray driver needs a node on its own machine), and the tests reach its API
and gateway over the bridge. Nodes start one at a time: Ray's raylet gives its dashboard
agent a fixed 15 s to come up, which a loaded two-core machine can miss when several start
together (a node that misses it is started again, up to three times).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

BRIDGE = "kpt-ray-br"
SUBNET = "10.77.0"
BRIDGE_IP = f"{SUBNET}.1"
HEAD_IP = f"{SUBNET}.2"
TOKEN = "kingpost-ray-tests-0123456789abcdef"
RAY = str(Path(sys.executable).with_name("ray"))


def ray_env() -> dict[str, str]:
    return {
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": TOKEN,
        # A dead worker is noticed in seconds, not the default ~30 s.
        "RAY_health_check_period_ms": "1000",
        "RAY_health_check_timeout_ms": "2000",
        "RAY_health_check_failure_threshold": "4",
    }


@dataclass
class Node:
    name: str
    ip: str
    netns: str
    proc: subprocess.Popen[bytes] | None = None


@dataclass
class RayCluster:
    root: Path
    gcs_port: int = 0
    nodes: list[Node] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"{HEAD_IP}:{self.gcs_port}"

    def kill(self, node: Node) -> None:
        """SIGKILL a node's whole process tree (raylet, agents, its actors' workers)."""
        if node.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(node.proc.pid, signal.SIGKILL)
        node.proc.wait(timeout=10)
        _kill_under(self.root / node.name)

    def stop(self) -> None:
        for node in reversed(self.nodes):
            self.kill(node)


def _run(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=30)


def _kill_under(temp_dir: Path) -> None:
    """Kill what left the node's process group but belongs to it (its agents keep running
    when the raylet is SIGKILLed): processes naming its temp dir, or holding a file there."""
    needle = str(temp_dir)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            mine = needle.encode() in (entry / "cmdline").read_bytes() or any(
                os.readlink(fd).startswith(needle) for fd in (entry / "fd").iterdir()
            )
            if mine:
                os.kill(int(entry.name), signal.SIGKILL)


def kill_replicas(node_dir: Path) -> None:
    """Kill replica servers whose ``APP_HOME`` lies under ``node_dir``: a node killed in a
    test leaves them orphaned (a real dead node takes them along)."""
    prefix = b"APP_HOME=" + str(node_dir).encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if any(v.startswith(prefix) for v in (entry / "environ").read_bytes().split(b"\0")):
                os.kill(int(entry.name), signal.SIGKILL)


def _namespace(name: str, ip: str) -> None:
    _run("ip", "netns", "add", name)
    _run("ip", "link", "add", f"{name}-v", "type", "veth", "peer", "name", "eth0", "netns", name)
    _run("ip", "link", "set", f"{name}-v", "master", BRIDGE, "up")
    _run("ip", "-n", name, "addr", "add", f"{ip}/24", "dev", "eth0")
    _run("ip", "-n", name, "link", "set", "eth0", "up")
    _run("ip", "-n", name, "link", "set", "lo", "up")
    etc = Path("/etc/netns") / name
    etc.mkdir(parents=True, exist_ok=True)
    (etc / "resolv.conf").write_text("nameserver 127.0.0.1\n")
    (etc / "hosts").write_text(f"127.0.0.1 localhost\n{ip} {socket.gethostname()}\n")


def node_ip(index: int) -> str:
    """The address of the ``index``-th node (0: the head)."""
    return f"{SUBNET}.{index + 2}"


def network_up(names: list[str]) -> None:
    """The bridge, and a namespace per node (``names[0]`` the head's)."""
    _run("ip", "link", "add", BRIDGE, "type", "bridge")
    _run("ip", "addr", "add", f"{BRIDGE_IP}/24", "dev", BRIDGE)
    _run("ip", "link", "set", BRIDGE, "up")
    # Docker's FORWARD policy drops bridged traffic when br_netfilter is loaded.
    with contextlib.suppress(subprocess.CalledProcessError, FileNotFoundError):
        _run("iptables", "-I", "FORWARD", "1", "-i", BRIDGE, "-o", BRIDGE, "-j", "ACCEPT")
    for i, name in enumerate(names):
        _namespace(name, node_ip(i))


def network_down(names: list[str]) -> None:
    for name in names:
        with contextlib.suppress(subprocess.CalledProcessError):
            _run("ip", "netns", "del", name)
        shutil.rmtree(Path("/etc/netns") / name, ignore_errors=True)
    with contextlib.suppress(subprocess.CalledProcessError, FileNotFoundError):
        _run("iptables", "-D", "FORWARD", "-i", BRIDGE, "-o", BRIDGE, "-j", "ACCEPT")
    with contextlib.suppress(subprocess.CalledProcessError):
        _run("ip", "link", "del", BRIDGE)


def _start_node(cluster: RayCluster, node: Node, head: bool) -> None:
    temp = cluster.root / node.name
    log = cluster.root / f"{node.name}.log"
    args = [RAY, "start", "--block", "--disable-usage-stats", f"--node-ip-address={node.ip}"]
    args += ["--num-cpus=2", "--memory=4000000000", f"--temp-dir={temp}"]
    if head:
        args += ["--head", f"--port={cluster.gcs_port}", "--include-dashboard=false"]
    else:
        args += [f"--address={cluster.address}"]
    args = ["ip", "netns", "exec", node.netns, *args]
    for _attempt in range(3):
        shutil.rmtree(temp, ignore_errors=True)
        with log.open("wb") as out:
            node.proc = subprocess.Popen(
                args,
                env={**os.environ, **ray_env()},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            text = log.read_text(errors="replace")
            if "Ray runtime started" in text:
                return
            if node.proc.poll() is not None or "Exception" in text:
                break
            time.sleep(0.2)
        cluster.kill(node)
    raise RuntimeError(f"ray node {node.name} did not start:\n{log.read_text()[-2000:]}")


def start_cluster(root: Path, names: list[str]) -> RayCluster:
    """Ray on each namespace of ``names`` (made by :func:`network_up`): the first the head."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))  # a port number free here is all but surely free there
        port = int(s.getsockname()[1])
    root.mkdir(parents=True, exist_ok=True)
    cluster = RayCluster(root, port)
    try:
        for i, name in enumerate(names):
            node = Node(name, node_ip(i), name)
            cluster.nodes.append(node)
            _start_node(cluster, node, head=i == 0)
    except Exception:
        cluster.stop()
        raise
    return cluster
