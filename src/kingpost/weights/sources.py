"""Weight sources, one per scheme behind one interface: list a pinned revision, fetch files.

This build has ``file://`` (and plain absolute paths) and ``s3://`` / ``r2://`` (S3 API).
``hf://``, ``gs://`` and ``https://`` are refused with a message that says so.
"""

from __future__ import annotations

import json
import os
import shutil
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

from kingpost.errors import WeightsError

__all__ = ["RemoteFile", "Source", "WeightsEntry", "open_source"]


class WeightsEntry(Protocol):
    source: str
    mount_location: str
    allow_patterns: list[str] | None
    ignore_patterns: list[str] | None

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


class Source(ABC):
    @abstractmethod
    def files(self) -> list[RemoteFile]: ...

    @abstractmethod
    def fetch(self, f: RemoteFile, out: IO[bytes]) -> None: ...


class LocalSource(Source):
    def __init__(self, root: Path) -> None:
        if not root.is_dir():
            raise WeightsError(f"weights source {root}: not a directory on this machine")
        self.root = root

    def files(self) -> list[RemoteFile]:
        out = []
        for dirpath, _, names in os.walk(self.root):
            for name in names:
                path = Path(dirpath) / name
                st = path.stat()
                rel = path.relative_to(self.root).as_posix()
                out.append(RemoteFile(rel, st.st_size, f"{st.st_mtime_ns}-{st.st_size}"))
        return sorted(out, key=lambda f: f.path)

    def fetch(self, f: RemoteFile, out: IO[bytes]) -> None:
        with (self.root / f.path).open("rb") as fh:
            shutil.copyfileobj(fh, out, 1024 * 1024)


class S3Source(Source):
    """S3 (and R2 through the S3 API at its endpoint)."""

    def __init__(self, bucket: str, prefix: str, client: Any) -> None:
        self.bucket, self.prefix, self.client = bucket, prefix.strip("/"), client

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
                        out.append(RemoteFile(rel, int(obj["Size"]), obj["ETag"].strip('"')))
        except Exception as exc:  # botocore errors stop here
            raise WeightsError(f"s3://{self.bucket}/{self.prefix}: cannot list: {exc}") from exc
        return sorted(out, key=lambda f: f.path)

    def fetch(self, f: RemoteFile, out: IO[bytes]) -> None:
        key = f"{self.prefix}/{f.path}" if self.prefix else f.path
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=key)["Body"]
            for chunk in body.iter_chunks(1024 * 1024):
                out.write(chunk)
        except Exception as exc:
            raise WeightsError(f"s3://{self.bucket}/{key}: download failed: {exc}") from exc


_S3_KEYS = ("aws_access_key_id", "aws_secret_access_key")


def _s3_credentials(entry: WeightsEntry, secrets: Mapping[str, str]) -> dict[str, str]:
    name = entry.secret_name
    if not name:
        raise WeightsError(
            f"{entry.source}: secret_id is required: add an auth block, e.g. "
            "`auth: {auth_method: CUSTOM_SECRET, auth_secret_name: <secret-name>}`"
        )
    if name not in secrets:
        raise WeightsError(
            f"{entry.source}: secret {name!r} is not defined; set it with "
            f"`kingpost secrets set {name}`"
        )
    try:
        creds = json.loads(secrets[name])
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


def open_source(entry: WeightsEntry, secrets: Mapping[str, str]) -> Source:
    scheme = entry.scheme
    if scheme == "file":
        path = entry.source.split("://", 1)[1] if "://" in entry.source else entry.source
        return LocalSource(Path(path))
    if scheme in ("s3", "r2"):
        return _s3_source(entry, secrets)
    if scheme == "gs" and not entry.secret_name:
        raise WeightsError(
            f"{entry.source}: no credentials configured: need either OIDC config or secret_id"
        )
    raise WeightsError(
        f"{entry.source}: {scheme}:// sources are not supported by this build yet "
        "(file://, s3:// and r2:// are)"
    )
