"""The log store on real files: records, queries, the bound, and the collector."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from kingpost.errors import ValidationError
from kingpost.logstore import (
    Collector,
    LogQuery,
    LogSettings,
    SegmentWriter,
    parse_level,
    parse_time,
    position,
    prune,
    query,
    replica_record,
    store_bytes,
)


def _rec(ts: float, **kw: object) -> dict[str, object]:
    base: dict[str, object] = {"ts": ts, "level": "INFO", "source": "replica", "message": "m"}
    return base | kw


def test_the_model_servers_json_lines_keep_time_level_and_request_id() -> None:
    line = json.dumps(
        {
            "ts": "2026-12-05T01:00:00.250Z",
            "level": "WARNING",
            "logger": "model",
            "message": "slow",
            "request_id": "r-1",
            "traceback": "Traceback...\nValueError: x",
        }
    )
    rec = replica_record(line, "replica", 99.0, "d1-abcde", "d1")
    assert rec["ts"] == pytest.approx(1796432400.25)
    assert (rec["level"], rec["request_id"]) == ("WARNING", "r-1")
    assert rec["message"] == "slow\nTraceback...\nValueError: x"
    plain = replica_record("2026 ERROR boom", "replica", 99.0, "d1-abcde", "d1")
    assert (plain["level"], plain["ts"], plain["message"]) == ("ERROR", 99.0, "2026 ERROR boom")
    assert replica_record("[warn] careful", "replica", 1, None, "d1")["level"] == "INFO"
    assert replica_record("WARN careful", "replica", 1, None, "d1")["level"] == "WARNING"
    assert replica_record("no level here", "replica", 1, None, "d1")["level"] == "INFO"
    assert replica_record("{not json}", "replica", 1, None, "d1")["message"] == "{not json}"


def test_bad_values_name_field_rule_and_value() -> None:
    with pytest.raises(ValidationError, match=r"since: must be a duration ago.*'yesterday'"):
        parse_time("yesterday", "since")
    with pytest.raises(ValidationError, match=r"level: must be one of debug, .*'loud'"):
        parse_level("loud")
    with pytest.raises(ValidationError, match=r"limit: must be between 1 and 10000; got 0"):
        LogQuery(limit=0)
    with pytest.raises(ValidationError, match="since: must not be after until"):
        LogQuery(since=10, until=5)
    assert parse_time("10m", "since", now=1000.0) == 400.0
    assert parse_time("2026-12-05T01:00:00Z", "until") == 1796432400.0
    assert parse_time("1796432400.5", "until") == 1796432400.5
    assert parse_level("warn") == "WARNING"


def test_filters_combine_and_a_request_id_finds_its_lines(tmp_path: Path) -> None:
    w = SegmentWriter(tmp_path, "t", 1 << 20)
    w.write(
        [
            _rec(1, source="gateway", request_id="r1", model_id="m1", deployment_id="d1",
                 replica="d1-a", status=200, route="/predict"),
            _rec(2, request_id="r1", model_id="m1", deployment_id="d1", replica="d1-a",
                 message="loading"),
            _rec(3, model_id="m1", deployment_id="d1", replica="d1-a", message="handling r1 now"),
            _rec(4, request_id="r2", model_id="m1", deployment_id="d1", replica="d1-b",
                 level="ERROR", message="boom"),
            _rec(5, source="build", model_id="m1", deployment_id="d2", message="pip install"),
            _rec(6, request_id="r10", model_id="m2", deployment_id="d3", message="other r1x"),
            _rec(7, source="gateway", request_id="r3", model_id="m1", deployment_id="d1",
                 message="POST /x handling r1", level="WARNING"),
        ]
    )  # fmt: skip
    w.close()

    def ts(**kw: object) -> list[float]:
        return [r["ts"] for r in query(tmp_path, LogQuery(**kw))]  # type: ignore[arg-type]

    # the gateway's line, the replica's JSON line, and a custom server's own words; not
    # r10's lines, nor a gateway line that merely mentions it
    assert ts(request_id="r1") == [1, 2, 3]
    assert ts(model_id="m1", level="WARNING") == [4, 7]
    assert ts(deployment_ids=frozenset({"d1"}), replica="d1-a", since=2, until=3) == [2, 3]
    assert ts(search="PIP") == [5]
    assert ts(source="gateway") == [1, 7]
    assert ts(deployment_ids=frozenset()) == []
    assert ts(model_id="m1", request_id="r2", level="ERROR") == [4]
    assert ts(limit=2) == [6, 7]  # the newest, oldest first
    cursors = [r["cursor"] for r in query(tmp_path, LogQuery())]
    assert len(set(cursors)) == 7


def test_pages_oldest_first_after_a_cursor_cover_every_line_once(tmp_path: Path) -> None:
    """``kingpost logs --follow`` pages through lines this way: ties in time (a batch of
    replica output read at once shares one) are ordered by segment and line, so a page
    ends exactly where the next begins, across writers."""
    a, b = SegmentWriter(tmp_path, "a", 1 << 20), SegmentWriter(tmp_path, "b", 1 << 20)
    a.write([_rec(1, message=f"a{i}") for i in range(5)] + [_rec(3, message="a5")])
    b.write([_rec(1, message=f"b{i}") for i in range(3)] + [_rec(2, message="b3")])
    a.close()
    b.close()
    everything = [r["message"] for r in query(tmp_path, LogQuery())]
    assert len(everything) == 10 and everything[-2:] == ["b3", "a5"]
    assert [r["message"] for r in query(tmp_path, LogQuery(limit=3))] == ["b2", "b3", "a5"]
    pages, after = [], None
    while True:
        page = query(tmp_path, LogQuery(limit=3, oldest_first=True, after=after))
        pages.append([r["message"] for r in page])
        if len(page) < 3:
            break
        after = position(tmp_path, page[-1]["cursor"])
    assert [m for p in pages for m in p] == everything and len(pages) == 4
    # With since: from there on, the oldest first.
    page = query(tmp_path, LogQuery(since=2, limit=1, oldest_first=True))
    assert [r["message"] for r in page] == ["b3"]
    for bad in ("nope.1.jsonl:0", "../x:1", page[0]["cursor"].replace(":", ":9")):
        with pytest.raises(ValidationError, match=r"after: must be the cursor of a line"):
            position(tmp_path, bad)


def test_the_bound_by_size_and_age_is_enforced(tmp_path: Path) -> None:
    line = {"message": "x" * 200}
    w = SegmentWriter(tmp_path, "w", 8192)
    for i in range(2000):  # ~450 KB through 8 KB segments
        w.write([_rec(float(i), **line)])
    assert store_bytes(tmp_path) > 400_000
    removed = prune(tmp_path, 64 * 1024, 3600)
    assert removed and store_bytes(tmp_path) <= 64 * 1024
    kept = query(tmp_path, LogQuery(limit=10_000))
    assert kept[-1]["ts"] == 1999.0  # the newest lines stay, the oldest went
    assert kept[0]["ts"] > 1000
    # Age: everything not written in the last hour goes, the open segment too; the writer
    # starts a new one when it writes again.
    old = time.time() - 7200
    for p in tmp_path.iterdir():
        os.utime(p, (old, old))
    prune(tmp_path, 1 << 30, 3600)
    assert store_bytes(tmp_path) == 0
    w.write([_rec(5000.0)])
    assert [r["ts"] for r in query(tmp_path, LogQuery())] == [5000.0]


def _collector(root: Path, replicas: Path, builds: Path) -> Collector:
    settings = LogSettings(root, 1 << 20, 3600)
    return Collector(settings, replicas, builds, model_of=lambda dep: f"model-of-{dep}")


def test_the_collector_stores_output_once_across_restarts(tmp_path: Path) -> None:
    root, replicas, builds = tmp_path / "logs", tmp_path / "replicas", tmp_path / "builds"
    (replicas / "dep1-abcde").mkdir(parents=True)
    builds.mkdir()
    out = replicas / "dep1-abcde" / "output.log"
    json_line = json.dumps(
        {"ts": "2026-12-05T01:00:00.000Z", "level": "INFO", "message": "hi", "request_id": "q"}
    )
    out.write_text(f"{json_line}\nplain ERROR line\npartial")
    (builds / "build-dep1.log").write_text("installing\n")
    c = _collector(root, replicas, builds)
    assert c.collect_once() == 3
    assert c.collect_once() == 0
    got = query(root, LogQuery())
    assert sorted((r["source"], r["level"], r["message"]) for r in got) == [
        ("build", "INFO", "installing"),
        ("replica", "ERROR", "plain ERROR line"),
        ("replica", "INFO", "hi"),
    ]
    assert {r["model_id"] for r in got} == {"model-of-dep1"}
    assert {r["replica"] for r in got if r["source"] == "replica"} == {"dep1-abcde"}
    # A new collector (a restarted control plane) goes on where the last one stopped.
    with out.open("a") as f:
        f.write(" done\nnext\n")
    c2 = _collector(root, replicas, builds)
    assert c2.collect_once() == 2
    assert [r["message"] for r in query(root, LogQuery(search="done"))] == ["partial done"]
    # The build log replaced by its tail, and a new build's line after it: only that line.
    tmp = builds / "build-dep1.tmp"
    tmp.write_text("installing\nsecond build\n")
    tmp.replace(builds / "build-dep1.log")
    assert c2.collect_once() == 1
    # A new file of the name, with none of what was read: from its start.
    os.unlink(out)
    out.write_text("fresh\n")
    assert c2.collect_once() == 1
    messages = [r["message"] for r in query(root, LogQuery())]
    assert sorted(messages) == sorted(
        ["hi", "plain ERROR line", "installing", "partial done", "next", "second build", "fresh"]
    )
