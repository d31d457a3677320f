"""What a process-engine replica sees of the host, decided as a value (Linux, as root).

A replica runs as an unprivileged uid of its own deployment, in a private mount
namespace where:

- the Kingpost home is an empty tmpfs (its database, ``secret.key``, ``credentials``,
  control sockets, projects, other replicas' working copies: all out of sight), with
  only the replica's own directory (read-write) and what it runs from (its Python
  environment, its deployment's dynamic config; read-only) bound back at their places;
- every directory others may not enter (``/root``, a 0700 parent of the home) that
  holds something the replica needs is an empty tmpfs too, with that thing bound back
  read-only: the exact directory, or for an interpreter's installation the top
  directory under the mask that holds it (``/root/.pyenv``: shims need all of it);
- ``/dev/shm`` is a fresh tmpfs (the engine mounts it; other replicas' secret files
  live under the host's).

:func:`plan_view` is pure; ``engines/_isolation.py`` makes the mounts.
"""

from __future__ import annotations

import hashlib
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["UID_BASE", "UID_SPAN", "View", "others_may_enter", "plan_view", "replica_uid"]

UID_BASE = 200_000_000
"""Replicas run as ``UID_BASE + h % UID_SPAN``, ``h`` the first 8 bytes of the SHA-256 of
their deployment id: uids 200000000 to 216777215, far above the users and the
subordinate-id ranges distributions hand out."""
UID_SPAN = 1 << 24


def replica_uid(deployment_id: str) -> int:
    """The uid (and gid) a deployment's replicas run as, derived from the deployment id.

    Never the config's ``docker_server.run_as_user_id``: that names a user inside an
    image, which only the docker engine has. On this machine it would be a real uid,
    perhaps a login user's, and shared by every deployment that names it (1000, as the
    docs advise for NVIDIA images), each then reading the others' ``/proc/PID/root``
    (their secrets) and environment. ``config/rules.py`` warns that it is not applied."""
    digest = hashlib.sha256(deployment_id.encode()).digest()
    return UID_BASE + int.from_bytes(digest[:8], "big") % UID_SPAN


def others_may_enter(path: Path) -> bool:
    """Whether a user that is neither owner nor group may search ``path``."""
    try:
        return bool(path.stat().st_mode & stat.S_IXOTH)
    except OSError:
        return False


@dataclass(frozen=True)
class View:
    masks: tuple[str, ...]
    """Directories to cover with an empty tmpfs, none inside another."""
    keep: tuple[tuple[str, bool], ...]
    """(path, writable) to bind back at the same place, parents first."""


def _under(path: Path, top: Path) -> bool:
    return path == top or top in path.parents


def plan_view(
    home: Path,
    own: Path,
    read_only: Sequence[Path],
    installs: Sequence[Path],
    may_enter: Callable[[Path], bool] = others_may_enter,
) -> View:
    """What to hide and what to bind back for a replica whose own tree is ``own``.

    ``read_only``: directories it needs as they are (its environment, PATH entries);
    ``installs``: interpreter installations (kept whole under a mask). Paths are
    resolved; ones that do not exist are left out."""
    home = home.resolve()
    needed: list[tuple[Path, bool, bool]] = [(own.resolve(), True, True)]
    for path, whole in [(p, False) for p in read_only] + [(p, True) for p in installs]:
        if path.exists():
            needed.append((path.resolve(), False, whole))
    found = {home}
    for path, _, _ in needed:
        found.update(a for a in path.parents if not may_enter(a))
    masks = sorted(m for m in found if not any(o in m.parents for o in found))
    keep: dict[Path, bool] = {}
    for path, writable, whole in needed:
        mask = next((m for m in masks if m in path.parents), None)
        if mask is None or _under(home, path):
            continue  # visible as it is, or it would show the home itself
        chosen = path
        if whole and not _under(path, home):
            top = mask / path.relative_to(mask).parts[0]
            if not _under(home, top):
                chosen = top
        keep[chosen] = keep.get(chosen, False) or writable
    ordered = sorted(keep.items(), key=lambda kv: len(kv[0].parts))
    kept = tuple(
        (str(p), w)
        for p, w in ordered
        if not any(o in p.parents and (wo or not w) for o, wo in ordered)
    )
    return View(tuple(str(m) for m in masks), kept)
