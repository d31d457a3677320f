"""``kingpost migrate``: turn ``model_cache`` into ``weights``, as the seed's table says.

The rest of config.yaml is kept as written (comments, order): only the ``model_cache``
block is replaced by a ``weights`` block.
"""

from __future__ import annotations

import difflib
import io
import re
import tokenize
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kingpost.config._yaml import load_yaml
from kingpost.errors import ConfigError

__all__ = ["MigrationPlan", "plan_migration"]

_SCHEMES = {"hf": "hf", "s3": "s3", "gcs": "gs", "r2": "r2"}
_CODE_HINTS = {
    "/app/model_cache": "reads /app/model_cache/…: point it at the new mount_location",
    "lazy_data_resolver": "uses lazy_data_resolver: weights are mounted before load(); "
    "drop the resolver call",
    "hf_hub_download": "downloads from the Hub at run time: read the mounted files instead",
    "snapshot_download": "downloads from the Hub at run time: read the mounted files instead",
}


@dataclass
class MigrationPlan:
    original: str
    migrated: str
    warnings: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return self.original != self.migrated

    def diff(self) -> str:
        return "".join(
            difflib.unified_diff(
                self.original.splitlines(keepends=True),
                self.migrated.splitlines(keepends=True),
                "config.yaml (before)",
                "config.yaml (after)",
            )
        )


def _without_comments(source: str) -> str:
    """Python source with its comments dropped: a hint is for code that uses a name, not
    for a comment that mentions it (``kingpost init``'s template names the resolver in one).
    Source that does not tokenize is searched whole."""
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    except (tokenize.TokenError, SyntaxError):
        return source
    return " ".join(t.string for t in tokens if t.type != tokenize.COMMENT)


def _entry(item: dict[str, Any], i: int) -> dict[str, Any]:
    repo = str(item.get("repo_id") or "")
    if not repo:
        raise ConfigError(f"config.yaml: model_cache[{i}].repo_id: missing; nothing to migrate")
    kind = str(item.get("kind") or "hf").lower()
    scheme = _SCHEMES.get(kind)
    if scheme is None:
        raise ConfigError(f"config.yaml: model_cache[{i}].kind: unknown kind {kind!r}")
    source = repo if "://" in repo else f"{scheme}://{repo}"
    if scheme == "hf" and item.get("revision"):
        source += f"@{item['revision']}"
    folder = item.get("volume_folder") or repo.rstrip("/").split("/")[-1]
    out: dict[str, Any] = {"source": source, "mount_location": f"/app/model_cache/{folder}"}
    for key in ("allow_patterns", "ignore_patterns"):
        if item.get(key):
            out[key] = list(item[key])
    if item.get("runtime_secret_name"):
        out["auth"] = {
            "auth_method": "CUSTOM_SECRET",
            "auth_secret_name": item["runtime_secret_name"],
        }
    return out


def _external_entry(
    project_dir: Path, item: dict[str, Any], i: int, taken: set[str]
) -> tuple[dict[str, Any] | None, str]:
    """A ``weights`` entry for one ``external_data`` item, or why it cannot be one.

    An https:// source is mounted as a directory holding one file named after the
    URL, so an item maps when its ``local_data_path`` is ``<dir>/<that name>``, no
    other item uses ``<dir>``, and the project's own ``data/<dir>`` is empty (a mount
    there would hide it). It is then read at ``/app/data/<dir>/<name>``, where
    containers have the data directory.
    """
    url, local = str(item.get("url") or ""), str(item.get("local_data_path") or "")
    where = f"external_data[{i}] ({local or url})"
    if not url.startswith(("https://", "http://")):
        return None, f"{where}: only http(s) URLs can become weights sources"
    name = urllib.parse.urlsplit(url).path.rstrip("/").rsplit("/", 1)[-1]
    folder, _, filename = local.rpartition("/")
    if not folder:
        return None, f"{where}: the file sits at the top of data/, where a mount would hide data/"
    if filename != name:
        return None, (
            f"{where}: the URL's file is named {name!r}, not {filename!r}; a weights mount "
            "keeps the URL's name"
        )
    if folder in taken:
        return None, f"{where}: another item already uses data/{folder}"
    existing = project_dir / "data" / folder
    if existing.is_dir() and any(existing.iterdir()):
        return None, f"{where}: data/{folder} has files of its own that a mount would hide"
    taken.add(folder)
    return {"source": url, "mount_location": f"/app/data/{folder}"}, ""


