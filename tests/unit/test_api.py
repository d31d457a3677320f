"""The control-plane API in-process (FastAPI TestClient), no engines running."""

from __future__ import annotations

import contextlib
import io
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from kingpost.api import ControlPlane, create_app
from kingpost.config import parse_config
from kingpost.controller.loop import Controller
from kingpost.packaging import pack_project
from kingpost.serve import bootstrap
from kingpost.settings import Settings

CONFIG = """\
model_name: api-test
docker_server:
  start_command: python server.py
  server_port: 8000
  predict_endpoint: /predict
  readiness_endpoint: /health
  liveness_endpoint: /health
"""


@pytest.fixture
def api(tmp_path: Path) -> Iterator[tuple[TestClient, str]]:
    settings = Settings(home=tmp_path / "home")
    messages: list[str] = []
    store = bootstrap(settings, messages.append, show_key=True)
    key = (settings.home / "credentials").read_text().strip()
    assert key in messages[0] and (settings.home / "credentials").stat().st_mode & 0o777 == 0o600
    plane = ControlPlane(settings, store, Controller(settings, store))
    with TestClient(create_app(plane)) as client:
        client.headers["Authorization"] = f"Api-Key {key}"
        yield client, key


def upload(client: TestClient, tmp_path: Path, config: str = CONFIG) -> str:
    project = tmp_path / "project"
    project.mkdir(exist_ok=True)
    (project / "config.yaml").write_text(config)
    (project / "server.py").write_text("print('hi')\n")
    packed = pack_project(project)
    assert client.head(f"/v1/projects/{packed.sha256}").status_code == 404
    r = client.put(f"/v1/projects/{packed.sha256}", content=packed.data)
    assert r.status_code == 201, r.text
    assert client.head(f"/v1/projects/{packed.sha256}").status_code == 200
    return packed.sha256


def test_every_route_needs_a_key(api: tuple[TestClient, str]) -> None:
    client, _ = api
    for headers in ({}, {"Authorization": "Api-Key wrong"}, {"Authorization": "Basic x"}):
        r = client.get("/v1/models", headers={"Authorization": "", **headers})
        assert r.status_code == 401
        assert r.json()["code"] == "unauthorized"
    assert client.get("/v1/health", headers={"Authorization": ""}).status_code == 200


def test_push_creates_model_deployment_and_production(
    api: tuple[TestClient, str], tmp_path: Path
) -> None:
    client, _ = api
    sha = upload(client, tmp_path)
    r = client.post("/v1/push", json={"project_hash": sha, "labels": {"team": "ml"}})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"]["name"] == "api-test"
    assert body["deployment"]["name"] == "deployment-1"
    assert body["deployment"]["labels"] == {"team": "ml"}
    assert body["deployment"]["environments"] == ["production"]
    assert body["predict_url"].endswith(
        f"/models/{body['model']['id']}/environments/production/predict"
    )
    second = client.post("/v1/push", json={"project_hash": sha, "deployment_name": "blue"}).json()
    assert second["deployment"]["name"] == "blue" and second["deployment"]["environments"] == []
    assert second["predict_url"].endswith(f"/deployment/{second['deployment']['id']}/predict")
    deps = client.get("/v1/models/api-test/deployments").json()["deployments"]
    assert [d["name"] for d in deps] == ["deployment-1", "blue"]


