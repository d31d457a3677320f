"""Mirroring weights in the background, pinning them per deployment, mounting them.

``start(key, entries, secrets)`` is idempotent and returns at once; a thread lists
each source, pins what it found (a manifest per source, revision and patterns),
downloads what the blob store lacks in parallel, and records the pin under ``key``
(a deployment id). A restarted control plane finds the pin and never re-lists: later
scale-ups see exactly the files the first replica saw.
"""

from __future__ import annotations

import enum
import hashlib
import json
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from pathlib import Path

from kingpost.config.sources import source_scheme
from kingpost.engines.base import WeightMount
from kingpost.errors import KingpostError, WeightsError
from kingpost.weights.access import public_dir_problem
from kingpost.weights.blobs import BlobStore, GcReport, Manifest, Partial
from kingpost.weights.patterns import selected
from kingpost.weights.sources import RemoteFile, Source, SourceChanged, WeightsEntry, open_source

__all__ = [
    "MIRROR_ATTEMPTS",
    "MirrorState",
    "MirrorStatus",
    "WeightsManager",
    "validate_weights",
]


class MirrorState(enum.StrEnum):
    PENDING = "PENDING"  # asked for, not started
    RESOLVING = "RESOLVING"  # listing sources and pinning revisions
    DOWNLOADING = "DOWNLOADING"  # fetching files the store lacks
    COMPLETE = "COMPLETE"  # every file is in the store; mounts can be built
    FAILED = "FAILED"  # see error; start() retries after a backoff, a bounded number of times


@dataclass(frozen=True)
class MirrorStatus:
    state: MirrorState
    files_done: int = 0
    files_total: int = 0
    bytes_done: int = 0
    bytes_total: int = 0
    rate_bytes_per_s: float = 0.0
    error: str = ""
    attempts: int = 0
    """Attempts that failed since the last success (or :meth:`WeightsManager.forget`)."""
    retry_in_s: float | None = None
    """FAILED with attempts left: seconds until :meth:`WeightsManager.start` tries again;
    ``None`` once it gave up (after :data:`MIRROR_ATTEMPTS`)."""


class _Job:
    def __init__(self) -> None:
        self.state = MirrorState.PENDING
        self.files_done = self.files_total = self.bytes_done = self.bytes_total = 0
        self.started = time.monotonic()
        self.since = time.time()
        """Wall-clock start: blobs this mirror stores are written after it."""
        self.error = ""
        self.manifests: list[Manifest] = []
        self.digests: set[str] = set()
        """Blobs this mirror decided to use before its manifests are saved (ones the store
        already held, ones it committed): :meth:`WeightsManager.gc` keeps them. Changed
        only under the manager's lock."""
        self.lock = threading.Lock()

    def status(self) -> MirrorStatus:
        with self.lock:
            elapsed = max(time.monotonic() - self.started, 1e-6)
            return MirrorStatus(
                self.state, self.files_done, self.files_total, self.bytes_done,
                self.bytes_total, self.bytes_done / elapsed, self.error,
            )  # fmt: skip


def local_source_problem(source: str, home: Path | None) -> str | None:
    """Why a local-path weights source may not be mirrored (None: it may): it lies
    inside Kingpost's home (the database, keys, every model's files and secrets'
    mirrors) or holds it, and a replica would get a read-only copy of them; or it is not
    open to every user of the machine (``weights/access.py``): the control plane reads
    it as root, a replica could not. Files inside are checked as they are mirrored."""
    if source_scheme(source) != "file":
        return None
    raw = source.split("://", 1)[1] if "://" in source else source
    path = Path(raw).resolve()
    if home is not None:
        home = home.resolve()
        if path == home or home in path.parents or path in home.parents:
            return (
                f"a local path may not be inside Kingpost's home {home} or contain it "
                f"(found `{source}`); copy the weights to a directory of their own and point "
                "`source` there"
            )
    return public_dir_problem(raw)


def _field(entry: WeightsEntry, index: int) -> str:
    """The config key of ``entry``'s source, as push errors name it (``weights[0].source``,
    ``model_cache[1].source`` for a derived entry)."""
    return f"{getattr(entry, 'origin', f'weights[{index}]')}.source"


