"""Build or reuse a deployment's Python environment, keyed by a hash of its inputs.

A model class's environment is made in one of three ways (:class:`ModelEnvMode`, the
``KINGPOST_MODEL_ENV`` setting handed in as a :class:`ModelEnvPolicy`). ``truss-base``:
a venv layered on a shared base environment of Truss's server packages
(:mod:`kingpost.envs.base`; the layering is ``_install_layered``), holding the user's
requirements only. ``server-python``: the server's interpreter as it is, its packages
checked against the requirements (:mod:`kingpost.envs.offline`). ``minimal``, what the
rest of this docstring describes, and what a custom server's environment follows:

How the model server is isolated from user packages (the decision):

- The server's hot path needs only ``httptools``, ``msgpack`` and ``PyYAML``
  (``uvloop`` when it installs). uv installs these in the *same* resolver run
  as the user's requirements; pip in a second run pinned to what the user's
  installed (a hashed requirements file allows no unhashed ones in its run).
  Either way a user pin that contradicts them fails the build loudly (a
  BuildError naming the conflict) instead of breaking at run time.
- Kingpost's own source is not installed: a ``.pth`` file puts a directory that
  holds only the ``kingpost`` package *after* the venv's site-packages, so the
  user's packages always win and none of the platform's other dependencies
  (SQLAlchemy, FastAPI for the API, ...) leak into the model's environment.
- What Truss's server image also provides and model code often imports without
  declaring (``fastapi``/``starlette``, ``pydantic``) is added in a second,
  best-effort step constrained to the versions already installed, so it can
  never change a user's package. If the resolver finds that impossible, the
  step is skipped with a warning for good; if it fails for another reason
  (network, index), the environment is used without them and the marker
  records it, so the step is tried again each time the environment is reused
  until it succeeds. The server imports starlette and pydantic only when model code
  uses them, and validates config.yaml only when pydantic v2 is importable
  (the control plane validated it at push time anyway).
- Finally ``uv pip check`` (``pip check``) must pass and the venv's interpreter
  must import ``kingpost.server.main``.

A custom server (``docker_server``) that lists requirements gets an environment of its
own from :func:`ensure_custom_server_environment`: its requirements alone, as Truss
installs them into its image, with none of the model server's parts above (its
requirements, fastapi/pydantic, the ``.pth`` link, the import check; ``pip check`` still
runs), hashed apart from a model's environment with the same requirements.

Resolved versions are recorded, so a rebuild installs what the first build did. After a
build, ``freeze`` lists every installed package; the list goes into the ready marker
(``kingpost venvs show``) and into ``{envs}/_pins/{key}.txt``, keyed by what the user
controls (Python version, requirements and their files, the server's own requirement
ranges) and not by the installer's version or Kingpost's path. A later build with the same
key (the environment was collected, uv was upgraded) installs with those pins as
constraints; a pin that can no longer be installed fails the build, naming the file to
delete for a fresh resolution. Changing a requirement changes the key, so it resolves
afresh. Requirements carrying ``--hash`` are pinned by the user already and get no pins.

A project with no requirements that does not ask for another Python reuses
the platform's own interpreter (a custom server: the machine's own PATH). An
environment is built at its final path (the shebangs of its console scripts name
that path), under a file lock that makes
concurrent builds of the same hash wait for each other and then reuse the
result; its ready marker is written last, so a build that died is never reused
but removed and done again.
"""

from __future__ import annotations

import enum
import hashlib
import json
import shutil
import subprocess
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import kingpost
from kingpost._cancel import current as current_cancel
from kingpost._filelock import locked
from kingpost.envs.base import BaseEnvironment, base_hash, ensure_base
from kingpost.envs.baseset import base_set_for
from kingpost.envs.installer import Installer, resolution_conflict, run_logged
from kingpost.envs.interpreters import (
    Interpreter,
    current,
    find_interpreter,
    parse_python_version,
)
from kingpost.envs.pyproject import pyproject_dependencies
from kingpost.errors import BuildError, ConfigError

