"""Packing a Truss project for upload, and unpacking it on the server.

The archive is deterministic (sorted entries, zeroed times and owners), so its
SHA-256 is a content address: pushing an unchanged project uploads nothing new.
``.git`` is always left out, as are paths matched by ``.truss_ignore`` and
``.gitignore`` (gitignore syntax) and a few well-known caches.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import pathspec

from kingpost.errors import InsufficientStorageError, ValidationError, is_disk_full

__all__ = [
    "PackedProject",
    "SpooledProject",
    "pack_project",
    "pack_project_file",
    "project_files",
    "unpack_project",
]

_ALWAYS_IGNORED = [
    ".git/", "__pycache__/", "*.pyc", ".DS_Store", ".venv/", ".mypy_cache/",
    "/config.yaml.bak-*",  # `kingpost migrate`'s backups: the next push need not carry them
]  # fmt: skip
MAX_PROJECT_BYTES = 2 * 1024**3
MAX_PROJECT_ENTRIES = 100_000
"""Most files and directories a project archive may hold: each is a member kept in memory
while the archive is checked, and a file every replica start copies."""


def no_space_for_projects() -> InsufficientStorageError:
    return InsufficientStorageError(
        "project archive: the server's disk is full, so the upload cannot be stored; free "
        "space on the disk of KINGPOST_HOME (e.g. `kingpost weights gc`, `kingpost venvs "
        "gc`) and push again",
        field="project",
        cause="projects disk full",
    )


def _too_many(count: int, where: str) -> ValidationError:
    return ValidationError(
        f"{where}: more than {MAX_PROJECT_ENTRIES} files and directories ({count} so far); "
        "leave generated files out with .truss_ignore, or move data to weights",
        field="project",
        limit=MAX_PROJECT_ENTRIES,
        value=count,
    )


class PackedProject:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.sha256 = hashlib.sha256(data).hexdigest()


class SpooledProject:
    """A packed project in a temporary file, hashed as it was written; removed on close."""

    def __init__(self, path: Path, sha256: str, size: int) -> None:
        self.path = path
        self.sha256 = sha256
        self.size = size

    def chunks(self, size: int = 1024 * 1024) -> Iterator[bytes]:
        with self.path.open("rb") as f:
            while chunk := f.read(size):
                yield chunk

    def close(self) -> None:
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> SpooledProject:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class _HashingWriter:
    """The file object tarfile writes to: hashes and counts what passes through."""

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self._out.write(data)

    def tell(self) -> int:
        return self.size


def _ignore_spec(root: Path) -> pathspec.GitIgnoreSpec:
    lines = list(_ALWAYS_IGNORED)
    for name in (".truss_ignore", ".gitignore"):
        path = root / name
        if path.is_file():
            lines.extend(path.read_text(errors="replace").splitlines())
    return pathspec.GitIgnoreSpec.from_lines(lines)


def project_files(root: Path) -> list[Path]:
    """Files of the project that get uploaded, relative to ``root``, sorted."""
    spec = _ignore_spec(root)
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root)
        dirnames[:] = sorted(
            d for d in dirnames if not spec.match_file(f"{(rel_dir / d).as_posix()}/")
        )
        for name in sorted(filenames):
            rel = rel_dir / name
            if not spec.match_file(rel.as_posix()):
                out.append(rel)
    return sorted(out)


def _check_project_dir(root: Path) -> None:
    if not (root / "config.yaml").is_file():
        raise ValidationError(
            f"{root}: no config.yaml here; point at a Truss project directory "
            "(or create one with `kingpost init NAME`)",
            field="project_dir",
            value=str(root),
        )


def _write_archive(root: Path, out: BinaryIO) -> None:
    """The deterministic archive of ``root``, file by file: nothing is held whole in memory."""
    files = project_files(root)
    if len(files) > MAX_PROJECT_ENTRIES:
        raise _too_many(len(files), str(root))
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for rel in files:
            path = root / rel
            if path.is_symlink() and not path.resolve().is_relative_to(root.resolve()):
                continue  # links out of the project are not part of it
            try:
                f = path.open("rb")
            except FileNotFoundError:
                # A dangling link (emacs's ``.#model.py`` lock) or a file removed since it
                # was listed: not part of the project as it is now.
                continue
            with f:
                info = tarfile.TarInfo(rel.as_posix())
                info.mode = 0o755 if os.access(path, os.X_OK) else 0o644
                info.mtime = 0
                info.size = os.fstat(f.fileno()).st_size
                tar.addfile(info, f)


def pack_project(root: Path) -> PackedProject:
    """The archive in memory: for small projects and tests (the CLI streams from disk)."""
    _check_project_dir(root)
    buf = io.BytesIO()
    _write_archive(root, buf)
    return PackedProject(buf.getvalue())


def pack_project_file(root: Path, spool_dir: Path | None = None) -> SpooledProject:
    """The archive written to a temporary file while it is hashed, so a project of any
    size costs no more memory than a buffer; the caller closes it."""
    _check_project_dir(root)
    fd, name = tempfile.mkstemp(prefix="kingpost-push-", suffix=".tar", dir=spool_dir)
    try:
        with os.fdopen(fd, "wb") as out:
            writer = _HashingWriter(out)
            _write_archive(root, writer)  # type: ignore[arg-type]
    except BaseException:
        os.unlink(name)
        raise
    return SpooledProject(Path(name), writer.digest.hexdigest(), writer.size)


def _kind(member: tarfile.TarInfo) -> str:
    if member.issym():
        return "symbolic link"
    if member.islnk():
        return "hard link"
    if member.isdev() or member.isfifo():
        return "device or FIFO"
    return "special entry"


def _check_members(tar: tarfile.TarFile) -> None:
    """Only what :func:`pack_project` writes: regular files (and directories).

    Links are refused outright rather than left to tarfile's ``data`` filter, which
    older Pythons get wrong for links whose expansion exceeds PATH_MAX (CVE-2025-4517).
    """
    total = 0
    # Read one member at a time: an archive of empty entries holds four million of them
    # in 2 GiB, and getmembers() would build every one before a check could refuse it.
    for count, member in enumerate(tar, start=1):
        if count > MAX_PROJECT_ENTRIES:
            raise _too_many(count, "project archive")
        if not (member.isreg() or member.isdir()):
            raise ValidationError(
                f"project archive: {member.name!r} is a {_kind(member)}; only regular files "
                "and directories are allowed (push with `kingpost push`, which stores a "
                "link's target as a file)",
                field="project",
                value=member.name,
            )
        total += member.size  # a sparse member's size is what it unpacks to
        if total > MAX_PROJECT_BYTES:
            raise ValidationError(
                f"project archive unpacks to more than 2 GiB (at {member.name!r}, "
                f"{member.size} bytes); move big files to weights",
                field="project",
                value=member.name,
            )


def unpack_project(data: bytes | Path, dest: Path) -> None:
    """Unpack an uploaded archive (its bytes, or the file holding it) into ``dest``
    atomically (temp dir + rename)."""
    if dest.exists():
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    # One of its own per call: uploads of the same project may be unpacked concurrently.
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".tmp-", dir=dest.parent))
    tmp.chmod(0o755)  # as a plain mkdir made it; the home around it is private
    try:
        # Uncompressed only, as pack_project writes it: a compressed archive is a
        # decompression bomb the upload limit cannot see.
        source = {"name": data} if isinstance(data, Path) else {"fileobj": io.BytesIO(data)}
        with tarfile.open(mode="r:", **source) as tar:
            _check_members(tar)
            tar.extractall(tmp, filter="data")
        os.replace(tmp, dest)
    except ValidationError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except tarfile.ReadError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ValidationError(
            f"project archive: not an uncompressed tar archive ({exc}); "
            "`kingpost push` uploads one",
            field="project",
        ) from exc
    except (tarfile.TarError, OSError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if dest.exists():
            return
        if is_disk_full(exc):  # not the archive's fault: say so, and name no server path
            raise no_space_for_projects() from exc
        raise ValidationError(f"project archive: cannot unpack ({exc})", field="project") from exc
