"""What the Ray engine runs on each node of the cluster: one actor per replica.

:class:`ReplicaHost` is placed by Ray's scheduler. On the node it lands on it prepares
its replica: the project archive is unpacked and the Python environment built under the
node's cache (``{node_dir}/{scope}/{node}/``), and its weights fetched in chunks from the
control plane's :class:`WeightsSource` into the node's own blob store (``weights/``), all
keyed by content hash, so a node's second replica of a deployment prepares nothing and a
second deployment with the same weights fetches none. Each replica claims what it uses
there; what no replica claims goes after a while (:mod:`._node_cache`). It then runs the
replica with the process engine's own code (a one-replica
:class:`~kingpost.engines.process.ProcessEngine`: the same environment variables,
``/secrets`` files, read-only weights, probes, restarts after exits), and a TCP forwarder
on the node's address hands the gateway's connections to it (the replica listens on
loopback, in its own network namespace when permitted).

Secrets: the actor is created with them sealed (Fernet) under a key of its replica's own;
the key reaches it only in a later method call (:meth:`ReplicaHost.unlock`), never in
the creation arguments Ray keeps (in its GCS, to restart the actor) nor in the object
store. An actor restarted by Ray (its node died) waits for the key again, which the
control plane sends when it sees the actor ask for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, cast

from kingpost.engines._node_cache import Claim, NodeCache
from kingpost.engines._records import records_dir
from kingpost.engines.base import Endpoint, ReplicaPhase, ReplicaSpec, WeightMount
from kingpost.weights.blobs import BlobStore, Manifest

__all__ = [
    "HostPlan",
    "NodeWeights",
    "ReplicaHost",
    "WeightsSource",
    "fetch_weights",
    "pack_project",
]

log = logging.getLogger(__name__)

STOP_POLL_S = 0.05
WEIGHTS_CHUNK = 64 * 1024 * 1024
"""Bytes of one weights file a node asks the control plane's :class:`WeightsSource` for at
once: no object in Ray's store is larger, however large the file."""


@dataclass(frozen=True)
class NodeWeights:
    """One weights entry as a node fetches it: its mirror manifest (path -> sha256, size)
    and, for a single-file entry (``external_data``), that file's path in the tree."""

    mount_location: str
    manifest: Manifest
    single_file: str | None = None


@dataclass(frozen=True)
class HostPlan:
    """Everything a :class:`ReplicaHost` is created with (kept by Ray to restart it)."""

    spec: ReplicaSpec
    """With no secrets, no ``app_dir`` of meaning here, no interpreter: the node makes those."""
    archive: bytes
    archive_hash: str
    sealed_secrets: bytes
    """The secrets as JSON, sealed with the key :meth:`ReplicaHost.unlock` brings."""
    node_dir: str
    scope: str
    settings: dict[str, Any]
    """The control plane's settings the node's process engine runs under (model_env, …)."""
    weights: tuple[NodeWeights, ...] = ()
    weights_source: str = ""
    """The name of the control plane's :class:`WeightsSource` actor (namespace kingpost)."""
    cache_keep_s: float = 3600.0
    """How long the node keeps what no replica on it uses (:mod:`._node_cache`)."""


