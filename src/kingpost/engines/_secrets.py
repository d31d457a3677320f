"""Where engines keep replicas' secret files: directories on tmpfs that only this user
can enter, under names anyone can predict in world-writable ``/dev/shm``."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from collections.abc import Mapping
from pathlib import Path

from kingpost.errors import EngineError

__all__ = ["private_dir", "remove_secrets", "tmpfs", "write_secrets"]


def tmpfs() -> Path:
    """``/dev/shm`` where it exists (secrets never touch a disk), else ``/tmp``."""
    shm = Path("/dev/shm")
    return shm if shm.is_dir() else Path("/tmp")


def private_dir(path: Path) -> None:
    """Make ``path`` a directory only this user can enter, or refuse one it finds that
    someone else made: its owner could read or swap what is put in it."""
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        raise EngineError(
            f"{path} is not owned by this user (uid {os.geteuid()}) or is not a directory; "
            "secret files cannot be kept there safely. Remove it and start again"
        )
    if stat.S_IMODE(st.st_mode) != 0o700:
        path.chmod(0o700)


def remove_secrets(path: Path) -> None:
    """Remove a secrets directory (its directories are read-only while in use)."""
    if path.is_dir() and not path.is_symlink():
        for dirpath, _, _ in os.walk(path):
            with contextlib.suppress(OSError):
                os.chmod(dirpath, 0o700)
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        with contextlib.suppress(OSError):
            path.unlink()


def write_secrets(path: Path, secrets: Mapping[str, str], uid: int | None) -> Path:
    """One replica's secret files at ``path`` (under a :func:`private_dir`): directory
    0500 and files 0400, owned by ``uid`` when the replica runs as its own user. Written
    under a temporary name and renamed, so a replica never sees part of the set."""
    private_dir(path.parent)
    tmp = path.with_name(path.name + ".tmp")
    remove_secrets(tmp)
    tmp.mkdir(mode=0o700)
    for name, value in secrets.items():
        fd = os.open(tmp / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
        with os.fdopen(fd, "w") as fh:
            fh.write(value)
        if uid is not None:
            os.chown(tmp / name, uid, uid, follow_symlinks=False)
    if uid is not None:
        os.chown(tmp, uid, uid, follow_symlinks=False)
    tmp.chmod(0o500)
    tmp.rename(path)
    return path