def validate_weights(
    entries: Sequence[WeightsEntry], home: Path | None = None
) -> list[tuple[str, str]]:
    """Problems to refuse at push, as (key path, message), beyond config parsing."""
    errors = []
    for i, e in enumerate(entries):
        where = getattr(e, "origin", f"weights[{i}]")  # model_cache / external_data items
        problem = local_source_problem(e.source, home)
        if problem is not None:
            errors.append((f"{where}.source", problem))
        auth = getattr(e, "auth", None)
        method = getattr(getattr(auth, "auth_method", None), "value", None)
        if method in ("AWS_OIDC", "GCP_OIDC"):
            errors.append(
                (f"{where}.auth.auth_method", f"{method} needs an OIDC identity provider "
                 "the cloud trusts, which Kingpost does not run; use CUSTOM_SECRET with a "
                 "secret holding the credentials")
            )  # fmt: skip
        elif e.scheme in ("s3", "r2") and not e.secret_name:
            errors.append(
                (f"{where}.auth", f"secret_id is required: {e.scheme}:// sources need "
                 "`auth: {auth_method: CUSTOM_SECRET, auth_secret_name: <secret-name>}`")
            )  # fmt: skip
        elif e.scheme == "gs" and not e.secret_name:
            errors.append(
                (f"{where}.auth", "no credentials configured: need either OIDC config or "
                 "secret_id; add `auth: {auth_method: CUSTOM_SECRET, auth_secret_name: "
                 "<secret-name>}` whose secret holds a service-account JSON key")
            )  # fmt: skip
        if e.scheme in ("bt", "azure", "cw"):
            errors.append(
                (f"{where}.source", f"{e.scheme}:// sources are not supported by this "
                 "build; file://, s3://, r2://, gs://, hf:// and https:// are")
            )  # fmt: skip
    return errors


FETCH_ATTEMPTS = 4
MIRROR_ATTEMPTS = 3
"""Whole mirrors tried before a deployment's weights are FAILED for good (until re-activated)."""
RETRY_DELAYS_S = (5.0, 20.0)
"""Wait after the first, then every later failed attempt of a mirror."""
RANGE_BYTES = 16 * 1024 * 1024
"""Files larger than this are fetched as parallel byte ranges of this size."""


@dataclass(eq=False)
class _File:
    """One file a mirror downloads, or waits for while another mirror downloads it."""

    key: str
    source_url: str
    source: Source
    remote: RemoteFile
    partial: Partial | None = None
    left: int = 0
    digest: str = ""
    error: str = ""
    done: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _transport_errors() -> type[Exception]:
    import httpx

    return httpx.TransportError


def _check_paths(source: str, paths: list[str]) -> None:
    """Refuse listed names that would land outside the mirror's tree, or nowhere."""
    dirs: dict[str, str] = {}
    for path in paths:
        parts = path.split("/")
        if path.startswith("/") or "\0" in path or any(p in ("", ".", "..") for p in parts):
            raise WeightsError(
                f"{source}: the source lists {path!r}, which is not a relative path inside the "
                "source (it is absolute or has empty, `.` or `..` parts); rename or remove "
                "that object, or exclude it with ignore_patterns"
            )
        for i in range(1, len(parts)):
            dirs.setdefault("/".join(parts[:i]), path)
    for path in paths:
        if path in dirs:
            raise WeightsError(
                f"{source}: {path!r} is both a file and the directory of {dirs[path]!r}, "
                "which one tree cannot hold; exclude one of them with ignore_patterns"
            )


def _mount_location(entry: WeightsEntry, m: Manifest) -> str:
    """Where ``entry`` is mounted; a Hub snapshot (``model_cache`` without a volume) is
    named after the commit its revision was pinned to."""
    if getattr(entry, "hub_snapshot", False):
        return entry.mount_location.replace("{revision}", m.revision)
    return entry.mount_location


