"""Where Truss's own server behaves in a way a model can notice, Kingpost's behaves the same.

Each case was found by running one model under both servers side by side; these tests pin
Kingpost's side of it.
"""

from __future__ import annotations

import datetime
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import msgpack
import numpy as np
import pytest
from test_server_harness import ServerProcess, run_server

PREDICT = "/v1/models/model:predict"

MODEL = """
import asyncio, datetime, os
from pathlib import Path

import numpy as np
from prometheus_client import Counter
from starlette.requests import Request
from starlette.responses import JSONResponse

CALLS = Counter("parity_model_calls", "predict calls counted by the model itself")
LOADS = []


class Model:
    def __init__(self, config, data_dir, environment, secrets):
        self.config, self.data_dir, self.environment = config, data_dir, environment
        self.secrets = secrets
        self.told = []

    def setup_environment(self, environment):
        self.told.append(environment)

    def load(self):
        LOADS.append(1)
        if len(LOADS) == 1:
            raise RuntimeError("the first download timed out")

    def is_healthy(self):
        if Path(os.environ["PARITY_UNHEALTHY"]).exists():
            return False
        return None  # no answer: healthy

    async def predict(self, inputs, request: Request):
        CALLS.inc()
        case = inputs.get("case") if isinstance(inputs, dict) else None
        if case == "init":
            return {
                "model_metadata": self.config["model_metadata"],
                "predict_concurrency": self.config["runtime"]["predict_concurrency"],
                "model_name": self.config["model_name"],
                "data_dir": [str(self.data_dir), self.data_dir.is_dir()],
                "environment": self.environment,
                "told": self.told,
                "loads": len(LOADS),
            }
        if case == "secrets":
            try:
                self.secrets.get("never_declared")
                undeclared = "no error"
            except KeyError as exc:
                undeclared = type(exc).__name__
            return {"token": self.secrets["token"], "from_env": self.secrets["from_env"],
                    "undeclared": undeclared}
        if case == "disconnect-check":
            if await request.is_disconnected():
                return {"gone": True}
            return {"body": await request.json()}
        if case in ("response", "stream"):
            return inputs
        if case is None:  # msgpack
            return {
                "types": {k: type(v).__name__ for k, v in inputs.items()},
                "array_sum": float(inputs["array"].sum()),
                "array": np.arange(6, dtype=np.float32).reshape(2, 3),
                "scalar": np.int64(7),
                "when": inputs["when"] + datetime.timedelta(days=1),
                "id": inputs["id"],
            }
        return inputs

    def postprocess(self, result):
        if isinstance(result, dict) and result.get("case") == "response":
            return JSONResponse({"from": "postprocess"}, status_code=201)
        if isinstance(result, dict) and result.get("case") == "stream":
            return (f"part{i};" for i in range(3))
        return result

    def messages(self, inputs):
        return {"messages": inputs}

    def responses(self, inputs):
        return {"responses": inputs}
"""

CONFIG = """model_name: parity
model_metadata:
  owner: tests
secrets:
  token: null
  from_env: null
"""


@pytest.fixture(scope="module")
def parity(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, Path]]:
    tmp = tmp_path_factory.mktemp("parity")
    app = tmp / "app"
    (app / "model").mkdir(parents=True)
    (app / "config.yaml").write_text(CONFIG)
    (app / "model" / "model.py").write_text(MODEL)
    secrets = tmp / "secrets"
    secrets.mkdir()
    (secrets / "token").write_text("from-the-store")
    env = {
        "KINGPOST_ENVIRONMENT": json.dumps({"name": "staging"}),
        "TRUSS_SECRET_from_env": "from-the-environment",
        "PARITY_UNHEALTHY": str(tmp / "unhealthy"),
    }
    with run_server(app, tmp, env=env, secrets_dir=secrets) as server:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            server.wait_ready(client)
        yield server, tmp


@pytest.fixture
def client(parity: tuple[ServerProcess, Path]) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=parity[0].url, timeout=10) as c:
        yield c


def test_init_gets_the_full_config_a_data_dir_and_the_environment(client: httpx.Client) -> None:
    got = client.post(PREDICT, json={"case": "init"}).json()
    assert got["model_metadata"] == {"owner": "tests"}
    assert got["predict_concurrency"] == 1  # left out of config.yaml: the default
    assert got["model_name"] == "parity"
    assert got["data_dir"][1] is True  # created, though the project has no data/
    assert got["environment"] == {"name": "staging"}
    assert got["told"] == [{"name": "staging"}]  # setup_environment, before load
    assert got["loads"] == 2  # the first load() failed and was retried once


def test_secrets_come_from_the_store_or_the_environment_and_undeclared_ones_raise(
    client: httpx.Client,
) -> None:
    assert client.post(PREDICT, json={"case": "secrets"}).json() == {
        "token": "from-the-store",
        "from_env": "from-the-environment",
        "undeclared": "UndeclaredSecretError",
    }


def test_is_healthy_without_an_answer_is_ready_and_loaded_skips_it(
    client: httpx.Client, parity: tuple[ServerProcess, Path]
) -> None:
    assert client.get("/v1/models/model").status_code == 200
    flag = parity[1] / "unhealthy"
    flag.touch()
    try:
        assert client.get("/v1/models/model").status_code == 503
        assert client.get("/v1/models/model/loaded").status_code == 200
        # SageMaker's readiness name answers like ``loaded``, as in Truss.
        assert (client.get("/ping").status_code, client.get("/ping").json()) == (200, {})
    finally:
        flag.unlink()


