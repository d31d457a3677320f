"""Table-driven tests of the pure reconcile decision."""

from __future__ import annotations

import pytest

from kingpost.controller.plan import Want, plan
from kingpost.engines.base import Endpoint, ReplicaPhase, ReplicaStatus
from kingpost.store.models import DeploymentStatus

P = ReplicaPhase
S = DeploymentStatus


def rep(
    rid: str, phase: ReplicaPhase, started: float = 10.0, message: str = "", generation: int = 1
) -> ReplicaStatus:
    return ReplicaStatus(
        rid, "d1", phase, Endpoint("127.0.0.1", 1), 0, message, started, generation
    )


CASES = [
    # (name, want, replicas, start, stop, status, message, ready ids)
    ("fresh deployment starts one", Want(True, 1, generation=1), [], 1, (), S.DEPLOYING, "", ()),
    ("fresh deployment starts two", Want(True, 2), [], 2, (), S.DEPLOYING, "", ()),
    ("starting replica counts", Want(True, 1), [rep("a", P.STARTING)], 0, (), S.DEPLOYING, "", ()),
    ("ready replica is active", Want(True, 1), [rep("a", P.READY)], 0, (), S.ACTIVE, "", ("a",)),
    (
        "one of two ready is active, no new start",
        Want(True, 2),
        [rep("a", P.READY), rep("b", P.STARTING)],
        0,
        (),
        S.ACTIVE,
        "",
        ("a",),
    ),
    (
        "not-ready replica gets no traffic and is not replaced",
        Want(True, 1, was_active=True),
        [rep("a", P.NOT_READY)],
        0,
        (),
        S.UNHEALTHY,
        "no replica is ready",
        (),
    ),
    (
        "restarting replica is not replaced",
        Want(True, 1),
        [rep("a", P.RESTARTING)],
        0,
        (),
        S.DEPLOYING,
        "",
        (),
    ),
    (
        "failed replica makes the deployment failed, not retried",
        Want(True, 1),
        [rep("a", P.FAILED, message="boom")],
        0,
        (),
        S.FAILED,
        "boom",
        (),
    ),
    (
        "build failure is reported as BUILD_FAILED, without the prefix",
        Want(True, 1),
        [rep("a", P.FAILED, message="BUILD_FAILED: step 2 exited 1")],
        0,
        (),
        S.BUILD_FAILED,
        "step 2 exited 1",
        (),
    ),
    (
        "a failed replica beside a live one is not a failed deployment",
        Want(True, 2),
        [rep("a", P.FAILED, message="boom"), rep("b", P.STARTING)],
        0,
        (),
        S.DEPLOYING,
        "",
        (),
    ),
    (
        "failure of an earlier activation is replaced",
        Want(True, 1, generation=2),
        [rep("a", P.FAILED, message="boom", generation=1)],
        1,
        ("a",),
        S.DEPLOYING,
        "",
        (),
    ),
    (
        "failure of this activation is reported, not replaced",
        Want(True, 1, generation=2),
        [rep("a", P.FAILED, started=99.0, message="boom", generation=2)],
        0,
        (),
        S.FAILED,
        "boom",
        (),
    ),
    (
        "live replicas of an earlier activation keep serving",
        Want(True, 1, generation=3),
        [rep("a", P.READY, generation=1)],
        0,
        (),
        S.ACTIVE,
        "",
        ("a",),
    ),
    (
        "scale down stops not-ready before ready",
        Want(True, 1),
        [rep("a", P.READY, 1.0), rep("b", P.STARTING, 2.0)],
        0,
        ("b",),
        S.ACTIVE,
        "",
        ("a",),
    ),
    (
        "scale down stops the oldest ready first",
        Want(True, 1),
        [rep("a", P.READY, 1.0), rep("b", P.READY, 2.0)],
        0,
        ("a",),
        S.ACTIVE,
        "",
        ("b",),
    ),
    (
        "scale down from three to two starts nothing",
        Want(True, 2),
        [rep("a", P.READY, 1.0), rep("b", P.READY, 2.0), rep("c", P.READY, 3.0)],
        0,
        ("a",),
        S.ACTIVE,
        "",
        ("b", "c"),
    ),
    (
        "scale to zero stops the last replica and says so",
        Want(True, 0, was_active=True),
        [rep("a", P.READY)],
        0,
        ("a",),
        S.SCALED_TO_ZERO,
        "",
        (),
    ),
    (
        "inactive stops everything",
        Want(False, 1),
        [rep("a", P.READY), rep("b", P.FAILED)],
        0,
        ("a", "b"),
        None,
        "",
        (),
    ),
    (
        "stopped replicas are ignored",
        Want(True, 1),
        [rep("a", P.STOPPED)],
        1,
        (),
        S.DEPLOYING,
        "",
        (),
    ),
    ("zero replicas is scaled to zero", Want(True, 0), [], 0, (), S.SCALED_TO_ZERO, "", ()),
    (
        "a swap starts a new-generation replica; the old one serves meanwhile",
        Want(True, 1, generation=2, replace_older=True),
        [rep("old", P.READY, generation=1)],
        1,
        (),
        S.DEPLOYING,
        "replacing the running replica, which serves until the new one is ready",
        ("old",),
    ),
    (
        "a swap stops the old replica once the new one is ready",
        Want(True, 1, generation=2, replace_older=True),
        [rep("old", P.READY, generation=1), rep("new", P.READY, generation=2)],
        0,
        ("old",),
        S.DEPLOYING,
        "replacing the running replica, which serves until the new one is ready",
        ("new",),
    ),
    (
        "a swap keeps routing the old replica until the new one is in the table",
        Want(True, 1, generation=2, replace_older=True, routed=frozenset({"old"})),
        [rep("old", P.READY, generation=1), rep("new", P.READY, generation=2)],
        0,
        (),
        S.DEPLOYING,
        "replacing the running replica, which serves until the new one is ready",
        ("new", "old"),
    ),
    (
        "a swap takes the old replica out of the table before stopping it",
        Want(True, 1, generation=2, replace_older=True, routed=frozenset({"old", "new"})),
        [rep("old", P.READY, generation=1), rep("new", P.READY, generation=2)],
        0,
        (),
        S.DEPLOYING,
        "replacing the running replica, which serves until the new one is ready",
        ("new",),
    ),
    (
        "a swap stops the old replica once the table no longer routes to it",
        Want(True, 1, generation=2, replace_older=True, routed=frozenset({"new"})),
        [rep("old", P.READY, generation=1), rep("new", P.READY, generation=2)],
        0,
        ("old",),
        S.DEPLOYING,
        "replacing the running replica, which serves until the new one is ready",
        ("new",),
    ),
    (
        "once the old replica is gone the swapped deployment is active",
        Want(True, 1, generation=2, replace_older=True, routed=frozenset({"new"})),
        [rep("new", P.READY, generation=2)],
        0,
        (),
        S.ACTIVE,
        "",
        ("new",),
    ),
    (
        "a swap whose new replica failed keeps the old one serving",
        Want(True, 1, generation=2, replace_older=True),
        [rep("old", P.READY, generation=1), rep("new", P.FAILED, generation=2, message="boom")],
        0,
        (),
        S.FAILED,
        "boom",
        ("old",),
    ),
    (
        "without replace_older an older live replica stays",
        Want(True, 1, generation=2),
        [rep("old", P.READY, generation=1)],
        0,
        (),
        S.ACTIVE,
        "",
        ("old",),
    ),
]


@pytest.mark.parametrize(
    ("want", "replicas", "start", "stop", "status", "message", "ready"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_plan(
    want: Want,
    replicas: list[ReplicaStatus],
    start: int,
    stop: tuple[str, ...],
    status: DeploymentStatus | None,
    message: str,
    ready: tuple[str, ...],
) -> None:
    p = plan(want, replicas)
    assert p.start == start
    assert p.stop == stop
    assert p.status == status
    assert p.message == message
    assert tuple(r.replica_id for r in p.ready) == ready


def test_failure_message_is_kept() -> None:
    p = plan(Want(True, 1), [rep("a", P.FAILED, message="Traceback: boom")])
    assert p.message == "Traceback: boom"
