"""One place that opens the Docker Engine API and translates its errors."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kingpost.errors import EngineError

if TYPE_CHECKING:
    from docker import DockerClient

__all__ = ["docker_client", "image_exists"]


def docker_client() -> DockerClient:
    """A client for the engine named by ``DOCKER_HOST`` (default: the local socket)."""
    try:
        import docker
        from docker.errors import DockerException
    except ImportError as exc:
        raise EngineError(
            "the docker engine needs the `docker` Python package; install kingpost[docker]"
        ) from exc
    try:
        client = docker.from_env(timeout=120)
        client.ping()
    except DockerException as exc:
        raise EngineError(
            f"cannot reach the Docker Engine ({exc}); start dockerd or set DOCKER_HOST, "
            "or use --engine process"
        ) from exc
    return client


def image_exists(client: DockerClient, tag: str) -> bool:
    from docker.errors import DockerException, ImageNotFound

    try:
        client.images.get(tag)
    except ImageNotFound:
        return False
    except DockerException as exc:
        raise EngineError(f"cannot inspect image {tag} on the Docker Engine: {exc}") from exc
    return True
