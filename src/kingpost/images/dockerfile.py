"""What an image of a Truss project contains: a Dockerfile and its context, as data.

Pure functions of the config, the project's files and the host's build settings;
:mod:`kingpost.images.build` writes the plan to disk and hands it to the Docker
Engine. The layer order follows Truss's image builder, cheapest-to-change last:

1. ``FROM`` the base (``base_image.image`` or the Kingpost Python base);
2. ``system_packages`` through apt;
3. the user ``app`` (UID 60000, or ``docker_server.run_as_user_id``) and its
   writable directories ``/app``, ``/workspace``, ``/packages`` and ``$HOME``;
4. for model classes, Truss's server packages (the base set of the project's Truss
   version, :mod:`kingpost.envs.baseset`, with the model server's own few), then
   ``requirements`` / ``requirements_file`` over them, so a user pin wins as on Truss;
   the base layer comes first and is the same for every model of a Truss version and
   Python, so images share it;
5. for model classes, the ``kingpost`` package itself (see below);
6. the project at ``/app``, its data directory at ``/app/data``, and ``/packages``
   pointing at its bundled packages directory (where Truss puts them);
7. each of ``build_commands`` as its own layer, in order, as root, in ``/app``: like
   Truss, after the project is in place, so they may read or patch its files.

The model server is installed without pip: the ``kingpost`` package directory is
copied to ``/opt/kingpost/lib`` and a ``.pth`` file appends that directory to the
interpreter's path, after site-packages. User packages therefore always win,
and none of the control plane's dependencies enter the image (the same rule as
the process engine's environments, :mod:`kingpost.envs.builder`).

With ``docker_server.no_build`` the image runs unmodified: the plan only adds
``data/`` at ``/app/data`` (owned by the server's UID: the image runs as 60000 or
``run_as_user_id`` like any other) and warns about the config keys that have no effect.

The host's package settings reach ``RUN`` steps as build arguments, which do
not persist into the image's runtime environment: its CA bundle (for TLS
interception proxies), and its pip index URLs when they are http(s).
"""

from __future__ import annotations

import configparser
import json
import os
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from kingpost.envs.baseset import BaseSet
from kingpost.errors import ConfigError
from kingpost.server.contract import SERVER_ARGS

if TYPE_CHECKING:
    from kingpost.config import TrussConfig

__all__ = [
    "APP_DIR",
    "DEFAULT_UID",
    "HOME_DIR",
    "PACKAGES_DIR",
    "WORKSPACE_DIR",
    "BuildPlan",
    "HostBuildEnv",
    "image_python",
    "image_user_id",
    "plan_build",
]

APP_DIR = "/app"
HOME_DIR = "/home/app"
DEFAULT_UID = 60000
PACKAGES_DIR = "/packages"
WORKSPACE_DIR = "/workspace"
WRITABLE_DIRS = (APP_DIR, WORKSPACE_DIR, PACKAGES_DIR, HOME_DIR)
KINGPOST_LIB = "/opt/kingpost/lib"
CA_PATH = "/usr/local/share/kingpost/host-ca.crt"
CTX = "kingpost-build"
SERVER_REQUIREMENTS = ("httptools>=0.6", "msgpack>=1.0", "PyYAML>=6.0", "uvloop>=0.19")
"""What ``python -m kingpost.server`` imports beyond the standard library."""


@dataclass(frozen=True)
class HostBuildEnv:
    """Settings of the building machine that ``RUN`` steps need to reach package indexes."""

    ca_bundle: bytes | None = None
    pip: Mapping[str, str] = field(default_factory=dict)
    """PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, PIP_TRUSTED_HOST (http(s) URLs only)."""

    @classmethod
    def from_host(cls) -> HostBuildEnv:
        return cls(ca_bundle=_host_ca_bundle(), pip=_host_pip_settings())


