"""Weight sources, one per scheme behind one interface: list a pinned revision, fetch files.

This build has ``file://`` (and plain absolute paths), ``s3://`` / ``r2://`` (S3 API),
``hf://`` (the Hub's HTTP API; ``HF_ENDPOINT`` points it elsewhere), ``https://`` single
files and ``gs://`` (``weights/gcs.py``). ``bt://`` (Baseten Training) has no counterpart
here and is refused.
"""

from __future__ import annotations

import json
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

from kingpost.errors import WeightsError

_MD5 = re.compile(r"[0-9a-f]{32}")

__all__ = ["RemoteFile", "Source", "SourceChanged", "WeightsEntry", "open_source", "range_header"]


class SourceChanged(WeightsError):
    """A file is no longer the version its listing named: its ranges fetched so far must
    not be mixed with the new content, and fetching it again with the same listing is
    pointless. The mirror drops them and fails the attempt; the next one lists again."""

    def __init__(self, what: str) -> None:
        super().__init__(
            f"{what}: changed at the source while it was being mirrored; "
            "the next attempt lists the source again"
        )


class WeightsEntry(Protocol):
    """What the mirror reads of one ``weights:`` entry (a frozen config model, read only)."""

    @property
    def source(self) -> str: ...

    @property
    def mount_location(self) -> str: ...

    @property
    def allow_patterns(self) -> list[str] | None: ...

    @property
    def ignore_patterns(self) -> list[str] | None: ...

    @property
    def scheme(self) -> str: ...

    @property
    def secret_name(self) -> str | None: ...


@dataclass(frozen=True)
class RemoteFile:
    path: str
    """Relative to the source root, ``/``-separated."""
    size: int
    etag: str
    """What identifies this content at the source (ETag, mtime+size…), for dedup."""
    sha256: str | None = None
    """The content's SHA-256 when the source states it (Hub LFS files); verified."""
    md5: str | None = None
    """The content's MD5 when the source states it (single-part S3 ETags, GCS); verified."""


class Source(ABC):
    pinned: str | None = None
    """The commit a listing resolved to, for sources with revisions (hf)."""
    ranges: bool = True
    """Whether byte ranges can be fetched (parallel chunks, resuming mid-file)."""

    @abstractmethod
    def files(self) -> list[RemoteFile]: ...

    @abstractmethod
    def fetch(self, f: RemoteFile, out: IO[bytes], start: int = 0, end: int | None = None) -> None:
        """Write bytes ``[start, end)`` of ``f`` (``end`` defaults to its size) into ``out``."""

    def md5(self, f: RemoteFile) -> str | None:
        """The MD5 to verify ``f`` against once fetched: what the listing said, unless a
        download showed that it is not one."""
        return f.md5


def range_header(f: RemoteFile, start: int, end: int | None) -> dict[str, str]:
    """The ``Range`` header for bytes ``[start, end)`` of ``f``; none for the whole file."""
    last = f.size if end is None else end
    if start == 0 and last >= f.size:
        return {}
    return {"Range": f"bytes={start}-{last - 1}"}


class LocalSource(Source):
    """A directory on this machine. The control plane reads it as root for a replica, so
    only what any user of the machine may read is copied (:mod:`kingpost.weights.access`);
    anything else fails the mirror with ``label`` (the entry's source field), the path
    and the rule."""

    def __init__(self, root: Path, label: str = "") -> None:
        self.label = label or f"weights source {root}"
        if not root.is_dir():
            raise WeightsError(f"{self.label}: {root}: not a directory on this machine")
        self.root = root

    def files(self) -> list[RemoteFile]:
        from kingpost.weights.access import dir_problem, open_public_file, public_dir_problem

        problem = public_dir_problem(str(self.root))
        if problem is not None:
            raise WeightsError(f"{self.label}: {problem}")
        out = []
        for dirpath, _, names in os.walk(self.root):
            problem = dir_problem(dirpath)
            if problem is not None:
                raise WeightsError(f"{self.label}: {problem}")
            for name in names:
                path = Path(dirpath) / name
                fd, st = open_public_file(str(path), self.label)
                os.close(fd)
                rel = path.relative_to(self.root).as_posix()
                out.append(RemoteFile(rel, st.st_size, f"{st.st_mtime_ns}-{st.st_size}"))
        return sorted(out, key=lambda f: f.path)

    def fetch(self, f: RemoteFile, out: IO[bytes], start: int = 0, end: int | None = None) -> None:
        from kingpost.weights.access import open_public_file

        fd, st = open_public_file(str(self.root / f.path), self.label)
        with os.fdopen(fd, "rb") as fh:
            _same_version(f, st, self.label)
            fh.seek(start)
            left = (f.size if end is None else end) - start
            while left > 0 and (chunk := fh.read(min(left, 1024 * 1024))):
                out.write(chunk)
                left -= len(chunk)
            _same_version(f, os.fstat(fh.fileno()), self.label)  # not rewritten meanwhile