def test_reads_have_basetens_shapes_and_fields(api: tuple[TestClient, str], tmp_path: Path) -> None:
    """A script written against Baseten's management API reads the same keys here."""
    client, _ = api
    sha = upload(client, tmp_path)
    first = client.post("/v1/push", json={"project_hash": sha}).json()["deployment"]
    blue = client.post("/v1/push", json={"project_hash": sha, "deployment_name": "blue"})
    model = client.get("/v1/models").json()["models"][0]
    assert (model["deployments_count"], model["deployment_count"]) == (2, 2)
    assert model["production_deployment_id"] == first["id"]
    assert model["development_deployment_id"] is None
    deps = {
        d["name"]: d for d in client.get("/v1/models/api-test/deployments").json()["deployments"]
    }
    assert (deps["deployment-1"]["is_production"], deps["deployment-1"]["environment"]) == (
        True,
        "production",
    )
    assert (deps["blue"]["is_production"], deps["blue"]["environment"]) == (False, None)
    assert deps["blue"]["active_replica_count"] == 0  # no controller pass counted one
    assert (
        client.get("/v1/deployments").json()["deployments"][1]["id"]
        == blue.json()["deployment"]["id"]
    )
    envs = client.get("/v1/models/api-test/environments").json()["environments"]
    assert [e["name"] for e in envs] == ["production"]
    assert envs[0]["current_deployment"]["id"] == first["id"]
    assert envs[0]["current_deployment"]["is_production"] is True
    assert envs[0]["created_at"] is not None
    r = client.post("/v1/models/api-test/environments", json={"name": "staging"})
    assert r.status_code == 200, r.text  # Baseten's create answers 200
    assert (r.json()["name"], r.json()["current_deployment"]) == ("staging", None)
    # Baseten's promote-to-production: no body needed.
    r = client.post(f"/v1/models/api-test/deployments/{blue.json()['deployment']['id']}/promote")
    assert r.status_code == 200, r.text
    # Baseten's promote bodies (what the fields do: tests/integration/test_store.py).
    r = client.post(
        "/v1/models/api-test/environments/staging/promote",
        json={"deployment_id": first["id"], "preserve_env_instance_type": False},
    )
    assert r.status_code == 400 and r.json()["field"] == "preserve_env_instance_type", r.text
    r = client.post(
        "/v1/models/api-test/environments/staging/promote",
        json={
            "deployment_id": first["id"],
            "scale_down_previous_deployment": True,
            "preserve_env_instance_type": True,
        },
    )
    assert r.status_code == 200, r.text
    r = client.post(
        f"/v1/models/api-test/deployments/{first['id']}/promote",
        json={"scale_down_previous_production": False},
    )
    assert r.status_code == 200, r.text
    # Promoting into an environment that does not exist is a 404, not a new environment.
    r = client.post(
        "/v1/models/api-test/environments/prodution/promote", json={"deployment_id": first["id"]}
    )
    assert r.status_code == 404 and "'prodution'" in r.json()["error"], r.text
    names = [
        e["name"] for e in client.get("/v1/models/api-test/environments").json()["environments"]
    ]
    assert names == ["production", "staging"]
    # Baseten's production-deployment routes: `production` names what production serves.
    r = client.get("/v1/models/api-test/deployments/production")
    assert r.status_code == 200 and r.json()["id"] == first["id"], r.text
    assert r.json()["is_production"] is True
    assert client.get("/v1/deployments/production").status_code == 404  # only under a model


def test_bad_config_is_refused_with_path_rule_value_and_nothing_created(
    api: tuple[TestClient, str], tmp_path: Path
) -> None:
    client, _ = api
    sha = upload(client, tmp_path, CONFIG.replace("8000", "70000").replace("/predict", "predict"))
    r = client.post("/v1/push", json={"project_hash": sha})
    assert r.status_code == 422
    err = r.json()
    assert err["code"] == "invalid_config"
    paths = {e["path"] for e in err["errors"]}
    assert {"docker_server.server_port", "docker_server.predict_endpoint"} <= paths
    assert "70000" in err["error"]
    assert client.get("/v1/models").json() == {"models": []}


def test_yaml_dates_and_binary_in_a_valid_config_are_stored_as_json(
    api: tuple[TestClient, str], tmp_path: Path
) -> None:
    client, _ = api
    extra = "model_metadata:\n  released: 2024-01-01\n  blob: !!binary aGk=\n  1: one\n"
    r = client.post("/v1/push", json={"project_hash": upload(client, tmp_path, CONFIG + extra)})
    assert r.status_code == 200, r.text  # was a 500: the store's JSON column refused a date
    assert client.get(f"/v1/deployments/{r.json()['deployment']['id']}").status_code == 200
    document = parse_config(CONFIG + extra).document()
    assert document["model_metadata"] == {"released": "2024-01-01", "blob": "aGk=", "1": "one"}


def test_missing_secret_is_named_and_nothing_created(
    api: tuple[TestClient, str], tmp_path: Path
) -> None:
    client, _ = api
    sha = upload(client, tmp_path, CONFIG + "secrets:\n  hf_token: null\n")
    r = client.post("/v1/push", json={"project_hash": sha})
    assert r.status_code == 422 and "hf_token" in r.json()["error"]
    assert client.get("/v1/models").json() == {"models": []}
    assert (
        client.post("/v1/secrets", json={"name": "hf_token", "value": "v-123"}).status_code == 200
    )
    r = client.post("/v1/push", json={"project_hash": sha})
    assert r.status_code == 200
    listed = client.get("/v1/secrets")
    assert [s["name"] for s in listed.json()["secrets"]] == ["hf_token"]
    assert "v-123" not in listed.text


def test_upload_hash_must_match(api: tuple[TestClient, str]) -> None:
    client, _ = api
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w"):
        pass
    r = client.put("/v1/projects/" + "0" * 64, content=buf.getvalue())
    assert r.status_code == 400 and "mismatch" in r.json()["error"]


def test_bad_bodies_name_the_field(api: tuple[TestClient, str]) -> None:
    client, _ = api
    r = client.post("/v1/push", json={"project_hash": "nothex", "surprise": 1})
    assert r.status_code == 400
    fields = {e["field"] for e in r.json()["errors"]}
    assert {"project_hash", "surprise"} <= fields
    r = client.post("/v1/push", json={"project_hash": "a" * 64})
    assert r.status_code == 404 and "not uploaded" in r.json()["error"]