@dataclass(frozen=True)
class BuildPlan:
    """A Dockerfile, its context (path in context -> bytes or a file to copy) and args."""

    dockerfile: str
    files: Mapping[str, bytes | Path]
    buildargs: Mapping[str, str]
    base_image: str
    warnings: tuple[str, ...] = ()
    package_dir: Path | None = None
    """The ``kingpost`` package to copy to ``kingpost-build/kingpost`` (model classes)."""


def image_python(config: TrussConfig) -> str:
    """The interpreter an image of this config runs its Python with."""
    from kingpost.images.base import BASE_PYTHON

    base = config.base_image
    if base is not None and base.python_executable_path:
        return base.python_executable_path
    if base is not None and base.image:
        return "python3"
    return BASE_PYTHON


def image_user_id(config: TrussConfig) -> int:
    """The UID the server runs as: ``run_as_user_id``, else 60000, ``no_build`` images
    too (never the image's own user, which is often root)."""
    ds = config.docker_server
    if ds is not None and ds.run_as_user_id is not None:
        return ds.run_as_user_id
    return DEFAULT_UID


def plan_build(
    config: TrussConfig,
    app_files: Mapping[str, Path],
    base_image: str,
    host: HostBuildEnv,
    package_dir: Path | None = None,
    base_set: BaseSet | None = None,
) -> BuildPlan:
    """The plan for ``config``; ``app_files`` maps project-relative paths to files.
    ``base_set``: the Truss server packages a model class gets (needed for one)."""
    if not base_image or any(ch.isspace() or not ch.isprintable() for ch in base_image):
        # It is pasted into the FROM line: a newline would add Dockerfile instructions.
        raise ConfigError(
            f"config.yaml: base_image.image {base_image!r} is not an image reference; "
            "write it like `python:3.11-slim` (no spaces or line breaks)",
            field="base_image.image",
            value=base_image,
        )
    if config.no_build:
        return _plan_no_build(config, app_files, base_image)
    warnings = _python_version_warning(config)
    files: dict[str, bytes | Path] = {f"app/{rel}": path for rel, path in app_files.items()}
    args = _buildargs(host)
    lines = [f"FROM {base_image}", "USER root", *(f"ARG {name}" for name in sorted(args))]
    if host.ca_bundle:
        files[f"{CTX}/host-ca.crt"] = host.ca_bundle
        lines.append(f"COPY {CTX}/host-ca.crt {CA_PATH}")
    if not config.is_custom_server:
        if base_set is None:
            raise ValueError("a model-class image needs the Truss server packages' set")
        lines += _base_steps(config, base_set, files)
    if config.system_packages:
        lines.append(_apt_step(config.system_packages))
    uid = image_user_id(config)
    lines.append(_run(_user_script(uid)))
    lines += _requirements_steps(config, app_files, files)
    if not config.is_custom_server:
        if package_dir is None:
            raise ValueError("a model-class image needs the kingpost package directory")
        lines += _server_steps(image_python(config))
    lines.append(f"COPY --chown={uid}:{uid} app/ {APP_DIR}/")
    data_dir = config.data_dir.strip("/") or "data"
    if data_dir != "data" and any(rel.startswith(f"{data_dir}/") for rel in app_files):
        lines.append(_copy(f"app/{data_dir}/", f"{APP_DIR}/data/", f"--chown={uid}:{uid} "))
    packages = config.bundled_packages_dir.strip("/") or "packages"
    if any(rel.startswith(f"{packages}/") for rel in app_files):
        target = shlex.quote(f"{APP_DIR}/{packages}")
        lines.append(_run(f"rm -rf {PACKAGES_DIR} && ln -s {target} {PACKAGES_DIR}"))
    if config.build_commands:
        lines.append(f"WORKDIR {APP_DIR}")
        lines += [_run(command) for command in config.build_commands]
    lines += _runtime_lines(config, uid)
    return BuildPlan(
        dockerfile="\n".join(lines) + "\n",
        files=files,
        buildargs=args,
        base_image=base_image,
        warnings=warnings,
        package_dir=None if config.is_custom_server else package_dir,
    )