def _same_version(f: RemoteFile, st: os.stat_result, label: str) -> None:
    """Raise :class:`SourceChanged` unless ``st`` is still the file the listing saw (a
    local file has no hash to verify it by; its listing's etag is mtime and size)."""
    if f.etag and f"{st.st_mtime_ns}-{st.st_size}" != f.etag:
        raise SourceChanged(f"{label}: {f.path}")


class S3Source(Source):
    """S3 (and R2 through the S3 API at its endpoint)."""

    def __init__(self, bucket: str, prefix: str, client: Any) -> None:
        self.bucket, self.prefix, self.client = bucket, prefix.strip("/"), client
        self._opaque: set[str] = set()
        """Paths whose ETag is not their MD5 although it looks like one (SSE-KMS, SSE-C)."""

    def files(self) -> list[RemoteFile]:
        out = []
        prefix = f"{self.prefix}/" if self.prefix else ""
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=prefix
            ):
                for obj in page.get("Contents", []):
                    rel = obj["Key"][len(prefix) :]
                    if rel and not rel.endswith("/"):
                        etag = obj["ETag"].strip('"')
                        md5 = etag if _MD5.fullmatch(etag) else None  # multipart ETags are not
                        out.append(RemoteFile(rel, int(obj["Size"]), etag, md5=md5))
        except Exception as exc:  # botocore errors stop here
            raise WeightsError(f"s3://{self.bucket}/{self.prefix}: cannot list: {exc}") from exc
        return sorted(out, key=lambda f: f.path)

    def fetch(self, f: RemoteFile, out: IO[bytes], start: int = 0, end: int | None = None) -> None:
        key = f"{self.prefix}/{f.path}" if self.prefix else f.path
        extra = range_header(f, start, end)
        if f.etag:  # a multipart object has no MD5 to verify: refuse a newer version instead
            extra["IfMatch"] = f'"{f.etag}"'
        try:
            answer = self.client.get_object(Bucket=self.bucket, Key=key, **extra)
            # S3 documents the ETag of an object encrypted with a KMS or customer key as
            # not its MD5; verifying against it would refuse good bytes.
            if str(answer.get("ServerSideEncryption", "")).startswith("aws:kms") or answer.get(
                "SSECustomerAlgorithm"
            ):
                self._opaque.add(f.path)
            body = answer["Body"]
            for chunk in body.iter_chunks(1024 * 1024):
                out.write(chunk)
        except Exception as exc:
            status = getattr(exc, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status == 412:
                raise SourceChanged(f"s3://{self.bucket}/{key}") from exc
            raise WeightsError(f"s3://{self.bucket}/{key}: download failed: {exc}") from exc

    def md5(self, f: RemoteFile) -> str | None:
        return None if f.path in self._opaque else f.md5


class HubSource(Source):
    """A Hugging Face Hub repository (or a compatible server at ``HF_ENDPOINT``).

    ``files()`` resolves the revision (a branch, tag or commit) to a commit and pins it;
    every download reads that commit, so a branch moving later changes nothing.
    """

    def __init__(
        self, repo: str, revision: str, endpoint: str, token: str | None, no_token_hint: str = ""
    ) -> None:
        import httpx

        self.repo, self.revision, self.endpoint = repo, revision, endpoint.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(headers=headers, timeout=60, follow_redirects=True)
        self._token_given = token is not None
        self._no_token_hint = no_token_hint or (
            "the repository is private or gated: add an auth block whose secret holds an "
            "hf_access_token"
        )

    def _check(self, status: int, what: str) -> None:
        if status in (401, 403):
            hint = (
                "the token in the auth secret was refused"
                if self._token_given
                else self._no_token_hint
            )
            raise WeightsError(f"hf://{self.repo}: {what}: HTTP {status}: {hint}")
        if status == 404:
            raise WeightsError(f"hf://{self.repo}@{self.revision}: {what}: not found")
        if status >= 400:
            raise WeightsError(f"hf://{self.repo}: {what}: HTTP {status}")

    def files(self) -> list[RemoteFile]:
        url = f"{self.endpoint}/api/models/{self.repo}/revision/{self.revision}"
        r = self._http.get(url, params={"blobs": "true"})
        self._check(r.status_code, "cannot list")
        info = r.json()
        self.pinned = str(info["sha"])
        out = []
        for sib in info.get("siblings", []):
            lfs = sib.get("lfs") or {}
            size = int(lfs.get("size", sib.get("size", 0)))
            etag = str(lfs.get("sha256") or sib.get("blobId") or f"{self.pinned}:{size}")
            sha256 = str(lfs["sha256"]) if lfs.get("sha256") else None
            out.append(RemoteFile(sib["rfilename"], size, etag, sha256=sha256))
        return sorted(out, key=lambda f: f.path)

    def fetch(self, f: RemoteFile, out: IO[bytes], start: int = 0, end: int | None = None) -> None:
        url = f"{self.endpoint}/{self.repo}/resolve/{self.pinned or self.revision}/{f.path}"
        headers = range_header(f, start, end)
        with self._http.stream("GET", url, headers=headers) as r:
            self._check(r.status_code, f"cannot download {f.path}")
            if headers and r.status_code != 206:
                raise WeightsError(f"hf://{self.repo}: {f.path}: the server ignored Range")
            for chunk in r.iter_bytes(1024 * 1024):
                out.write(chunk)


class HttpFileSource(Source):
    """One file at an ``https://`` (or, for local servers, ``http://``) URL."""

    def __init__(self, url: str) -> None:
        from kingpost.weights.access import guarded_client

        self.url = url
        self.name = url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1] or "file"
        # A URL the user's config names: public addresses only (weights/access.py).
        self._http = guarded_client(timeout=60, follow_redirects=True)
        self._condition: dict[str, str] = {}
        """The precondition that the listed version is still the one served (If-Match on
        a strong ETag, else If-Unmodified-Since), sent with every download."""

    def files(self) -> list[RemoteFile]:
        with self._http.stream("GET", self.url) as r:  # headers only; the body is not read
            if r.status_code >= 400:
                raise WeightsError(f"{self.url}: HTTP {r.status_code}")
            length = r.headers.get("content-length")
            if length is None:
                raise WeightsError(f"{self.url}: the server gives no Content-Length")
            etag = r.headers.get("etag") or r.headers.get("last-modified") or length
            self.ranges = r.headers.get("accept-ranges", "").lower() == "bytes"
            strong = r.headers.get("etag", "")
            if strong and not strong.startswith("W/"):  # If-Match compares strongly
                self._condition = {"If-Match": strong}
            elif r.headers.get("last-modified"):
                self._condition = {"If-Unmodified-Since": r.headers["last-modified"]}
        return [RemoteFile(self.name, int(length), etag.strip('"'))]

    def fetch(self, f: RemoteFile, out: IO[bytes], start: int = 0, end: int | None = None) -> None:
        headers = range_header(f, start, end)
        with self._http.stream("GET", self.url, headers=headers | self._condition) as r:
            if r.status_code == 412:
                raise SourceChanged(self.url)
            if r.status_code >= 400 or (headers and r.status_code != 206):
                raise WeightsError(f"{self.url}: download failed: HTTP {r.status_code}")
            for chunk in r.iter_bytes(1024 * 1024):
                out.write(chunk)


