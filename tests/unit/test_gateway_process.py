"""What a starting control plane does with the gateway the last one left: a table of
cases for the pure ``decide``."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from kingpost import __version__
from kingpost.gateway_process import (
    Action,
    GatewayRecord,
    Observed,
    async_store,
    decide,
    read_record,
    write_record,
)
from kingpost.settings import Settings

HOME = Path("/srv/kp")
SETTINGS = Settings(home=HOME, gateway_port=8080)
RECORD = GatewayRecord(
    pid=4242,
    start_ticks=77,
    boot_id="b",
    version=__version__,
    host="127.0.0.1",
    port=8080,
    workers=1,
    orphan_timeout=3600.0,
    control_socket=str(HOME / "run" / "gateway.sock"),
    token="t",
    log_dir=str(HOME / "logs"),
    log_segment_bytes=8 * 1024 * 1024,
    **async_store(SETTINGS),
)
FITS = Observed(ours=True, versions=(__version__,))


@pytest.mark.parametrize(
    ("record", "seen", "settings", "action", "why"),
    [
        (None, Observed(False), SETTINGS, Action.START, "no gateway was recorded"),
        (RECORD, Observed(False), SETTINGS, Action.START, "pid 4242) is gone"),
        (RECORD, FITS, SETTINGS, Action.ADOPT, f"Kingpost {__version__} on 127.0.0.1:8080"),
        (
            RECORD,
            Observed(True, ("0.0.1",)),
            SETTINGS,
            Action.REPLACE,
            f"it runs Kingpost 0.0.1, not {__version__}",
        ),
        (RECORD, Observed(True, (None,)), SETTINGS, Action.REPLACE, "do not all answer"),
        (
            RECORD,
            FITS,
            SETTINGS.model_copy(update={"gateway_port": 9090}),
            Action.REPLACE,
            "its settings changed: port 8080 -> 9090",
        ),
        (
            RECORD,
            FITS,
            SETTINGS.model_copy(update={"gateway_host": "0.0.0.0", "gateway_workers": 2}),
            Action.REPLACE,
            "host '127.0.0.1' -> '0.0.0.0', workers 1 -> 2",
        ),
        (
            RECORD,
            FITS,
            SETTINGS.model_copy(update={"gateway_orphan_timeout": 0.0}),
            Action.REPLACE,
            "orphan_timeout 3600.0 -> 0.0",
        ),
        # Access lines go to the log store as the gateway was started: another setting
        # must replace it, or an adopted gateway keeps (or keeps not) writing them.
        (
            RECORD,
            FITS,
            SETTINGS.model_copy(update={"log_access": False}),
            Action.REPLACE,
            "log_dir '/srv/kp/logs' -> '', log_segment_bytes 8388608 -> 0",
        ),
        (
            replace(RECORD, log_dir="", log_segment_bytes=0),
            FITS,
            SETTINGS,
            Action.REPLACE,
            "log_dir '' -> '/srv/kp/logs'",
        ),
        (
            RECORD,
            FITS,
            SETTINGS.model_copy(update={"log_max_bytes": 16 * 1024 * 1024}),
            Action.REPLACE,
            "log_segment_bytes 8388608 -> 1048576",
        ),
        # The async routes write to the database the gateway was started with: another
        # one must replace it, or requests queue where no worker of this plane reads.
        (
            RECORD,
            FITS,
            Settings(home=HOME, gateway_port=8080, database_url="postgresql://kp:pw@db/kp"),
            Action.REPLACE,
            "its settings changed: the database URL (KINGPOST_DATABASE_URL)",
        ),
        (
            replace(RECORD, database=""),  # recorded by a Kingpost that did not compare it
            FITS,
            SETTINGS,
            Action.REPLACE,
            "the database URL",
        ),
        (
            RECORD,
            FITS,
            SETTINGS.model_copy(update={"async_payload_limit": 1024}),
            Action.REPLACE,
            "async_payload_limit 262144 -> 1024",
        ),
        (
            RECORD,
            FITS,
            SETTINGS.model_copy(update={"async_webhook_allow_http": True}),
            Action.REPLACE,
            "async_webhook_allow_http False -> True",
        ),
        (
            replace(RECORD, workers=2),
            Observed(True, (__version__, "0.0.1")),
            SETTINGS.model_copy(update={"gateway_workers": 2}),
            Action.REPLACE,
            "it runs Kingpost 0.0.1",
        ),
        (  # its own /metrics moves (or is turned on): a gateway listening there is needed
            RECORD,
            FITS,
            SETTINGS.model_copy(update={"gateway_metrics_listen": "127.0.0.1:9465"}),
            Action.REPLACE,
            "metrics_listen '' -> '127.0.0.1:9465'",
        ),
        (
            replace(RECORD, metrics_listen="127.0.0.1:9465"),
            FITS,
            SETTINGS.model_copy(update={"gateway_metrics_listen": "127.0.0.1:9465"}),
            Action.ADOPT,
            "8080",
        ),
    ],
)
def test_decide(
    record: GatewayRecord | None, seen: Observed, settings: Settings, action: Action, why: str
) -> None:
    got, reason = decide(record, seen, settings)
    assert got == action
    assert why in reason
    assert "pw@" not in reason  # a password in the URL is never logged


def test_the_record_is_private_and_a_damaged_one_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "run" / "gateway.json"
    write_record(path, RECORD)
    assert path.stat().st_mode & 0o777 == 0o600
    assert read_record(path) == RECORD
    path.write_text('{"pid": 1}')
    assert read_record(path) is None
    assert read_record(tmp_path / "none.json") is None


def test_an_orphan_timeout_under_the_push_period_is_refused() -> None:
    with pytest.raises(ValueError, match=r"ORPHAN_TIMEOUT must be 0 .* got 3\.0"):
        Settings(gateway_orphan_timeout=3)


@pytest.mark.parametrize(
    ("recorded", "traces", "action", "why"),
    [
        ("", None, Action.ADOPT, "on 127.0.0.1:8080"),
        ("http://otel:4318/v1/traces", "http://otel:4318/v1/traces", Action.ADOPT, "8080"),
        ("", "http://otel:4318/v1/traces", Action.REPLACE, "traces_endpoint '' -> 'http://"),
        ("http://otel:4318/v1/traces", None, Action.REPLACE, "traces_endpoint 'http://otel"),
    ],
)
def test_a_gateway_tracing_elsewhere_is_replaced(
    recorded: str, traces: str | None, action: Action, why: str
) -> None:
    """The gateway reads its OTLP endpoint from the environment it was started with: an
    adopted one would go on tracing (or not) as the last server said."""
    got, reason = decide(replace(RECORD, traces_endpoint=recorded), FITS, SETTINGS, traces)
    assert got == action
    assert why in reason