if TYPE_CHECKING:
    from kingpost.config import TrussConfig

__all__ = [
    "CONVENIENCE_REQUIREMENTS",
    "SERVER_REQUIREMENTS",
    "EnvironmentResult",
    "ModelEnvMode",
    "ModelEnvPolicy",
    "ensure_custom_server_environment",
    "ensure_environment",
    "environment_hash",
]

SCHEMA = 3  # 2: fastapi/pydantic really added; 3: built in place, console scripts work
SERVER_REQUIREMENTS: tuple[str, ...] = (
    "httptools>=0.6",
    "msgpack>=1.0",
    "PyYAML>=6.0",
    "uvloop>=0.19",
)
CONVENIENCE_REQUIREMENTS: tuple[str, ...] = ("fastapi>=0.111", "pydantic>=2.7")
READY_MARKER = "kingpost-env.json"
PINS_DIR = "_pins"
BASE_DIR = "_base"


class Conveniences(enum.StrEnum):
    """How the best-effort fastapi/pydantic step ended, as the ready marker records it."""

    ADDED = "added"  # installed, or already there in compatible versions
    CONFLICT = "conflict"  # impossible without changing a user's version: never retried
    FAILED = "failed"  # failed otherwise (network, index): retried when the env is reused


class ModelEnvMode(enum.StrEnum):
    """What a model class runs in (``KINGPOST_MODEL_ENV``)."""

    TRUSS_BASE = "truss-base"  # a venv of its requirements layered on Truss's server set
    SERVER_PYTHON = "server-python"  # the server's interpreter as it is; installs nothing
    MINIMAL = "minimal"  # its requirements and the server's four packages; none: ours


@dataclass(frozen=True)
class ModelEnvPolicy:
    """How :func:`ensure_environment` makes a model class's environment (from settings)."""

    mode: ModelEnvMode = ModelEnvMode.MINIMAL
    base_dir: Path | None = None
    """Where base environments live; ``None``: ``{envs_dir}/_base``."""
    truss_version: str | None = None
    """The Truss version whose server set a project without ``truss_version`` gets."""

    def base_dir_for(self, envs_dir: Path) -> Path:
        return self.base_dir if self.base_dir is not None else envs_dir / BASE_DIR


@dataclass(frozen=True)
class EnvironmentResult:
    python_executable: str
    env_hash: str
    reused: bool


@dataclass(frozen=True)
class _Inputs:
    requirements: tuple[str, ...]
    files: tuple[tuple[str, str], ...]
    """(name, text) of requirements files."""
    interpreter: Interpreter
    model_server: bool = True
    """Whether Kingpost's model server runs in it; False for a custom server's command."""
    base_hash: str | None = None
    """The base environment it is layered on (:mod:`kingpost.envs.base`), if any."""
    base_requirements: tuple[str, ...] = ()
    """That base's set, which a recorded resolution depends on."""

    @property
    def empty(self) -> bool:
        return not self.requirements and not self.files


def _requirements_inputs(
    config: TrussConfig, app_dir: Path
) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    reqs = tuple(r.strip() for r in config.requirements if r and r.strip())
    name = config.requirements_file
    if not name:
        return reqs, ()
    path = (app_dir / name).resolve()
    if not path.is_file():
        raise ConfigError(
            f"config.yaml: `requirements_file` names {name!r}, which is not a file in "
            f"{app_dir}; add the file or fix the path"
        )
    files = [(path.name, path.read_text(encoding="utf-8"))]
    if path.name == "pyproject.toml":
        pyproject_dependencies(files[0][1], name)  # refuses what would install nothing
    if path.name == "uv.lock":
        pyproject = path.parent / "pyproject.toml"
        if not pyproject.is_file():
            raise ConfigError(
                f"config.yaml: `requirements_file` {name!r} is a uv.lock, which needs the "
                f"pyproject.toml beside it; add {pyproject.relative_to(app_dir.resolve())}"
            )
        files.append(("pyproject.toml", pyproject.read_text(encoding="utf-8")))
    return reqs, tuple(files)


