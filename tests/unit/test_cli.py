"""The `kingpost` command without a server: errors are messages and exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from test_api import CONFIG  # a valid custom-server config


def kingpost(tmp_path: Path, *args: str, **settings: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KINGPOST_")}
    env.update(KINGPOST_HOME=str(tmp_path / "home"), KINGPOST_API_KEY="kp_x", KINGPOST_API_PORT="9")
    env.update(settings)
    return subprocess.run(
        [sys.executable, "-m", "kingpost.cli", *args],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def project(tmp_path: Path, extra: str = "") -> Path:
    root = tmp_path / "project"
    root.mkdir(exist_ok=True)
    (root / "config.yaml").write_text(CONFIG + extra)
    return root


def test_brackets_in_errors_and_warnings_are_printed_as_text(tmp_path: Path) -> None:
    """Messages went through rich markup: `[/x]` in a value was a MarkupError traceback,
    and `[bold]` vanished from the text."""
    out = kingpost(tmp_path, "push", str(project(tmp_path)), "--labels", "[/x] [bold]")
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert "--labels: not valid JSON" in out.stderr and "[/x] [bold]" in out.stderr
    out = kingpost(tmp_path, "push", str(project(tmp_path, '"[/y]": 1\n')), "--labels", "[")
    assert "Traceback" not in out.stderr, out.stderr
    assert "[/y]" in out.stderr and "--labels" in out.stderr


def test_table_cells_are_text_not_markup(capsys: pytest.CaptureFixture[str]) -> None:
    """Labels are any JSON and a status message quotes build output: `deployments list`
    failed with a MarkupError on a label `[/x]` and dropped `[notice]` from a message."""
    from kingpost.cli._common import print_rows

    rows = [{"labels": {"a": "[/x]"}, "message": "pip [notice] new release"}]
    print_rows(rows, ["labels", "message"], "table")  # piped
    out = capsys.readouterr().out
    assert "[/x]" in out and "[notice]" in out
    assert "[/x]" in _in_terminal(rows, ["labels", "message"], 120)
    assert "[notice]" in _in_terminal(rows, ["labels", "message"], 120)
    # Nor emoji codes: rich turned `:x:` into a cross, `:ok:` into a button.
    rows = [{"labels": {"k": "v:ok:w"}, "message": "exec /srv/bin:x:/usr/bin failed"}]
    out = _in_terminal(rows, ["labels", "message"], 120)
    assert '"v:ok:w"' in out and "/srv/bin:x:/usr/bin" in out, out


DEPLOYMENT = {
    "id": "dep-0123456789abcdef0123",
    "name": "v3",
    "model_id": "mdl-0123456789abcdef0123",
    "status": "BUILD_FAILED",
    "created_at": "2026-11-23T21:00:00Z",
    "message": "installing requirements failed:\n  No matching distribution found for "
    "torch==9.9.9 (from -r config_requirements.txt (line 1))",
}
COLUMNS = ["id", "name", "model_id", "status", "created_at", "message"]


def _in_terminal(rows: list[dict[str, object]], columns: list[str], width: int) -> str:
    import io

    from rich.console import Console

    from kingpost.cli import _common

    buffer = io.StringIO()
    terminal = Console(file=buffer, force_terminal=True, width=width, color_system=None)
    saved, _common.console = _common.console, terminal
    try:
        _common.print_rows(rows, columns, "table")
    finally:
        _common.console = saved
    return buffer.getvalue()


def test_piped_tables_are_one_line_per_row_with_nothing_cut(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Piped, a table was boxed at 80 columns: ids cut to `dep-01…` and a message wrapped
    over ten lines, so `kingpost deployments | grep` found nothing to copy."""
    from kingpost.cli._common import print_rows

    other = {**DEPLOYMENT, "id": "dep-1", "name": "v4", "status": "ACTIVE", "message": None}
    print_rows([DEPLOYMENT, other], COLUMNS, "table")
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and lines[0].split() == ["ID", "NAME", "MODEL", "ID", "STATUS",
                                                    "CREATED", "AT", "MESSAGE"]  # fmt: skip
    assert lines[1].split()[:5] == [DEPLOYMENT[c] for c in COLUMNS[:5]]
    assert lines[1].endswith("(from -r config_requirements.txt (line 1))")
    assert "failed: No matching" in lines[1]  # the message's own line break is a space
    assert lines[2].split() == ["dep-1", "v4", DEPLOYMENT["model_id"], "ACTIVE",
                                DEPLOYMENT["created_at"], "-"]  # fmt: skip
    # Columns line up: each starts where its header does.
    assert lines[1].index(DEPLOYMENT["model_id"]) == lines[0].index("MODEL ID")


