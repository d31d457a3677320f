"""The Ray engine on a real three-node Ray cluster (``helpers/raycluster.py``): replicas
spread over the nodes, served through the gateway, node caches collected, a worker node
killed under load, a control plane restarted and its actors adopted.

The cluster and the control plane start once for the module; the tests run in order
(each builds on what the one before left: the node killed, then the restart).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import httpx
import pytest

from helpers.platform import EXAMPLES, Platform, wait_answer, wait_for

pytestmark = [pytest.mark.ray, pytest.mark.slow]

NODES = ["kpt-ray-n2", "kpt-ray-n3", "kpt-ray-n4"]
"""The nodes' network namespaces, the head's first (the control plane runs there too)."""
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "models"
LEAN = "resources:\n  cpu: 500m\n  memory: 128Mi\n"


def _skip_reason() -> str | None:
    try:
        import ray  # noqa: F401
    except ImportError:
        return "the `ray` package is not installed (dev extra)"
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return "needs root and iproute2 to create the nodes' network namespaces"
    return None


def _unavailable(reason: str) -> NoReturn:
    """Skipped here; under CI (which installs everything these need) a failure, so a
    cluster that cannot start is never a green run."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    reason = _skip_reason()
    if reason:
        _unavailable(reason)
    from helpers import raycluster

    root = Path(f"/tmp/kpt-ray-{os.getpid()}")  # short: Ray's unix socket paths
    raycluster.network_down(NODES)  # what a killed earlier run left
    try:
        raycluster.network_up(NODES)
    except Exception as exc:
        raycluster.network_down(NODES)
        _unavailable(f"cannot create the test network (bridge, namespaces): {exc}")
    try:
        c = raycluster.start_cluster(root, NODES)
    except RuntimeError as exc:
        raycluster.network_down(NODES)
        _unavailable(f"the Ray test cluster did not start: {exc}")
    try:
        yield c
    finally:
        c.stop()
        raycluster.network_down(NODES)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ray-home")


def _platform(cluster: Any, home: Path) -> Platform:
    from helpers.raycluster import ray_env

    env = {
        **ray_env(),
        "KINGPOST_RAY_ADDRESS": cluster.address,
        "KINGPOST_RAY_NODE_DIR": str(home / "nodes"),
        "KINGPOST_RAY_NODE_CACHE_KEEP": "0",  # what no replica uses goes at once
    }
    head = cluster.nodes[0]
    return Platform(home / "kp", engine="ray", extra_env=env, netns=(head.netns, head.ip))


@pytest.fixture(scope="module")
def deployed(cluster: Any, home: Path) -> Iterator[dict[str, Any]]:
    """The control plane, and two deployments of 3 replicas each: a custom server (with a
    secret) and a model class."""
    p = _platform(cluster, home).start()
    state: dict[str, Any] = {"platform": p}
    try:
        server = home / "echo-server"
        shutil.copytree(EXAMPLES / "echo-server", server)
        cfg = server / "config.yaml"
        cfg.write_text(cfg.read_text() + LEAN + "secrets:\n  ray_token: null\n")
        model = home / "basic"
        shutil.copytree(FIXTURES / "basic", model)
        cfg = model / "config.yaml"
        cfg.write_text(cfg.read_text().split("resources:")[0] + LEAN)
        with p.client() as c:
            c.set_secret("ray_token", "s3cret-over-ray")
            for name, project in (("server", server), ("model", model)):
                r = c.push(project, min_replicas=3)
                state[name] = (r["model"]["id"], r["deployment"]["id"])
        for name in ("server", "model"):
            _wait_ready(p, state[name][1], 3, timeout=150)
        yield state
    finally:
        state["platform"].stop()
        from helpers.raycluster import kill_replicas

        kill_replicas(home / "nodes")


def _wait_ready(p: Platform, dep: str, n: int, timeout: float) -> None:
    with p.client() as c:
        wait_for(
            lambda: c.deployment(dep)["replicas_ready"] == n,
            timeout,
            f"{n} ready replicas of {dep} (server log: {p.log})",
        )


def _server_replicas(p: Platform, model_id: str, calls: int = 30) -> dict[str, dict[str, Any]]:
    """Replica id -> what its server says of itself, from ``calls`` requests."""
    seen: dict[str, dict[str, Any]] = {}
    with p.gateway() as gw:
        for _ in range(calls):
            r = gw.get(f"/models/{model_id}/environments/production/sync/env")
            assert r.status_code == 200, r.text
            body = r.json()
            rid = Path(body["env"]["APP_HOME"]).parent.name
            seen[rid] = body
    return seen


