"""Where weights and data come from: ``weights``, ``model_cache``, ``external_data``."""

from __future__ import annotations

import posixpath
from enum import StrEnum

from pydantic import Field, field_validator, model_validator

from kingpost.config._base import ConfigModel, check_secret_name

__all__ = [
    "REVISION_SCHEMES",
    "WEIGHTS_SCHEMES",
    "CacheInternalEntry",
    "ExternalDataItem",
    "ModelCacheEntry",
    "ModelCacheKind",
    "WeightsAuth",
    "WeightsAuthMethod",
    "WeightsSource",
    "mount_root_problem",
    "normalize_mount",
    "source_scheme",
]

WEIGHTS_SCHEMES = ("hf", "s3", "gs", "r2", "bt", "https", "azure", "cw", "file")
"""URI schemes a ``weights[].source`` may use; a plain absolute path means ``file``."""
REVISION_SCHEMES = frozenset({"hf", "bt"})
"""Schemes whose sources may pin ``@revision`` (Hugging Face, Baseten Training)."""
_BUCKET_SCHEMES = frozenset({"s3", "gs", "r2", "azure", "cw"})
MOUNT_ROOTS = ("/models", "/app", "/workspace", "/home/app", "/packages", "/tmp")
"""Where weights may be mounted: below the replica's own tree (Truss's writable paths:
``/app``, ``$HOME``, ``/tmp``, ``/workspace``, ``/packages``) or ``/models``, the
conventional place for weights; never over the host's or the image's system files."""


def source_scheme(source: str) -> str:
    """``"hf://a/b"`` -> ``"hf"``; an absolute local path -> ``"file"``; else ``""``."""
    if "://" in source:
        return source.split("://", 1)[0]
    return "file" if source.startswith("/") else ""


def normalize_mount(path: str) -> str:
    """Collapse ``//``, ``/./`` and a trailing slash, so duplicates compare equal."""
    return posixpath.normpath(path) if path.startswith("/") else path


def mount_root_problem(path: str) -> str | None:
    """Why ``path`` may not be a weights mount (it lies outside :data:`MOUNT_ROOTS`), or None.

    One rule for written ``weights`` and for the entries ``model_cache`` and
    ``external_data`` stand for: the engines create and bind whatever this lets through.
    """
    path = normalize_mount(path)
    if any(path.startswith(root + "/") for root in MOUNT_ROOTS):
        return None
    return (
        f"mount_location must lie below one of {', '.join(MOUNT_ROOTS)} (the "
        f"replica's own tree), not `{path}`; use e.g. `/models/NAME` or "
        "`/app/model_cache/NAME`"
    )


def _has_dotdot(path: str) -> bool:
    return ".." in path.split("/")


class WeightsAuthMethod(StrEnum):
    CUSTOM_SECRET = "CUSTOM_SECRET"  # a platform secret holds the credentials
    AWS_OIDC = "AWS_OIDC"  # short-lived AWS role credentials
    GCP_OIDC = "GCP_OIDC"  # GCP workload identity federation


_AUTH_FIELDS: dict[WeightsAuthMethod, tuple[str, ...]] = {
    WeightsAuthMethod.CUSTOM_SECRET: ("auth_secret_name",),
    WeightsAuthMethod.AWS_OIDC: ("aws_oidc_role_arn", "aws_oidc_region"),
    WeightsAuthMethod.GCP_OIDC: ("gcp_oidc_service_account", "gcp_oidc_workload_id_provider"),
}


class OidcAuthFields(ConfigModel):
    """Fields every auth block shares: OIDC identities and a case-insensitive method."""

    aws_oidc_role_arn: str | None = None
    aws_oidc_region: str | None = None
    gcp_oidc_service_account: str | None = None
    gcp_oidc_workload_id_provider: str | None = None

    @field_validator("auth_method", mode="before", check_fields=False)
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value


class WeightsAuth(OidcAuthFields):
    """Credentials for a private weights source."""

    auth_method: WeightsAuthMethod
    auth_secret_name: str | None = None

    @field_validator("auth_secret_name")
    @classmethod
    def _check_name(cls, value: str | None) -> str | None:
        return None if value is None else check_secret_name(value)

    @model_validator(mode="after")
    def _check_fields(self) -> WeightsAuth:
        required = _AUTH_FIELDS[self.auth_method]
        missing = [name for name in required if not getattr(self, name)]
        others = {name for fields in _AUTH_FIELDS.values() for name in fields} - set(required)
        present = sorted(name for name in others if getattr(self, name))
        if missing:
            raise ValueError(
                f"auth_method {self.auth_method.value} needs {', '.join(missing)}; add "
                f"{' and '.join(f'`{m}`' for m in missing)} to this auth block"
            )
        if present:
            raise ValueError(
                f"{', '.join(present)} cannot be used with auth_method "
                f"{self.auth_method.value}; remove them or change auth_method"
            )
        return self