def secret_value(entry: WeightsEntry, name: str, secrets: Mapping[str, str]) -> str:
    """The value of the secret ``entry`` names, or an error saying how to define it."""
    if name not in secrets:
        raise WeightsError(
            f"{entry.source}: secret {name!r} is not defined; set it with "
            f"`kingpost secrets set {name}`"
        )
    return secrets[name]


def _hub_source(entry: WeightsEntry, secrets: Mapping[str, str], revision: str | None) -> Source:
    location = entry.source.split("://", 1)[1]
    repo, _, rev = location.partition("@")
    token = None
    optional = getattr(entry, "secret_optional", False)  # model_cache's default name
    if entry.secret_name and not (optional and entry.secret_name not in secrets):
        token = secret_value(entry, entry.secret_name, secrets).strip()
        if token.startswith("{"):
            try:
                token = str(json.loads(token)["hf_access_token"])
            except (ValueError, KeyError):
                raise WeightsError(
                    f"{entry.source}: secret {entry.secret_name!r} must hold the token, or JSON "
                    "with an `hf_access_token` key"
                ) from None
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    hint = (
        f"the repository is private or gated: store a token as secret {entry.secret_name!r} "
        f"(`kingpost secrets set {entry.secret_name}`), the model_cache `runtime_secret_name`"
        if optional and token is None
        else ""
    )
    source = HubSource(repo, revision or rev or "main", endpoint, token, hint)
    if revision:
        source.pinned = revision
    return source


