"""Schema-driven fuzzing of the control-plane API (schemathesis over its own OpenAPI).

Every operation in `/openapi.json` is called with generated path parameters, queries and
bodies (valid and invalid), authenticated with the admin key, against a real store that
holds one pushed model. The property: no input makes the API answer 5xx, and every error
is JSON with a `code`. Examples per operation: `KINGPOST_FUZZ_EXAMPLES` (default 50, split
over the operations' modes by schemathesis); a failure prints the call to reproduce it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error

from kingpost.api import ControlPlane, create_app
from kingpost.controller.loop import Controller
from kingpost.packaging import pack_project
from kingpost.serve import bootstrap
from kingpost.settings import Settings

EXAMPLES = int(os.environ.get("KINGPOST_FUZZ_EXAMPLES", "50"))
CONFIG = """\
model_name: fuzzed
docker_server:
  start_command: python server.py
  server_port: 8000
  predict_endpoint: /predict
  readiness_endpoint: /health
  liveness_endpoint: /health
"""


@pytest.fixture(scope="module")
def plane(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Any, str, dict[str, list[str]]]]:
    root = tmp_path_factory.mktemp("fuzz")
    settings_ = Settings(home=root / "home")
    store = bootstrap(settings_, lambda _: None)
    key = (settings_.home / "credentials").read_text().strip()
    app = create_app(ControlPlane(settings_, store, Controller(settings_, store)))
    project = root / "project"
    project.mkdir()
    (project / "config.yaml").write_text(CONFIG)
    (project / "server.py").write_text("print('hi')\n")
    packed = pack_project(project)
    with TestClient(app) as client:  # one model and deployment for the path parameters
        client.headers["Authorization"] = f"Api-Key {key}"
        assert client.put(f"/v1/projects/{packed.sha256}", content=packed.data).is_success
        pushed = client.post("/v1/push", json={"project_hash": packed.sha256})
        assert pushed.is_success, pushed.text
        body = pushed.json()
    known = {
        "model": [body["model"]["id"], body["model"]["name"]],
        "dep": [body["deployment"]["id"], body["deployment"]["name"]],
        "sha": [packed.sha256],
    }
    yield app, key, known


@pytest.fixture(scope="module")
def api_schema(plane: tuple[Any, str, dict[str, list[str]]]) -> Any:
    app, _, _ = plane
    return schemathesis.openapi.from_asgi("/openapi.json", app)


FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    database=None,
)


def test_no_input_makes_the_api_fail(
    api_schema: Any, plane: tuple[Any, str, dict[str, list[str]]]
) -> None:
    """One hypothesis run per operation (schemathesis's pytest plugin does not load on
    this pytest); every failing operation is reported, not only the first. Half the
    calls name the pushed model and deployment, so generated bodies reach the handlers."""
    _, key, known = plane
    failures: list[str] = []
    for result in api_schema.get_all_operations():
        operation = result.ok()

        @FUZZ
        @given(operation.as_strategy(), st.booleans(), st.integers(0, 1))
        def call(case: Any, pin: bool, which: int) -> None:
            if pin and case.method.upper() != "DELETE":  # reach past the 404s; keep the model
                for name in case.path_parameters or {}:
                    if name in known:
                        case.path_parameters[name] = known[name][which % len(known[name])]
            response = case.call_and_validate(
                headers={"Authorization": f"Api-Key {key}"}, checks=[not_a_server_error]
            )
            if response.status_code >= 400 and case.method.upper() != "HEAD":
                body = response.json()
                assert isinstance(body, dict) and "code" in body, response.text

        try:
            call()
        except Exception as exc:
            failures.append(f"{operation.label}: {exc}")
    assert not failures, "\n\n".join(failures)


def test_the_fuzzer_reaches_every_operation(api_schema: Any) -> None:
    """A schema that lost its operations would make the test above pass vacuously."""
    operations = [op.ok() for op in api_schema.get_all_operations()]
    paths = {op.path for op in operations}
    assert {"/v1/push", "/v1/models/{model}", "/v1/projects/{sha}"} <= paths, paths
    assert len(operations) >= 20