def _cluster(p: Platform) -> list[dict[str, Any]]:
    """The Ray engine's nodes as `kingpost engines` shows them."""
    out = p.cli("engines", "--output", "json")
    assert out.returncode == 0, out.stdout + out.stderr
    (ray,) = [e for e in json.loads(out.stdout)["engines"] if e["name"] == "ray"]
    assert ray["running"] and ray["default"], ray
    nodes: list[dict[str, Any]] = ray["nodes"]
    return nodes


def _node_of(app_home: str, home: Path) -> str:
    """The node directory a replica runs under: ``{node_dir}/{scope}/{node}/...``."""
    return Path(app_home).relative_to(home / "nodes").parts[1]


def test_replicas_spread_over_the_nodes_and_serve_through_the_gateway(
    deployed: dict[str, Any], home: Path
) -> None:
    p: Platform = deployed["platform"]
    server_id, _ = deployed["server"]
    model_id, _ = deployed["model"]
    seen = _server_replicas(p, server_id)
    assert len(seen) == 3, seen.keys()
    nodes = {_node_of(s["env"]["APP_HOME"], home) for s in seen.values()}
    assert len(nodes) == 3, nodes  # one per node (SPREAD)
    some = next(iter(seen.values()))
    assert some["secrets"] == {"ray_token": "s3cret-over-ray"}, some["secrets"]
    assert some["secrets_writable"] is False
    assert some["env"]["BT_MODEL_ID"] == server_id
    with p.gateway() as gw:
        r = wait_answer(gw, f"/models/{model_id}/production/predict", 200, {"text": "hi"}, 30)
        assert r.json()["echo"] == {"text": "hi"}, r.text
    nodes_seen = _cluster(p)
    assert len(nodes_seen) == 3 and all(n["alive"] for n in nodes_seen), nodes_seen
    assert sorted(len(n["replicas"]) for n in nodes_seen) == [2, 2, 2], nodes_seen
    # Each node prepared the model's project once, under its hash.
    projects = list((home / "nodes").glob("*/*/projects/*"))
    assert len(projects) == 6, projects  # 2 deployments x 3 nodes


def _net_namespace(pid: int | str) -> int:
    return os.stat(f"/proc/{pid}/ns/net").st_ino


def test_nothing_of_the_cluster_runs_in_the_tests_namespace(
    deployed: dict[str, Any], cluster: Any
) -> None:
    """Every Ray process of the cluster (raylets, GCS, workers, the replicas' actors), the
    control plane and its gateway run in the nodes' namespaces; none in this one, so no
    traffic of Ray's can leave the bridge."""
    p: Platform = deployed["platform"]
    ours = _net_namespace("self")
    spaces = {n.name: os.stat(f"/run/netns/{n.netns}").st_ino for n in cluster.nodes}
    assert p.proc is not None and _net_namespace(p.proc.pid) == spaces["kpt-ray-n2"]
    needle = str(cluster.root).encode()
    home = f"KINGPOST_HOME={p.home}".encode()  # the server and its gateway
    seen: dict[int, int] = {}
    planes = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            plane = home in (entry / "environ").read_bytes().split(b"\0")
            if plane or needle in (entry / "cmdline").read_bytes():
                seen[int(entry.name)] = _net_namespace(entry.name)
                planes += plane
    assert planes >= 2 and len(seen) > 10, seen  # the plane, and three nodes' Ray processes
    assert ours not in seen.values(), [pid for pid, ns in seen.items() if ns == ours]
    assert set(seen.values()) <= set(spaces.values()), seen


def _echo_server_asking(home: Path, name: str, cpu: str) -> Path:
    """examples/echo-server as model ``name``, asking ``cpu`` CPUs and 128Mi."""
    project = home / name
    shutil.copytree(EXAMPLES / "echo-server", project)
    cfg = project / "config.yaml"
    cfg.write_text(
        cfg.read_text().replace("model_name: echo-server", f"model_name: {name}")
        + f"resources:\n  cpu: '{cpu}'\n  memory: 128Mi\n"
    )
    return project


def test_a_config_the_cluster_cannot_hold_is_reported_not_left_pending(
    deployed: dict[str, Any], home: Path
) -> None:
    p: Platform = deployed["platform"]
    project = _echo_server_asking(home, "huge", "64")
    with p.client() as c:
        dep = c.push(project)["deployment"]["id"]
        d = p.wait_status(dep, "FAILED", "UNHEALTHY", timeout=60)
        assert "resources.cpu asks 64, the largest node has 2" in d["message"], d
        c.delete_model("huge")


