"""The store against real databases, migrated by Alembic: SQLite always, PostgreSQL when
KINGPOST_TEST_POSTGRES_URL names one (CI starts one; under CI=true it is required)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import inspect, select, text

from helpers.postgres import worker_database
from kingpost.errors import ConflictError, NotFoundError, SecretError, ValidationError
from kingpost.secrets_box import SecretBox, load_or_create_key
from kingpost.store import (
    ApiKeyKind,
    Database,
    DeploymentStatus,
    DesiredState,
    NewDeployment,
    RolloutStatus,
    Store,
    hash_api_key,
)
from kingpost.store.models import Base, Deployment, Secret


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    if request.param == "postgresql":
        with worker_database() as database:
            yield database
        return
    database = Database(f"sqlite:///{tmp_path / 'k.db'}")
    try:
        yield database
    finally:
        database.close()


@pytest.fixture
def store(db: Database, tmp_path: Path) -> Store:
    db.migrate()
    return Store(db, SecretBox(load_or_create_key(tmp_path, None)))


def new(model: str = "m", **kw: object) -> NewDeployment:
    return NewDeployment(model_name=model, project_hash="a" * 64, config={}, engine="process", **kw)  # type: ignore[arg-type]


def test_migration_matches_models(db: Database) -> None:
    db.migrate()
    db.migrate()  # idempotent
    assert db.current_revision() == Database.head_revision()
    insp = inspect(db.engine)
    for table in Base.metadata.sorted_tables:
        cols = {c["name"] for c in insp.get_columns(table.name)}
        assert cols == {c.name for c in table.columns}, table.name


def test_first_deployment_goes_to_production_next_ones_do_not(store: Store) -> None:
    d1 = store.create_deployment(new())
    d2 = store.create_deployment(new())
    assert (d1.name, d1.environments) == ("deployment-1", ("production",))
    assert (d2.name, d2.environments) == ("deployment-2", ())
    assert store.get_model("m").production_deployment_id == d1.id
    d3 = store.create_deployment(new(environment="production"))
    assert store.get_model("m").production_deployment_id == d3.id


def test_a_name_taken_ahead_of_the_numbering_is_skipped(store: Store) -> None:
    """A push named `deployment-3` while the next number was 3 made every later unnamed
    push fail with 409 "choose another with --deployment-name", for good."""
    store.create_deployment(new())
    store.create_deployment(new(name="deployment-3"))
    names = [store.create_deployment(new()).name for _ in range(2)]
    assert names == ["deployment-4", "deployment-5"]
    with pytest.raises(ConflictError, match="'deployment-5' already exists"):
        store.create_deployment(new(name="deployment-5"))


def test_named_deployment_with_labels_and_custom_environment(store: Store) -> None:
    store.create_deployment(new())
    d = store.create_deployment(new(name="blue", labels={"team": "ml"}, environment="staging"))
    assert d.name == "blue" and d.labels == {"team": "ml"} and d.environments == ("staging",)
    assert [e.name for e in store.list_environments("m")] == ["production", "staging"]
    with pytest.raises(ConflictError, match="blue"):
        store.create_deployment(new(name="blue"))


def test_a_name_that_is_another_ones_id_is_refused(store: Store) -> None:
    """References go by id first: a model named like another's id took over that id, so
    deleting it or scoping a key to it by name reached the other model."""
    first = store.create_deployment(new())
    model_id = store.get_model("m").id
    with pytest.raises(ConflictError, match="is the id of another model") as caught:
        store.create_deployment(new(model=model_id))
    assert caught.value.details["field"] == "model_name"
    assert [m.name for m in store.list_models()] == ["m"]
    with pytest.raises(ConflictError, match="is the id of another deployment"):
        store.create_deployment(new(name=first.id))
    second = store.create_deployment(new())
    with pytest.raises(ConflictError, match="is the id of another deployment"):
        store.update_deployment(second.id, "m", name=first.id)
    assert store.get_deployment(second.id).name == "deployment-2"


@pytest.mark.parametrize("name", ["", "-x", "a b", "x" * 80, "a/b"])
def test_bad_deployment_names_are_refused(store: Store, name: str) -> None:
    with pytest.raises(ValidationError, match="deployment name"):
        store.create_deployment(new(name=name))


def test_cannot_delete_promoted_deployment(store: Store) -> None:
    d1 = store.create_deployment(new())
    with pytest.raises(ConflictError, match="production"):
        store.set_desired(d1.id, DesiredState.DELETED)
    d2 = store.create_deployment(new())
    store.promote("m", d2.id, "production")
    store.set_desired(d1.id, DesiredState.DELETED)
    with pytest.raises(NotFoundError):
        store.get_deployment(d1.id)
    assert [d.id for d in store.list_deployments("m")] == [d2.id]


def test_reactivation_resets_failed_status(store: Store) -> None:
    d = store.create_deployment(new())
    assert store.set_status(d.id, DeploymentStatus.FAILED, "boom")
    assert not store.set_status(d.id, DeploymentStatus.FAILED, "boom")
    store.set_desired(d.id, DesiredState.INACTIVE)
    again = store.set_desired(d.id, DesiredState.ACTIVE)
    assert again.status == DeploymentStatus.DEPLOYING and again.message == ""


@pytest.mark.parametrize("name", [".", ".."])
def test_dot_and_dot_dot_are_not_secret_names(store: Store, name: str) -> None:
    """The store took them, though config.yaml refuses them and neither can be a file
    in /secrets: a secret that no deployment can ever use, set without a word."""
    with pytest.raises(ValidationError, match=r"not '\.' or '\.\.' alone") as info:
        store.set_secret(name, "v")
    assert info.value.details == {"field": "secret_name", "value": name}
    assert store.set_secret("..a", "v").name == "..a"


def test_secrets_are_encrypted_at_rest(store: Store, tmp_path: Path) -> None:
    store.set_secret("hf_token", "s3cr3t-value")
    with store.db.session() as s:
        stored = s.scalars(select(Secret.ciphertext)).one()
    assert b"s3cr3t-value" not in stored and store.box.open("hf_token", stored) == "s3cr3t-value"
    if store.db.url.startswith("sqlite"):
        assert b"s3cr3t-value" not in (tmp_path / "k.db").read_bytes()
    assert store.reveal_secrets(["hf_token", "missing"]) == {"hf_token": "s3cr3t-value"}
    assert [s.name for s in store.list_secrets()] == ["hf_token"]
    key_file = tmp_path / "secret.key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    other = Store(store.db, SecretBox(load_or_create_key(tmp_path / "x", None)))
    with pytest.raises(SecretError, match="hf_token"):
        other.reveal_secrets(["hf_token"])
    store.delete_secret("hf_token")
    with pytest.raises(NotFoundError):
        store.delete_secret("hf_token")


def test_api_keys_store_only_hashes(store: Store) -> None:
    view, key = store.create_api_key("admin")
    assert key.startswith("kp_") and store.verify_api_key(key)
    assert not store.verify_api_key(key + "x")
    assert view.prefix == key[:12]  # long enough to name one key among many
    assert (view.kind, view.model_ids) == (ApiKeyKind.ADMIN, ())


def test_invoke_keys_name_existing_models_and_the_last_admin_key_stays(store: Store) -> None:
    a = store.create_deployment(new("a"))
    store.create_deployment(new("b"))
    admin, admin_key = store.create_api_key("admin")
    inv, key = store.create_api_key("ci", ApiKeyKind.INVOKE, ["a", a.model_id])
    assert (inv.kind, inv.model_ids) == (ApiKeyKind.INVOKE, (a.model_id,))
    scopes = store.api_key_scopes()
    assert scopes.admin == {hash_api_key(admin_key)}
    assert scopes.invoke == {hash_api_key(key): frozenset({a.model_id})}
    with pytest.raises(NotFoundError, match="model 'nope' not found"):
        store.create_api_key("x", ApiKeyKind.INVOKE, ["nope"])
    with pytest.raises(ValidationError, match="needs at least one model") as err:
        store.create_api_key("x", ApiKeyKind.INVOKE, [])
    assert err.value.details["field"] == "model_ids"
    with pytest.raises(ValidationError, match="takes none"):
        store.create_api_key("x", ApiKeyKind.ADMIN, ["a"])
    with pytest.raises(ValidationError, match="api_key name '' is not allowed"):
        store.create_api_key("")
    with pytest.raises(ConflictError, match="last admin key"):
        store.revoke_api_key(admin.prefix)
    assert store.revoke_api_key(inv.prefix).prefix == inv.prefix
    assert store.find_api_key(key) is None and store.api_key_scopes().invoke == {}
    with pytest.raises(NotFoundError, match="not found"):
        store.revoke_api_key(inv.prefix)
    other, _ = store.create_api_key("second admin")
    store.revoke_api_key(admin.prefix)  # no longer the last
    assert [k.prefix for k in store.list_api_keys()] == [other.prefix]


def test_timestamps_read_back_in_utc_whatever_the_local_timezone(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The controller compares ``updated_at`` with replicas' start times in epoch seconds;
    a naive value read back from SQLite would count as local time (hours off)."""
    import time

    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        dep = store.create_deployment(new())
        store.set_secret("s", "v")
        again = store.get_deployment(dep.id)
        stamps = [
            again.created_at,
            again.updated_at,
            store.get_model("m").created_at,
            store.list_environments("m")[0].updated_at,
            store.list_secrets()[0].updated_at,
        ]
        for stamp in stamps:
            assert stamp.tzinfo is not None, stamp
            assert abs(stamp.timestamp() - time.time()) < 60, stamp
    finally:
        monkeypatch.undo()
        time.tzset()


