"""The Truss ``config.yaml`` schema, key for key, with Truss's defaults.

Attribute names are Truss's key names. Field-level rules live here as
validators, so pydantic reports every broken field at once; rules that relate
several keys live in :mod:`kingpost.config.rules` and run on the raw document.
"""

from __future__ import annotations

import posixpath
from collections.abc import Mapping
from enum import StrEnum
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    SerializerFunctionWrapHandler,
    field_serializer,
    field_validator,
    model_validator,
)

from kingpost.config._base import ConfigModel, check_secret_name
from kingpost.config.mirrored import DerivedWeights
from kingpost.config.resources import Resources, Runtime
from kingpost.config.sources import (
    CacheInternalEntry,
    ExternalDataItem,
    ModelCacheEntry,
    OidcAuthFields,
    WeightsSource,
)

__all__ = [
    "PYTHON_VERSIONS",
    "BaseImage",
    "Build",
    "DockerAuth",
    "DockerAuthMethod",
    "DockerServer",
    "ModelServer",
    "TrussConfig",
]


def _check_env_name(name: str) -> str:
    if not name or "=" in name or "\0" in name:
        raise ValueError(
            f"environment variable name `{name}` is invalid: it must be non-empty "
            "and contain no `=`"
        )
    return name


def _check_secret_value(value: object) -> object:
    # YAML reads `true` as a boolean; Truss refuses it here rather than guess a spelling.
    if isinstance(value, bool):
        raise ValueError(
            "a secret's value must be a string, or null for one stored with `kingpost "
            'secrets set NAME`, not a boolean; quote it (e.g. `"true"`) or set it to null'
        )
    return value


EnvName = Annotated[str, AfterValidator(_check_env_name)]
SecretName = Annotated[str, AfterValidator(check_secret_name)]
SecretValue = Annotated[str | None, BeforeValidator(_check_secret_value)]

PYTHON_VERSIONS = ("py38", "py39", "py310", "py311", "py312", "py313", "py314")
RESERVED_UIDS = (0, 60000)


class DockerAuthMethod(StrEnum):
    GCP_SERVICE_ACCOUNT_JSON = "GCP_SERVICE_ACCOUNT_JSON"  # secret holds a key JSON
    AWS_IAM = "AWS_IAM"  # secrets hold an access key pair
    AWS_OIDC = "AWS_OIDC"  # short-lived AWS role credentials
    GCP_OIDC = "GCP_OIDC"  # GCP workload identity federation
    REGISTRY_SECRET = "REGISTRY_SECRET"  # secret holds `user:password`


class DockerAuth(OidcAuthFields):
    """How to pull ``base_image.image`` from a private registry."""

    auth_method: DockerAuthMethod
    registry: str | None = ""
    secret_name: str | None = None
    aws_access_key_id_secret_name: str = "aws_access_key_id"
    aws_secret_access_key_secret_name: str = "aws_secret_access_key"

    @model_validator(mode="after")
    def _check_fields(self) -> DockerAuth:
        needs = {
            DockerAuthMethod.GCP_SERVICE_ACCOUNT_JSON: ("secret_name",),
            DockerAuthMethod.REGISTRY_SECRET: ("secret_name",),
            DockerAuthMethod.AWS_OIDC: ("aws_oidc_role_arn", "aws_oidc_region"),
            DockerAuthMethod.GCP_OIDC: (
                "gcp_oidc_service_account",
                "gcp_oidc_workload_id_provider",
            ),
        }.get(self.auth_method, ())
        missing = [name for name in needs if not getattr(self, name)]
        if missing:
            raise ValueError(
                f"docker_auth with auth_method {self.auth_method.value} needs "
                f"{', '.join(missing)}; add {' and '.join(f'`{m}`' for m in missing)}"
            )
        return self


class BaseImage(ConfigModel):
    """A custom image to build on (or, with ``no_build``, to run as is)."""

    image: str = ""
    python_executable_path: str = ""
    docker_auth: DockerAuth | None = None

    @field_validator("python_executable_path")
    @classmethod
    def _absolute(cls, value: str) -> str:
        if value and not value.startswith("/"):
            raise ValueError("python_executable_path must be absolute, e.g. `/usr/bin/python3`")
        return value