def test_a_replica_that_finds_no_room_says_so_while_it_waits(
    deployed: dict[str, Any], home: Path
) -> None:
    """2 CPUs fit a node of the cluster (2 each), but the two deployments' six replicas
    (0.5 each) left no node 2 free: Ray queues the actor, and the replica says why."""
    p: Platform = deployed["platform"]
    project = _echo_server_asking(home, "roomless", "2")
    with p.client() as c:
        pushed = c.push(project)
        model, dep = pushed["model"]["id"], pushed["deployment"]["id"]
        (replica,) = wait_for(
            lambda: [
                r
                for r in c.replicas(model, dep)
                if r["message"].startswith("waiting for room on the Ray cluster")
            ],
            30,
            "the waiting replica's message",
        )
        assert replica["status"] == "STARTING", replica
        assert "it asks cpu 2, memory 0.12Gi on one node, and no node has" in replica["message"]
        assert c.deployment(dep)["status"] not in ("ACTIVE", "FAILED"), c.deployment(dep)
        c.delete_model("roomless")


def _placed(engines: dict[str, Any]) -> int:
    """How many replicas the Ray engine has on its nodes (``GET /v1/engines``)."""
    (ray,) = [e for e in engines["engines"] if e["name"] == "ray"]
    return sum(len(n["replicas"]) for n in ray["nodes"])


def _node_blobs(home: Path) -> dict[str, dict[str, int]]:
    """Node -> the weights blobs in its cache (name -> inode: a blob fetched again is a new
    file renamed into place, so its inode changes)."""
    out: dict[str, dict[str, int]] = {}
    for node in (home / "nodes").glob("*/*"):
        blobs = (node / "weights" / "blobs").glob("*/*")
        out[node.name] = {b.name: b.stat().st_ino for b in blobs}
    return out


def test_weights_reach_each_node_once_and_are_mounted_read_only(
    deployed: dict[str, Any], home: Path, public_tmp: Path
) -> None:
    """The mirror's files are shipped to each node's own cache (by content hash), once per
    node, and mounted read-only; a second deployment of the same weights fetches nothing."""
    p: Platform = deployed["platform"]
    repo = public_tmp / "ray-weights"  # any user may read it: the mirror copies only that
    (repo / "sub").mkdir(parents=True)
    (repo / "model.safetensors").write_bytes(b"w" * 4096)
    (repo / "sub" / "config.json").write_text("{}")
    weights = f"weights:\n  - source: file://{repo}\n    mount_location: /models/ray-w\n"
    deps: dict[str, tuple[str, str]] = {}
    first: dict[str, dict[str, int]] = {}
    try:
        with p.client() as c:
            for name, n in (("ray-weighted", 3), ("ray-weighted-2", 1)):
                project = home / name
                shutil.copytree(EXAMPLES / "echo-server", project)
                cfg = project / "config.yaml"
                text = cfg.read_text().replace("model_name: echo-server", f"model_name: {name}")
                cfg.write_text(text + LEAN + weights)
                r = c.push(project, min_replicas=n)
                deps[name] = (r["model"]["id"], r["deployment"]["id"])
                _wait_ready(p, deps[name][1], n, timeout=120)
                if name == "ray-weighted":
                    first = _node_blobs(home)
        model_id, _ = deps["ray-weighted"]
        seen = _server_replicas(p, model_id, calls=20)
        nodes = {_node_of(s["env"]["APP_HOME"], home) for s in seen.values()}
        assert len(nodes) == 3, nodes  # the two workers among them (SPREAD)
        for node in nodes:  # the two files' contents, once each
            assert len(first[node]) == 2, first
        files = f"/models/{model_id}/environments/production/sync/files?dir=/models/ray-w"
        with p.gateway() as gw:
            for _ in range(6):  # each replica, most likely
                body = gw.get(files).json()
                assert body == {"files": ["model.safetensors", "sub/config.json"],
                                "writable": False}, body  # fmt: skip
        trees = list((home / "nodes").glob("*/*/weights/trees/*"))
        assert len(trees) == 3, trees  # one per node, shared by both deployments
        assert _node_blobs(home) == first  # the second deployment fetched nothing
    finally:
        with p.client() as c:
            for name in deps:
                c.delete_model(name)
            wait_for(lambda: _placed(c.engines()) == 6, 60, "their replicas gone")