def _hash(inputs: _Inputs, installer: Installer) -> str:
    doc: dict[str, Any] = {
        "schema": SCHEMA,
        "python": [inputs.interpreter.executable, inputs.interpreter.version],
        "requirements": list(inputs.requirements),
        "files": [[n, hashlib.sha256(t.encode()).hexdigest()] for n, t in inputs.files],
        "installer": installer.version(),
    }
    if inputs.base_hash is not None:
        doc["base"] = inputs.base_hash
        doc["kingpost"] = str(Path(kingpost.__file__).resolve().parent)
    elif inputs.model_server:
        doc["server"] = list(SERVER_REQUIREMENTS)
        doc["convenience"] = list(CONVENIENCE_REQUIREMENTS)
        doc["kingpost"] = str(Path(kingpost.__file__).resolve().parent)
    else:
        doc["custom_server"] = True
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:24]


def pins_key(inputs: _Inputs) -> str:
    """What a recorded resolution is reused for: the inputs a user controls, without the
    installer's version or where Kingpost is installed (upgrading either keeps the pins)."""
    doc: dict[str, Any] = {
        "python": inputs.interpreter.version,
        "requirements": list(inputs.requirements),
        "files": [[n, hashlib.sha256(t.encode()).hexdigest()] for n, t in inputs.files],
        "server": list(SERVER_REQUIREMENTS) if inputs.model_server else None,
    }
    if inputs.base_hash is not None:
        doc["server"] = None
        doc["base"] = list(inputs.base_requirements)
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:24]


def _pins_path(inputs: _Inputs, envs_dir: Path) -> Path | None:
    """Where this environment's resolution is recorded; ``None`` when the user's own
    requirements carry hashes (pinned already, and pip's hash mode takes no other pins)."""
    texts = [*inputs.requirements, *(text for _, text in inputs.files)]
    if any("--hash" in text for text in texts):
        return None
    return envs_dir / PINS_DIR / f"{pins_key(inputs)}.txt"


def _explicit_python(config: Any) -> str | None:
    fields_set = getattr(config, "model_fields_set", None)
    if fields_set is not None and "python_version" not in fields_set:
        return None
    return getattr(config, "python_version", None)


def ensure_environment(
    config: TrussConfig,
    app_dir: Path,
    envs_dir: Path,
    log: Callable[[str], None],
    policy: ModelEnvPolicy | None = None,
) -> EnvironmentResult:
    """The interpreter to run ``app_dir``'s model with; builds its venv when needed.

    ``policy`` (by default :attr:`ModelEnvMode.MINIMAL`) says how: layered on the shared
    base environment of Truss's server packages, the server's own interpreter checked
    against the requirements (nothing installed), or a venv of the requirements alone.

    Blocking; raises :class:`~kingpost.errors.BuildError` with the installer's
    last lines when an install fails.
    """
    policy = policy or ModelEnvPolicy()
    if policy.mode == ModelEnvMode.SERVER_PYTHON:
        from kingpost.envs.offline import check_interpreter

        requirements, files = _requirements_inputs(config, app_dir)
        python = current().executable
        asked = parse_python_version(_explicit_python(config))
        if asked is not None and not current().version.startswith(asked + "."):
            log(
                f"warning: python_version asks for Python {asked}; KINGPOST_MODEL_ENV="
                f"server-python runs every model with this server's, {current().version}"
            )
        check_interpreter(python, _listed_requirements(_Inputs(requirements, files, current())))
        log(f"KINGPOST_MODEL_ENV=server-python: using {python} and its packages as they are")
        return EnvironmentResult(python, "server-python", reused=True)
    if policy.mode == ModelEnvMode.TRUSS_BASE:
        requirements, files = _requirements_inputs(config, app_dir)
        interpreter = find_interpreter(_explicit_python(config), log)
        base_set = base_set_for(truss_version_of(config), policy.truss_version, log)
        base = ensure_base(base_set, interpreter, policy.base_dir_for(envs_dir), log)
        layered = _Inputs(requirements, files, interpreter, True, base.hash, base_set.requirements)
        return _ensure(layered, envs_dir, log, base)
    inputs = _model_inputs(config, app_dir, log)
    if inputs is None:
        log("no requirements: using the platform's interpreter")
        return EnvironmentResult(current().executable, "base", reused=True)
    return _ensure(inputs, envs_dir, log)


