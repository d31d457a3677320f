"""S3Source's MD5 check against the ETag, at the seam with boto3's client (a stub here:
moto answers every object's ETag with its MD5, KMS-encrypted or not)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from kingpost.errors import WeightsError
from kingpost.weights.blobs import BlobStore
from kingpost.weights.sources import S3Source

DATA = b"weights " * 1000
NOT_THE_MD5 = "0" * 32  # what S3 lists for an SSE-KMS object: hex, 32 digits, not the MD5


class Body:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def iter_chunks(self, size: int) -> Any:
        yield from (self.data[i : i + size] for i in range(0, len(self.data), size))


class Client:
    def __init__(self, etag: str, encryption: dict[str, str]) -> None:
        self.etag, self.encryption = etag, encryption

    def get_paginator(self, _: str) -> Any:
        etag = self.etag

        class Pages:
            def paginate(self, **_: Any) -> Any:
                return [{"Contents": [{"Key": "m/w.bin", "ETag": f'"{etag}"', "Size": len(DATA)}]}]

        return Pages()

    def get_object(self, **_: Any) -> dict[str, Any]:
        return {"Body": Body(DATA), **self.encryption}


def _mirror_one(tmp_path: Path, etag: str, encryption: dict[str, str]) -> str:
    source = S3Source("bucket", "m", Client(etag, encryption))
    (f,) = source.files()
    tmp_path.mkdir(exist_ok=True)
    tmp = tmp_path / "part"
    with tmp.open("wb") as out:
        source.fetch(f, out)
    return BlobStore(tmp_path / "store").commit(tmp, f.size, md5=source.md5(f))


@pytest.mark.parametrize(
    "encryption",
    [{"ServerSideEncryption": "aws:kms"}, {"ServerSideEncryption": "aws:kms:dsse"},
     {"SSECustomerAlgorithm": "AES256"}],
)  # fmt: skip
def test_an_etag_s3_says_is_not_an_md5_is_not_checked_as_one(
    tmp_path: Path, encryption: dict[str, str]
) -> None:
    assert _mirror_one(tmp_path, NOT_THE_MD5, encryption) == hashlib.sha256(DATA).hexdigest()


def test_an_etag_that_is_the_md5_is_still_checked(tmp_path: Path) -> None:
    good = hashlib.md5(DATA, usedforsecurity=False).hexdigest()
    sse_s3 = {"ServerSideEncryption": "AES256"}  # S3-managed keys: the ETag is the MD5
    assert _mirror_one(tmp_path, good, sse_s3) == hashlib.sha256(DATA).hexdigest()
    with pytest.raises(WeightsError, match="md5 mismatch"):
        _mirror_one(tmp_path / "again", NOT_THE_MD5, sse_s3)