@pytest.mark.parametrize(
    ("entry", "path", "message"),
    [
        ("source: gs://bucket/model", "weights[0].auth", "no credentials configured"),
        ("source: bt://job/checkpoint", "weights[0].source", "bt://"),
        (
            "source: gs://bucket/model\n    auth: {auth_method: GCP_OIDC, "
            "gcp_oidc_service_account: sa@p.iam, gcp_oidc_workload_id_provider: projects/1/x}",
            "weights[0].auth.auth_method",
            "GCP_OIDC needs an OIDC identity provider",
        ),
    ],
)
def test_weights_this_build_cannot_mirror_are_refused_before_anything_is_created(
    api: tuple[TestClient, str], tmp_path: Path, entry: str, path: str, message: str
) -> None:
    weights = f"weights:\n  - {entry}\n    mount_location: /models/m\n"
    client, _ = api
    sha = upload(client, tmp_path, CONFIG + weights)
    r = client.post("/v1/push", json={"project_hash": sha})
    assert r.status_code == 422, r.text
    assert r.json()["errors"][0]["path"] == path and message in r.json()["error"]
    assert client.get("/v1/models").json() == {"models": []}


S3_AUTH = "    auth: {auth_method: CUSTOM_SECRET, auth_secret_name: s3_creds}\n"


@pytest.mark.parametrize(
    ("extra", "path"),
    [
        ("weights:\n  - source: s3://bucket/llama\n    mount_location: /models/m\n" + S3_AUTH,
         "weights[0].auth.auth_secret_name"),
        ("weights:\n  - source: hf://org/private@main\n    mount_location: /models/m\n"
         "    auth_secret_name: s3_creds\n", "weights[0].auth_secret_name"),
        ("model_cache:\n  - repo_id: bucket/llama\n    kind: s3\n    use_volume: false\n"
         "    runtime_secret_name: s3_creds\n", "model_cache[0].runtime_secret_name"),
        # An inline default under `secrets:` never reaches the mirror: only stored ones do.
        ("secrets:\n  s3_creds: inline\nweights:\n  - source: s3://bucket/llama\n"
         "    mount_location: /models/m\n" + S3_AUTH, "weights[0].auth.auth_secret_name"),
    ],
    ids=["auth", "top-level", "model-cache-bucket", "inline-default"],
)  # fmt: skip
def test_a_weights_secret_not_stored_is_refused_before_anything_is_created(
    api: tuple[TestClient, str], tmp_path: Path, extra: str, path: str
) -> None:
    """The mirror starts once the deployment exists and read the secret only then: a name
    that is not stored failed the deployment after push had accepted it."""
    client, _ = api
    sha = upload(client, tmp_path, CONFIG + extra)
    r = client.post("/v1/push", json={"project_hash": sha})
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["code"] == "secret_error" and body["secrets"] == ["s3_creds"]
    assert body["errors"] == [
        {"path": path, "message": "secret `s3_creds` is not defined on this server",
         "value": "s3_creds"}
    ]  # fmt: skip
    assert f"{path}: secret `s3_creds`" in body["error"]
    assert "kingpost secrets set NAME" in body["error"]
    assert client.get("/v1/models").json() == {"models": []}
    assert client.post("/v1/secrets", json={"name": "s3_creds", "value": "{}"}).status_code == 200
    assert client.post("/v1/push", json={"project_hash": sha}).status_code == 200


@pytest.mark.parametrize(
    ("extra", "path", "value"),
    [
        ("resources:\n  cpu: .inf\n", "resources.cpu", "inf"),
        ("resources:\n  cpu: .nan\n", "resources.cpu", "nan"),
        ("resources:\n  memory: -.inf\n", "resources.memory", "-inf"),
    ],
)  # fmt: skip
def test_a_non_finite_value_is_a_clear_422(
    api: tuple[TestClient, str], tmp_path: Path, extra: str, path: str, value: str
) -> None:
    """push accepted cpu: .inf, which overflowed when the replica started; refused, its
    error then could not be answered (strict JSON has no Infinity)."""
    client, _ = api
    r = client.post("/v1/push", json={"project_hash": upload(client, tmp_path, CONFIG + extra)})
    assert r.status_code == 422, r.text
    (error,) = r.json()["errors"]
    assert (error["path"], error["value"]) == (path, value)
    assert "finite" in error["message"]


def test_a_model_cache_hub_token_stays_optional(
    api: tuple[TestClient, str], tmp_path: Path
) -> None:
    """runtime_secret_name defaults to hf_access_token whether or not the repository is
    private; without it a public repository is fetched without a token, as on Truss."""
    client, _ = api
    extra = "model_cache:\n  - repo_id: org/public\n    use_volume: false\n"
    r = client.post("/v1/push", json={"project_hash": upload(client, tmp_path, CONFIG + extra)})
    assert r.status_code == 200, r.text


MODEL_CLASS = "model_name: api-model\n"


def upload_files(client: TestClient, tmp_path: Path, files: dict[str, str]) -> str:
    project = tmp_path / "model-project"
    for name, text in files.items():
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text(text)
    packed = pack_project(project)
    assert client.put(f"/v1/projects/{packed.sha256}", content=packed.data).status_code == 201
    return packed.sha256