_S3_KEYS = ("aws_access_key_id", "aws_secret_access_key")
_R2_ACCOUNT = re.compile(r"[A-Za-z0-9-]+")


def _s3_credentials(entry: WeightsEntry, secrets: Mapping[str, str]) -> dict[str, str]:
    name = entry.secret_name
    if not name:
        raise WeightsError(
            f"{entry.source}: secret_id is required: add an auth block, e.g. "
            "`auth: {auth_method: CUSTOM_SECRET, auth_secret_name: <secret-name>}`"
        )
    try:
        creds = json.loads(secret_value(entry, name, secrets))
    except ValueError:
        raise WeightsError(f"{entry.source}: secret {name!r} is not JSON") from None
    if not isinstance(creds, dict):
        raise WeightsError(f"{entry.source}: secret {name!r} must be a JSON object")
    if entry.scheme == "r2" and isinstance(creds.get("r2_credentials"), dict):
        creds = creds["r2_credentials"]
    if not all(k in creds for k in _S3_KEYS):
        found = ", ".join(sorted(creds)) or "none"
        raise WeightsError(
            f"{entry.source}: aws_access_key_id and aws_secret_access_key are required in "
            f"the credentials of secret {name!r} (keys found: {found})"
        )
    return {k: str(v) for k, v in creds.items()}


def _s3_source(entry: WeightsEntry, secrets: Mapping[str, str]) -> Source:
    import boto3

    creds = _s3_credentials(entry, secrets)
    location = entry.source.split("://", 1)[1]
    bucket, _, prefix = location.partition("/")
    endpoint = os.environ.get("KINGPOST_S3_ENDPOINT_URL")
    if entry.scheme == "r2":
        account, _, bucket = bucket.partition(".")
        if not _R2_ACCOUNT.fullmatch(account):
            # It becomes the endpoint's host name: `localhost#` would send the request
            # (and the credentials) to this machine.
            raise WeightsError(
                f"{entry.source}: the R2 account id {account!r} must be letters, digits "
                "and `-` (r2://ACCOUNT_ID.BUCKET/path)"
            )
        template = os.environ.get(
            "KINGPOST_R2_ENDPOINT_TEMPLATE", "https://{account}.r2.cloudflarestorage.com"
        )
        endpoint = template.format(account=account)
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=creds["aws_access_key_id"],
        aws_secret_access_key=creds["aws_secret_access_key"],
        aws_session_token=creds.get("aws_session_token"),
        region_name=creds.get("aws_region", "us-east-1"),
    )
    return S3Source(bucket, prefix, client)


def open_source(
    entry: WeightsEntry, secrets: Mapping[str, str], revision: str | None = None, label: str = ""
) -> Source:
    """The source of ``entry``; ``revision`` pins a revisioned source to a known commit;
    ``label`` names the entry's source field in a local source's refusals."""
    scheme = entry.scheme
    if scheme == "hf":
        return _hub_source(entry, secrets, revision)
    if scheme in ("https", "http"):
        return HttpFileSource(entry.source)
    if scheme == "file":
        path = entry.source.split("://", 1)[1] if "://" in entry.source else entry.source
        return LocalSource(Path(path), label)
    if scheme in ("s3", "r2"):
        return _s3_source(entry, secrets)
    if scheme == "gs":
        from kingpost.weights.gcs import gcs_source

        return gcs_source(entry, secrets)
    raise WeightsError(
        f"{entry.source}: {scheme}:// sources are not supported by this build "
        "(file://, s3://, r2://, gs://, hf:// and https:// are)"
    )
