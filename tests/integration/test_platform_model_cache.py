"""``model_cache`` and ``external_data`` end to end: pushed as Truss writes them, mirrored
through the weights system, read by the model's ``load()`` where Truss puts them.

The Hub is the local hub-compatible server (``HF_ENDPOINT``), the external file a local
HTTP server; the model class is the shape of Truss's ``test_truss_server_model_cache_v2``
(files under ``/app/model_cache/{volume_folder}``, collected through the lazy data
resolver) plus a file its ``external_data`` puts in the data directory.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers.httpd import QuietHandler, serving
from helpers.hubserver import Hub, Repo, hub_server
from helpers.platform import Platform

VOCAB = b"hola\nmundo\n" * 100

MODEL = """\
from pathlib import Path


class Model:
    def __init__(self, **kwargs):
        self._lazy_data_resolver = kwargs["lazy_data_resolver"]
        self._data_dir = kwargs["data_dir"]

    def load(self):
        self._collected = self._lazy_data_resolver.block_until_download_complete()
        cache = Path("/app/model_cache/julien_c_esper")
        self._files = sorted(p.name for p in cache.iterdir())
        self._config = (cache / "config.json").read_text()
        self._vocab = (self._data_dir / "vocab" / "words.txt").read_text()
        try:
            (cache / "config.json").write_text("changed")
            self._writable = True
        except OSError:
            self._writable = False

    def predict(self, model_input):
        return {
            "files": self._files,
            "config": self._config,
            "vocab_lines": len(self._vocab.splitlines()),
            "writable": self._writable,
            "collected": bool(self._collected),
        }
"""


MODEL_V1 = """\
import os
from pathlib import Path


class Model:
    def load(self):
        # Where a Hub client (transformers' from_pretrained("julien-c/EsperBERTo-small"))
        # looks first: the revision's commit, then that commit's snapshot.
        hub = Path(os.environ["HOME"]) / ".cache" / "huggingface" / "hub"
        repo = hub / "models--julien-c--EsperBERTo-small"
        commit = (repo / "refs" / "main").read_text()
        self._config = (repo / "snapshots" / commit / "config.json").read_text()

    def predict(self, model_input):
        return {"config": self._config}
"""


def model_project(root: Path, name: str, model: str, config: str) -> Path:
    project = root / name
    (project / "model").mkdir(parents=True)
    (project / "model" / "model.py").write_text(model)
    (project / "config.yaml").write_text(f"model_name: {name}\nrequirements: []\n{config}")
    return project


@pytest.fixture
def sources() -> Iterator[tuple[Hub, str]]:
    """The local Hub, and the URL of one file on a plain HTTP server."""

    class Files(QuietHandler):
        def do_GET(self) -> None:
            if self.path == "/files/words.txt":
                self._send_bytes(VOCAB)
            else:
                self._send(404, b"{}")

    with hub_server() as hub, serving(Files) as files:
        url = f"http://127.0.0.1:{files.server_address[1]}/files/words.txt"
        yield hub, url


def projects(hub: Hub, url: str, root: Path) -> tuple[Path, Path]:
    """Truss's model_cache v2 shape with an external_data file, and its v1 shape."""
    repo = hub.repos["julien-c/EsperBERTo-small"] = Repo()
    commit = repo.commit(
        "main",
        {"config.json": b'{"model_type": "roberta"}', "merges.txt": b"m", "model.bin": b"x" * 999},
    )
    v2 = model_project(
        root,
        "cache-v2",
        MODEL,
        "model_cache:\n"
        "  - repo_id: julien-c/EsperBERTo-small\n"
        f"    revision: {commit}\n"
        "    volume_folder: julien_c_esper\n"
        "    use_volume: true\n"
        "    ignore_patterns:\n"
        '      - "*.bin"\n'
        '      - "*.msgpack"\n'
        "external_data:\n"
        f"  - url: {url}\n"
        "    local_data_path: vocab/words.txt\n",
    )
    # Truss's test_truss_server_model_cache_v1: no volume, the repository in the Hub cache.
    v1 = model_project(
        root,
        "cache-v1",
        MODEL_V1,
        "model_cache:\n  - repo_id: julien-c/EsperBERTo-small\n    use_volume: false\n"
        '    ignore_patterns: ["*.bin", "*.msgpack"]\n',
    )
    return v2, v1


def check(platform: Platform, hub: Hub, v2: Path, v1: Path) -> None:
    """Both projects deploy and their load() read the files where Truss puts them."""
    out = platform.cli("push", str(v2), "--wait", "--output", "json")
    assert out.returncode == 0, out.stdout + out.stderr + platform.output()
    result = json.loads(out.stdout)
    assert result["deployment"]["status"] == "ACTIVE", result
    with platform.gateway() as gw:
        r = gw.post(f"/models/{result['model']['id']}/production/predict", json={})
    assert r.status_code == 200, r.text
    assert r.json() == {
        "files": ["config.json", "merges.txt"],  # ignore_patterns applied
        "config": '{"model_type": "roberta"}',
        "vocab_lines": 200,
        "writable": False,
        "collected": True,
    }
    status = platform.cli("weights", "status", "-d", result["deployment"]["id"], "-o", "json")
    assert [s["state"] for s in json.loads(status.stdout)] == ["COMPLETE"], status.stdout
    out = platform.cli("push", str(v1), "--wait", "--output", "json")
    assert out.returncode == 0, out.stdout + out.stderr + platform.output()
    model_id = json.loads(out.stdout)["model"]["id"]
    with platform.gateway() as gw:
        r = gw.post(f"/models/{model_id}/production/predict", json={})
    assert r.status_code == 200, r.text
    assert r.json() == {"config": '{"model_type": "roberta"}'}
    assert hub.downloads["model.bin"] == 0


def env(hub: Hub) -> dict[str, str]:
    """The Hub is the operator's endpoint; the external_data file's URL, on this machine,
    is the config's, which the mirror fetches only with private URLs allowed."""
    return {"HF_ENDPOINT": hub.url, "KINGPOST_WEIGHTS_ALLOW_PRIVATE_URLS": "1"}


def test_model_cache_v1_v2_and_external_data_reach_load(
    sources: tuple[Hub, str], tmp_path: Path
) -> None:
    hub, url = sources
    v2, v1 = projects(hub, url, tmp_path)
    platform = Platform(tmp_path / "home", extra_env=env(hub)).start()
    try:
        check(platform, hub, v2, v1)
    finally:
        platform.stop()


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_same_projects_in_containers(sources: tuple[Hub, str], tmp_path: Path) -> None:
    """The docker engine mounts the same entries: a directory, one file in the image's
    /app/data, and a Hub snapshot linked into $HOME's Hub cache."""
    from test_docker_engine import _docker, _remove_containers

    from kingpost.images import ensure_base_image

    client = _docker()
    ensure_base_image(client, log=lambda line: None)
    hub, url = sources
    v2, v1 = projects(hub, url, tmp_path)
    home = tmp_path / "home"
    platform = Platform(home, engine="docker", extra_env=env(hub)).start()
    try:
        check(platform, hub, v2, v1)
    finally:
        platform.stop()
        _remove_containers(client, home)
        client.close()