def _plan_no_build(
    config: TrussConfig, app_files: Mapping[str, Path], base_image: str
) -> BuildPlan:
    from kingpost.config import NO_BUILD_IGNORED

    ignored = sorted(k for k in NO_BUILD_IGNORED if k in config.model_fields_set)
    warnings = (
        (
            f"config.yaml: {', '.join(ignored)} ignored with `docker_server.no_build: true` "
            "(the image runs unmodified); pass such settings as environment_variables",
        )
        if ignored
        else ()
    )
    data_dir = config.data_dir.strip("/") or "data"
    files: dict[str, bytes | Path] = {
        f"data/{rel[len(data_dir) + 1 :]}": path
        for rel, path in app_files.items()
        if rel.startswith(f"{data_dir}/")
    }
    lines = [f"FROM {base_image}"]
    if files:
        uid = image_user_id(config)
        lines.append(f"COPY --chown={uid}:{uid} data/ {APP_DIR}/data/")
    return BuildPlan("\n".join(lines) + "\n", files, {}, base_image, warnings)


def _python_version_warning(config: TrussConfig) -> tuple[str, ...]:
    from kingpost.images.base import BASE_PYTHON_VERSION

    if config.base_image is not None and config.base_image.image:
        return ()
    wanted = config.python_version
    if "python_version" in config.model_fields_set and wanted != BASE_PYTHON_VERSION:
        return (
            f"config.yaml: python_version is {wanted}, but the Kingpost base image has "
            f"Python 3.11 ({BASE_PYTHON_VERSION}); the project runs on 3.11. Set "
            "base_image.image to an image with the Python you need",
        )
    return ()


def _run(command: str) -> str:
    """A shell ``RUN`` in exec form, so multi-line commands survive intact."""
    return "RUN " + json.dumps(["/bin/sh", "-c", command])


def _copy(source: str, target: str, flags: str = "") -> str:
    """``COPY`` in JSON form, so paths from config.yaml with spaces stay one argument."""
    return f"COPY {flags}{json.dumps([source, target])}"


def _env_value(value: str) -> str:
    """An ``ENV`` value kept whole: double-quoted, with Docker's escapes."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$")
    return f'"{escaped}"'


def _apt_step(packages: list[str]) -> str:
    names = " ".join(shlex.quote(p) for p in packages)
    return _run(
        "apt-get update && apt-get install -y --no-install-recommends "
        f"{names} && apt-get clean && rm -rf /var/lib/apt/lists/*"
    )


def _user_script(uid: int) -> str:
    """Create user ``app`` with ``uid`` unless the UID exists; own the writable dirs."""
    dirs = " ".join(WRITABLE_DIRS)
    return (
        f"set -e; if ! grep -q '^[^:]*:[^:]*:{uid}:' /etc/passwd; then "
        f"if command -v useradd >/dev/null 2>&1; then "
        f"useradd --uid {uid} --user-group --home-dir {HOME_DIR} --shell /bin/sh app; "
        f"else echo 'app:x:{uid}:{uid}::{HOME_DIR}:/bin/sh' >> /etc/passwd; "
        f"echo 'app:x:{uid}:' >> /etc/group; fi; fi; "
        f"mkdir -p {dirs} && chown {uid}:{uid} {dirs}"
    )


def _requirements_steps(
    config: TrussConfig, app_files: Mapping[str, Path], files: dict[str, bytes | Path]
) -> list[str]:
    sources: list[str] = []
    if config.requirements_file:
        rel = config.requirements_file.strip().removeprefix("./")
        if rel not in app_files:
            raise ConfigError(
                f"config.yaml: requirements_file `{config.requirements_file}` is not in the "
                "project; add the file or remove the key",
                field="requirements_file",
                value=config.requirements_file,
            )
        files[f"{CTX}/requirements.txt"] = app_files[rel]
        sources.append("requirements.txt")
    elif config.requirements:
        files[f"{CTX}/requirements.txt"] = ("\n".join(config.requirements) + "\n").encode()
        sources.append("requirements.txt")
    if not sources:
        return []
    copies = [f"COPY {CTX}/{name} /tmp/kingpost-build/{name}" for name in sources]
    install = " ".join(f"-r /tmp/kingpost-build/{name}" for name in sources)
    python = shlex.quote(image_python(config))
    return [*copies, _run(f"{python} -m pip install --no-cache-dir {install}")]


def _base_steps(
    config: TrussConfig, base_set: BaseSet, files: dict[str, bytes | Path]
) -> list[str]:
    """Truss's server packages for a model class, in a layer of their own before anything
    of the project's: the same layer (so one cached copy) for every model-class image of
    that set and Python. The project's requirements install over it afterwards."""
    wanted = [*base_set.requirements, *SERVER_REQUIREMENTS]
    files[f"{CTX}/base-requirements.txt"] = ("\n".join(wanted) + "\n").encode()
    python = shlex.quote(image_python(config))
    return [
        f"COPY {CTX}/base-requirements.txt /tmp/kingpost-base/requirements.txt",
        _run(f"{python} -m pip install --no-cache-dir -r /tmp/kingpost-base/requirements.txt"),
    ]


