"""``KINGPOST_MODEL_ENV=server-python``: a model class runs in an interpreter as it is.

For hosts that reach no package index (GPU machines with torch installed): nothing is
installed, so the project's requirements must already be satisfied by what the
interpreter has. :func:`check_interpreter` asks the interpreter which distributions it
has and its marker environment (stdlib only, so any Python answers), and compares them
with each requirement; the first unsatisfied ones fail the build, naming the package,
the rule and what is installed.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterable

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from kingpost.errors import BuildError, ConfigError

__all__ = ["check_interpreter", "unsatisfied"]

_PROBE = r"""
import importlib.metadata as md, json, os, platform, sys
dists = {}
for d in md.distributions():
    name = d.metadata["Name"]
    if name:
        dists.setdefault(name, d.version)
impl = sys.implementation
iver = "{0.major}.{0.minor}.{0.micro}".format(impl.version)
if impl.version.releaselevel != "final":
    iver += impl.version.releaselevel[0] + str(impl.version.serial)
env = {
    "implementation_name": impl.name,
    "implementation_version": iver,
    "os_name": os.name,
    "platform_machine": platform.machine(),
    "platform_release": platform.release(),
    "platform_system": platform.system(),
    "platform_version": platform.version(),
    "python_full_version": platform.python_version(),
    "platform_python_implementation": platform.python_implementation(),
    "python_version": ".".join(platform.python_version_tuple()[:2]),
    "sys_platform": sys.platform,
}
print(json.dumps({"dists": dists, "env": env}))
"""


def _requirement_lines(lines: Iterable[str]) -> list[str]:
    """Requirement lines without options, comments and hashes."""
    out = []
    for raw in lines:
        line = raw.split(" #", 1)[0].split(" --hash", 1)[0].strip().rstrip("\\").strip()
        if line and not line.startswith(("#", "-")):
            out.append(line)
    return out


def _probe(python: str) -> tuple[dict[str, str], dict[str, str]]:
    try:
        out = subprocess.run(
            [python, "-c", _PROBE], capture_output=True, text=True, timeout=60, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BuildError(f"cannot ask {python} for its packages: {exc}") from exc
    if out.returncode != 0:
        raise BuildError(
            f"cannot ask {python} for its packages (exit {out.returncode}): "
            + out.stderr.strip()[-500:]
        )
    doc = json.loads(out.stdout)
    dists = {str(canonicalize_name(name)): str(v) for name, v in doc["dists"].items()}
    env = {str(key): str(value) for key, value in doc["env"].items()}
    return dists, env


def unsatisfied(
    requirements: Iterable[str], dists: dict[str, str], env: dict[str, str]
) -> list[str]:
    """One line per requirement that ``dists`` (canonical name -> version) does not
    satisfy on a machine with marker environment ``env``."""
    problems = []
    for line in _requirement_lines(requirements):
        try:
            req = Requirement(line)
        except InvalidRequirement as exc:
            raise ConfigError(
                f"requirements: {line!r} is not a requirement this check can read ({exc}); "
                "with KINGPOST_MODEL_ENV=server-python write `name` or `name<op>version`"
            ) from exc
        if req.marker is not None and not req.marker.evaluate({**env, "extra": ""}):
            continue
        installed = dists.get(canonicalize_name(req.name))
        rule = str(req.specifier) or "any version"
        if installed is None:
            problems.append(f"{req.name} ({rule}): not installed")
        elif req.specifier and not req.specifier.contains(installed, prereleases=True):
            problems.append(f"{req.name} ({rule}): {installed} is installed")
    return problems


def check_interpreter(python: str, requirements: Iterable[str]) -> None:
    """Raise BuildError naming each requirement ``python`` does not satisfy."""
    wanted = list(requirements)
    if not _requirement_lines(wanted):
        return
    dists, env = _probe(python)
    problems = unsatisfied(wanted, dists, env)
    if problems:
        raise BuildError(
            "KINGPOST_MODEL_ENV=server-python runs model classes with the packages "
            f"{python} has, installing none, and the project's requirements are not all "
            "satisfied:\n  " + "\n  ".join(problems) + "\nInstall them into that interpreter "
            "(e.g. from wheels carried to this host), relax the requirements, or unset "
            "KINGPOST_MODEL_ENV to build an environment from the package index"
        )
