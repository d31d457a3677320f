"""Unit tests of the model server's pure parts: no sockets, no subprocesses."""

from __future__ import annotations

import importlib
import re
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

import msgpack
import pydantic
import pytest
from starlette.requests import Request

import kingpost.server
from kingpost.envs.interpreters import parse_python_version
from kingpost.errors import ConflictError, SecretError, ValidationError
from kingpost.server.codec import InputError, encode_json, encode_msgpack, parse_inputs
from kingpost.server.config import ServerConfig, load_server_config
from kingpost.server.logs import format_user_exception
from kingpost.server.metrics import Metrics
from kingpost.server.model import ArgMode, ModelDefinitionError, ModelHost, describe
from kingpost.server.scaffold import scaffold_project
from kingpost.server.secrets import Secrets, UndeclaredSecretError


class _Item(pydantic.BaseModel):
    name: str
    n: int = 1


class _Methods:
    def none(self) -> None: ...
    def inputs(self, x: Any) -> None: ...
    def request(self, r: Request) -> None: ...
    def both(self, x: Any, r: Request) -> None: ...
    def bad_order(self, r: Request, x: Any) -> None: ...
    def bad_second(self, x: Any, y: Any) -> None: ...
    def too_many(self, a: Any, b: Any, c: Any) -> None: ...
    async def agen(self, x: Any) -> Any:
        yield x


@pytest.mark.parametrize(
    ("name", "mode"),
    [("none", ArgMode.NONE), ("inputs", ArgMode.INPUTS), ("request", ArgMode.REQUEST),
     ("both", ArgMode.BOTH)],
)  # fmt: skip
def test_argument_modes(name: str, mode: ArgMode) -> None:
    method = describe(_Methods(), name)
    assert method is not None and method.args is mode


@pytest.mark.parametrize("name", ["bad_order", "bad_second", "too_many"])
def test_bad_signatures_are_definition_errors(name: str) -> None:
    with pytest.raises(ModelDefinitionError):
        describe(_Methods(), name)


def test_async_generator_is_a_generator_not_a_coroutine() -> None:
    method = describe(_Methods(), "agen")
    assert method is not None and method.is_generator and not method.is_async
    assert describe(_Methods(), "missing") is None