def _server_steps(python: str) -> list[str]:
    pth = (
        "import pathlib, sysconfig; "
        "pathlib.Path(sysconfig.get_paths()['purelib'], 'kingpost.pth')"
        f".write_text('{KINGPOST_LIB}\\n')"
    )
    return [
        f"COPY {CTX}/kingpost/ {KINGPOST_LIB}/kingpost/",
        _run(f"{shlex.quote(python)} -c {shlex.quote(pth)}"),
    ]


def _runtime_lines(config: TrussConfig, uid: int) -> list[str]:
    python = image_python(config)
    lines = [
        f"ENV APP_HOME={APP_DIR} HOME={HOME_DIR} PYTHON_EXECUTABLE={_env_value(python)}",
        f"WORKDIR {APP_DIR}",
        f"USER {uid}",
    ]
    ds = config.docker_server
    if ds is not None and ds.start_command:
        lines.append("CMD " + json.dumps(["/bin/sh", "-c", ds.start_command]))
    elif ds is None:
        server = [python, *SERVER_ARGS, "--app-dir", APP_DIR, "--port", "8080"]
        lines.append("CMD " + json.dumps(server))
    return lines


def _buildargs(host: HostBuildEnv) -> dict[str, str]:
    args = {
        "DEBIAN_FRONTEND": "noninteractive",
        "PIP_BREAK_SYSTEM_PACKAGES": "1",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "PIP_ROOT_USER_ACTION": "ignore",
        **host.pip,
    }
    if host.ca_bundle:
        for name in ("PIP_CERT", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
            args[name] = CA_PATH
    return args


def _host_ca_bundle() -> bytes | None:
    candidates = [
        os.environ.get("PIP_CERT"),
        os.environ.get("SSL_CERT_FILE"),
        "/etc/ssl/certs/ca-certificates.crt",
        "/etc/pki/tls/certs/ca-bundle.crt",
    ]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate).read_bytes()
    return None


def _host_pip_settings() -> dict[str, str]:
    """Index settings from PIP_* variables, else pip.conf; http(s) URLs only."""
    parser = configparser.ConfigParser()
    parser.read(
        [
            "/etc/pip.conf",
            str(Path.home() / ".config/pip/pip.conf"),
            str(Path.home() / ".pip/pip.conf"),
        ]
    )
    out: dict[str, str] = {}
    for key in ("index-url", "extra-index-url", "trusted-host"):
        env = "PIP_" + key.upper().replace("-", "_")
        value = os.environ.get(env)
        if value is None:
            value = parser.get("global", key, fallback="") or parser.get(
                "install", key, fallback=""
            )
        words = value.split()
        if key != "trusted-host":
            words = [w for w in words if w.startswith(("http://", "https://"))]
        if words:
            out[env] = " ".join(words)
    return out