def _endpoint(value: str) -> str:
    if not value.startswith("/"):
        raise ValueError(f"endpoint must start with `/`, e.g. `/{value.lstrip('/') or 'health'}`")
    return value


class DockerServer(ConfigModel):
    """A server of the user's own, started by ``start_command`` (or the entrypoint)."""

    start_command: str | None = None
    server_port: int
    predict_endpoint: str
    readiness_endpoint: str
    liveness_endpoint: str
    run_as_user_id: int | None = None
    no_build: bool | None = None
    kingpost_metrics_endpoint: str | None = None
    """A Kingpost extension (Truss has no such key, and only warns about it): the path on
    ``server_port`` where the server serves Prometheus text, scraped with every scrape of
    the control plane's ``/metrics`` and re-exposed with the replica's labels, as a model
    class's ``/metrics`` is. Unset: the server is never asked."""

    @field_validator("predict_endpoint", "readiness_endpoint", "liveness_endpoint")
    @classmethod
    def _check_endpoint(cls, value: str) -> str:
        return _endpoint(value)

    @field_validator("kingpost_metrics_endpoint")
    @classmethod
    def _check_metrics_endpoint(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if any(c.isspace() or not c.isprintable() for c in value):
            raise ValueError(
                f"kingpost_metrics_endpoint must be a URL path without spaces or control "
                f"characters, e.g. `/metrics`; found {value!r}"
            )
        return _endpoint(value)

    @field_validator("server_port", mode="before")
    @classmethod
    def _check_port(cls, value: object) -> object:
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ValueError("server_port must be an integer from 1 to 65535, e.g. 8000")
        text = str(value).strip()
        if not text.isdigit() or not 1 <= int(text) <= 65535:
            raise ValueError("server_port must be an integer from 1 to 65535, e.g. 8000")
        return int(text)

    @field_validator("run_as_user_id")
    @classmethod
    def _check_uid(cls, value: int | None) -> int | None:
        if value is None:
            return None
        if value in RESERVED_UIDS:
            what = "root" if value == 0 else "the platform's default user `app`"
            raise ValueError(
                f"run_as_user_id may not be {value} ({what}); "
                "set `run_as_user_id` to another UID, e.g. 1000"
            )
        if value < 0:
            raise ValueError("run_as_user_id must be a non-negative UID, e.g. 1000")
        return value


class ModelServer(StrEnum):
    TrussServer = "TrussServer"  # the standard Truss model server
    TRT_LLM = "TRT_LLM"  # Baseten's TensorRT-LLM engine builder


class Build(ConfigModel):
    """Build-time settings."""

    model_server: ModelServer = ModelServer.TrussServer
    arguments: dict[str, Any] = Field(default_factory=dict)
    secret_to_path_mapping: dict[str, str] = Field(default_factory=dict)
    no_cache: bool = False

    @field_validator("secret_to_path_mapping")
    @classmethod
    def _check_mapping(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if not name.startswith("DOCKER_REGISTRY_"):
                check_secret_name(name)
        return value

    @field_validator("no_cache")
    @classmethod
    def _no_cache(cls, value: bool) -> bool:
        if value:
            raise ValueError(
                "no_cache cannot be set in config.yaml; remove it and ask for an uncached "
                "build when pushing instead"
            )
        return value


class TrussConfig(ConfigModel):
    """A parsed Truss ``config.yaml``. Keys Truss does not know are kept as extras.

    Once loaded, ``weights`` also holds what ``model_cache`` and ``external_data`` stand
    for, as :class:`~kingpost.config.mirrored.DerivedWeights` after the entries written
    (see :mod:`kingpost.config.mirrored`); a dump leaves those out.
    """

    model_name: str | None = None
    model_metadata: dict[str, Any] = Field(default_factory=dict)
    description: str | None = None
    examples_filename: str = "examples.yaml"
    data_dir: str = "data"
    external_data: list[ExternalDataItem] | None = None
    external_package_dirs: list[str] = Field(default_factory=list)
    python_version: str = "py313"
    base_image: BaseImage | None = None
    requirements_file: str | None = None
    requirements: list[str] = Field(default_factory=list)
    system_packages: list[str] = Field(default_factory=list)
    environment_variables: dict[EnvName, str] = Field(default_factory=dict)
    secrets: dict[SecretName, SecretValue] = Field(default_factory=dict)
    resources: Resources = Field(default_factory=Resources)
    runtime: Runtime = Field(default_factory=Runtime)
    build: Build = Field(default_factory=Build)
    build_commands: list[str] = Field(default_factory=list)
    docker_server: DockerServer | None = None
    model_cache: list[ModelCacheEntry] = Field(default_factory=list)
    weights: list[WeightsSource] = Field(default_factory=list)
    trt_llm: dict[str, Any] | None = None
    training_checkpoints: dict[str, Any] | None = None
    bis_llm: dict[str, Any] | None = None
    bdn: dict[str, Any] | None = None
    # Internal / legacy keys, accepted as Truss does.
    input_type: str = "Any"
    model_framework: str = "custom"
    model_type: str = "Model"
    model_module_dir: str = "model"
    model_class_filename: str = "model.py"
    model_class_name: str = "Model"
    bundled_packages_dir: str = "packages"
    use_local_src: bool = False
    cache_internal: list[CacheInternalEntry] = Field(default_factory=list)
    live_reload: bool = False
    apply_library_patches: bool = True
    spec_version: str = "2.0"

    @property
    def is_custom_server(self) -> bool:
        """True when the project brings its own server (``docker_server``)."""
        return self.docker_server is not None

    @property
    def no_build(self) -> bool:
        """True when the base image runs unmodified (``docker_server.no_build``)."""
        return bool(self.docker_server is not None and self.docker_server.no_build)

    @field_validator("python_version", mode="before")
    @classmethod
    def _check_python(cls, value: object) -> object:
        text = str(value)
        if text in PYTHON_VERSIONS:
            return text
        digits = text.replace(".", "").removeprefix("py")
        hint = f"py{digits}" if f"py{digits}" in PYTHON_VERSIONS else "py311"
        raise ValueError(
            f"python_version must be one of {', '.join(PYTHON_VERSIONS)}; write it like `{hint}`"
        )

    @field_validator("requirements_file")
    @classmethod
    def _inside_project(cls, value: str | None) -> str | None:
        # Only the project directory is uploaded; a path out of it would be read from the
        # server's own disk (and its content sent to the package index).
        if value is None or not value.strip():
            return value
        path = posixpath.normpath(value.strip())
        if path.startswith("/") or path == ".." or path.startswith("../"):
            raise ValueError(
                "requirements_file must be a relative path inside the project (only the "
                "project directory is uploaded); copy the file into the project"
            )
        return value

    @field_validator("data_dir")
    @classmethod
    def _data_dir_inside(cls, value: str) -> str:
        # The process engine links `/app/data` weights into `{replica app}/{data_dir}` as
        # root on the host: a path out of the project would place (or replace) host files.
        if not value.strip() or value.startswith("/") or ".." in value.split("/"):
            raise ValueError(
                "data_dir must be a relative folder inside the project (not empty, no "
                "leading `/`, no `..`), e.g. `data`"
            )
        return value

    @field_validator("environment_variables", mode="before")
    @classmethod
    def _env_to_str(cls, value: object) -> object:
        # Truss turns every value into a string; booleans become true/false.
        if not isinstance(value, Mapping):
            return value
        out: dict[str, object] = {}
        for key, item in value.items():
            if isinstance(item, bool):
                out[str(key)] = str(item).lower()
            elif item is None or isinstance(item, int | float | str):
                out[str(key)] = str(item)
            else:
                out[str(key)] = item  # a list or mapping: let the type check refuse it
        return out

    @field_validator("secrets", mode="before")
    @classmethod
    def _secrets_to_str(cls, value: object) -> object:
        if not isinstance(value, Mapping):
            return value
        # Numbers become strings as Truss's do; a boolean (an int too) is left to be refused.
        return {
            str(k): (str(v) if isinstance(v, int | float) and not isinstance(v, bool) else v)
            for k, v in value.items()
        }

    @field_serializer("weights", mode="wrap")
    def _written_weights(
        self, value: list[WeightsSource], handler: SerializerFunctionWrapHandler
    ) -> Any:
        # The entries that model_cache and external_data stand for (appended by the loader)
        # are not part of the document: a dumped config parses back to the same one.
        return handler([w for w in value if not isinstance(w, DerivedWeights)])

    @field_validator("model_cache", "cache_internal", "weights", mode="before")
    @classmethod
    def _null_list(cls, value: object) -> object:
        return [] if value is None else value