def ensure_custom_server_environment(
    config: TrussConfig, app_dir: Path, envs_dir: Path, log: Callable[[str], None]
) -> EnvironmentResult | None:
    """The environment a custom server's ``start_command`` runs in: its requirements
    alone, in a venv of the Python it asks for. ``None`` when it lists none: nothing to
    build, the command runs with the machine's own PATH and packages. A python_version
    alone builds nothing either: an empty venv first on PATH would hide the packages the
    command finds on this machine (``truss init`` writes a python_version into every
    config).

    Blocking; raises :class:`~kingpost.errors.BuildError` as :func:`ensure_environment`.
    """
    inputs = _custom_server_inputs(config, app_dir, log)
    if inputs is None:
        log("no requirements: the start_command runs with this machine's PATH")
        return None
    return _ensure(inputs, envs_dir, log)


def environment_hash(
    config: TrussConfig,
    app_dir: Path,
    *,
    custom_server: bool = False,
    policy: ModelEnvPolicy | None = None,
) -> str | None:
    """The hash (directory name under the envs dir) of the environment that
    :func:`ensure_environment` (or, with ``custom_server``,
    :func:`ensure_custom_server_environment`) would use for this project; ``None`` when
    it would use none. Builds nothing."""
    policy = policy or ModelEnvPolicy()
    if custom_server:
        inputs = _custom_server_inputs(config, app_dir, _quiet)
    elif policy.mode == ModelEnvMode.SERVER_PYTHON:
        return None
    elif policy.mode == ModelEnvMode.TRUSS_BASE:
        requirements, files = _requirements_inputs(config, app_dir)
        interpreter = find_interpreter(_explicit_python(config), _quiet)
        base_set = base_set_for(truss_version_of(config), policy.truss_version, _quiet)
        installer = Installer(_quiet)
        on = base_hash(base_set, interpreter, installer)
        layered = _Inputs(requirements, files, interpreter, True, on, base_set.requirements)
        return _hash(layered, installer)
    else:
        inputs = _model_inputs(config, app_dir, _quiet)
    return None if inputs is None else _hash(inputs, Installer(_quiet))


def truss_version_of(config: Any) -> object:
    """config.yaml's ``truss_version`` (kept among the keys Kingpost's model does not
    name), or ``None``."""
    extra = getattr(config, "model_extra", None) or {}
    return extra.get("truss_version")


def _quiet(line: str) -> None:
    """A build log that keeps nothing."""


def _model_inputs(config: TrussConfig, app_dir: Path, log: Callable[[str], None]) -> _Inputs | None:
    """A model class's environment inputs; ``None`` when the platform's interpreter does
    (no requirements, no other Python asked for)."""
    requirements, files = _requirements_inputs(config, app_dir)
    interpreter = find_interpreter(_explicit_python(config), log)
    inputs = _Inputs(requirements, files, interpreter)
    return None if inputs.empty and interpreter == current() else inputs


def _custom_server_inputs(
    config: TrussConfig, app_dir: Path, log: Callable[[str], None]
) -> _Inputs | None:
    requirements, files = _requirements_inputs(config, app_dir)
    if not requirements and not files:
        return None
    interpreter = find_interpreter(_explicit_python(config), log, model_server=False)
    return _Inputs(requirements, files, interpreter, model_server=False)