def test_secrets_mapping(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("abc")
    secrets = Secrets({"token": None, "other": "fallback"}, tmp_path)
    assert secrets["token"] == "abc"
    assert secrets["other"] == "fallback"
    assert sorted(secrets) == ["other", "token"] and len(secrets) == 2
    with pytest.raises(UndeclaredSecretError) as info:
        secrets["nope"]
    assert isinstance(info.value, KeyError) and isinstance(info.value, SecretError)
    assert "not declared in config.yaml" in str(info.value)


def test_parse_inputs_json_msgpack_pydantic() -> None:
    assert parse_inputs(b'{"a": 1}', False, None) == {"a": 1}
    assert parse_inputs(msgpack.packb([1, b"x"]), True, None) == [1, b"x"]
    assert parse_inputs(b'{"name": "a"}', False, _Item) == _Item(name="a")
    assert parse_inputs(msgpack.packb({"name": "b", "n": 2}), True, _Item) == _Item(name="b", n=2)
    with pytest.raises(InputError, match="Invalid JSON payload"):
        parse_inputs(b"{", False, None)
    with pytest.raises(InputError, match="name"):
        parse_inputs(b'{"n": 1}', False, _Item)


def test_encoders_handle_pydantic_and_fallbacks() -> None:
    assert encode_json(_Item(name="a")) == b'{"name":"a","n":1}'
    assert encode_json({"s": (1, 2)}) == b'{"s": [1, 2]}'
    assert msgpack.unpackb(encode_msgpack(_Item(name="z"))) == {"name": "z", "n": 1}
    assert encode_msgpack(b"raw") == b"raw"
    with pytest.raises(TypeError):
        encode_json({"x": object()})


def test_metrics_render_prometheus_text() -> None:
    m = Metrics()
    m.observe("predict", 200, 0.0007)
    m.observe("predict", 200, 0.2)
    m.observe("predict", 500, 0.001)
    text = m.render()
    assert 'kingpost_model_requests_total{route="predict",status="200"} 2' in text
    assert 'kingpost_model_request_duration_seconds_bucket{route="predict",le="0.001"} 2' in text
    assert 'kingpost_model_request_duration_seconds_count{route="predict"} 3' in text
    assert m.requests("predict", 500) == 1


def test_server_config_defaults_and_overrides(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text(
        "model_class_name: Other\nmodel_module_dir: src/pkg\nruntime:\n  predict_concurrency: 3\n"
    )
    cfg = load_server_config(tmp_path, validate=False)
    assert cfg.model_class_name == "Other"
    assert cfg.model_file == tmp_path.resolve() / "src/pkg/model.py"
    assert cfg.predict_concurrency == 3
    assert load_server_config(tmp_path / "missing", validate=False).predict_concurrency == 1


@pytest.mark.parametrize(
    ("value", "expected"),
    [("py311", "3.11"), ("py39", "3.9"), ("3.12", "3.12"), (None, None), ("bogus", None)],
)
def test_parse_python_version(value: str | None, expected: str | None) -> None:
    assert parse_python_version(value) == expected


def test_scaffold_refuses_bad_names_and_non_empty_dirs(tmp_path: Path) -> None:
    with pytest.raises(ValidationError):
        scaffold_project(tmp_path / "x", "bad/name")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("")
    with pytest.raises(ConflictError):
        scaffold_project(tmp_path / "busy", "ok")
    scaffold_project(tmp_path / "new", "my-model")
    assert (tmp_path / "new" / "model" / "model.py").is_file()
    assert "model_name: my-model" in (tmp_path / "new" / "config.yaml").read_text()


def test_output_schema_from_return_annotations() -> None:
    from collections.abc import AsyncIterator, Awaitable, Generator

    import pydantic

    from kingpost.server.model import _output_schema

    class Out(pydantic.BaseModel):
        x: int

    assert _output_schema(Out) == (Out, False)
    assert _output_schema(Generator[str, None, None]) == (None, True)
    assert _output_schema(AsyncIterator[bytes]) == (None, True)
    assert _output_schema(Awaitable[Out]) == (Out, False)
    assert _output_schema(Out | Generator[str, None, None]) == (Out, True)
    assert _output_schema(Awaitable[Out] | AsyncIterator[str]) == (Out, True)
    assert _output_schema(Out | None) == (None, None)  # as Truss: not a model, not a stream
    assert _output_schema(dict) == (None, None)


def test_a_huge_decimal_from_a_client_is_refused_at_once() -> None:
    def tagged(text: str) -> bytes:
        return msgpack.packb({"x": {b"__decimal__": True, b"data": text}}, use_bin_type=True)

    class Wants(pydantic.BaseModel):
        x: int

    # 35 bytes that pydantic would turn into a 33-million-bit int on the event loop.
    with pytest.raises(InputError, match="at most 1000 digits"):
        parse_inputs(tagged("1e10000000"), True, Wants)
    assert parse_inputs(tagged("12.50"), True, None) == {"x": Decimal("12.50")}
    assert parse_inputs(tagged("1e900"), True, Wants).x == 10**900


def test_numpy_arrays_of_objects_are_answered_as_lists() -> None:
    import numpy as np

    labels = np.array(["cat", "dog"], dtype=object)  # what pandas' .values often gives
    assert msgpack.unpackb(encode_msgpack({"labels": labels})) == {"labels": ["cat", "dog"]}


def test_config_defaults_fill_empty_sections_and_survive_binary_values(tmp_path: Path) -> None:
    from kingpost.server.config import _with_defaults

    (tmp_path / "config.yaml").write_text(
        'model_name: m\nmodel_metadata: {salt: !!binary "/w=="}\n'
    )
    raw = load_server_config(tmp_path).raw  # bytes that JSON cannot hold: the file as written
    assert raw["model_metadata"] == {"salt": b"\xff"}
    defaults = {"runtime": {"predict_concurrency": 1}, "model_metadata": {}}
    assert _with_defaults({"runtime": None, "model_metadata": {"a": 1}}, defaults) == {
        "runtime": {"predict_concurrency": 1},
        "model_metadata": {"a": 1},
    }


def test_an_endpoint_named_helper_that_cannot_be_an_endpoint_stays_a_helper(
    tmp_path: Path,
) -> None:
    from kingpost.server.config import ServerConfig
    from kingpost.server.model import ModelHost

    class Helpers:
        def predict(self, x: Any) -> Any:
            return x

        def messages(self, role: str, text: str, extra: str) -> list[str]:
            return [role, text, extra]

    host = ModelHost(ServerConfig(app_dir=tmp_path, raw={}), Secrets({}, tmp_path))
    host.bind(Helpers())
    assert "messages" not in host.openai

    class BadEndpoint(Helpers):
        def chat_completions(self, a: Any, b: Any, c: Any) -> None: ...

    with pytest.raises(ModelDefinitionError, match="chat_completions"):
        host.bind(BadEndpoint())


class _PreprocessThenRequestOnly:
    def preprocess(self, x: Any) -> Any:
        return {"pre": x}

    def predict(self, request: Request) -> Any:
        return "never sees what preprocess made"


class _PostprocessRequestOnly:
    def predict(self, x: Any) -> Any:
        return x

    def postprocess(self, request: Request) -> Any:
        return "predict's output is gone"


class _HealthyWithAnArgument:
    def predict(self, x: Any) -> Any:
        return x

    def is_healthy(self, probe: Any) -> bool:
        return probe is not None


class _HealthyWithAnOptionalArgument(_HealthyWithAnArgument):
    def is_healthy(self, probe: Any = None, *rest: Any) -> bool:
        return True


@pytest.mark.parametrize(
    ("klass", "words"),
    [
        (_PreprocessThenRequestOnly, "result of `preprocess` would be discarded"),
        (_PostprocessRequestOnly, "result of `predict` would be discarded"),
        (_HealthyWithAnArgument, "`is_healthy` must take no argument but `self`"),
        (_HealthyWithAnOptionalArgument, "`is_healthy` must take no argument but `self`"),
    ],
)
def test_method_shapes_truss_refuses_at_load_are_refused(
    tmp_path: Path, klass: type, words: str
) -> None:
    """Truss's ModelDescriptor refuses these at load; they were served here with
    preprocess's or predict's result dropped, or is_healthy called without its argument."""
    host = ModelHost(ServerConfig(app_dir=tmp_path, raw={}), Secrets({}, tmp_path))
    with pytest.raises(ModelDefinitionError, match=re.escape(words)) as info:
        host.bind(klass())
    assert str(info.value).startswith(f"{tmp_path / 'model' / 'model.py'}: ")


def test_request_taking_shapes_truss_allows_still_bind(tmp_path: Path) -> None:
    class Allowed:
        def preprocess(self, request: Request) -> Any:  # its result goes to predict
            return request

        def predict(self, x: Any, request: Request) -> Any:
            return x

        def postprocess(self, x: Any, request: Request) -> Any:
            return x

        def is_healthy(self) -> bool:
            return True

    class RequestOnly:
        def predict(self, request: Request) -> Any:
            return request

    host = ModelHost(ServerConfig(app_dir=tmp_path, raw={}), Secrets({}, tmp_path))
    host.bind(Allowed())
    assert host.is_healthy is not None and host.is_healthy.args is ArgMode.NONE
    assert not host.skip_input_parsing
    host.bind(RequestOnly())
    assert host.skip_input_parsing


def _server_catches(body: str) -> Any:
    """``call(fn)``, compiled as if in the server's package: it runs ``body`` and returns
    the exception raised, caught in the server's frame as the server catches a model's."""
    where = str(Path(kingpost.server.__file__).parent / "_frames_for_test.py")
    code = f"def call(fn):\n try:\n  {body}\n except Exception as exc:\n  return exc\n"
    scope: dict[str, Any] = {}
    exec(compile(code, where, "exec"), scope)
    return scope["call"]


def test_a_model_error_is_logged_from_the_models_frames_on() -> None:
    def predict() -> None:
        raise ValueError("in the model")

    lines = format_user_exception(_server_catches("fn()")(predict)).splitlines()
    assert lines[0] == "Traceback (most recent call last):"
    assert lines[1].startswith(f'  File "{__file__}"') and lines[1].endswith("in predict")
    assert "_frames_for_test.py" not in "\n".join(lines)
    assert lines[-1] == "ValueError: in the model"


def _import_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str) -> str:
    """The logged traceback of the server importing a model module made of ``source``."""
    (tmp_path / "kp_model_source.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "kp_model_source", raising=False)
    exc = _server_catches("fn('kp_model_source')")(importlib.import_module)
    return format_user_exception(exc)


def test_a_models_import_error_is_logged_from_its_line_not_from_importlib(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The most common load failure, a package the model imports but does not list, was
    logged from importlib's frozen frames on: six `<frozen importlib._bootstrap>` lines
    before the model's, which also pushed its line out of a FAILED deployment's message."""
    text = _import_failure(tmp_path, monkeypatch, "import not_installed_kp\n")
    lines = text.splitlines()
    assert "<frozen" not in text and "_frames_for_test.py" not in text, text
    assert lines[1].startswith(f'  File "{tmp_path / "kp_model_source.py"}", line 1'), text
    assert lines[-1] == "ModuleNotFoundError: No module named 'not_installed_kp'"


def test_a_syntax_error_in_the_model_is_logged_as_its_file_and_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No frame of a SyntaxError's traceback is the model's (the import machinery's are),
    yet the error is in the model's file: it is shown without the frames before it."""
    text = _import_failure(tmp_path, monkeypatch, "class Model:\n    def load(self)\n")
    assert "<frozen" not in text and "_frames_for_test.py" not in text, text
    assert f'File "{tmp_path / "kp_model_source.py"}", line 2' in text
    assert "def load(self)" in text and text.rstrip().endswith("SyntaxError: expected ':'")


def test_an_error_of_the_server_itself_keeps_its_whole_traceback() -> None:
    exc = _server_catches("fn() + 1")(lambda: None)  # a TypeError in the server's frame
    text = format_user_exception(exc)
    assert "_frames_for_test.py" in text and "in call" in text
    assert text.rstrip().endswith(
        "TypeError: unsupported operand type(s) for +: 'NoneType' and 'int'"
    )


def test_an_error_the_server_finds_in_the_model_is_logged_as_its_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A misspelt ``model_class_name`` was logged as a server bug: the message came last,
    under a traceback of the server's own frames."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model.py").write_text("class Model:\n    pass\n")
    (tmp_path / "config.yaml").write_text("model_name: typo\nmodel_class_name: Modell\n")
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "model", raising=False)
    monkeypatch.delitem(sys.modules, "model.model", raising=False)
    host = ModelHost(load_server_config(tmp_path, validate=False), Secrets({}, tmp_path))
    exc = _server_catches("fn(None)")(host.load_blocking)  # as the server's main calls it
    assert isinstance(exc, ModelDefinitionError)
    assert format_user_exception(exc) == (
        f"ModelDefinitionError: {tmp_path / 'model' / 'model.py'}: no class 'Modell'; "
        "define it or set `model_class_name` in config.yaml\n"
    )


def test_a_refused_method_shape_fails_the_load_as_its_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As every ModelDefinitionError the server finds: the load fails, logged as the
    message alone, not under the server's frames."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model.py").write_text(
        "class Model:\n    def predict(self, x):\n        return x\n"
        "    def is_healthy(self, probe):\n        return True\n"
    )
    (tmp_path / "config.yaml").write_text("model_name: health\n")
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "model", raising=False)
    monkeypatch.delitem(sys.modules, "model.model", raising=False)
    host = ModelHost(load_server_config(tmp_path, validate=False), Secrets({}, tmp_path))
    exc = _server_catches("fn(None)")(host.load_blocking)
    assert isinstance(exc, ModelDefinitionError)
    assert format_user_exception(exc) == (
        f"ModelDefinitionError: {tmp_path / 'model' / 'model.py'}: `is_healthy` must take no "
        "argument but `self` (it is called with none); write `def is_healthy(self) -> bool`. "
        "Got: (probe)\n"
    )