MODEL_PY = "class Model:\n    def predict(self, x):\n        return x\n"


@pytest.mark.parametrize(
    ("files", "path", "value"),
    [
        ({"config.yaml": MODEL_CLASS + "requirements_file: requirements.txt\n",
          "model/model.py": MODEL_PY}, "requirements_file", "requirements.txt"),
        ({"config.yaml": MODEL_CLASS + "requirements_file: reqs\n",  # a folder, not a file
          "reqs/a.txt": "x\n", "model/model.py": MODEL_PY}, "requirements_file", "reqs"),
        ({"config.yaml": CONFIG + "requirements_file: requirements.txt\n"},
         "requirements_file", "requirements.txt"),
        ({"config.yaml": MODEL_CLASS + "model_class_filename: nothere.py\n",
          "model/model.py": MODEL_PY}, "model_class_filename", "model/nothere.py"),
        ({"config.yaml": MODEL_CLASS + "model_module_dir: src\n",
          "model/model.py": MODEL_PY}, "model_module_dir", "src/model.py"),
        ({"config.yaml": MODEL_CLASS}, "model_class_filename", "model/model.py"),
        ({"config.yaml": MODEL_CLASS + "model_module_dir: ../../..\n"
          "model_class_filename: etc/passwd\n", "model/model.py": MODEL_PY},
         "model_class_filename", "../../../etc/passwd"),
    ],
    ids=["requirements-missing", "requirements-folder", "requirements-custom-server",
         "model-file", "model-dir", "default-model-file", "model-file-outside"],
)  # fmt: skip
def test_files_the_config_names_must_be_in_the_project(
    api: tuple[TestClient, str], tmp_path: Path, files: dict[str, str], path: str, value: str
) -> None:
    """Only the build or the model server found these missing: after the deployment existed."""
    client, _ = api
    r = client.post("/v1/push", json={"project_hash": upload_files(client, tmp_path, files)})
    assert r.status_code == 422, r.text
    (error,) = r.json()["errors"]
    assert (error["path"], error["value"]) == (path, value)
    assert (
        "not a file in the project" in error["message"]
        or "not in the project" in (error["message"])
    )
    assert f"{path}: " in r.json()["error"]
    assert client.get("/v1/models").json() == {"models": []}


def test_a_project_with_the_files_it_names_is_accepted(
    api: tuple[TestClient, str], tmp_path: Path
) -> None:
    client, _ = api
    files = {
        "config.yaml": MODEL_CLASS + "requirements_file: ./deps/requirements.txt\n"
        "model_module_dir: src/\nmodel_class_filename: serve.py\n",
        "deps/requirements.txt": "\n",
        "src/serve.py": MODEL_PY,
    }
    r = client.post("/v1/push", json={"project_hash": upload_files(client, tmp_path, files)})
    assert r.status_code == 200, r.text
    # A custom server has no model file (CONFIG pushes without one, above), and no_build
    # ignores requirements_file, as Truss does.
    from kingpost.api.app import _project_file_problems

    no_build = (
        "base_image:\n  image: vllm/vllm-openai:latest\nrequirements_file: requirements.txt\n"
        "docker_server:\n  no_build: true\n  server_port: 8000\n  predict_endpoint: /p\n"
        "  readiness_endpoint: /h\n  liveness_endpoint: /h\n"
    )
    assert _project_file_problems(parse_config(no_build).config, tmp_path) == []


@pytest.mark.parametrize("where", ["{home}", "{home}/projects", "/", "file://{home}/weights"])
def test_a_local_weights_source_in_or_around_the_home_is_refused(
    api: tuple[TestClient, str], tmp_path: Path, where: str
) -> None:
    source = where.format(home=tmp_path / "home")
    weights = f"weights:\n  - source: {source}\n    mount_location: /models/m\n"
    client, _ = api
    sha = upload(client, tmp_path, CONFIG + weights)
    r = client.post("/v1/push", json={"project_hash": sha})
    assert r.status_code == 422, r.text
    error = r.json()["errors"][0]
    assert error["path"] == "weights[0].source"
    assert "may not be inside Kingpost's home" in error["message"] and source in error["message"]
    assert client.get("/v1/models").json() == {"models": []}