class WeightsSource(ConfigModel):
    """One ``weights:`` entry: mirrored once, mounted read-only at ``mount_location``."""

    source: str = Field(min_length=1)
    mount_location: str = Field(min_length=1)
    auth: WeightsAuth | None = None
    auth_secret_name: str | None = None
    allow_patterns: list[str] | None = None
    ignore_patterns: list[str] | None = None

    @property
    def scheme(self) -> str:
        return source_scheme(self.source)

    @property
    def secret_name(self) -> str | None:
        """The secret holding credentials, from either place Truss allows."""
        if self.auth is not None and self.auth.auth_secret_name:
            return self.auth.auth_secret_name
        return self.auth_secret_name

    @field_validator("source")
    @classmethod
    def _check_source(cls, value: str) -> str:
        scheme = source_scheme(value)
        if scheme not in WEIGHTS_SCHEMES:
            raise ValueError(
                "source must be a URI with scheme "
                f"{', '.join(s + '://' for s in WEIGHTS_SCHEMES)} or an absolute local path, "
                "e.g. `hf://owner/repo@main` or `s3://bucket/path`"
            )
        rest = value.split("://", 1)[1] if "://" in value else value
        if scheme != "file" and (not rest or rest.startswith("/")):
            raise ValueError(
                f"source needs a location after `{scheme}://`, e.g. `{scheme}://bucket/path`"
                if scheme != "hf"
                else "source needs a repository after `hf://`, e.g. `hf://owner/repo`"
            )
        if scheme in _BUCKET_SCHEMES and "@" in rest:
            raise ValueError(
                f"`@revision` is only allowed on hf:// (and bt://) sources, not {scheme}://; "
                "put the version in the path instead"
            )
        if scheme in REVISION_SCHEMES and rest.endswith("@"):
            raise ValueError("`@` must be followed by a revision, e.g. `hf://owner/repo@main`")
        return value

    @field_validator("mount_location")
    @classmethod
    def _check_mount(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError(
                "mount_location must be an absolute path (start with `/`), e.g. `/models/llama`"
            )
        if _has_dotdot(value):
            raise ValueError("mount_location may not contain `..`; give the full absolute path")
        problem = mount_root_problem(value)
        if problem is not None:
            raise ValueError(problem)
        return value

    @field_validator("auth_secret_name")
    @classmethod
    def _check_name(cls, value: str | None) -> str | None:
        return None if value is None else check_secret_name(value)

    @model_validator(mode="after")
    def _one_secret_place(self) -> WeightsSource:
        if self.auth_secret_name and self.auth is not None and self.auth.auth_secret_name:
            raise ValueError(
                "auth_secret_name is given both at the top of the entry and in `auth`; "
                "keep only `auth.auth_secret_name`"
            )
        return self


class ModelCacheKind(StrEnum):
    HF = "hf"  # Hugging Face Hub
    GCS = "gcs"  # Google Cloud Storage
    S3 = "s3"  # AWS S3
    R2 = "r2"  # Cloudflare R2
    AZURE = "azure"  # Azure Blob Storage


class ModelCacheEntry(ConfigModel):
    """One legacy ``model_cache:`` entry (superseded by ``weights``)."""

    repo_id: str = Field(min_length=1)
    revision: str = ""
    allow_patterns: list[str] | None = None
    ignore_patterns: list[str] | None = None
    kind: ModelCacheKind = ModelCacheKind.HF
    volume_folder: str | None = Field(default=None, min_length=1)
    runtime_secret_name: str = "hf_access_token"
    use_volume: bool

    @field_validator("revision")
    @classmethod
    def _check_revision(cls, value: str) -> str:
        if len(value) == 1:
            raise ValueError("revision must be empty or at least 2 characters, e.g. `main`")
        return value

    @field_validator("repo_id")
    @classmethod
    def _check_repo_id(cls, value: str) -> str:
        # A bucket's path becomes the mount below /app/model_cache (kingpost.config.mirrored);
        # `..` would climb out of it. Hub repository ids never contain `..` either.
        if _has_dotdot(value.split("://", 1)[-1]):
            raise ValueError(
                "repo_id may not contain `..` path segments (a bucket's path is mounted below "
                "/app/model_cache and must stay there), e.g. `gs://bucket/llama/v1`"
            )
        return value

    @field_validator("volume_folder")
    @classmethod
    def _check_volume_folder(cls, value: str | None) -> str | None:
        # Mounted at /app/model_cache/{volume_folder}: it must name a folder inside that.
        if value is not None and (value.startswith("/") or _has_dotdot(value)):
            raise ValueError(
                "volume_folder must be a folder inside /app/model_cache (no leading `/`, "
                "no `..`), e.g. `llama`"
            )
        return value

    @model_validator(mode="after")
    def _check_volume(self) -> ModelCacheEntry:
        if not self.use_volume:
            return self
        if self.kind == ModelCacheKind.HF and not self.revision:
            raise ValueError(
                "use_volume: true Hugging Face entries need a pinned `revision` "
                "(a commit SHA or tag); add e.g. `revision: main`"
            )
        if not self.volume_folder:
            raise ValueError(
                "use_volume: true entries need `volume_folder`; add e.g. `volume_folder: llama`"
            )
        return self


class CacheInternalEntry(ModelCacheEntry):
    """A legacy ``cache_internal:`` entry; ``use_volume`` defaults to false."""

    use_volume: bool = False


class ExternalDataItem(ConfigModel):
    """A file downloaded into the data directory before the model loads."""

    url: str = Field(min_length=1)
    local_data_path: str = Field(min_length=1)
    backend: str = "http_public"
    name: str | None = None

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        if not value.startswith(("https://", "http://")):
            raise ValueError(
                "url must be an http:// or https:// URL (the file is downloaded from it "
                "before the model loads), e.g. `https://example.com/weights/model.bin`"
            )
        return value

    @field_validator("local_data_path")
    @classmethod
    def _check_local(cls, value: str) -> str:
        if value.startswith("/") or _has_dotdot(value):
            raise ValueError(
                "local_data_path must be relative to the data directory and stay inside it "
                "(no leading `/`, no `..`), e.g. `weights/model.bin`"
            )
        return value