def test_a_node_keeps_only_what_its_replicas_use(deployed: dict[str, Any], home: Path) -> None:
    """After the weighted deployments above are deleted, their projects, weights trees and
    blobs and their replicas' homes are gone from every node (the keep period is 0 here);
    what the replicas still running claim is all that is left, and the environment a
    replica claims is the one it runs in (the model's, once per node)."""
    from kingpost.engines._node_cache import NodeCache

    nodes = sorted((home / "nodes").glob("*/*"))
    assert len(nodes) == 3, nodes

    def leftovers() -> list[str]:
        """What a node keeps beyond its live claims (their stops collect as they end)."""
        out = []
        for node in nodes:
            cache = NodeCache(node)
            claims = cache.live_claims()
            projects = {p.name for p in cache.projects.iterdir()}
            trees = list((cache.weights / "trees").iterdir())
            blobs = list((cache.weights / "blobs").glob("*/*"))
            homes = {r.name for r in cache.replicas.iterdir()}
            envs = {e.name for e in cache.envs.iterdir() if not e.name.startswith((".", "_"))}
            if envs != {c.environment for c in claims.values() if c.environment}:
                out.append(f"{node.name}: environments {envs}, claims {claims}")
            if projects != {c.project for c in claims.values()} or trees or blobs:
                out.append(f"{node.name}: projects {projects}, trees {trees}, blobs {blobs}")
            if homes != set(claims):
                out.append(f"{node.name}: replica homes {homes}, claims {set(claims)}")
        return out

    with contextlib.suppress(AssertionError):
        wait_for(lambda: not leftovers(), 30, "the nodes' caches collected")
    assert leftovers() == []
    claimed = sum(len(NodeCache(node).live_claims()) for node in nodes)
    assert claimed == 6  # the two deployments' replicas, three each


DEV_MODEL = """
import os


class Model:
    def load(self):
        self.value = VALUE

    def predict(self, model_input):
        return {"value": self.value, "pid": os.getpid()}
"""


def _ancestors(pid: int) -> list[int]:
    out = []
    while pid > 1:
        stat = Path(f"/proc/{pid}/stat").read_text()
        pid = int(stat[stat.rindex(")") + 2 :].split()[1])
        out.append(pid)
    return out


def test_a_development_replica_reloads_in_place_and_after_ray_restarts_it(
    deployed: dict[str, Any], cluster: Any, home: Path
) -> None:
    """A development deployment on Ray takes a code change in place (the same process),
    and a failed one leaves the last good code serving. When the actor's process is
    killed, its replica is stopped with it (not left running), and the actor Ray restarts
    comes back on the reloaded files, not on those it was created with, also when a
    control plane restarted in between adopted it."""
    from kingpost.engines._node_cache import NodeCache

    p: Platform = deployed["platform"]
    project = home / "ray-dev"
    (project / "model").mkdir(parents=True)
    (project / "config.yaml").write_text("model_name: ray-dev\n" + LEAN)
    model = project / "model" / "model.py"
    model.write_text(DEV_MODEL.replace("VALUE", "1"))

    def predict() -> dict[str, Any]:
        with p.gateway() as gw:
            r = gw.post("/models/ray-dev/development/predict", json={})
        assert r.status_code == 200, r.text
        return dict(r.json())

    try:
        with p.client() as c:
            dep = c.push(project, development=True)["deployment"]
            p.wait_status(dep["id"], "ACTIVE", timeout=150)
            first = predict()
            assert first["value"] == 1
            model.write_text(DEV_MODEL.replace("VALUE", "2"))
            done = c.development_sync("ray-dev", c.upload(project))
            assert (done["kind"], done["ok"]) == ("reload", True), done
            assert done["changed"] == ["model/model.py"], done
            assert predict() == {"value": 2, "pid": first["pid"]}
            model.write_text(DEV_MODEL.replace("VALUE", "1 / 0"))
            done = c.development_sync("ray-dev", c.upload(project))
            assert (done["kind"], done["ok"]) == ("reload", False), done
            assert "ZeroDivisionError" in done["error"], done
            assert predict() == {"value": 2, "pid": first["pid"]}

        def kill_its_actor(server_pid: int) -> dict[str, Any]:
            """Kill the actor's process alone (its replica goes with it); the answer of
            the replica Ray's restart of the actor brings back."""
            claims = {
                int(json.loads(path.read_text())["pid"])
                for node in (home / "nodes").glob("*/*")
                for path in NodeCache(node).uses.glob("*.json")
            }
            (worker,) = [pid for pid in _ancestors(server_pid) if pid in claims]
            os.kill(worker, signal.SIGKILL)
            wait_for(lambda: not Path(f"/proc/{server_pid}").exists(), 30, "replica stopped")

            def restarted() -> dict[str, Any] | None:
                answer = predict()
                return answer if answer["pid"] != server_pid else None

            return wait_for(restarted, 120, f"the replica back after its actor's restart ({p.log})")

        again = kill_its_actor(first["pid"])
        assert again["value"] == 2  # the reloaded files, not those it was created with
        # A control plane restarted meanwhile adopts the actor and still knows its files.
        p.stop(signal.SIGTERM)
        p = deployed["platform"] = _platform(cluster, home).start()
        assert wait_for(predict, 60, "the adopted replica answering")["pid"] == again["pid"]
        assert kill_its_actor(again["pid"])["value"] == 2
    finally:
        with p.client() as c:
            c.delete_model("ray-dev")
            wait_for(lambda: _placed(c.engines()) == 6, 60, "its replica gone")