def test_unknown_or_unreachable_engines_are_named(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from kingpost.engines import create_engine
    from kingpost.errors import EngineError, ValidationError

    with pytest.raises(ValidationError, match="nope"):
        create_engine("nope", Settings())
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-dockerd.sock")
    with pytest.raises(EngineError, match=r"cannot reach the Docker Engine.*--engine process"):
        create_engine("docker", Settings(home=tmp_path))


def test_push_names_a_bad_engine(api: tuple[TestClient, str], tmp_path: Path) -> None:
    client, _ = api
    sha = upload(client, tmp_path)
    r = client.post("/v1/push", json={"project_hash": sha, "engine": "k8s"})
    assert r.status_code == 400 and "k8s" in r.json()["error"]
    assert client.get("/v1/models").json() == {"models": []}


def test_a_custom_server_without_start_command_is_refused_on_the_process_engine(
    api: tuple[TestClient, str], tmp_path: Path
) -> None:
    """``no_build: true`` runs an image's entrypoint; the process engine runs no image, so
    such a push was accepted and its replica never launched (DEPLOYING forever)."""
    client, _ = api
    no_build = CONFIG.replace("  start_command: python server.py\n", "  no_build: true\n")
    sha = upload(client, tmp_path, "base_image:\n  image: python:3.11-slim\n" + no_build)
    r = client.post("/v1/push", json={"project_hash": sha, "engine": "process"})
    assert r.status_code == 422, r.text
    err = r.json()
    assert err["code"] == "invalid_config"
    assert [e["path"] for e in err["errors"]] == ["docker_server.start_command"]
    assert "--engine docker" in err["error"]
    assert client.get("/v1/models").json() == {"models": []}


def test_push_warns_of_what_the_process_engine_ignores(
    api: tuple[TestClient, str], tmp_path: Path
) -> None:
    client, _ = api
    sha = upload(client, tmp_path, CONFIG + "system_packages: [ffmpeg]\n")
    warnings = client.post("/v1/push", json={"project_hash": sha, "engine": "process"}).json()[
        "warnings"
    ]
    assert [w for w in warnings if "system_packages: not installed" in w], warnings


def test_max_replicas_below_min_replicas_is_refused(
    api: tuple[TestClient, str], tmp_path: Path
) -> None:
    client, _ = api
    sha = upload(client, tmp_path)
    r = client.post("/v1/push", json={"project_hash": sha, "min_replicas": 5, "max_replicas": 2})
    assert r.status_code == 400, r.text
    (err,) = r.json()["errors"]
    assert err["field"] == "max_replicas" and "min_replicas (5)" in err["message"]
    assert client.get("/v1/models").json() == {"models": []}


def test_home_is_private_to_the_server_user(tmp_path: Path) -> None:
    """The database (configs with inline secret values and environment variables),
    projects, logs and replica copies were readable by every local user (0755 home)."""
    fresh = Settings(home=tmp_path / "fresh" / "home")
    bootstrap(fresh, lambda _: None).db.close()
    assert fresh.home.stat().st_mode & 0o777 == 0o700
    old = tmp_path / "old"
    old.mkdir(mode=0o755)
    old.chmod(0o755)
    bootstrap(Settings(home=old), lambda _: None).db.close()
    assert old.stat().st_mode & 0o777 == 0o700


def test_client_sends_names_as_one_path_segment(
    api: tuple[TestClient, str], tmp_path: Path
) -> None:
    """`kingpost deployments delete m ../../../secrets/hf_token` deleted the secret: the
    client pasted the argument into the URL and httpx resolved the dot segments."""
    from kingpost.client import KingpostClient
    from kingpost.errors import NotFoundError, ValidationError

    client, key = api
    client.post("/v1/push", json={"project_hash": upload(client, tmp_path)})
    assert client.post("/v1/secrets", json={"name": "hf_token", "value": "v"}).status_code == 200
    kp = KingpostClient("http://testserver", key, "http://gateway")
    kp._http = client
    for action in ("delete", "deactivate"):
        with pytest.raises(ValidationError, match=r"deployment '\.\./\.\./\.\./secrets/hf_token'"):
            kp.deployment_action("api-test", "../../../secrets/hf_token", action)
    with pytest.raises(ValidationError, match=r"model '\.\.'"):
        kp.promote("..", "deployment-1")
    with pytest.raises(ValidationError, match="secret 'a/b'"):
        kp.delete_secret("a/b")
    with pytest.raises(NotFoundError, match=r"model 'a\?b' not found"):
        kp.model("a?b")
    assert [s["name"] for s in kp.secrets()] == ["hf_token"]
    assert [d["name"] for d in kp.deployments("api-test")] == ["deployment-1"]
    assert kp.predict_path("my model", environment="prod") == (
        "/models/my%20model/environments/prod/predict"
    )


def test_a_config_without_model_name_is_named_after_its_folder(
    api: tuple[TestClient, str], tmp_path: Path
) -> None:
    """README: the model name defaults to config.yaml's model_name, else the folder name.
    The server used its own folder for the upload, the content hash, so every change to
    such a project made a new model named by 64 hex digits instead of deployment-2."""
    from kingpost.client import KingpostClient

    client, key = api
    config = CONFIG.replace("model_name: api-test\n", "")
    sha = upload(client, tmp_path, config)
    r = client.post("/v1/push", json={"project_hash": sha})
    assert r.status_code == 400, r.text
    assert r.json()["field"] == "model_name" and "config.yaml has none" in r.json()["error"]
    kp = KingpostClient("http://testserver", key, "http://gateway")
    kp._http = client
    project = tmp_path / "project"
    assert kp.push(project)["model"]["name"] == "project"
    (project / "server.py").write_text("print('changed')\n")
    second = kp.push(project)
    assert second["model"]["name"] == "project"
    assert second["deployment"]["name"] == "deployment-2"
    assert kp.push(project, model_name="other")["model"]["name"] == "other"
    assert [m["name"] for m in kp.models()] == ["project", "other"]


def test_an_upload_is_spooled_to_disk_and_refused_by_its_declared_size(
    api: tuple[TestClient, str], tmp_path: Path
) -> None:
    """The archive was gathered in memory (then copied once more) before the 2 GiB limit
    was checked: a few concurrent uploads could take the control plane's memory."""
    import hashlib
    import tracemalloc

    client, _ = api
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("data.bin")
        info.size = 64 << 20
        tar.addfile(info, io.BytesIO(b"\1" * info.size))
    data = buf.getvalue()
    size, sha = len(data), hashlib.sha256(data).hexdigest()
    tracemalloc.start()
    try:
        r = client.put(f"/v1/projects/{sha}", content=data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert r.status_code == 201, r.text
    assert peak < size // 2, f"{peak} bytes held for a {size}-byte upload"
    r = client.put("/v1/projects/" + "0" * 64, content=b"x", headers={"content-length": "3" * 12})
    assert r.status_code == 400
    assert "larger than 2 GiB" in r.json()["error"] and r.json()["value"] == 333333333333


def test_a_bad_body_value_is_named_with_the_field_and_rule(api: tuple[TestClient, str]) -> None:
    client, _ = api
    r = client.post("/v1/push", json={"project_hash": "a" * 64, "min_replicas": 100})
    assert r.status_code == 400
    (err,) = r.json()["errors"]
    assert err["field"] == "min_replicas" and err["value"] == 100
    assert "min_replicas: Input should be less than or equal to 64, got 100" in r.json()["error"]
    r = client.post("/v1/push", json={})
    assert r.json()["errors"] == [{"field": "project_hash", "message": "Field required"}], r.text
    r = client.post("/v1/push", content=b"{nope", headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert r.json()["errors"] == [{"field": "body", "message": "JSON decode error at character 1"}]
    r = client.post("/v1/weights/gc", params={"budget_bytes": -5})
    assert r.status_code == 400 and r.json()["errors"][0]["field"] == "budget_bytes", r.text
    assert r.json()["errors"][0]["value"] == "-5"


def test_a_call_that_got_no_answer_says_it_may_have_taken_effect() -> None:
    """A push whose answer timed out may still create the deployment: the client must not
    say the control plane was unreachable (which invites a blind retry)."""
    import socket
    import threading

    from kingpost.client import KingpostClient
    from kingpost.errors import KingpostError

    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    done = threading.Event()

    def accept_and_keep_quiet() -> None:
        while not done.is_set():
            with contextlib.suppress(OSError):
                held.append(listener.accept()[0])

    threading.Thread(target=accept_and_keep_quiet, daemon=True).start()
    kp = KingpostClient(f"http://127.0.0.1:{listener.getsockname()[1]}", "kp_x", "http://g", 0.3)
    try:
        with pytest.raises(KingpostError, match="may still have taken effect"):
            kp._call("POST", "/v1/push", json={"project_hash": "a" * 64})
        with pytest.raises(KingpostError, match="did not answer in time") as info:
            kp._call("GET", "/v1/models")
        assert "may still" not in info.value.message
    finally:
        done.set()
        kp.close()
        listener.close()
        for conn in held:
            conn.close()


def test_labels_past_their_limit_are_refused_naming_field_limit_and_size(
    api: tuple[TestClient, str], tmp_path: Path
) -> None:
    """20 MB of labels were accepted and kept; every list call then returned them."""
    client, _ = api
    sha = upload(client, tmp_path)
    labels = {"blob": "x" * 20_000}
    r = client.post("/v1/push", json={"project_hash": sha, "labels": labels})
    assert r.status_code == 400, r.text
    body = r.json()
    assert (body["code"], body["field"], body["limit_bytes"]) == (
        "invalid_request",
        "labels",
        16384,
    )
    assert body["value"] == 20_011
    assert "labels: 20011 bytes as JSON, more than the limit of 16384 bytes" in body["error"]
    assert client.get("/v1/models").json() == {"models": []}
    r = client.post("/v1/push", json={"project_hash": sha, "labels": {"team": "ml" * 4000}})
    assert r.status_code == 200, r.text


def test_a_bad_body_names_its_field_once_even_when_the_body_is_missing(
    api: tuple[TestClient, str], tmp_path: Path
) -> None:
    client, _ = api
    r = client.post("/v1/secrets")  # no body at all: the field is the body
    assert r.status_code == 400, r.text
    assert (r.json()["field"], r.json()["errors"][0]["field"]) == ("body", "body")
    assert "body: Field required" in r.json()["error"]
    sha = upload(client, tmp_path)
    r = client.post("/v1/push", json={"project_hash": sha, "min_replicas": 3, "max_replicas": 2})
    assert r.status_code == 400, r.text
    assert r.json()["field"] == "max_replicas"
    assert r.json()["error"].count("got 2") == 1, r.text  # the value named once


def test_a_body_declared_past_the_limit_gets_413_json_without_being_read(
    api: tuple[TestClient, str],
) -> None:
    client, _ = api
    r = client.post("/v1/secrets", content=b"{}", headers={"content-length": str(5 * 1024**2)})
    assert r.status_code == 413
    body = r.json()
    assert (body["code"], body["field"], body["limit_bytes"]) == (
        "payload_too_large",
        "body",
        1024**2,
    )
    assert body["value"] == 5 * 1024**2 and "more than the limit of 1048576 bytes" in body["error"]
    r = client.post("/v1/secrets", json={"name": "big", "value": "v" * (900 * 1024)})
    assert r.status_code == 200, r.text  # under the limit: read in full and handled


def test_a_chunked_body_past_the_limit_gets_413(api: tuple[TestClient, str]) -> None:
    client, _ = api

    def chunks() -> Iterator[bytes]:
        yield b'{"name": "big", "value": "'
        for _ in range(40):
            yield b"v" * 65536

    r = client.post("/v1/secrets", content=chunks())
    assert r.status_code == 413, r.text
    assert "sent a body of more than 1048576 bytes" in r.json()["error"]
    assert client.get("/v1/secrets").json() == {"secrets": []}


def test_api_keys_are_created_shown_once_listed_by_prefix_and_revoked(
    api: tuple[TestClient, str], tmp_path: Path
) -> None:
    client, admin_key = api
    sha = upload(client, tmp_path)
    model_id = client.post("/v1/push", json={"project_hash": sha}).json()["model"]["id"]
    r = client.post(
        "/v1/api_keys", json={"name": "ci", "type": "WORKSPACE_INVOKE", "model_ids": ["api-test"]}
    )
    assert r.status_code == 200, r.text  # as Baseten's
    created = r.json()
    key = created["api_key"]
    assert key.startswith(created["prefix"]) and created["model_ids"] == [model_id]
    listed = client.get("/v1/api_keys").json()["keys"]
    assert [(k["name"], k["type"]) for k in listed] == [
        ("admin", "WORKSPACE_MANAGE_ALL"),
        ("ci", "WORKSPACE_INVOKE"),
    ]
    assert key not in str(listed) and all("api_key" not in k for k in listed)
    # The invoke-only key is valid (403, not 401) but not for the management API.
    r = client.get("/v1/models", headers={"Authorization": f"Api-Key {key}"})
    assert r.status_code == 403, r.text
    assert r.json()["code"] == "forbidden" and "invoke-only" in r.json()["error"]
    r = client.delete(f"/v1/api_keys/{created['prefix']}")
    assert r.json() == {"prefix": created["prefix"]}
    r = client.get("/v1/models", headers={"Authorization": f"Api-Key {key}"})
    assert r.status_code == 401
    assert client.delete(f"/v1/api_keys/{created['prefix']}").status_code == 404
    admin_prefix = listed[0]["prefix"]
    r = client.delete(f"/v1/api_keys/{admin_prefix}")
    assert r.status_code == 409 and "last admin key" in r.json()["error"]
    assert client.get("/v1/models", headers={"Authorization": f"Api-Key {admin_key}"}).is_success


def test_api_key_requests_name_what_is_wrong(api: tuple[TestClient, str]) -> None:
    client, _ = api
    r = client.post("/v1/api_keys", json={"name": "x", "type": "WORKSPACE_INVOKE"})
    assert r.status_code == 400 and r.json()["field"] == "model_ids", r.text
    r = client.post(
        "/v1/api_keys", json={"name": "x", "type": "WORKSPACE_INVOKE", "model_ids": ["nope"]}
    )
    assert r.status_code == 404 and "model 'nope' not found" in r.json()["error"]
    r = client.post("/v1/api_keys", json={"name": "x", "type": "WORKSPACE_EXPORT_METRICS"})
    assert r.status_code == 400 and r.json()["errors"][0]["field"] == "type"
    r = client.post("/v1/api_keys", json={"name": "x", "model_ids": ["a"]})
    assert r.status_code == 400 and "takes none" in r.json()["error"]
    assert len(client.get("/v1/api_keys").json()["keys"]) == 1
    # Baseten's documented example: a PERSONAL key, its name left out: a full-access key.
    r = client.post("/v1/api_keys", json={"type": "PERSONAL"})
    assert r.status_code == 200, r.text
    assert (r.json()["type"], r.json()["name"]) == ("WORKSPACE_MANAGE_ALL", "unnamed")
    r = client.get("/v1/models", headers={"Authorization": f"Api-Key {r.json()['api_key']}"})
    assert r.status_code == 200, r.text


def _fill_the_database_disk(store: Any) -> None:
    """Real SQLite, out of room: SQLITE_FULL as on a full disk, for every new connection."""
    from sqlalchemy import event, text

    with store.db.engine.connect() as conn:
        pages = int(conn.execute(text("PRAGMA page_count")).scalar_one())

    def cap(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.execute(f"PRAGMA max_page_count = {pages + 2}")

    event.listen(store.db.engine, "connect", cap)
    store.db.engine.dispose()


def test_a_database_write_on_a_full_disk_is_507_json_naming_the_cause(tmp_path: Path) -> None:
    """It was a plain-text 500 `Internal Server Error`."""
    settings = Settings(home=tmp_path / "home")
    store = bootstrap(settings, lambda _: None)
    key = (settings.home / "credentials").read_text().strip()
    plane = ControlPlane(settings, store, Controller(settings, store))
    _fill_the_database_disk(store)
    with TestClient(create_app(plane), headers={"Authorization": f"Api-Key {key}"}) as client:
        r = client.post("/v1/secrets", json={"name": "big", "value": "v" * 200_000})
        assert r.status_code == 507, r.text
        body = r.json()
        assert (body["code"], body["cause"]) == ("insufficient_storage", "database disk full")
        assert "its disk is full" in body["error"] and str(settings.home) not in body["error"]
        assert client.get("/v1/secrets").json() == {"secrets": []}  # reads still work


def test_an_upload_on_a_full_disk_is_507_not_a_bad_archive(
    api: tuple[TestClient, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It was 400 invalid_request, blaming the archive; the spool's own write was a 500."""
    import errno
    import hashlib

    from kingpost.api import app as app_module

    client, _ = api
    project = tmp_path / "p"
    project.mkdir()
    (project / "config.yaml").write_text(CONFIG)
    packed = pack_project(project)

    def refuse(self: tarfile.TarFile, *args: Any, **kw: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", "/home/x/projects/f")

    monkeypatch.setattr(tarfile.TarFile, "extractall", refuse)
    r = client.put(f"/v1/projects/{packed.sha256}", content=packed.data)
    assert r.status_code == 507, r.text
    assert r.json()["code"] == "insufficient_storage" and "/home/x" not in r.text
    monkeypatch.undo()

    # The spool on a device that is really full: /dev/full answers every write ENOSPC.
    def dev_full(**_: Any) -> Any:
        return open("/dev/full", "wb")

    monkeypatch.setattr(app_module.tempfile, "NamedTemporaryFile", dev_full)
    data = b"x" * 300_000
    r = client.put(f"/v1/projects/{hashlib.sha256(data).hexdigest()}", content=data)
    assert r.status_code == 507, r.text
    assert r.json()["cause"] == "projects disk full"


def test_logs_follow_prints_every_line_once_however_many_arrive(
    api: tuple[TestClient, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`kingpost logs --follow` asked each second for the newest --tail (200) lines since
    just before the newest it had printed: with 300 lines a second, a third of them were
    never printed. It now pages through every line, oldest first, with ``order=oldest``
    and ``after`` (the real route and store here)."""
    import click

    import kingpost.cli.logs as cli_logs
    from kingpost.client import KingpostClient
    from kingpost.logstore import SegmentWriter

    client, key = api
    writer = SegmentWriter(tmp_path / "home" / "logs", "gw", 1 << 16)  # several segments
    written: list[str] = []
    clock = [time.time() - 100]

    def add(n: int) -> None:
        recs = []
        for _ in range(n):
            clock[0] += 1.0 / n
            written.append(f"line {len(written)}")
            recs.append({"ts": clock[0], "level": "INFO", "source": "gateway",
                         "message": written[-1]})  # fmt: skip
        writer.write(recs)

    class Polls(KingpostClient):
        calls = 0

        def log_query(self, **filters: str | int | None) -> list[dict[str, Any]]:
            Polls.calls += 1
            if Polls.calls > 1 and filters.get("after") is None:  # a new poll
                if Polls.calls > 8:
                    raise KeyboardInterrupt
                add(1500)  # more than a page (1000) arrived since the last poll
            return super().log_query(**filters)

    kp = Polls("http://testserver", key, "http://gateway")
    kp._http = client
    printed: list[str] = []
    monkeypatch.setattr(click, "echo", printed.append)
    monkeypatch.setattr(cli_logs, "_FOLLOW_S", 0)
    add(50)
    with pytest.raises(KeyboardInterrupt):
        cli_logs._follow(kp, {"since": None, "limit": 200}, "table")
    assert [p.split("] ", 1)[1] for p in printed] == written
    assert len(written) > 3000
    bad = client.get("/v1/logs", params={"order": "newest-first"})
    assert bad.status_code == 400 and bad.json()["field"] == "order", bad.text
    bad = client.get("/v1/logs", params={"after": "gw.1.jsonl:0"})
    assert bad.status_code == 400 and bad.json()["field"] == "after", bad.text
    assert "'gw.1.jsonl:0'" in bad.json()["error"]