def _migrate_external_data(project_dir: Path, raw: dict[str, Any], plan: MigrationPlan) -> None:
    items = [dict(x) for x in raw.get("external_data") or []]
    taken: set[str] = set()
    mapped, kept = [], []
    for i, item in enumerate(items):
        entry, why = _external_entry(project_dir, item, i, taken)
        if entry is None:
            kept.append(item)
            plan.warnings.append(f"{why}; left in external_data")
        else:
            mapped.append(entry)
    if not mapped:
        return
    if re.search(r"^weights\s*:", plan.migrated, re.M):  # written above from model_cache
        block = yaml.safe_dump(mapped, sort_keys=False)
        plan.migrated = re.sub(
            r"^(weights\s*:\n(?:[ \t-].*\n)*)",
            lambda m: m.group(1) + block,
            plan.migrated,
            count=1,
            flags=re.M,
        )
    else:
        plan.migrated = (
            plan.migrated.rstrip("\n") + "\n" + yaml.safe_dump({"weights": mapped}, sort_keys=False)
        )
    rest = yaml.safe_dump({"external_data": kept}, sort_keys=False) if kept else ""
    plan.migrated = _replace_block(plan.migrated, "external_data", rest)
    folders = ", ".join(f"/app/data/{e['mount_location'].rsplit('/data/', 1)[1]}" for e in mapped)
    plan.warnings.append(
        f"external_data files now come from weights mounted read-only at {folders}: code that "
        "writes there, or reads data/ outside a container, must change"
    )


def _replace_block(text: str, key: str, replacement: str) -> str:
    lines = text.splitlines(keepends=True)
    start = next((i for i, ln in enumerate(lines) if re.match(rf"{key}\s*:", ln)), None)
    if start is None:
        return text
    end = start + 1
    while end < len(lines) and (not lines[end].strip() or lines[end][0] in " \t#-"):
        end += 1
    return "".join(lines[:start]) + replacement + "".join(lines[end:])


def _read(text: str) -> dict[str, Any]:
    """config.yaml's fields, with a ConfigError (not a traceback) for what cannot be read."""
    raw, _, _ = load_yaml(text, "config.yaml")
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"config.yaml: the top level must be a mapping of fields, got "
            f"{type(raw).__name__} {str(raw)[:40]!r}"
        )
    for key in ("model_cache", "external_data"):
        value = raw.get(key)
        if value and not (isinstance(value, list) and all(isinstance(x, dict) for x in value)):
            raise ConfigError(
                f"config.yaml: {key}: must be a list of mappings (one per item), got "
                f"{str(value)[:60]!r}"
            )
    return raw


def plan_migration(project_dir: Path) -> MigrationPlan:
    path = project_dir / "config.yaml"
    text = path.read_text()
    raw = _read(text)
    plan = MigrationPlan(text, text)
    cache = raw.get("model_cache") or []
    if raw.get("weights"):
        raise ConfigError("config.yaml: already has `weights`; nothing to migrate")
    if cache:
        weights = [_entry(dict(item), i) for i, item in enumerate(cache)]
        block = yaml.safe_dump({"weights": weights}, sort_keys=False)
        plan.migrated = _replace_block(text, "model_cache", block)
    if raw.get("external_data"):
        _migrate_external_data(project_dir, raw, plan)
    server = raw.get("docker_server")
    start = str(server.get("start_command") or "") if isinstance(server, dict) else ""
    if "truss-transfer" in start:
        plan.warnings.append(
            "docker_server.start_command runs truss-transfer-cli: remove it, files are mounted "
            "before the server starts"
        )
    for py in sorted(project_dir.glob("model/**/*.py")):
        source = _without_comments(py.read_text(errors="replace"))
        for needle, hint in _CODE_HINTS.items():
            if needle in source:
                plan.warnings.append(f"{py.relative_to(project_dir)} {hint}")
    return plan
