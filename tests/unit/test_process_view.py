"""What an isolated process-engine replica sees: ``plan_view`` and ``replica_uid``."""

from __future__ import annotations

from pathlib import Path

from kingpost.engines._view import UID_BASE, UID_SPAN, plan_view, replica_uid


def tree(root: Path, *dirs: str) -> None:
    for d in dirs:
        (root / d).mkdir(parents=True, exist_ok=True)


def test_the_home_is_hidden_and_only_the_replicas_own_tree_comes_back(tmp_path: Path) -> None:
    tree(tmp_path, "home/replicas/d1-a/app", "home/replicas/d2-a", "home/envs/h1/bin", "venv")
    home = tmp_path / "home"
    view = plan_view(
        home,
        home / "replicas/d1-a",
        [home / "envs/h1", tmp_path / "venv"],
        [],
        may_enter=lambda p: True,
    )
    assert view.masks == (str(home),)
    # The venv outside the home needs nothing: it is visible as it is.
    assert set(view.keep) == {(str(home / "envs/h1"), False), (str(home / "replicas/d1-a"), True)}


def test_a_closed_parent_is_masked_and_an_install_kept_whole(tmp_path: Path) -> None:
    root = tmp_path / "root"
    tree(root, ".kingpost/replicas/d1-a", ".pyenv/versions/3.11/bin", ".pyenv/shims", ".ssh")
    home = root / ".kingpost"
    view = plan_view(
        home,
        home / "replicas/d1-a",
        [root / ".pyenv/shims", tmp_path / "missing"],
        [root / ".pyenv/versions/3.11"],
        may_enter=lambda p: p != root,  # like /root, 0700
    )
    # /root is one empty tmpfs (its .ssh gone, the home inside it too): the pyenv
    # tree, which shims need whole, and the replica's own tree come back.
    assert view.masks == (str(root),)
    assert view.keep == ((str(root / ".pyenv"), False), (str(home / "replicas/d1-a"), True))


def test_an_install_that_holds_the_home_is_kept_exactly(tmp_path: Path) -> None:
    top = tmp_path / "top"
    tree(top, "x/home/replicas/r", "x/python")
    home = top / "x/home"
    view = plan_view(
        home, home / "replicas/r", [], [top / "x/python"], may_enter=lambda p: p != top
    )
    assert view.masks == (str(top),)
    assert (str(top / "x"), False) not in view.keep
    assert (str(top / "x/python"), False) in view.keep


def test_a_derived_uid_is_stable_per_deployment_and_in_range() -> None:
    uids = {replica_uid(f"dep{i}") for i in range(200)}
    assert len(uids) == 200
    assert all(UID_BASE <= u < UID_BASE + UID_SPAN for u in uids)
    assert replica_uid("dep1") == replica_uid("dep1")
