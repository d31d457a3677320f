"""The Kingpost-provided Python base image, built locally from Debian packages.

No image registry is needed: the root filesystem comes from ``debootstrap``
(Debian's own installer, reading the same apt mirror as the host) and is
imported with the Docker Engine's ``import`` call. The image is tagged by a
hash of its recipe (:data:`RECIPE`), so it is built once per machine and every
later call finds the tag and returns at once. Concurrent builders on one
machine wait for each other through a file lock.

The image holds Debian's Python 3 in a virtual environment at ``/opt/python``
(first on ``PATH``, so ``python``, ``python3`` and ``pip`` are that venv's,
the way the official Python images put theirs in ``/usr/local/bin``).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kingpost._cancel import current as current_cancel
from kingpost._filelock import locked
from kingpost.envs.installer import run_logged
from kingpost.errors import BuildError

if TYPE_CHECKING:
    from docker import DockerClient

__all__ = [
    "BASE_PYTHON",
    "BASE_PYTHON_VERSION",
    "BASE_REPOSITORY",
    "RECIPE",
    "base_image_tag",
    "ensure_base_image",
]

BASE_REPOSITORY = "kingpost/python-base"
BASE_PYTHON = "/opt/python/bin/python"
BASE_PYTHON_VERSION = "py311"
"""The Python of Debian bookworm, the only one the local base image offers."""

RECIPE: dict[str, Any] = {
    "schema": 1,
    "suite": "bookworm",
    "variant": "minbase",
    "include": ["python3", "python3-venv", "ca-certificates"],
    "venv": "/opt/python",
    "changes": [
        "ENV PATH=/opt/python/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "ENV LANG=C.UTF-8",
        "ENV PYTHONUNBUFFERED=1",
        'CMD ["python3"]',
    ],
}
"""Everything that decides the image's content; its hash is the image tag.
The apt mirror is not part of it: any Debian mirror serves the same packages."""

DEFAULT_MIRROR = "http://deb.debian.org/debian"
_URI = re.compile(r"^(?:URIs:\s*|deb\s+(?:\[[^]]*\]\s+)?)(https?://\S+)", re.MULTILINE)

Log = Callable[[str], None]


def base_image_tag() -> str:
    """``kingpost/python-base:<12 hex>``, the hash of :data:`RECIPE`."""
    digest = hashlib.sha256(json.dumps(RECIPE, sort_keys=True).encode()).hexdigest()
    return f"{BASE_REPOSITORY}:{digest[:12]}"


def debian_mirror(sources: Iterator[Path] | None = None) -> str:
    """The host's Debian mirror (from /etc/apt/sources.list*), else deb.debian.org."""
    paths = (
        sources
        if sources is not None
        else iter(
            [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
        )
    )
    for path in paths:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        for match in _URI.finditer(text):
            uri = match.group(1).rstrip("/")
            if uri.endswith("/debian"):
                return uri
    return DEFAULT_MIRROR


def ensure_base_image(client: DockerClient | None = None, log: Log = print) -> str:
    """Return the base image's tag, building and importing it first if it is missing."""
    from kingpost.images.client import docker_client, image_exists

    client = client or docker_client()
    tag = base_image_tag()
    if image_exists(client, tag):
        return tag
    # Builds on this machine share one; a cancelled build stops waiting, and stops
    # debootstrap if it was the one running it (the next build starts it again).
    with locked(Path(tempfile.gettempdir()) / "kingpost-base-image.lock", current_cancel()):
        if image_exists(client, tag):
            return tag
        started = time.monotonic()
        log(f"building the Kingpost base image {tag} with debootstrap (once per machine)")
        tmp = Path(tempfile.mkdtemp(prefix="kingpost-base-"))
        try:
            archive = _build_rootfs(tmp, log)
            _import(client, archive, tag)
        finally:
            _remove_build_dir(tmp, log)
        log(f"built {tag} in {time.monotonic() - started:.0f}s")
    return tag


def _remove_build_dir(tmp: Path, log: Log) -> None:
    """Remove the build's directory, after unmounting what debootstrap left mounted in it.

    debootstrap mounts proc and sysfs inside the root filesystem while it installs
    packages and unmounts them in an exit trap, which a SIGKILL (a cancelled build, Ctrl-C
    on ``kingpost image base``) skips. Removing the directory with those still mounted
    walks the host's /proc and /sys as root (``TemporaryDirectory`` even chmods what it
    cannot delete there), so they are detached first, and the directory is kept if
    anything stays mounted in it.
    """
    left = _unmount_under(tmp)
    if left:
        log(f"warning: kept {tmp}: still mounted there: {', '.join(left)}")
        return
    shutil.rmtree(tmp, ignore_errors=True)
    if tmp.exists():
        log(f"warning: could not remove all of {tmp}")


def _mounts_under(path: Path) -> list[str]:
    """Mount points at or below ``path`` in this process's mount namespace."""
    root = os.path.realpath(path)
    try:
        table = Path("/proc/self/mountinfo").read_text()
    except OSError:  # not Linux: debootstrap mounts nothing we could see
        return []
    points = []
    for line in table.splitlines():
        fields = line.split(" ")
        if len(fields) < 5:
            continue
        # Spaces, tabs, newlines and backslashes in a path are written as octal escapes.
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
        if point == root or point.startswith(root.rstrip("/") + "/"):
            points.append(point)
    return points


def _unmount_under(path: Path) -> list[str]:
    """Detach every mount at or below ``path``, deepest first; return what is left."""
    points = _mounts_under(path)
    if points:
        libc = ctypes.CDLL(None, use_errno=True)
        for point in sorted(points, key=len, reverse=True):
            libc.umount2(os.fsencode(point), _MNT_DETACH)
    return _mounts_under(path)


_MNT_DETACH = 2


def _build_rootfs(tmp: Path, log: Log) -> Path:
    if shutil.which("debootstrap") is None:
        raise BuildError(
            "the Kingpost base image needs `debootstrap` to build its root filesystem; "
            "install it (apt-get install debootstrap) or set base_image.image in config.yaml",
        )
    if os.geteuid() != 0:
        raise BuildError(
            "building the Kingpost base image runs debootstrap, which needs root; run "
            "`kingpost image base` as root once, or set base_image.image in config.yaml",
        )
    root = tmp / "rootfs"
    mirror = debian_mirror()
    debootstrap = [
        "debootstrap",
        f"--variant={RECIPE['variant']}",
        f"--include={','.join(RECIPE['include'])}",
        RECIPE["suite"],
        str(root),
        mirror,
    ]
    _run(debootstrap, log)
    _run(["chroot", str(root), "python3", "-m", "venv", RECIPE["venv"]], log)
    for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for child in (root / junk).glob("*"):
            if child.is_file():
                child.unlink()
    archive = tmp / "rootfs.tar"
    _run(
        [
            "tar",
            "--numeric-owner",
            "--exclude=./dev/*",
            "--exclude=./proc/*",
            "--exclude=./sys/*",
            "-C",
            str(root),
            "-cf",
            str(archive),
            ".",
        ],
        log,
    )
    return archive


def _run(command: list[str], log: Log) -> None:
    """Run a step of the base image's build; killed with the build when it is cancelled,
    and with the control plane when it dies."""
    log(f"$ {' '.join(command)}")
    run_logged(command, log, f"building the Kingpost base image: `{command[0]}`", whose="its")


def _import(client: DockerClient, archive: Path, tag: str) -> None:
    from docker.errors import DockerException

    repository, _, version = tag.partition(":")
    try:
        client.api.import_image_from_file(
            str(archive), repository=repository, tag=version, changes=RECIPE["changes"]
        )
    except DockerException as exc:
        raise BuildError(
            f"importing the base image {tag} into the Docker Engine failed: {exc}"
        ) from exc


if __name__ == "__main__":
    print(ensure_base_image())