def _ensure(
    inputs: _Inputs,
    envs_dir: Path,
    log: Callable[[str], None],
    base: BaseEnvironment | None = None,
) -> EnvironmentResult:
    installer = Installer(log)
    if not installer.uv and any(name == "uv.lock" for name, _ in inputs.files):
        raise BuildError(
            "requirements_file is a uv.lock, which needs uv; install uv (pip install uv)"
        )
    env_hash = _hash(inputs, installer)
    target = envs_dir / env_hash
    # Another build of the same environment may hold it: this one waits, unless cancelled.
    with locked(envs_dir / f".{env_hash}.lock", current_cancel()):
        python = target / "bin" / "python"
        if (target / READY_MARKER).is_file() and python.exists():
            log(f"reusing environment {env_hash}")
            (target / READY_MARKER).touch()  # its last use, which `kingpost venvs gc` reads
            if inputs.model_server and base is None:
                _retry_conveniences(installer, python, target, log)
            return EnvironmentResult(str(python), env_hash, reused=True)
        _build(inputs, installer, envs_dir, target, log, base)
    return EnvironmentResult(str(python), env_hash, reused=False)


def _build(
    inputs: _Inputs,
    installer: Installer,
    envs_dir: Path,
    target: Path,
    log: Callable[[str], None],
    base: BaseEnvironment | None = None,
) -> None:
    shutil.rmtree(target, ignore_errors=True)  # a build that died left it without a marker
    version = inputs.interpreter.version
    log(f"building environment {target.name} with {installer.name} (Python {version})")
    pins = _pins_path(inputs, envs_dir)
    pinned = pins is not None and pins.is_file()
    try:
        python = installer.create_venv(inputs.interpreter.executable, target)
        user_args = _install_args(inputs, target, installer)
        if pinned:
            assert pins is not None
            count = sum(1 for line in pins.read_text().splitlines() if line.strip())
            log(f"installing the {count} versions recorded when this environment was first built")
        recorded = ["-c", str(pins)] if pinned and pins is not None else []
        marker: dict[str, Any] = {
            "python": inputs.interpreter.version,
            "requirements": _listed_requirements(inputs),
        }
        try:
            if base is not None:
                marker["base"] = base.hash
                _install_layered(installer, python, base, user_args, recorded, log)
            elif inputs.model_server:
                _install_requirements(installer, python, target, user_args, recorded)
                marker["conveniences"] = _install_conveniences(
                    installer, python, target, log, recorded
                )
            elif user_args:  # a custom server's: its requirements alone, as Truss installs them
                installer.install(python, [*recorded, *user_args], "installing requirements")
        except BuildError as exc:
            if pinned and resolution_conflict(exc):
                raise BuildError(
                    f"{exc.message}\nThe versions this environment was first built with "
                    f"(recorded in {pins}) cannot all be installed any more; delete that file "
                    "to resolve the requirements afresh",
                    exit_status=exc.details.get("exit_status"),
                    output_tail=exc.details.get("output_tail"),
                ) from exc
            raise
        installer.check(python)
        if inputs.model_server:
            _link_kingpost(python, envs_dir)
            run_logged(
                [str(python), "-c", "import kingpost.server.main"],
                log,
                "checking the model server imports",
            )
        else:
            marker["custom_server"] = True
        marker["packages"] = installer.freeze(python)
        if pins is not None:
            marker["pins"] = pins.name
            if not pinned:
                _record_pins(pins, marker["packages"])
        _write_marker(target, marker)
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise
    log(f"environment {target.name} ready")


def _listed_requirements(inputs: _Inputs) -> list[str]:
    """What the user asked for, inline or in ``requirements_file`` (its requirement lines;
    options, comments and blank lines left out), as ``venvs list`` counts them."""
    listed = list(inputs.requirements)
    for name, text in inputs.files:
        if name == "pyproject.toml":
            listed.extend(pyproject_dependencies(text, name))
            continue
        if name == "uv.lock":  # what it pins is the pyproject.toml's dependencies, listed
            continue
        for line in text.splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith(("#", "-")):
                listed.append(line)
    return listed


