"""A small server speaking the part of the Hugging Face Hub HTTP API a mirror needs:
``GET /api/models/{repo}/revision/{rev}`` (commit sha + siblings with sizes and LFS
sha256) and ``GET /{repo}/resolve/{rev}/{path}``. Branches can be moved; repos can be
private (Bearer token required); downloads are counted."""

from __future__ import annotations

import hashlib
import json
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from helpers.httpd import QuietHandler, byte_range, serving


@dataclass
class Repo:
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    token: str | None = None

    def commit(self, branch: str, files: dict[str, bytes]) -> str:
        sha = hashlib.sha1(json.dumps(sorted((k, v.hex()) for k, v in files.items())).encode())
        commit = sha.hexdigest()
        self.commits[commit] = dict(files)
        self.branches[branch] = commit
        return commit


class Hub:
    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.downloads: Counter[str] = Counter()
        self.drop_once: set[str] = set()
        """Paths whose next download stops halfway (the connection is closed)."""
        self.ranges: list[str] = []
        """Every Range header received, in order."""
        self.tamper: dict[str, bytes] = {}
        """Paths whose downloads send these bytes instead of what the listing describes."""
        self.fail: set[tuple[str, int]] = set()
        """(path, first byte) of downloads that answer 500 until removed from here."""
        self.hold: dict[str, threading.Event] = {}
        """Paths whose downloads wait for their event before answering."""
        self.server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}"


def _handler(hub: Hub) -> type[BaseHTTPRequestHandler]:
    class Handler(QuietHandler):
        def _repo(self, name: str) -> Repo | None:
            repo = hub.repos.get(name)
            if repo is None:
                self._send(404, b'{"error": "Repository not found"}')
                return None
            if repo.token and self.headers.get("Authorization") != f"Bearer {repo.token}":
                self._send(401, b'{"error": "Invalid credentials"}')
                return None
            return repo

        def do_HEAD(self) -> None:
            """What huggingface_hub asks before a download: commit, etag, size."""
            parts = self.path.split("?", 1)[0].lstrip("/").split("/")
            if len(parts) < 5 or parts[2] != "resolve":
                self._send(404, b"")
                return
            repo = self._repo("/".join(parts[:2]))
            if repo is None:
                return
            commit = repo.branches.get(parts[3], parts[3])
            data = repo.commits.get(commit, {}).get("/".join(parts[4:]))
            if data is None:
                self.send_response(404)
                self.send_header("X-Error-Code", "EntryNotFound")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            etag = hashlib.sha256(data).hexdigest()
            self.send_response(200)
            self.send_header("X-Repo-Commit", commit)
            self.send_header("ETag", f'"{etag}"')
            self.send_header("X-Linked-Etag", f'"{etag}"')
            self.send_header("X-Linked-Size", str(len(data)))
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path.startswith("/api/models/"):
                name, _, rev = path[len("/api/models/") :].partition("/revision/")
                repo = self._repo(name)
                if repo is None:
                    return
                commit = repo.branches.get(rev, rev)
                if commit not in repo.commits:
                    self._send(404, b'{"error": "Revision not found"}')
                    return
                siblings = [
                    {"rfilename": p, "size": len(d),
                     "lfs": {"sha256": hashlib.sha256(d).hexdigest(), "size": len(d)}}
                    for p, d in sorted(repo.commits[commit].items())
                ]  # fmt: skip
                self._send(200, json.dumps({"sha": commit, "siblings": siblings}).encode())
                return
            parts = path.lstrip("/").split("/")
            if len(parts) >= 5 and parts[2] == "resolve":
                name, rev, rel = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
                repo = self._repo(name)
                if repo is None:
                    return
                data = repo.commits.get(repo.branches.get(rev, rev), {}).get(rel)
                if data is None:
                    self._send(404, b'{"error": "Entry not found"}')
                    return
                hub.downloads[rel] += 1
                rng = self.headers.get("Range")
                if rng:
                    hub.ranges.append(rng)
                if (rel, byte_range(rng, len(data))[0]) in hub.fail:
                    self._send(500, b'{"error": "injected failure"}')
                    return
                if rel in hub.hold:
                    hub.hold[rel].wait(30)
                cut = rel in hub.drop_once
                hub.drop_once.discard(rel)
                self._send_bytes(hub.tamper.get(rel, data), cut=cut)
                return
            self._send(404, b"{}")

    return Handler


@contextmanager
def hub_server() -> Iterator[Hub]:
    hub = Hub()
    with serving(_handler(hub)) as server:
        hub.server = server
        yield hub