def _digest(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


class WeightsManager:
    def __init__(
        self,
        root: Path,
        *,
        max_workers: int = 8,
        chunk_bytes: int = RANGE_BYTES,
        attempts: int = MIRROR_ATTEMPTS,
        home: Path | None = None,
    ) -> None:
        """``home``: Kingpost's home, which no local source may lie in or contain."""
        self.home = home
        self.store = BlobStore(root)
        self.attempts = attempts
        self.max_workers = max_workers
        self.chunk_bytes = chunk_bytes
        self._active: dict[str, _File] = {}
        self._jobs: dict[str, _Job] = {}
        self._entries: dict[str, list[WeightsEntry]] = {}
        self._failures: dict[str, tuple[int, float]] = {}
        """Per key: failed attempts in a row, and when (monotonic) the next may start."""
        self._lock = threading.Lock()
        self._etags = root / "etags"
        self._etags.mkdir(exist_ok=True)

    def start(self, key: str, entries: Sequence[WeightsEntry], secrets: Mapping[str, str]) -> None:
        """Starts mirroring ``key`` unless it is running or done. A failed mirror is
        started again only once its backoff has passed, and not after ``attempts``
        failures (default :data:`MIRROR_ATTEMPTS`): a source that is down or refuses the
        credentials must end in a visible failure, not a mirror restarted on every call."""
        with self._lock:
            job = self._jobs.get(key)
            if job is not None and job.state != MirrorState.FAILED:
                return
            if job is not None:
                failed, retry_at = self._failures.get(key, (0, 0.0))
                if failed >= self.attempts or time.monotonic() < retry_at:
                    return
            job = self._jobs[key] = _Job()
            self._entries[key] = list(entries)
        threading.Thread(
            target=self._run, args=(job, key, list(entries), dict(secrets)), daemon=True
        ).start()

    def status(self, key: str) -> MirrorStatus:
        job = self._jobs.get(key)
        if job is None:
            return MirrorStatus(MirrorState.PENDING)
        status = job.status()
        with self._lock:
            failed, retry_at = self._failures.get(key, (0, 0.0))
        retry_in: float | None = None
        if status.state == MirrorState.FAILED and failed < self.attempts:
            retry_in = max(0.0, retry_at - time.monotonic())
        return replace(status, attempts=failed, retry_in_s=retry_in)

    def forget(self, key: str) -> None:
        """Drops a failed mirror and its count, so the next :meth:`start` tries afresh (the
        user re-activated the deployment). A running or finished mirror is left alone."""
        with self._lock:
            job = self._jobs.get(key)
            if job is not None and job.state == MirrorState.FAILED:
                del self._jobs[key]
            self._failures.pop(key, None)

    def restart(self, key: str) -> None:
        """Drop ``key``'s finished mirror (done or failed) and its failures, so the next
        :meth:`start` resolves and mirrors the entries it is given then (its pin goes too):
        a development deployment whose weights changed. The mirrored files stay in the store
        for what still uses them."""
        with self._lock:
            job = self._jobs.get(key)
            if job is not None and job.state in (MirrorState.COMPLETE, MirrorState.FAILED):
                del self._jobs[key]
            if key not in self._jobs:
                self.store.unpin(key)
            self._failures.pop(key, None)

    def mounts(self, key: str) -> tuple[WeightMount, ...]:
        job = self._jobs.get(key)
        if job is None or job.state != MirrorState.COMPLETE:
            raise WeightsError(f"weights of {key} are not mirrored yet")
        return tuple(
            WeightMount(_mount_location(e, m), self._mount_source(e, m))
            for e, m in zip(self._entries[key], job.manifests, strict=True)
        )

    def _mount_source(self, entry: WeightsEntry, m: Manifest) -> Path:
        """The tree of ``m``, or its one file for a single-file entry (``external_data``)."""
        tree = self.store.tree(m)
        if not getattr(entry, "single_file", False):
            return tree
        if len(m.files) != 1:
            raise WeightsError(
                f"{entry.source}: expected one file at this URL, the listing has {len(m.files)}"
            )
        return tree / next(iter(m.files))

    def gc(self, budget_bytes: int | None = None) -> GcReport:
        """Remove blobs no manifest references, except what running mirrors use: their
        manifests are saved when their last file is in. A running mirror's blobs are the
        ones stored since it started and the older ones it decided to reuse (``digests``).
        Holds the lock that starting a mirror and recording its digests take, so none is
        missed meanwhile."""
        with self._lock:
            running = [
                j for j in self._jobs.values()
                if j.state not in (MirrorState.COMPLETE, MirrorState.FAILED)
            ]  # fmt: skip
            keep = {d for j in running for d in j.digests}
            # A second of slack: some filesystems keep whole-second modification times.
            since = min(j.since for j in running) - 1 if running else None
            return self.store.gc(budget_bytes, keep_since=since, keep=keep)

    def list_manifests(self) -> list[Manifest]:
        return self.store.manifests()

    # -- the mirror thread ------------------------------------------------------------------
    def _run(
        self, job: _Job, key: str, entries: list[WeightsEntry], secrets: dict[str, str]
    ) -> None:
        try:
            job.state = MirrorState.RESOLVING
            pinned = self.store.pinned(key)
            manifests = [self.store.manifest(i) for i in pinned] if pinned else []
            if not pinned or any(m is None for m in manifests):
                manifests = [self._resolve(e, secrets, _field(e, i)) for i, e in enumerate(entries)]
                self.store.pin(key, [m.id for m in manifests if m is not None])
            job.manifests = [m for m in manifests if m is not None]
            self._download(job, entries, secrets)
            with self._lock:
                self._failures.pop(key, None)
            job.state = MirrorState.COMPLETE
        except KingpostError as exc:
            self._failed(job, key, exc.message)
        except Exception as exc:  # a mirror bug must not stay silent
            self._failed(job, key, f"{type(exc).__name__}: {exc}")

    def _failed(self, job: _Job, key: str, error: str) -> None:
        with self._lock:  # counted before the state says FAILED: status() reads both
            failed = self._failures.get(key, (0, 0.0))[0] + 1
            delay = RETRY_DELAYS_S[min(failed, len(RETRY_DELAYS_S)) - 1]
            self._failures[key] = (failed, time.monotonic() + delay)
        job.error, job.state = error, MirrorState.FAILED

    def _resolve(self, entry: WeightsEntry, secrets: Mapping[str, str], where: str) -> Manifest:
        problem = local_source_problem(entry.source, self.home)
        if problem is not None:  # a deployment pushed before the rule: refused here too
            raise WeightsError(f"{where}: {problem}")
        source = open_source(entry, secrets, None, where)
        files = [
            f for f in source.files()
            if selected(f.path, entry.allow_patterns, entry.ignore_patterns)
        ]  # fmt: skip
        if not files:
            raise WeightsError(f"{entry.source}: no files match the patterns")
        _check_paths(entry.source, [f.path for f in files])
        listing = source.pinned or _digest([(f.path, f.size, f.etag) for f in files])
        manifest_id = _digest(entry.source, entry.allow_patterns, entry.ignore_patterns, listing)
        known = self.store.manifest(manifest_id)
        if known is not None:
            return known
        digests = {f.path: self._known_digest(entry.source, f) for f in files}
        manifest = Manifest(
            manifest_id, entry.source, listing,
            {f.path: (digests[f.path] or "", f.size) for f in files},
        )  # fmt: skip
        return manifest

    def _etag_file(self, source: str, f: RemoteFile) -> Path:
        return self._etags / _digest(source, f.path, f.etag, f.size)

    def _known_digest(self, source: str, f: RemoteFile) -> str | None:
        path = self._etag_file(source, f)
        digest = path.read_text().strip() if path.exists() else None
        return digest if digest and self.store.has(digest) else None

    def _download(self, job: _Job, entries: list[WeightsEntry], secrets: Mapping[str, str]) -> None:
        work: list[tuple[int, Source, RemoteFile]] = []
        with self._lock:  # before has() below: a gc either ran already or keeps them
            job.digests.update(d for m in job.manifests for d, _ in m.files.values() if d)
        for idx, (entry, m) in enumerate(zip(entries, job.manifests, strict=True)):
            missing = [
                RemoteFile(p, size, "") for p, (d, size) in m.files.items()
                if not d or not self.store.has(d)
            ]  # fmt: skip
            with job.lock:
                job.files_total += len(m.files)
                job.bytes_total += m.total_bytes
                job.files_done += len(m.files) - len(missing)
                job.bytes_done += m.total_bytes - sum(f.size for f in missing)
            if missing:
                revision = m.revision if entry.scheme == "hf" else None
                source = open_source(entry, secrets, revision, _field(entry, idx))
                listed = {f.path: f for f in source.files()}
                gone = [f.path for f in missing if f.path not in listed]
                if gone:
                    raise WeightsError(
                        f"{entry.source}: {', '.join(gone[:3])}"
                        f"{f' and {len(gone) - 3} more' if len(gone) > 3 else ''}: pinned for "
                        "this deployment and not in the store, but the source no longer lists "
                        "it; restore the file at the source or push a new deployment"
                    )
                work.extend((idx, source, listed[f.path]) for f in missing)
        if work:
            self._fetch_all(job, entries, work)
        for m in job.manifests:
            self.store.save_manifest(m)

    def _fetch_all(
        self, job: _Job, entries: list[WeightsEntry], work: list[tuple[int, Source, RemoteFile]]
    ) -> None:
        """Download every missing file, large ones as parallel byte ranges, all on one pool.

        A file another mirror is already downloading (same source, path and etag) is
        waited for, not fetched twice.
        """
        job.state = MirrorState.DOWNLOADING
        mine: list[_File] = []
        wanted: list[tuple[int, _File]] = []
        with self._lock:
            for idx, source, f in work:
                key = _digest(entries[idx].source, f.path, f.etag, f.size)
                file = self._active.get(key)
                if file is None:
                    file = self._active[key] = _File(key, entries[idx].source, source, f)
                    mine.append(file)
                wanted.append((idx, file))
        try:
            units = [u for file in mine for u in self._plan(job, file)]
            with ThreadPoolExecutor(self.max_workers) as pool:
                futures = [pool.submit(self._fetch_range, job, *u) for u in units]
                for fut in as_completed(futures):
                    if fut.exception() is not None:
                        for other in futures:
                            other.cancel()
                        fut.result()  # raises the range's error
        except BaseException as exc:
            for file in mine:
                file.error = file.error or str(exc)
            raise
        finally:
            with self._lock:
                for file in mine:
                    self._active.pop(file.key, None)
                    file.done.set()
        for idx, file in wanted:
            file.done.wait()
            if not file.digest:
                raise WeightsError(
                    f"{file.source_url}: {file.remote.path}: {file.error or 'download failed'}"
                )
            with self._lock:
                job.digests.add(file.digest)
            if file not in mine:
                with job.lock:
                    job.files_done += 1
                    job.bytes_done += file.remote.size
            job.manifests[idx].files[file.remote.path] = (file.digest, file.remote.size)

    def _plan(self, job: _Job, file: _File) -> list[tuple[_File, int, int]]:
        """The byte ranges of ``file`` still to fetch (none recorded by an earlier run)."""
        size, chunk = file.remote.size, self.chunk_bytes
        file.partial = self.store.partial(file.key, size)
        if not file.source.ranges or size <= chunk:
            ranges = [(0, size)]
        else:
            ranges = [(a, min(a + chunk, size)) for a in range(0, size, chunk)]
        done = file.partial.done() if file.source.ranges else set()
        left = [r for r in ranges if r not in done]
        with job.lock:
            job.bytes_done += sum(b - a for a, b in ranges if (a, b) in done)
        file.left = len(left)
        if not left:  # every range landed before an interruption; only the commit is missing
            self._commit(job, file)
        return [(file, a, b) for a, b in left]

    def _fetch_range(self, job: _Job, file: _File, start: int, end: int) -> None:
        assert file.partial is not None
        what = f"{file.source_url}: {file.remote.path}"
        with file.partial.writer(start) as w:
            for attempt in range(FETCH_ATTEMPTS):
                try:
                    file.source.fetch(file.remote, w, w.offset, end)  # type: ignore[arg-type]
                    break
                except SourceChanged:
                    file.partial.discard()  # old ranges must not meet the new version's
                    raise
                except (OSError, WeightsError, _transport_errors()) as exc:
                    # An interrupted range resumes from the bytes already written.
                    if attempt == FETCH_ATTEMPTS - 1:
                        raise WeightsError(
                            f"{what}: download failed after {attempt + 1} attempts: {exc}"
                        ) from exc
                    if not file.source.ranges:
                        w.offset = start
                    time.sleep(0.1 * 2**attempt)
            if w.offset != end:
                raise WeightsError(
                    f"{what}: expected bytes {start}-{end - 1}, the source sent "
                    f"{w.offset - start} bytes"
                )
            file.partial.record(w, start, end)
        with job.lock:
            job.bytes_done += end - start
        with file.lock:
            file.left -= 1
            last = file.left == 0
        if last:
            self._commit(job, file)

    def _commit(self, job: _Job, file: _File) -> None:
        """Verify the finished file (size, and the source's hashes) and store it."""
        assert file.partial is not None
        try:
            digest = self.store.commit(
                file.partial.path,
                file.remote.size,
                file.remote.sha256,
                md5=file.source.md5(file.remote),
            )
        except WeightsError as exc:
            file.partial.discard()  # corrupt: the next attempt starts over
            raise WeightsError(f"{file.source_url}: {file.remote.path}: {exc.message}") from exc
        file.partial.finished()
        self._etag_file(file.source_url, file.remote).write_text(digest)
        file.digest = digest
        with job.lock:
            job.files_done += 1
