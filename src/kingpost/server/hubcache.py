"""Hub repositories of a ``use_volume: false`` model_cache, made visible in the Hub cache.

Truss's image downloads them into the Hugging Face cache at build time, so a model loads
them by repository id (``from_pretrained("owner/repo")``) without downloading. Kingpost
mirrors them like weights and mounts each as its commit's snapshot under
``model_cache/.hub/models--{owner}--{repo}/snapshots/{commit}`` in the app directory
(see ``config/mirrored.py``). Before the model is imported, :func:`link_hub_snapshots`
links that snapshot into the replica's Hub cache and records the revision the config
names (``refs/{revision}``), which is all a Hub client reads to find a file, online or
offline: the repository's other folders (blobs, other snapshots) stay writable.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["hub_cache_dir", "link_hub_snapshots"]

log = logging.getLogger("kingpost.server")

MOUNTED = Path("model_cache") / ".hub"
"""Where, relative to the app directory, the mirrored snapshots are."""


def hub_cache_dir(env: Mapping[str, str]) -> Path:
    """The Hub cache a Hugging Face client in this process uses (its own rules)."""
    if env.get("HF_HUB_CACHE"):
        return Path(env["HF_HUB_CACHE"]).expanduser()
    if env.get("HUGGINGFACE_HUB_CACHE"):
        return Path(env["HUGGINGFACE_HUB_CACHE"]).expanduser()
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]).expanduser() / "hub"
    xdg = env.get("XDG_CACHE_HOME") or os.path.join(env.get("HOME", "~"), ".cache")
    return Path(xdg).expanduser() / "huggingface" / "hub"


def _items(raw: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(repo_id, revision) of each Hugging Face ``model_cache`` item without a volume."""
    cache = raw.get("model_cache", raw.get("hf_cache")) or []
    out = []
    for item in cache if isinstance(cache, list) else []:
        if not isinstance(item, Mapping) or item.get("use_volume") is True:
            continue
        if str(item.get("kind") or "hf") != "hf" or not item.get("repo_id"):
            continue
        out.append((str(item["repo_id"]).strip("/"), str(item.get("revision") or "main")))
    return out


def link_hub_snapshots(app_dir: Path, raw: Mapping[str, Any], env: Mapping[str, str]) -> int:
    """Link each mirrored snapshot into the Hub cache; how many were linked.

    A problem (a read-only cache, a snapshot that is not mounted) is logged, not raised:
    the model can still download the files itself, as it would without a model_cache.
    """
    cache, linked = hub_cache_dir(env), 0
    for repo_id, revision in _items(raw):
        folder = "models--" + repo_id.replace("/", "--")
        snapshots = app_dir / MOUNTED / folder / "snapshots"
        commits = sorted(p.name for p in snapshots.iterdir()) if snapshots.is_dir() else []
        if len(commits) != 1:
            log.warning("model_cache %s: no mirrored snapshot at %s", repo_id, snapshots)
            continue
        commit = commits[0]
        repo = cache / folder
        try:
            (repo / "snapshots").mkdir(parents=True, exist_ok=True)
            link = repo / "snapshots" / commit
            if not os.path.lexists(link):
                link.symlink_to(snapshots / commit, target_is_directory=True)
            if revision != commit:
                (repo / "refs").mkdir(exist_ok=True)
                (repo / "refs" / revision).write_text(commit)
        except OSError as exc:
            log.warning("model_cache %s: cannot link it into the Hub cache %s: %s",
                        repo_id, cache, exc)  # fmt: skip
            continue
        linked += 1
    return linked