def test_a_terminal_table_keeps_ids_whole_or_falls_back_to_lines() -> None:
    wide = _in_terminal([DEPLOYMENT], COLUMNS, 160)
    assert "┃ ID" in wide and DEPLOYMENT["id"] in wide and DEPLOYMENT["model_id"] in wide
    assert "…" not in wide
    narrow = _in_terminal([DEPLOYMENT], COLUMNS, 80)
    assert "┃" not in narrow and "…" not in narrow
    assert DEPLOYMENT["id"] in narrow and DEPLOYMENT["model_id"] in narrow


def test_columns_are_measured_in_terminal_cells_not_characters(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A CJK character takes two columns of a terminal: counted as one, piped columns
    after it were out of line, and a terminal table that did not fit was chosen anyway
    and cut short on the right."""
    from rich.cells import cell_len

    from kingpost.cli._common import print_rows

    rows = [
        {"id": "w1", "source": "s3://bucket/模型权重/", "files": 3},
        {"id": "w2", "source": "hf://org/repo", "files": 12},
    ]
    print_rows(rows, ["id", "source", "files"], "table")
    lines = capsys.readouterr().out.splitlines()
    starts = {cell_len(line) - len(line.split()[-1]) for line in lines}
    assert len(starts) == 1, lines  # FILES, 3 and 12 start in the same column

    row = {"id": DEPLOYMENT["id"], "state": "构建失败" * 8}  # 32 characters, 64 cells
    out = _in_terminal([row], ["id", "state"], 80)
    assert "┃" not in out and row["state"] in out and DEPLOYMENT["id"] in out


def test_predict_data_file_that_cannot_be_read_is_named(tmp_path: Path) -> None:
    (tmp_path / "latin1.json").write_bytes(b'{"a": "\xe9"}')
    for name, says in (
        ("missing.json", "No such file"),
        (".", "Is a directory"),
        ("latin1.json", "not UTF-8"),
    ):
        out = kingpost(tmp_path, "predict", "-m", "x", "-d", f"@{tmp_path / name}")
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
        text = " ".join(out.stderr.split())  # rich wraps lines at 80 columns
        assert "--data" in text and says in text, text


def test_an_api_key_that_cannot_be_a_header_is_named_not_a_traceback(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KINGPOST_")}
    env.update(KINGPOST_HOME=str(tmp_path / "home"), KINGPOST_API_PORT="9")
    for where, key in (("env", "kp_clé"), ("file", "kp_\u2028x")):
        if where == "env":
            env["KINGPOST_API_KEY"] = key
        else:
            env.pop("KINGPOST_API_KEY")
            (tmp_path / "home").mkdir(exist_ok=True)
            (tmp_path / "home" / "credentials").write_text(key)
        out = subprocess.run(
            [sys.executable, "-m", "kingpost.cli", "deployments", "list"],
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr
        text = " ".join(out.stderr.split())
        assert "printable ASCII" in text, text
        assert ("KINGPOST_API_KEY" if where == "env" else "credentials") in text, text


@pytest.mark.parametrize(("level", "httpx_level"), [("info", "WARNING"), ("debug", "DEBUG")])
def test_the_server_log_has_no_line_per_table_push_unless_debugging(
    level: str, httpx_level: str
) -> None:
    # the controller pushes the routing table every pass; httpx logs each request at INFO
    code = (
        "import logging; from kingpost.cli.main import configure_server_logging;"
        f"configure_server_logging({level!r});"
        "print(logging.getLevelName(logging.getLogger('httpx').getEffectiveLevel()))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == httpx_level, out.stderr


def test_errors_are_not_wrapped_when_piped(tmp_path: Path) -> None:
    """Piped, rich wrapped messages at 80 columns: a log or CI output then had a line break
    in the middle of the parser's message."""
    out = kingpost(tmp_path, "predict", "--model", "m", "-d", "{bad")
    assert out.returncode == 2, out.stderr
    message = "error: --data: not valid JSON (Expecting property name enclosed in double quotes)"
    assert message in out.stderr.splitlines(), out.stderr


def test_init_prints_a_push_command_that_can_be_pasted(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "kingpost.cli", "init", "My Model"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    command = out.stdout.split("`")[1]
    assert command == "kingpost push 'My Model'", out.stdout
    assert "model_name: My Model" in (tmp_path / "My Model" / "config.yaml").read_text()


def test_init_takes_a_path_and_names_the_model_after_its_last_part(tmp_path: Path) -> None:
    # As `truss init DIR`; the whole path was taken for the model name and refused.
    out = kingpost(tmp_path, "init", str(tmp_path / "models" / "my-model"))
    assert out.returncode == 0, out.stderr
    config = (tmp_path / "models" / "my-model" / "config.yaml").read_text()
    assert "model_name: my-model" in config


def test_deployment_list_shows_a_one_line_reason_for_a_long_failure() -> None:
    """A FAILED deployment's MESSAGE column held ~2 KB of raw JSON log lines: the table
    shows the failure's first line and the last output line, and where to read the rest."""
    from kingpost.cli.manage import _reason

    records = [
        json.dumps({"levelname": "INFO", "message": f"loading shard {i}", "pad": "x" * 80})
        for i in range(20)
    ]
    records.append(json.dumps({"levelname": "ERROR", "message": "ValueError: no GPU"}))
    message = "server exited with code 1 before becoming ready; last output:\n" + "\n".join(records)
    assert len(message) > 2000
    reason = _reason({"id": "dep-1", "message": message})
    assert "\n" not in reason and len(reason) < 220, reason
    assert reason.startswith("server exited with code 1 before becoming ready")
    assert "ValueError: no GPU" in reason and reason.endswith("(more: kingpost logs -d dep-1)")
    # Short messages stand as they are; two lines become one.
    assert _reason({"id": "d", "message": "no replica is ready"}) == "no replica is ready"
    two = _reason({"id": "d", "message": DEPLOYMENT["message"]})
    assert two == (
        "installing requirements failed: No matching distribution found for torch==9.9.9 "
        "(from -r config_requirements.txt (line 1))"
    )
    assert _reason({"id": "d", "message": ""}) == ""


def test_stdout_is_not_wrapped_when_piped(tmp_path: Path) -> None:
    """`push` piped printed `deployment deployment-1 \\n(xxeavbw): DEPLOYING`: rich wrapped
    stdout at 80 columns when it was not a terminal."""
    code = (
        "from kingpost.cli._common import console;"
        "console.print('model [bold]a-rather-long-model-name[/] (mdl-0123456789abcdef), '"
        "'deployment [bold]deployment-1[/] (dep-0123456789abcdef0123): DEPLOYING')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.splitlines() == [
        "model a-rather-long-model-name (mdl-0123456789abcdef), "
        "deployment deployment-1 (dep-0123456789abcdef0123): DEPLOYING"
    ], out.stdout


@contextmanager
def _serving(handler: type[BaseHTTPRequestHandler]) -> Iterator[int]:
    """``handler`` on a free loopback port, in a thread: a stand-in control plane."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


class _Quiet(BaseHTTPRequestHandler):
    def _send(self, body: bytes, *headers: tuple[str, str]) -> None:
        self.send_response(200)
        for name, value in (("content-length", str(len(body))), *headers):
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_metrics_text_that_does_not_parse_is_one_line_of_error(tmp_path: Path) -> None:
    """A raw line break in a HELP line (a control plane from before it was escaped) made
    `kingpost metrics` die with prometheus_client's ValueError traceback."""

    class Metrics(_Quiet):
        def do_GET(self) -> None:
            text = b"# HELP tokens_total Tokens.\nCounts prompt.\n# TYPE tokens_total counter\n"
            self._send(text, ("content-type", "text/plain; version=0.0.4"))

    with _serving(Metrics) as port:
        out = kingpost(
            tmp_path, "metrics", "-o", "json", "--interval", "0.1", KINGPOST_API_PORT=str(port)
        )
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("error: cannot parse the control plane's /metrics text at http://")
    assert "'prompt.'" in line and out.stdout == ""


@pytest.mark.parametrize("always", [False, True])
def test_predict_prints_a_compressing_servers_answer_as_text(tmp_path: Path, always: bool) -> None:
    """httpx offers gzip by default and `kingpost predict` wrote the raw bytes, so a custom
    server that compresses when offered (GZipMiddleware, nginx) was printed as gzip. The
    client asks for the body uncompressed now, and decodes one compressed regardless."""
    import gzip

    asked: list[str | None] = []
    answer = json.dumps({"text": "hello " * 100}).encode()

    class Server(_Quiet):
        def do_GET(self) -> None:  # the model, looked up by name
            self._send(b'{"id": "m", "name": "m"}', ("content-type", "application/json"))

        def do_POST(self) -> None:  # the gateway's predict route
            self.rfile.read(int(self.headers["content-length"]))
            asked.append(self.headers.get("accept-encoding"))
            if always or "gzip" in (self.headers.get("accept-encoding") or ""):
                self._send(gzip.compress(answer), ("content-encoding", "gzip"))
            else:
                self._send(answer)

    with _serving(Server) as port:
        out = kingpost(
            tmp_path, "predict", "-m", "m", "-d", "{}",
            KINGPOST_API_PORT=str(port), KINGPOST_GATEWAY_PORT=str(port),
        )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert asked == ["identity"] and out.stdout.strip() == answer.decode()


def test_metrics_environment_shows_a_deployment_two_environments_point_at(
    tmp_path: Path,
) -> None:
    """Staging promoted to production: both point at deployment-1, whose series carry
    environment="production"; `kingpost metrics --environment staging` showed nothing."""
    lab = 'model="m",deployment="deployment-1",environment="production"'
    scrapes = iter([10, 30])
    dep = {
        "id": "dep-1",
        "name": "deployment-1",
        "model_id": "mdl-1",
        "environments": ["production", "staging"],  # and "dev" points at nothing
    }
    answers = {
        "/v1/models": {"models": [{"id": "mdl-1", "name": "m"}]},
        "/v1/deployments": {"deployments": [dep]},
    }

    class Plane(_Quiet):
        def do_GET(self) -> None:
            if self.path == "/metrics":
                n = next(scrapes)
                text = f'kingpost_requests_total{{{lab},route="predict",code_class="2xx"}} {n}\n'
                self._send(text.encode(), ("content-type", "text/plain; version=0.0.4"))
            else:
                self._send(json.dumps(answers[self.path]).encode())

    for env, want in (("staging", ["staging"]), ("dev", [])):
        scrapes = iter([10, 30])
        with _serving(Plane) as port:
            out = kingpost(
                tmp_path, "metrics", "--environment", env, "-o", "json", "--interval", "0.1",
                KINGPOST_API_PORT=str(port),
            )  # fmt: skip
        assert out.returncode == 0, out.stderr
        rows = json.loads(out.stdout)
        assert [(r["deployment"], r["environment"]) for r in rows] == [
            ("deployment-1", e) for e in want
        ]


def test_environments_update_sends_only_what_was_given(tmp_path: Path) -> None:
    """The server keeps what a PATCH leaves out (null), so the CLI reads nothing first (a
    read, then a write of the whole, could undo a change made in between); choosing one
    rolling mode sends the other as 0, Baseten's "not this mode"."""
    sent: list[tuple[str, dict[str, object]]] = []
    env = {"name": "production", "deployment_id": None, "promotion_settings": {}}

    class Plane(_Quiet):
        def do_GET(self) -> None:
            sent.append(("GET", {}))
            self._send(json.dumps(env).encode())

        def do_PATCH(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["content-length"])))
            sent.append((f"PATCH {self.path}", body))
            self._send(json.dumps(env).encode())

    with _serving(Plane) as port:
        out = kingpost(
            tmp_path, "environments", "update", "m", "production", "--max-surge-percent", "25",
            KINGPOST_API_PORT=str(port),
        )  # fmt: skip
    assert out.returncode == 0, out.stderr
    ((what, body),) = sent
    assert what == "PATCH /v1/models/m/environments/production"
    settings: Any = body["promotion_settings"]
    assert settings["rolling_deploy_config"] == {
        "max_surge_percent": 25,
        "max_unavailable_percent": 0,
        "stabilization_time_seconds": None,
        "replica_overhead_percent": None,
    }
    assert settings["rolling_deploy"] is None and settings["ready_timeout_seconds"] is None