def test_sagemaker_invocations_is_predict(client: httpx.Client) -> None:
    r = client.post("/invocations", json={"case": "echo", "n": 1})
    assert (r.status_code, r.json()) == (200, {"case": "echo", "n": 1})
    assert client.get("/invocations").status_code == 404


def test_a_disconnect_check_leaves_the_body_readable(client: httpx.Client) -> None:
    r = client.post(PREDICT, json={"case": "disconnect-check"})
    assert r.json() == {"body": {"case": "disconnect-check"}}


def test_postprocess_may_return_a_response_or_a_stream(client: httpx.Client) -> None:
    r = client.post(PREDICT, json={"case": "response"})
    assert (r.status_code, r.json()) == (201, {"from": "postprocess"})
    r = client.post(PREDICT, json={"case": "stream"})
    assert (r.status_code, r.text) == (200, "part0;part1;part2;")
    assert r.headers["transfer-encoding"] == "chunked"


def test_no_schema_without_annotations(client: httpx.Client) -> None:
    r = client.get("/v1/models/model/schema")
    assert (r.status_code, r.json()) == (404, {"error": "No schema found"})


@pytest.mark.parametrize("name", ["messages", "responses"])
def test_messages_and_responses_routes(client: httpx.Client, name: str) -> None:
    assert client.post(f"/v1/{name}", json={"q": 1}).json() == {name: {"q": 1}}


def test_metrics_include_what_the_model_counts(client: httpx.Client) -> None:
    client.post(PREDICT, json={"case": "echo"})
    text = client.get("/metrics").text
    assert "kingpost_model_requests_total" in text
    assert [line for line in text.splitlines() if line.startswith("parity_model_calls_total ")]


def test_msgpack_carries_numpy_arrays_dates_and_uuids_as_truss_does(
    client: httpx.Client,
) -> None:
    array = np.arange(4, dtype=np.int16)
    ident = uuid.uuid4()
    body = msgpack.packb(
        {
            # The tagged maps Truss's client sends (msgpack-numpy's form for arrays).
            "array": {
                b"nd": True,
                b"type": array.dtype.str,
                b"kind": b"",
                b"shape": array.shape,
                b"data": array.tobytes(),
            },
            "when": {b"__dt_datetime_iso__": True, b"data": "2026-11-23T10:00:00Z"},
            "id": {b"__uuid__": True, b"data": str(ident)},
        },
        use_bin_type=True,
    )
    r = client.post(PREDICT, content=body, headers={"content-type": "application/octet-stream"})
    assert r.status_code == 200, r.text
    out = msgpack.unpackb(r.content, raw=False)
    assert out["types"] == {"array": "ndarray", "when": "datetime", "id": "UUID"}
    assert out["array_sum"] == 6.0
    arr = out["array"]
    assert (arr[b"nd"], arr[b"type"], arr[b"shape"]) == (True, "<f4", [2, 3])
    assert np.frombuffer(arr[b"data"], "<f4").tolist() == [0, 1, 2, 3, 4, 5]
    assert out["scalar"] == {b"nd": False, b"type": "<i8", b"data": np.int64(7).tobytes()}
    assert out["when"] == {b"__dt_datetime_iso__": True, b"data": "2026-11-24T10:00:00Z"}
    assert out["id"] == {b"__uuid__": True, b"data": str(ident)}
    bad = {"when": {b"__dt_datetime_iso__": True, b"data": "not a date"}}
    r = client.post(
        PREDICT,
        content=msgpack.packb(bad, use_bin_type=True),
        headers={"content-type": "application/octet-stream"},
    )
    assert r.status_code == 400 and "Invalid msgpack payload" in r.json()["error"]


def test_datetime_round_trips_through_the_codec() -> None:
    from kingpost.server import codec

    value = {
        "d": datetime.date(2026, 11, 23),
        "t": datetime.time(10, 30),
        "td": datetime.timedelta(days=1, seconds=2, microseconds=3),
        "naive": datetime.datetime(2026, 11, 23, 10, 0),
        "complex": 1 + 2j,
        "grid": np.zeros((2, 2), dtype=[("x", "<i4"), ("y", "<f8")]),
    }
    back = codec.parse_inputs(codec.encode_msgpack(value), True, None)
    grid = back.pop("grid")
    assert back == {k: v for k, v in value.items() if k != "grid"}
    assert grid.dtype == value["grid"].dtype and grid.shape == (2, 2)


def test_every_response_carries_a_date(client: httpx.Client) -> None:
    from email.utils import parsedate_to_datetime

    for r in (client.get("/"), client.post(PREDICT, json={"case": "echo"}), client.get("/x")):
        sent = parsedate_to_datetime(r.headers["date"])
        assert abs((datetime.datetime.now(datetime.UTC) - sent).total_seconds()) < 60


def test_numpy_is_imported_once_ready_so_neither_a_cold_start_nor_a_request_waits_for_it(
    tmp_path: Path,
) -> None:
    app = tmp_path / "app"
    (app / "model").mkdir(parents=True)
    (app / "config.yaml").write_text("model_name: no-numpy\n")
    (app / "model" / "model.py").write_text(
        "import sys\n\nclass Model:\n"
        "    def predict(self, inputs):\n"
        "        return {'numpy': 'numpy' in sys.modules}\n"
    )
    with run_server(app, tmp_path) as server, httpx.Client(base_url=server.url) as c:
        server.wait_ready(c)
        deadline = time.monotonic() + 30
        while c.post(PREDICT, json={}).json() != {"numpy": True}:
            assert time.monotonic() < deadline, "numpy was never imported"
            time.sleep(0.05)
