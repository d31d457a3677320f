"""Mutation testing of the pure decision modules, each against only its own unit tests.

``make mutation`` (or ``python bench/mutation.py [plan|routing|housekeeping] [--jobs N]``)
runs mutmut on one module at a time and prints, per module, the mutants killed out of all
generated and the score. A mutant counts as killed when a test failed or timed out on it;
one that no selected test reaches ("no tests") counts as surviving, as it should: nothing
guards that code.

mutmut reads its settings from ``setup.cfg`` in the directory it runs in, and those
settings (which file to mutate, which tests to run) differ per module, so each module runs
in a scratch copy of ``src/``, ``tests/`` and ``pyproject.toml`` under ``.mutation/{name}/``
with a ``setup.cfg`` of its own. The scratch copy is made anew on every run: results never
come from a cache of older source. Survivors are listed with the command that shows each
one's diff.

Not part of ``make test``: a run takes minutes and is CPU heavy.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRATCH = ROOT / ".mutation"


@dataclass(frozen=True)
class Module:
    source: str
    """The file to mutate, relative to the repository root."""
    tests: tuple[str, ...]
    """The unit tests that guard it, and the only ones run against its mutants."""


MODULES = {
    "plan": Module("src/kingpost/controller/plan.py", ("tests/unit/test_controller_plan.py",)),
    "routing": Module(
        "src/kingpost/gateway/routing.py",
        ("tests/unit/test_gateway_routing.py", "tests/unit/test_gateway_websocket_routing.py"),
    ),
    "housekeeping": Module("src/kingpost/housekeeping.py", ("tests/unit/test_housekeeping.py",)),
}
THRESHOLD = 0.90
"""The score every module must reach (issue 24): a run below it exits 1."""


@dataclass(frozen=True)
class Score:
    killed: int
    total: int
    survivors: tuple[tuple[str, str], ...]
    """(mutant name, status) of each mutant not killed."""

    @property
    def ratio(self) -> float:
        return self.killed / self.total if self.total else 0.0


def _setup_cfg(module: Module) -> str:
    tests = "\n    ".join(module.tests)
    return (
        "[mutmut]\n"
        "source_paths = src\n"
        f"only_mutate = {module.source}\n"
        f"pytest_add_cli_args_test_selection =\n    {tests}\n"
        # No cache dir in the scratch copy; the suite's own timeout plugin stays on.
        "pytest_add_cli_args = -p no:cacheprovider\n"
    )


def _prepare(name: str, module: Module) -> Path:
    work = SCRATCH / name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "src", work / "src", ignore=ignore)
    shutil.copytree(ROOT / "tests", work / "tests", ignore=ignore)
    shutil.copy2(ROOT / "pyproject.toml", work / "pyproject.toml")
    (work / "setup.cfg").write_text(_setup_cfg(module))
    return work


def _mutmut(work: Path, *args: str) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("mutmut")
    return subprocess.run([str(exe), *args], cwd=work, text=True, capture_output=True, check=False)


def run_module(name: str, jobs: int) -> Score:
    module = MODULES[name]
    work = _prepare(name, module)
    ran = _mutmut(work, "run", "--max-children", str(jobs))
    if ran.returncode != 0:
        sys.stderr.write(ran.stdout[-4000:] + ran.stderr[-4000:])
        raise SystemExit(f"mutation: mutmut run failed for {name} (exit {ran.returncode})")
    exported = _mutmut(work, "export-cicd-stats")
    stats_file = work / "mutants" / "mutmut-cicd-stats.json"
    if exported.returncode != 0 or not stats_file.exists():
        sys.stderr.write(exported.stdout + exported.stderr)
        raise SystemExit(f"mutation: no results for {name}")
    stats = json.loads(stats_file.read_text())
    listed = _mutmut(work, "results")
    survivors = tuple(
        (key.strip(), status.strip())
        for key, _, status in (
            line.rpartition(":") for line in listed.stdout.splitlines() if line.strip()
        )
    )
    killed = int(stats["killed"]) + int(stats["timeout"])
    return Score(killed, int(stats["total"]), survivors)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="*", metavar="MODULE", help=f"of {', '.join(MODULES)}")
    parser.add_argument(
        "--jobs", type=int, default=max(1, (os.cpu_count() or 2) // 2), help="mutants at once"
    )
    args = parser.parse_args()
    names = args.modules or list(MODULES)
    unknown = [name for name in names if name not in MODULES]
    if unknown:
        parser.error(f"unknown module {unknown[0]!r}: choose from {', '.join(MODULES)}")
    scores: dict[str, Score] = {}
    for name in names:  # one module at a time: each run already uses --jobs processes
        started = time.monotonic()
        score = run_module(name, args.jobs)
        scores[name] = score
        took = time.monotonic() - started
        print(f"{name}: {score.killed}/{score.total} killed ({score.ratio:.0%}) in {took:.0f}s")
        for key, status in score.survivors:
            print(f"    {status:>10}  {key}")
        if score.survivors:
            show = os.path.relpath(Path(sys.executable).with_name("mutmut"), SCRATCH / name)
            print(f"    diffs: cd .mutation/{name} && {show} show NAME")
    print()
    print(f"{'module':<14} {'killed':>7} {'total':>6} {'score':>6}")
    for name, score in scores.items():
        print(f"{name:<14} {score.killed:>7} {score.total:>6} {score.ratio:>6.1%}")
    low = [name for name, score in scores.items() if score.ratio < THRESHOLD]
    if low:
        print(f"below {THRESHOLD:.0%}: {', '.join(low)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