def _record_pins(path: Path, packages: list[str]) -> None:
    """Writes the resolution once, atomically; a build that dies before never leaves half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    tmp.write_text("".join(f"{line}\n" for line in packages))
    tmp.replace(path)


def _write_marker(env_dir: Path, marker: dict[str, Any]) -> None:
    tmp = env_dir / f".{READY_MARKER}.tmp"
    tmp.write_text(json.dumps(marker))
    tmp.replace(env_dir / READY_MARKER)


def _install_requirements(
    installer: Installer,
    python: Path,
    env_dir: Path,
    user_args: list[str],
    recorded: Sequence[str] = (),
) -> None:
    """The user's requirements and the server's, so that a conflict fails the build.

    uv resolves both in one run. pip cannot: one hashed requirement (``pip-compile
    --generate-hashes``) puts the whole run in require-hashes mode, which the server's
    unhashed requirements then fail. So pip installs the user's alone, as Truss does,
    then the server's pinned to what that installed: a conflict fails that second run
    with pip's resolver naming both sides, and ``pip check`` runs after. ``recorded``:
    constraints from the first build's resolution, for both runs (pip refuses a run of
    constraints alone, so none is made without requirements).
    """
    if installer.uv:
        args = [*recorded, *user_args, *SERVER_REQUIREMENTS]
        installer.install(python, args, "installing requirements")
        return
    if user_args:
        installer.install(python, [*recorded, *user_args], "installing requirements")
    pins = env_dir / "kingpost-server-constraints.txt"
    pins.write_text("\n".join(installer.freeze(python)) + "\n")
    what = "installing the model server's requirements"
    installer.install(python, ["-c", str(pins), *recorded, *SERVER_REQUIREMENTS], what)


def _install_layered(
    installer: Installer,
    python: Path,
    base: BaseEnvironment,
    user_args: list[str],
    recorded: Sequence[str],
    log: Callable[[str], None],
) -> None:
    """Layers the venv on ``base`` and installs the user's requirements on top.

    They are installed with the base's versions as constraints first, so a requirement
    the base satisfies takes the base's version (uv links it from its cache; pip sees
    the base and installs nothing). When that is impossible (the project needs numpy 2,
    the base has 1.26) they are installed without, and the venv's versions shadow the
    base's, as Truss's image installs a model's requirements over its server's: logged
    as a warning naming the rule, for a base package that needs the shadowed version
    may then break if the model imports it.
    """
    _layer_on(python, base)
    if not user_args:
        log(f"no requirements: layered on base environment {base.hash}, nothing to install")
        return
    try:
        installer.install(
            python, ["-c", str(base.freeze), *recorded, *user_args], "installing requirements"
        )
    except BuildError as exc:
        if not resolution_conflict(exc):
            raise
        log(
            "warning: your requirements need versions other than the base environment's "
            f"(Truss's server packages, {base.freeze}); installing them over it, where "
            "they take precedence"
        )
        installer.install(python, [*recorded, *user_args], "installing requirements")


BASE_PTH = "zy_kingpost_base.pth"
"""Sorts after a venv's own ``.pth`` files and before ``zz_kingpost.pth``."""


def _layer_on(python: Path, base: BaseEnvironment) -> None:
    """A ``.pth`` line that adds the base's site-packages as a site directory (its own
    ``.pth`` files run too), after the venv's own."""
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    line = f"import site; site.addsitedir({base.purelib!r})\n"
    (Path(purelib) / BASE_PTH).write_text(line)


