"""``build_image``: a Truss project to a local image, tagged by a hash of its inputs.

The tag is ``kingpost/<model-name>:<hash>``, where the hash covers the
Dockerfile, every file of the build context, the build arguments, the base
image's ID and, for model classes, the ``kingpost`` package source. An
unchanged project finds its tag on the engine and never rebuilds. Output
streams to a log callback line by line; a failing step raises
:class:`~kingpost.errors.BuildError` naming the command and its last lines.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import tarfile
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import kingpost
from kingpost._cancel import Cancel
from kingpost._cancel import current as current_cancel
from kingpost.errors import BuildError, EngineError
from kingpost.images.base import ensure_base_image
from kingpost.images.client import docker_client, image_exists
from kingpost.images.dockerfile import BuildPlan, HostBuildEnv, plan_build
from kingpost.packaging import project_files

if TYPE_CHECKING:
    from docker import DockerClient

    from kingpost.config import TrussConfig

__all__ = ["build_image", "image_tag", "plan_for"]

Log = Callable[[str], None]
IMAGE_LABEL = "kingpost.image"
_LAST_LINES = 25
_CHUNK = 1 << 20
"""Bytes read from a project file at a time, to hash it or to send it."""
_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


def build_image(
    config: TrussConfig,
    app_dir: Path,
    log: Log,
    client: DockerClient | None = None,
    host: HostBuildEnv | None = None,
    truss_version: str | None = None,
) -> str:
    """Build (or find) the image of the project at ``app_dir``; return its tag.
    ``truss_version``: whose server packages a model class without its own
    ``truss_version`` gets (``KINGPOST_TRUSS_VERSION``; None: the newest set)."""
    client = client or docker_client()
    plan = plan_for(config, app_dir, client, log, host, truss_version)
    for warning in plan.warnings:
        log(f"warning: {warning}")
    tag = image_tag(config, plan, _base_id(client, plan.base_image))
    lock, cancel = _lock_for(tag), current_cancel()
    # Another deployment may be building the same image: wait for it, unless cancelled.
    if not lock.acquire(blocking=False):
        log(f"waiting for another deployment's build of image {tag}")
        if not cancel.acquire(lambda timeout: lock.acquire(timeout=timeout)):
            raise _stopped(cancel)
    try:
        if image_exists(client, tag):
            log(f"image {tag} is up to date")
            return tag
        log(f"building image {tag} from {plan.base_image}")
        _docker_build(client, plan, tag, log)
    finally:
        lock.release()
    log(f"built image {tag}")
    return tag


def plan_for(
    config: TrussConfig,
    app_dir: Path,
    client: DockerClient,
    log: Log,
    host: HostBuildEnv | None = None,
    truss_version: str | None = None,
) -> BuildPlan:
    """The build plan of a project, with the base image made available first."""
    base = config.base_image.image if config.base_image and config.base_image.image else None
    if base is None:
        base = ensure_base_image(client, log)
    files = {rel.as_posix(): app_dir / rel for rel in project_files(app_dir)}
    base_set = None
    if not config.is_custom_server:
        from kingpost.envs.baseset import base_set_for
        from kingpost.envs.builder import truss_version_of

        base_set = base_set_for(truss_version_of(config), truss_version, log)
    return plan_build(
        config,
        files,
        base,
        host or HostBuildEnv.from_host(),
        package_dir=Path(kingpost.__file__).parent,
        base_set=base_set,
    )


def image_tag(config: TrussConfig, plan: BuildPlan, base_id: str) -> str:
    """``kingpost/<model-name>:<16 hex>`` from everything that shapes the image."""
    digest = hashlib.sha256()

    def add(*parts: str | bytes) -> None:
        for part in parts:
            data = part.encode() if isinstance(part, str) else part
            digest.update(len(data).to_bytes(8, "big") + data)

    def add_file(path: Path) -> None:
        """As ``add(path.read_bytes())``, a chunk at a time: a data file may be gigabytes."""
        with path.open("rb") as f:
            digest.update(os.fstat(f.fileno()).st_size.to_bytes(8, "big"))
            while chunk := f.read(_CHUNK):
                digest.update(chunk)

    add("kingpost-image-v1", plan.dockerfile, base_id)
    for name, value in sorted(plan.buildargs.items()):
        add(name, value)
    for rel, content in sorted(plan.files.items()):
        if isinstance(content, bytes):
            add(rel, content)
        else:  # the context keeps the file's mode (an executable script stays one)
            add(rel)
            add_file(content)
            add(oct(_context_mode(content)))
    for rel, path in _package_files(plan.package_dir):
        add(f"kingpost/{rel}")
        add_file(path)
    name = re.sub(r"[^a-z0-9]+", "-", (config.model_name or "").lower()).strip("-")
    return f"kingpost/{name or 'project'}:{digest.hexdigest()[:16]}"


def _package_files(package_dir: Path | None) -> Iterator[tuple[str, Path]]:
    if package_dir is None:
        return
    for path in sorted(package_dir.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
            yield path.relative_to(package_dir).as_posix(), path


def _base_id(client: DockerClient, base: str) -> str:
    from docker.errors import DockerException, ImageNotFound

    try:
        return str(client.images.get(base).id)
    except ImageNotFound:
        return base  # not local: the build will try to pull it, and say so if it cannot
    except DockerException as exc:
        raise EngineError(f"cannot inspect base image {base}: {exc}") from exc


def _lock_for(tag: str) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(tag, threading.Lock())


def _context_mode(path: Path) -> int:
    """The mode a project file gets in the build context (and so in the image)."""
    return path.stat().st_mode & 0o777 | 0o444


def _context_entries(plan: BuildPlan) -> Iterator[tuple[str, bytes | Path, int]]:
    """(path in the context, content, mode) of every file of the build context."""
    yield "Dockerfile", plan.dockerfile.encode(), 0o644
    for rel, content in plan.files.items():
        if isinstance(content, bytes):
            yield rel, content, 0o644
        else:
            yield rel, content, _context_mode(content)
    for rel, path in _package_files(plan.package_dir):
        yield f"kingpost-build/kingpost/{rel}", path, 0o644


def _context_tar(plan: BuildPlan, cancel: Cancel) -> Iterator[bytes]:
    """The build context as an uncompressed tar, made from the project's files while it is
    sent: no copy of the project and no tar file on disk first (a ``data/`` directory may
    hold gigabytes), and a build cancelled meanwhile stops sending at the next chunk."""
    dirs = {"app"}  # the Dockerfile copies it, even when empty
    entries = list(_context_entries(plan))
    for name, _, _ in entries:
        parts = name.split("/")[:-1]
        dirs.update("/".join(parts[: i + 1]) for i in range(len(parts)))
    for name in sorted(dirs):
        info = tarfile.TarInfo(name)
        info.type, info.mode = tarfile.DIRTYPE, 0o755
        yield info.tobuf(format=tarfile.PAX_FORMAT)
    for name, content, mode in entries:
        if cancel.reason is not None:
            raise _stopped(cancel)
        info = tarfile.TarInfo(name)
        info.mode = mode
        if isinstance(content, bytes):
            info.size = len(content)
            yield info.tobuf(format=tarfile.PAX_FORMAT) + content + _padding(len(content))
            continue
        with content.open("rb") as f:
            stat = os.fstat(f.fileno())
            info.size, info.mtime = stat.st_size, int(stat.st_mtime)
            yield info.tobuf(format=tarfile.PAX_FORMAT)
            left = info.size
            while left > 0:
                if cancel.reason is not None:
                    raise _stopped(cancel)
                chunk = f.read(min(_CHUNK, left))
                if not chunk:  # shrank while sent: the header promised more
                    raise BuildError(f"{content} changed while the image build read it")
                left -= len(chunk)
                yield chunk
        yield _padding(info.size)
    yield b"\0" * (2 * tarfile.BLOCKSIZE)


def _stopped(cancel: Cancel) -> BuildError:
    return BuildError(f"the image build was stopped: {cancel.reason}")


def _padding(size: int) -> bytes:
    return b"\0" * (-size % tarfile.BLOCKSIZE)


def _docker_build(client: DockerClient, plan: BuildPlan, tag: str, log: Log) -> None:
    """Run the build on the engine, its output to ``log``.

    A cancelled build (see :mod:`kingpost._cancel`) hangs up the build request: the
    Docker Engine then stops the build and removes the container of the step it was
    running, which would otherwise run on to its end with nobody waiting for it."""
    from docker.errors import DockerException

    cancel = current_cancel()
    requests = _BuildRequests(client)
    try:
        with requests:
            stream: Iterable[Mapping[str, Any]] = client.api.build(
                # An iterator, which requests sends chunked; docker-py's stubs say IO only.
                fileobj=_context_tar(plan, cancel),  # type: ignore[arg-type]
                custom_context=True,
                tag=tag,
                buildargs=dict(plan.buildargs),
                rm=True,
                forcerm=True,
                decode=True,
                labels={IMAGE_LABEL: "1"},
            )
        with cancel.on_cancel(requests.hang_up):
            _follow(stream, plan, log)
    except DockerException as exc:
        if cancel.reason is not None:
            raise _stopped(cancel) from exc
        raise BuildError(f"image build of {tag} failed: the Docker Engine said {exc}") from exc
    except Exception as exc:
        if cancel.reason is not None:  # the connection we closed broke off the stream
            raise _stopped(cancel) from exc
        raise


class _BuildRequests:
    """The responses to ``/build`` requests this thread makes on ``client`` while the
    block runs, so that another thread can hang them up (docker-py does not hand the
    response of a streamed build to its caller)."""

    def __init__(self, client: DockerClient) -> None:
        self._hooks: list[Any] = client.api.hooks.setdefault("response", [])
        self._thread = threading.get_ident()
        self._responses: list[Any] = []

    def _capture(self, response: Any, *args: Any, **kwargs: Any) -> Any:
        path = str(getattr(response.request, "path_url", "")).split("?", 1)[0]
        if threading.get_ident() == self._thread and path.endswith("/build"):
            self._responses.append(response)
        return response

    def __enter__(self) -> _BuildRequests:
        self._hooks.append(self._capture)
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.remove(self._capture)

    def hang_up(self) -> None:
        for response in self._responses:
            sock = getattr(getattr(response.raw, "connection", None), "sock", None)
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
"""The colour codes the builder wraps a step's stderr in."""
_BUILDER_NOISE = re.compile(r"^ ---> |^Removing intermediate container ")
"""The builder's own lines, which say nothing about why a step failed."""