def pack_project(app_dir: Path) -> tuple[bytes, str]:
    """The project as a tar archive and the sha256 of its bytes (files in sorted order,
    owner and times cleared, so the same files give the same hash)."""

    def clean(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.mtime = 0
        return info

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for path in sorted(app_dir.rglob("*")):
            tar.add(path, arcname=str(path.relative_to(app_dir)), recursive=False, filter=clean)
    data = buf.getvalue()
    return data, hashlib.sha256(data).hexdigest()


def _unpack(archive: bytes, digest: str, apps_dir: Path) -> Path:
    """The project unpacked once per node under its hash (renamed into place, so two
    replicas preparing at once never see half a tree)."""
    target = apps_dir / digest
    if target.is_dir():
        return target
    if hashlib.sha256(archive).hexdigest() != digest:
        raise ValueError(f"project archive: sha256 is not {digest}; the upload was damaged")
    apps_dir.mkdir(parents=True, exist_ok=True)
    work = apps_dir / f".{digest}.{os.getpid()}.{threading.get_ident()}"
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r") as tar:
        tar.extractall(work, filter="data")
    try:
        work.rename(target)
    except OSError:  # another replica's unpack won
        shutil.rmtree(work, ignore_errors=True)
    return target


class WeightsSource:
    """Serves the control plane's mirrored weights blobs to the nodes, a chunk per call
    (an actor pinned to the control plane's node, reading its blob store)."""

    def __init__(self, store_root: str) -> None:
        self._store = BlobStore(Path(store_root))

    def read(self, digest: str, offset: int, length: int) -> bytes:
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ValueError(f"weights blob: {digest!r} is not a sha256 in hex")
        with self._store.blob_path(digest).open("rb") as fh:
            fh.seek(offset)
            return fh.read(min(length, WEIGHTS_CHUNK))


def fetch_weights(
    weights: tuple[NodeWeights, ...],
    read: Callable[[str, int, int], bytes],
    cache: Path,
    note: Callable[[str], object],
    chunk: int = WEIGHTS_CHUNK,
) -> tuple[WeightMount, ...]:
    """Each entry's files in the node's own content-addressed cache (``cache``, a
    :class:`BlobStore`: blobs by sha256, read-only hard-link trees per manifest), fetched
    with ``read(sha256, offset, length)`` (a :class:`WeightsSource` call) ``chunk`` bytes
    at a time, only when missing; the mounts the replica gets, at the same
    ``mount_location`` the process engine uses.

    Replicas preparing on one node at once take a lock per blob (``flock``), so a blob is
    fetched once; the blob is verified (size, sha256) and renamed into place, the tree
    built aside and renamed, so a reader never sees half of either."""
    import fcntl

    store = BlobStore(cache)
    locks = cache / "locks"
    locks.mkdir(exist_ok=True)
    fetched = fetched_bytes = 0
    mounts = []
    for w in weights:
        for digest, size in sorted(set(w.manifest.files.values())):
            if store.has(digest):
                continue
            with (locks / digest).open("w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                if store.has(digest):
                    continue
                with store.writer() as (fh, tmp):
                    offset = 0
                    while offset < size:
                        data = read(digest, offset, chunk)
                        if not data:
                            break
                        fh.write(data)
                        offset += len(data)
                    fh.close()
                    store.commit(tmp, size, digest)
                fetched, fetched_bytes = fetched + 1, fetched_bytes + size
        tree = store.tree(w.manifest)
        path = tree / w.single_file if w.single_file else tree
        mounts.append(WeightMount(w.mount_location, path))
    if weights:
        note(f"weights: fetched {fetched} files ({fetched_bytes} bytes) onto this node; "
             "the rest were in its cache")  # fmt: skip
    return tuple(mounts)


class _Forwarder:
    """Accepts TCP connections on the node's address and pipes each to the replica.

    Protocols, not streams: the bytes of one side are written to the other as they
    arrive (no task, read call or drain per chunk), and a side whose peer's buffer fills
    stops reading until it drains. With streams the hop cost a quarter of a fast
    replica's throughput through the gateway (``bench/ray_engine.py``)."""

    def __init__(self, host: str, upstream: Any) -> None:
        self._upstream = upstream
        self._loop = asyncio.new_event_loop()
        self._sock = socket.create_server((host, 0), backlog=512)
        self.port: int = self._sock.getsockname()[1]
        self._thread = threading.Thread(target=self._run, name="kingpost-forward", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        with contextlib.suppress(asyncio.CancelledError):  # close()
            self._loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        server = await self._loop.create_server(lambda: _Client(self), sock=self._sock)
        async with server:
            await server.serve_forever()

    async def connect(self, client: _Client) -> None:
        """Connect ``client`` to the replica; if that fails, close it before its first
        byte is answered (the gateway retries elsewhere)."""
        endpoint: Endpoint | None = self._upstream()
        up = _Half()
        try:
            if endpoint is None:
                raise ConnectionRefusedError("the replica is not running")
            if endpoint.netns is None:
                await self._loop.create_connection(lambda: up, endpoint.host, endpoint.port)
            else:
                from kingpost.netns import socket_in_netns

                sock = socket_in_netns(endpoint.netns)
                sock.setblocking(False)
                try:
                    await self._loop.sock_connect(sock, (endpoint.host, endpoint.port))
                    await self._loop.create_connection(lambda: up, sock=sock)
                except BaseException:
                    sock.close()
                    raise
        except OSError:
            client.close()
            return
        client.join(up)

    def close(self) -> None:
        def stop() -> None:
            for task in asyncio.all_tasks(self._loop):
                task.cancel()

        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(stop)
        self._thread.join(timeout=5)


class _Half(asyncio.Protocol):
    """One side of a forwarded connection: what it receives goes to its peer as it comes;
    its end of input half-closes the peer, and both close once both ends came."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: _Half | None = None
        self.ended = False
        self._held: list[bytes] = []  # received before the peer was connected

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Not an isinstance check: uvloop's transports (Ray's workers run uvloop) are not
        # asyncio.Transport subclasses, though they have its methods.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None:
            peer.transport.write(data)
        else:
            self._held.append(data)

    def eof_received(self) -> bool:
        self.ended = True
        self._pass_end()
        return True  # the other direction may still be carrying an answer

    def _pass_end(self) -> None:
        peer = self.peer
        if peer is None or peer.transport is None:
            return
        if peer.transport.can_write_eof():
            peer.transport.write_eof()
        if peer.ended:  # both directions done
            self.close()
            peer.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.peer is not None:
            self.peer.close()

    def pause_writing(self) -> None:  # our buffer is full: the peer stops reading
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()

    def join(self, peer: _Half) -> None:
        """Pair with ``peer`` (now connected) and send it what came meanwhile."""
        self.peer, peer.peer = peer, self
        if self.transport is None:  # gone while the peer connected
            peer.close()
            return
        held, self._held = self._held, []
        for data in held:
            assert peer.transport is not None
            peer.transport.write(data)
        if self.ended:
            self._pass_end()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class _Client(_Half):
    """The gateway's side: connects to the replica when it is accepted."""

    def __init__(self, forwarder: _Forwarder) -> None:
        super().__init__()
        self._forwarder = forwarder

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._connecting = asyncio.ensure_future(self._forwarder.connect(self))


class ReplicaHost:
    """One replica on a Ray node (the actor's class; see the module docstring)."""

    def __init__(self, plan: HostPlan) -> None:
        import ray

        self._plan = plan
        self._key = threading.Event()
        self._project: tuple[bytes, str] | None = None
        self._watch_end = -1  # the write end of the pipe the watcher waits on (_watch)
        self._secrets: dict[str, str] = {}
        self._engine: Any = None
        self._forwarder: _Forwarder | None = None
        self._failed = ""
        self._phase_note = "preparing the replica on its node"
        self._build: deque[str] = deque(maxlen=200)
        ctx = ray.get_runtime_context()
        self._node_id: str = ctx.get_node_id()
        self._node_ip: str = ray.util.get_node_ip_address()  # type: ignore[no-untyped-call]
        gpu_ids = ray.get_gpu_ids()
        self._gpus = tuple(str(g) for g in gpu_ids) if gpu_ids else None
        self._started = time.time()
        self._node_home = Path(plan.node_dir) / plan.scope / self._node_id[:16]
        self._cache = NodeCache(self._node_home)
        threading.Thread(target=self._run, name="kingpost-replica-host", daemon=True).start()

    # -- what the control plane calls -----------------------------------------------------
    def unlock(self, key: bytes, project: tuple[bytes, str] | None = None) -> bool:
        """Bring the key the secrets were sealed with; the replica starts once prepared.
        ``project``: the archive and hash of the project it was reloaded onto since it was
        created (:meth:`reload`), which a restarted actor runs instead of its plan's."""
        if self._key.is_set():
            return True
        self._project = project
        from cryptography.fernet import Fernet, InvalidToken

        try:
            plain = Fernet(key).decrypt(self._plan.sealed_secrets)
        except (InvalidToken, ValueError):
            self._failed = "the secrets' key does not open them; restart the control plane"
            return False
        self._secrets = dict(json.loads(plain))
        self._key.set()
        return True

    def reload(self, files: dict[str, bytes], removed: list[str]) -> dict[str, Any] | None:
        """Patch the replica's own copy of its project with ``files`` (relative path ->
        content) and ``removed``, and reload it in place (the process engine's
        :meth:`~kingpost.engines.process.ProcessEngine.reload`); ``None`` if it cannot."""
        engine = self._engine
        if engine is None:
            return None
        for rel in [*files, *removed]:
            parts = Path(rel).parts
            if Path(rel).is_absolute() or ".." in parts or not parts:
                raise ValueError(f"reload: {rel!r} is not a path inside the project")
        with tempfile.TemporaryDirectory(dir=self._node_home, prefix=".reload-") as tmp:
            for rel, data in files.items():
                path = Path(tmp) / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
            result = engine.reload(self._plan.spec.replica_id, Path(tmp), list(files), removed)
        return None if result is None else asdict(result)

    def status(self) -> dict[str, Any]:
        spec = self._plan.spec
        out: dict[str, Any] = {
            "replica_id": spec.replica_id,
            "deployment_id": spec.deployment_id,
            "generation": spec.generation,
            "node_id": self._node_id,
            "node_ip": self._node_ip,
            "needs_key": not self._key.is_set(),
            "phase": ReplicaPhase.STARTING.value,
            "host": None,
            "port": None,
            "restarts": 0,
            "message": self._phase_note,
            "started_at": self._started,
        }
        if self._failed:
            out.update(phase=ReplicaPhase.FAILED.value, message=self._failed)
            return out
        engine = self._engine
        if engine is None:
            return out
        statuses = engine.poll()
        if not statuses:
            out.update(phase=ReplicaPhase.STOPPED.value, message="stopped")
            return out
        st = statuses[0]
        out.update(phase=st.phase.value, restarts=st.restarts, message=st.message)
        if st.endpoint is not None and self._forwarder is not None:
            out.update(host=self._node_ip, port=self._forwarder.port)
        return out

    def stop(self, grace_s: float) -> bool:
        """Stop the replica (SIGTERM, grace, SIGKILL, as the process engine does)."""
        engine = self._engine
        if engine is not None:
            engine.stop(self._plan.spec.replica_id)
            deadline = time.monotonic() + grace_s + 5
            while engine.poll() or self._still_tracked(engine):
                if time.monotonic() > deadline:
                    break
                time.sleep(STOP_POLL_S)
            engine.close()
        if self._forwarder is not None:
            self._forwarder.close()
        self._cache.release(self._plan.spec.replica_id)
        self._collect()
        return True

    @staticmethod
    def _still_tracked(engine: Any) -> bool:
        with engine._lock:
            return bool(engine._replicas)

    def logs(self, tail: int) -> list[str]:
        lines = list(self._build)
        engine = self._engine
        if engine is not None:
            lines += [line.text for line in engine.logs(self._plan.spec.deployment_id, tail)]
        return lines[-tail:]

    # -- preparing and starting on this node --------------------------------------------------
    def _run(self) -> None:
        try:
            self._start()
        except Exception as exc:
            log.exception("ray engine: preparing replica %s", self._plan.spec.replica_id)
            self._failed = f"preparing the replica on node {self._node_ip} failed: {exc}"

    def _start(self) -> None:
        from kingpost.engines.process import (
            ProcessEngine,
            prepare_python,
            python_environment_hash,
        )
        from kingpost.settings import Settings

        plan, spec = self._plan, self._plan.spec
        node_settings = Settings(home=self._node_home, **plan.settings)
        # Claimed before used, so no collection on this node removes it meanwhile.
        claim = Claim(
            plan.archive_hash,
            manifests=tuple(w.manifest.id for w in plan.weights),
            blobs=tuple(sorted({d for w in plan.weights for d, _ in w.manifest.files.values()})),
        )
        self._cache.claim(spec.replica_id, claim)
        app_dir = _unpack(plan.archive, plan.archive_hash, self._node_home / "projects")
        assert spec.config is not None
        environment = python_environment_hash(node_settings, spec.config, app_dir)
        self._cache.claim(spec.replica_id, replace(claim, environment=environment))
        weights: tuple[WeightMount, ...] = ()
        if plan.weights:
            self._phase_note = "fetching the weights onto its node"
            import ray

            source = ray.get_actor(plan.weights_source, namespace="kingpost")

            def read(digest: str, offset: int, length: int) -> bytes:
                return bytes(ray.get(source.read.remote(digest, offset, length)))

            weights = fetch_weights(
                plan.weights,
                read,
                self._node_home / "weights",
                self._build.append,
            )
        prepared = prepare_python(node_settings, spec.config, app_dir, self._build.append)
        self._phase_note = "waiting for the control plane to send the secrets' key"
        self._key.wait()
        if self._project is not None and self._project[1] != plan.archive_hash:
            archive, digest = self._project  # reloaded since created: its files, not the plan's
            self._cache.claim(
                spec.replica_id, replace(claim, project=digest, environment=environment)
            )
            app_dir = _unpack(archive, digest, self._node_home / "projects")
        home = self._node_home / "replicas" / spec.replica_id
        replica_settings = Settings(home=home, **plan.settings)
        self._watch(records_dir(replica_settings.run_dir), replica_settings.stop_grace_period)
        engine = ProcessEngine(replica_settings)
        engine.start(
            replace(
                spec,
                app_dir=app_dir,
                python_executable=prepared.python_executable,
                secrets=self._secrets,
                gpus=self._gpus,
                weights=weights,
            )
        )
        self._forwarder = _Forwarder(self._node_ip, lambda: _endpoint(engine))
        self._engine = engine
        self._collect()

    def _watch(self, records: Path, grace_s: float) -> None:
        """Start the watcher that stops this actor's replica once the actor's process
        ends, however it ends (:mod:`._ray_watch`); the pipe's write end stays here."""
        read_end, self._watch_end = os.pipe()
        try:
            subprocess.Popen(
                [sys.executable, "-m", "kingpost.engines._ray_watch", str(read_end),
                 str(records), str(grace_s)],
                pass_fds=(read_end,),
                start_new_session=True,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )  # fmt: skip
        finally:
            os.close(read_end)

    def _collect(self) -> None:
        """Collect the node's cache (what this node's replicas no longer use) and the
        directories of nodes gone from the cluster; a failure is logged, never the
        replica's."""
        import ray

        try:
            report = self._cache.collect(self._plan.cache_keep_s)
            nodes = ray.nodes()  # type: ignore[no-untyped-call]
            alive = {str(n["NodeID"])[:16] for n in nodes if n.get("Alive")}
            report.removed += self._cache.sweep_dead(alive).removed
        except Exception:
            log.exception("ray engine: collecting the node cache %s", self._node_home)
            return
        if report.removed:
            self._build.append(report.summary())
            log.info("ray engine: %s on node %s", report.summary(), self._node_ip)


def _endpoint(engine: Any) -> Endpoint | None:
    statuses = engine.poll()
    return statuses[0].endpoint if statuses else None