def _install_args(inputs: _Inputs, env_dir: Path, installer: Installer) -> list[str]:
    """``-r`` arguments for the user's requirements, written to files as Truss writes them:
    an inline entry may be an option line, carry hashes, or be a comment."""
    work = env_dir / "kingpost-inputs"
    work.mkdir()
    args: list[str] = []
    if inputs.requirements:
        inline = work / "config_requirements.txt"
        inline.write_text("\n".join(inputs.requirements) + "\n")
        args += ["-r", str(inline)]
    if not inputs.files:
        return args
    name, text = inputs.files[0]
    if name == "pyproject.toml" and installer.uv:
        (work / "pyproject.toml").write_text(text)  # as Truss: uv reads it, [tool.uv] too
        return [*args, "-r", str(work / "pyproject.toml")]
    if name == "pyproject.toml":
        deps = pyproject_dependencies(text, name)
        (work / "requirements.txt").write_text("\n".join(deps) + "\n")
    elif name == "uv.lock":
        assert installer.uv, "ensure_environment refuses a uv.lock without uv"
        (work / "uv.lock").write_text(text)
        (work / "pyproject.toml").write_text(inputs.files[1][1])
        exported = run_logged(
            [installer.uv, "export", "--frozen", "--no-hashes", "--no-header", "--no-emit-project",
             "--format", "requirements-txt"],
            lambda _: None, "exporting uv.lock", cwd=work,
        )  # fmt: skip
        (work / "requirements.txt").write_text("\n".join(exported) + "\n")
    else:
        (work / "requirements.txt").write_text(text)
    return [*args, "-r", str(work / "requirements.txt")]


def _install_conveniences(
    installer: Installer,
    python: Path,
    env_dir: Path,
    log: Callable[[str], None],
    extra: Sequence[str] = (),
) -> Conveniences:
    pins = env_dir / "kingpost-constraints.txt"
    try:
        pins.write_text("\n".join(installer.freeze(python)) + "\n")
        installer.install(
            python,
            ["-c", str(pins), *extra, *CONVENIENCE_REQUIREMENTS],
            "adding fastapi/pydantic",
        )
    except BuildError as exc:
        if resolution_conflict(exc):
            log(
                "warning: fastapi and pydantic could not be added without changing your "
                "requirements' versions; model code that imports them must list them in "
                "requirements"
            )
            return Conveniences.CONFLICT
        log(
            "warning: adding fastapi and pydantic failed (the installer's lines are above); "
            "the environment is used without them and the step is tried again when it is "
            "next reused; model code that imports them should list them in requirements"
        )
        return Conveniences.FAILED
    return Conveniences.ADDED


def _retry_conveniences(
    installer: Installer, python: Path, env_dir: Path, log: Callable[[str], None]
) -> None:
    """Tries the best-effort step again on a reused environment where it once failed for
    a reason that may have passed. Only adds packages, pinned to what is installed."""
    marker_path = env_dir / READY_MARKER
    marker = json.loads(marker_path.read_text())
    if marker.get("conveniences") != Conveniences.FAILED:
        return
    marker["conveniences"] = _install_conveniences(installer, python, env_dir, log)
    _write_marker(env_dir, marker)


def _kingpost_link_dir(envs_dir: Path) -> Path:
    """A directory holding only a ``kingpost`` symlink to this package's source.

    Builds of other hashes may get here at the same moment, so the link is made under a
    name of its own and renamed over ``kingpost`` (atomic; the result is the same link).
    """
    package = Path(kingpost.__file__).resolve().parent
    link_dir = envs_dir / "_kingpost" / hashlib.sha256(str(package).encode()).hexdigest()[:12]
    link = link_dir / "kingpost"
    if link.is_symlink() and link.readlink() == package:
        return link_dir
    link_dir.mkdir(parents=True, exist_ok=True)
    tmp = link_dir / f".kingpost-{uuid.uuid4().hex}"
    tmp.symlink_to(package, target_is_directory=True)
    tmp.replace(link)
    return link_dir


def _link_kingpost(python: Path, envs_dir: Path) -> None:
    link_dir = _kingpost_link_dir(envs_dir)
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    (Path(purelib) / "zz_kingpost.pth").write_text(str(link_dir) + "\n")