def _follow(stream: Iterable[Mapping[str, Any]], plan: BuildPlan, log: Log) -> None:
    step = ""
    last: list[str] = []
    for chunk in stream:
        text = _ANSI.sub("", str(chunk.get("stream", "")))
        for line in text.splitlines():
            if not line.strip():
                continue
            log(line)
            if re.match(r"^Step \d+/\d+ : ", line):
                step, last = line.split(" : ", 1)[1], []
            elif not _BUILDER_NOISE.match(line):
                last = [*last[-(_LAST_LINES - 1) :], line]
        if "error" in chunk:
            error = str(chunk["error"]).strip()
            log(error)
            raise BuildError(_failure_message(step, error, last, plan), command=_command(step))


def _command(step: str) -> str:
    """The user's command of a ``RUN ["/bin/sh", "-c", cmd]`` step, else the step."""
    if step.startswith("RUN ["):
        try:
            argv = json.loads(step[4:])
        except ValueError:
            return step
        if isinstance(argv, list) and len(argv) == 3 and argv[:2] == ["/bin/sh", "-c"]:
            return str(argv[2])
    return step


def _failure_message(step: str, error: str, last: list[str], plan: BuildPlan) -> str:
    if not step or step.startswith("FROM "):
        return (
            f"base_image.image `{plan.base_image}` is not on this Docker Engine and could "
            f"not be pulled ({error}); load it first (docker load / docker pull) or "
            "remove base_image to use the Kingpost base"
        )
    tail = "\n".join(last)
    return f"image build failed at `{_command(step)}`: {error}; last output:\n{tail}"