def test_a_worker_node_dies_under_load_and_its_replicas_start_elsewhere(
    deployed: dict[str, Any], cluster: Any, home: Path
) -> None:
    p: Platform = deployed["platform"]
    server_id, server_dep = deployed["server"]
    model_id, model_dep = deployed["model"]
    victim = cluster.nodes[-1]
    stop = threading.Event()
    counts = {"ok": 0, "failed": 0}
    errors: list[str] = []

    def load() -> None:
        with p.gateway() as gw:
            while not stop.is_set():
                try:
                    r = gw.post(f"/models/{server_id}/production/predict", json={"n": 1})
                    ok = r.status_code == 200
                    if not ok:
                        errors.append(f"{r.status_code} {r.text[:200]}")
                except httpx.HTTPError as exc:
                    ok = False
                    errors.append(repr(exc))
                counts["ok" if ok else "failed"] += 1
                time.sleep(0.02)

    clients = [threading.Thread(target=load) for _ in range(3)]
    for t in clients:
        t.start()
    try:
        wait_for(lambda: counts["ok"] > 20, 30, "load to flow")
        cluster.kill(victim)
        for dep in (server_dep, model_dep):
            with p.client() as c:
                wait_for(
                    lambda d=dep: c.deployment(d)["replicas_ready"] < 3, 60, "the loss noticed"
                )
        _wait_ready(p, server_dep, 3, timeout=120)
        _wait_ready(p, model_dep, 3, timeout=120)
        before = counts["ok"]
        wait_for(lambda: counts["ok"] > before + 20, 30, "load to flow after")
    finally:
        stop.set()
        for t in clients:
            t.join(timeout=30)
    # Only requests in flight on the dead node may fail: one per client at most.
    assert counts["failed"] <= len(clients), (counts, errors[:5])
    seen = _server_replicas(p, server_id)
    nodes = {_node_of(s["env"]["APP_HOME"], home) for s in seen.values()}
    assert len(seen) == 3 and len(nodes) == 2, (seen.keys(), nodes)
    with p.gateway() as gw:
        r = gw.post(f"/models/{model_id}/production/predict", json={"text": "again"})
        assert r.status_code == 200, r.text
    alive = [n for n in _cluster(p) if n["alive"]]
    assert len(alive) == 2 and sum(len(n["replicas"]) for n in alive) == 6, alive
    # The dead node's directory (Ray never gives its id again) is swept by the others.
    wait_for(lambda: len(list((home / "nodes").glob("*/*"))) == 2, 30, "its directory gone")


def test_a_restarted_control_plane_adopts_the_running_actors(
    deployed: dict[str, Any], cluster: Any, home: Path
) -> None:
    p: Platform = deployed["platform"]
    server_id, server_dep = deployed["server"]
    before = {rid: s["pid"] for rid, s in _server_replicas(p, server_id).items()}
    p.stop(signal.SIGTERM)
    assert "left running on the ray engine" in p.output(), p.output()
    again = _platform(cluster, home).start()
    deployed["platform"] = again
    _wait_ready(again, server_dep, 3, timeout=60)
    after = {rid: s["pid"] for rid, s in _server_replicas(again, server_id).items()}
    assert after == before  # the same replicas, the same processes: adopted, not started