@pytest.mark.parametrize("existing", [False, True], ids=["new-model", "existing-model"])
def test_concurrent_pushes_each_get_a_deployment(store: Store, existing: bool) -> None:
    """Two CLIs pushing at once: each gets the next number, none an IntegrityError (a 500
    at the API) or a conflict over a name it did not choose."""
    import threading

    if existing:
        store.create_deployment(new())
    pushes = 4
    barrier = threading.Barrier(pushes)
    names: list[str] = []
    errors: list[Exception] = []

    def push() -> None:
        barrier.wait()
        try:
            names.append(store.create_deployment(new()).name)
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=push) for _ in range(pushes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    first = 2 if existing else 1
    assert sorted(names) == [f"deployment-{n}" for n in range(first, first + pushes)]
    assert len(store.list_models()) == 1
    assert len(store.list_deployments("m")) == pushes + existing


def test_promoting_and_deleting_one_deployment_at_once_leave_no_dangling_environment(
    store: Store,
) -> None:
    """On PostgreSQL (read committed) a delete that ran while a promotion of the same
    deployment was not yet committed saw no environment on it, and both went through:
    production then routed to a deleted deployment."""
    import threading

    from sqlalchemy import event
    from sqlalchemy.orm import Session

    store.create_deployment(new())
    second = store.create_deployment(new())
    promoting = threading.local()
    flushed = threading.Event()

    def slow_commit(session: Session) -> None:
        if getattr(promoting, "on", False):
            flushed.set()  # the promotion is written, not committed
            threading.Event().wait(0.5)

    outcome: dict[str, object] = {}

    def promote() -> None:
        promoting.on = True
        outcome["promote"] = store.promote("m", second.id, "production")

    def delete() -> None:
        flushed.wait(10)
        try:
            outcome["delete"] = store.set_desired(second.id, DesiredState.DELETED)
        except ConflictError as exc:
            outcome["delete"] = exc

    event.listen(Session, "before_commit", slow_commit)
    try:
        threads = [threading.Thread(target=promote), threading.Thread(target=delete)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
    finally:
        event.remove(Session, "before_commit", slow_commit)
    assert isinstance(outcome["delete"], ConflictError), outcome
    production = [e for e in store.list_environments("m") if e.name == "production"]
    assert production[0].deployment_id == second.id
    assert store.get_deployment(second.id).desired_state == DesiredState.ACTIVE


@pytest.mark.parametrize("db", ["postgresql"], indirect=True)  # SQLite: one writer at a time
@pytest.mark.parametrize("second", ["promote", "create_environment"])
def test_a_new_environment_made_while_a_push_creates_it_too_does_not_deadlock(
    store: Store, db: Database, second: str
) -> None:
    """On PostgreSQL a push holds its model's row (``FOR UPDATE``) while it points an
    environment at the new deployment. A promotion to (or creation of) that environment,
    not there yet, inserted it first and then waited for the model's row (the foreign key
    check) while the push waited for the inserted environment: a deadlock, and one of
    them failed with an internal error."""
    import threading

    from sqlalchemy import event

    first = store.create_deployment(new())
    pusher: dict[str, object] = {}
    holding, go = threading.Event(), threading.Event()

    def pause_after_model_lock(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        if threading.current_thread() is pusher.get("thread") and "FOR UPDATE" in statement:
            pusher["pid"] = cursor.connection.info.backend_pid
            holding.set()
            go.wait(10)

    outcome: dict[str, object] = {}

    def run(name: str, call: Callable[[], object]) -> None:
        try:
            outcome[name] = call()
        except Exception as exc:
            outcome[name] = exc

    def waits_on_the_push() -> bool:
        with db.engine.connect() as conn:
            blocked = conn.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE :pid = ANY(pg_blocking_pids(pid))"
                ),
                {"pid": pusher["pid"]},
            ).scalar()
        return bool(blocked)

    if second == "promote":
        other: Callable[[], object] = lambda: store.promote("m", first.id, "staging")  # noqa: E731
    else:
        other = lambda: store.create_environment("m", "staging")  # noqa: E731
    event.listen(db.engine, "after_cursor_execute", pause_after_model_lock)
    try:
        push = threading.Thread(
            target=run, args=("push", lambda: store.create_deployment(new(environment="staging")))
        )
        pusher["thread"] = push
        push.start()
        assert holding.wait(10)
        racer = threading.Thread(target=run, args=("other", other))
        racer.start()
        pause = threading.Event()
        for _ in range(100):  # until the racer waits on the push (then it has its turn)
            if waits_on_the_push():
                break
            pause.wait(0.1)
        go.set()
        push.join(20)
        racer.join(20)
    finally:
        go.set()
        event.remove(db.engine, "after_cursor_execute", pause_after_model_lock)
    errors = {k: v for k, v in outcome.items() if isinstance(v, Exception)}
    if second == "promote":
        assert errors == {}, errors
        staging = [e for e in store.list_environments("m") if e.name == "staging"]
        assert staging[0].deployment_id == first.id  # the promotion came last
    else:  # the push made it: the creation says the environment exists
        assert set(errors) == {"other"} and isinstance(errors["other"], ConflictError), errors


def test_deleting_a_model_removes_its_deployments_and_environments_and_frees_its_name(
    store: Store,
) -> None:
    """A model's production deployment could not be deleted, nor the model: it stayed."""
    first = store.create_deployment(new())
    store.create_deployment(new(environment="staging"))
    store.create_deployment(new("other"))
    store.set_desired(store.create_deployment(new()).id, DesiredState.DELETED)
    gone = store.delete_model("m")
    assert (gone.name, gone.id) == ("m", first.model_id)
    assert [m.name for m in store.list_models()] == ["other"]
    left = store.list_deployments(include_deleted=True)
    assert [d.model_id for d in left] == [store.get_model("other").id]
    with pytest.raises(NotFoundError):
        store.list_environments("m")
    with pytest.raises(NotFoundError):
        store.get_deployment(first.id)
    again = store.create_deployment(new())  # a new model under the old name
    assert again.model_id != first.model_id and again.name == "deployment-1"
    assert again.environments == ("production",)


def test_keys_made_before_scopes_stay_admin_keys(db: Database, tmp_path: Path) -> None:
    """Migration 0002 adds the kind of a key: every key before it could do everything."""
    from alembic import command

    from kingpost.store.db import _alembic_config

    cfg = _alembic_config(db.url)
    with db.engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0001")
        conn.execute(
            text(
                "INSERT INTO api_keys (id, name, key_hash, prefix, created_at) "
                "VALUES ('k1', 'admin', :h, 'kp_old12', '2026-01-01 00:00:00')"
            ),
            {"h": hash_api_key("kp_old12345")},
        )
    db.migrate()
    store = Store(db, SecretBox(load_or_create_key(tmp_path, None)))
    found = store.find_api_key("kp_old12345")
    assert found is not None and (found.kind, found.model_ids) == (ApiKeyKind.ADMIN, ())
    assert store.api_key_scopes().admin == {hash_api_key("kp_old12345")}


def test_reactivating_after_a_failure_or_a_stop_is_a_new_activation(store: Store) -> None:
    """Replicas carry the activation they were started for; the controller replaces the
    failed ones of an earlier activation instead of reporting them."""
    dep = store.create_deployment(new()).id
    assert store.get_deployment(dep).activation == 1
    store.set_desired(dep, DesiredState.ACTIVE)  # already active: the same activation
    assert store.get_deployment(dep).activation == 1
    store.set_status(dep, DeploymentStatus.FAILED, "boom")
    store.set_desired(dep, DesiredState.ACTIVE)
    view = store.get_deployment(dep)
    assert (view.activation, view.status) == (2, DeploymentStatus.DEPLOYING)
    store.set_desired(dep, DesiredState.INACTIVE)
    store.set_status(dep, DeploymentStatus.INACTIVE)
    store.set_desired(dep, DesiredState.ACTIVE)
    assert store.get_deployment(dep).activation == 3


def test_a_status_decided_before_a_reactivation_is_not_written(store: Store) -> None:
    """A pass decided FAILED from activation 2; the user re-activated meanwhile (3): the
    pass's FAILED must not overwrite the DEPLOYING that re-activation set."""
    dep = store.create_deployment(new()).id
    store.set_status(dep, DeploymentStatus.FAILED, "boom")
    store.set_desired(dep, DesiredState.ACTIVE)  # activation 2
    seen = (2, DesiredState.ACTIVE)
    store.set_status(dep, DeploymentStatus.FAILED, "weights gave up", seen=seen)
    store.set_desired(dep, DesiredState.ACTIVE)  # the user again: activation 3, DEPLOYING
    assert not store.set_status(dep, DeploymentStatus.FAILED, "weights gave up", seen=seen)
    view = store.get_deployment(dep)
    assert (view.status, view.activation) == (DeploymentStatus.DEPLOYING, 3)
    store.set_desired(dep, DesiredState.INACTIVE)
    assert not store.set_status(dep, DeploymentStatus.ACTIVE, seen=(3, DesiredState.ACTIVE))
    assert store.set_status(dep, DeploymentStatus.INACTIVE, seen=(3, DesiredState.INACTIVE))


def test_development_deployment_is_one_per_model_and_never_in_an_environment(
    store: Store,
) -> None:
    dev = store.create_deployment(new(development=True))
    assert (dev.name, dev.is_development, dev.environments) == ("development", True, ())
    assert dev.number == 0
    # Pushed again: the same deployment, with the new project and a new activation.
    again = store.create_deployment(
        NewDeployment(
            model_name="m",
            project_hash="b" * 64,
            config={"x": 1},
            engine="process",
            development=True,
        )
    )
    assert (again.id, again.project_hash, again.activation) == (
        dev.id,
        "b" * 64,
        dev.activation + 1,
    )
    assert [d.id for d in store.list_deployments("m")] == [dev.id]
    # Numbered deployments still start at 1, and none may take its name.
    assert store.create_deployment(new()).name == "deployment-1"
    with pytest.raises(ValidationError, match="reserved for the development deployment"):
        store.create_deployment(new(name="development"))
    with pytest.raises(ValidationError, match="in no environment"):
        store.create_deployment(new(development=True, environment="production"))
    with pytest.raises(ConflictError, match="cannot be in an environment"):
        store.promote("m", "development", "production")
    moved = store.set_development_project(dev.id, "c" * 64, {"y": 2}, again.activation + 1)
    assert (moved.project_hash, moved.config, moved.activation) == (
        "c" * 64, {"y": 2}, again.activation + 1,
    )  # fmt: skip


def test_a_deleted_development_deployment_makes_way_for_a_new_one(store: Store) -> None:
    dev = store.create_deployment(new(development=True))
    store.set_desired(dev.id, DesiredState.DELETED, "m")
    again = store.create_deployment(new(development=True))
    assert again.id != dev.id and again.name == "development"
    assert store.get_deployment("development", "m").id == again.id


def _rolling_out(store: Store) -> tuple[str, str]:
    """A running rollout into production: (previous, candidate)."""
    first = store.create_deployment(new())
    store.set_status(first.id, DeploymentStatus.ACTIVE)
    second = store.create_deployment(new())
    store.promote("m", second.id, "production")
    rollout = store.latest_rollout("m", "production")
    assert rollout is not None and rollout.status == RolloutStatus.IN_PROGRESS
    return first.id, second.id


def test_the_candidate_of_a_running_rollout_cannot_be_deleted(store: Store) -> None:
    """The delete went through, and the rollout's SUCCEEDED (decided from a snapshot
    taken before it) then pointed production at a deleted deployment."""
    first, second = _rolling_out(store)
    with pytest.raises(ConflictError) as refused:
        store.set_desired(second, DesiredState.DELETED, "m")
    assert "candidate of the promotion into 'production'" in str(refused.value)
    assert "kingpost rollouts cancel m --environment production" in str(refused.value)
    assert "cancel_promotion" in str(refused.value)
    assert store.get_deployment(second).desired_state == DesiredState.ACTIVE
    # Once the promotion is canceled and has ended, the candidate can go.
    store.control_rollout("m", "production", "cancel")
    with pytest.raises(ConflictError, match="once the rollout has ended"):
        store.set_desired(second, DesiredState.DELETED, "m")
    (rollout,) = store.running_rollouts()
    ended = {"status": RolloutStatus.CANCELED, "phase": "DONE"}
    assert store.record_rollout(rollout.id, ended, seen=("IN_PROGRESS", "cancel"))
    store.set_desired(second, DesiredState.DELETED, "m")
    assert [e.deployment_id for e in store.list_environments("m")] == [first]


@pytest.mark.parametrize("how", ["deactivated", "deleted"])
def test_a_rollout_whose_candidate_went_since_the_snapshot_fails_instead_of_succeeding(
    store: Store, db: Database, how: str
) -> None:
    """The terminal write moved the environment to the candidate without looking at it: a
    candidate deactivated (or deleted) after the controller's snapshot became what the
    environment served. ``deleted``: a row as a delete that committed before the guard
    against it leaves it (the guard itself refuses it while the rollout runs)."""
    first, second = _rolling_out(store)
    if how == "deactivated":  # allowed while the rollout runs: it fails the rollout
        store.set_desired(second, DesiredState.INACTIVE, "m")
    else:
        with db.session() as s:
            row = s.get(Deployment, second)
            assert row is not None
            row.desired_state = DesiredState.DELETED
    (rollout,) = store.running_rollouts()
    done = {"status": RolloutStatus.SUCCEEDED, "phase": "DONE", "candidate_traffic_percent": 100.0}
    written = store.record_rollout(rollout.id, done, seen=("IN_PROGRESS", None))
    assert written is not None and written.status == RolloutStatus.FAILED
    assert "deactivated or deleted" in written.message
    assert (written.candidate_traffic_percent, written.candidate_replicas) == (0.0, 0)
    assert [e.deployment_id for e in store.list_environments("m")] == [first]
    assert store.latest_rollout("m", "production") == written


@pytest.mark.parametrize(
    ("rolling", "scale_down", "previous_after"),
    [
        (False, None, DesiredState.ACTIVE),  # Kingpost's default: all at once keeps it
        (True, None, DesiredState.INACTIVE),  # and a rolling promotion scales it down
        (False, True, DesiredState.INACTIVE),  # Baseten's scale_down_previous_*
        (True, False, DesiredState.ACTIVE),
    ],
)
def test_a_promotion_scales_the_previous_deployment_down_when_asked(
    store: Store, rolling: bool, scale_down: bool | None, previous_after: DesiredState
) -> None:
    first = store.create_deployment(new())
    store.set_status(first.id, DeploymentStatus.ACTIVE)
    if rolling:
        settings = {"rolling_deploy": True, "rolling_deploy_config": {"max_surge_percent": 50}}
        store.set_promotion_settings("m", "production", settings)
    second = store.create_deployment(new())
    store.promote("m", second.id, "production", scale_down)
    (rollout,) = store.running_rollouts()
    done = {"status": RolloutStatus.SUCCEEDED, "phase": "DONE", "candidate_traffic_percent": 100.0}
    written = store.record_rollout(rollout.id, done, seen=("IN_PROGRESS", None))
    assert written is not None and written.status == RolloutStatus.SUCCEEDED
    assert store.get_model("m").production_deployment_id == second.id
    assert store.get_deployment(first.id).desired_state == previous_after


def test_a_promotion_that_points_at_once_scales_the_previous_one_down_when_asked(
    store: Store,
) -> None:
    """Nothing served (the previous deployment still starting): no rollout, the
    environment moves at once, and the one it left goes with it when asked."""
    first = store.create_deployment(new())
    second = store.create_deployment(new())
    store.promote("m", second.id, "production")
    assert store.get_deployment(first.id).desired_state == DesiredState.ACTIVE
    third = store.create_deployment(new())
    store.promote("m", third.id, "production", scale_down_previous=True)
    assert store.running_rollouts() == []
    assert store.get_deployment(second.id).desired_state == DesiredState.INACTIVE
    store.create_deployment(new(name="blue", environment="staging"))
    store.promote("m", "blue", "production", scale_down_previous=True)  # blue stays in staging
    assert store.get_deployment(third.id).desired_state == DesiredState.INACTIVE
    blue = store.get_deployment("blue", "m")
    assert blue.desired_state == DesiredState.ACTIVE and blue.environments == (
        "production",
        "staging",
    )
