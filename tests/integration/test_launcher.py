"""The replica launcher (engines/_launcher.py): a real launcher process forking real children,
with the process engine's isolation (a session, a network namespace) where this machine
allows it."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers.platform import wait_for
from kingpost.engines._isolation import Isolation
from kingpost.engines._launcher import LaunchedProcess, Launcher
from kingpost.netns import can_unshare_net

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the launcher is Linux only")

PLAIN = Isolation(netns=False)


@pytest.fixture
def launcher() -> Iterator[Launcher]:
    lau = Launcher()
    try:
        yield lau
    finally:
        lau.close()


def spawn(
    lau: Launcher, tmp_path: Path, *argv: str, isolation: Isolation = PLAIN
) -> LaunchedProcess:
    with (tmp_path / "out.log").open("ab") as out:
        return lau.spawn(
            list(argv),
            cwd=str(tmp_path),
            env={"PATH": os.defpath, "WHO": "replica"},
            output=out.fileno(),
            isolation=isolation,
        )


def test_a_child_runs_with_its_env_cwd_and_output_and_its_exit_status_comes_back(
    launcher: Launcher, tmp_path: Path
) -> None:
    child = spawn(launcher, tmp_path, "sh", "-c", 'echo "$WHO in $(pwd)"; echo err >&2; exit 3')
    assert child.wait(timeout=10) == 3
    assert (tmp_path / "out.log").read_text() == f"replica in {tmp_path}\nerr\n"
    assert child.poll() == 3


def test_a_signal_reads_as_minus_the_signal_and_the_child_leads_its_own_session(
    launcher: Launcher, tmp_path: Path
) -> None:
    child = spawn(launcher, tmp_path, "sleep", "30")
    assert child.poll() is None
    assert os.getsid(child.pid) == child.pid and os.getpgid(child.pid) == child.pid
    with pytest.raises(subprocess.TimeoutExpired):
        child.wait(timeout=0.2)
    os.killpg(child.pid, signal.SIGKILL)
    assert child.wait(timeout=10) == -signal.SIGKILL


def test_the_child_holds_no_descriptor_of_the_launcher_and_reads_an_empty_stdin(
    launcher: Launcher, tmp_path: Path
) -> None:
    child = spawn(launcher, tmp_path, "sh", "-c", "ls /proc/self/fd; cat; echo end")
    assert child.wait(timeout=10) == 0
    lines = (tmp_path / "out.log").read_text().split()
    assert lines[-1] == "end"
    # 0-2, and the descriptor ls opened to list them
    assert len([fd for fd in lines[:-1] if fd.isdigit()]) == 4, lines


def test_a_command_that_does_not_exist_is_an_oserror_naming_it(
    launcher: Launcher, tmp_path: Path
) -> None:
    with pytest.raises(OSError) as info:
        spawn(launcher, tmp_path, "no-such-server-here", "--port", "1")
    assert info.value.errno == errno.ENOENT
    assert "no-such-server-here" in str(info.value)
    # the launcher still works
    assert spawn(launcher, tmp_path, "true").wait(timeout=10) == 0


def test_an_isolation_step_that_fails_is_reported_with_the_childs_error(
    launcher: Launcher, tmp_path: Path
) -> None:
    if os.geteuid() != 0:
        pytest.skip("mount namespaces need root here")
    bad = Isolation(netns=False, read_only_binds=((str(tmp_path / "missing"), "/mnt/kp-x"),))
    with pytest.raises(OSError) as info:
        spawn(launcher, tmp_path, "true", isolation=bad)
    assert info.value.errno == errno.ENOENT


def test_a_child_in_its_own_network_namespace(launcher: Launcher, tmp_path: Path) -> None:
    if not can_unshare_net():
        pytest.skip("this process may not create network namespaces")
    child = spawn(launcher, tmp_path, "sleep", "30", isolation=Isolation(netns=True))
    try:
        assert os.readlink(f"/proc/{child.pid}/ns/net") != os.readlink("/proc/self/ns/net")
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait(timeout=10)


def test_children_outlive_the_launcher_and_are_then_watched_through_proc(
    launcher: Launcher, tmp_path: Path
) -> None:
    child = spawn(launcher, tmp_path, "sleep", "30")
    launcher_pid = launcher._proc.pid if launcher._proc else 0
    os.kill(launcher_pid, signal.SIGKILL)  # the launcher dies, not its child
    time.sleep(0.3)
    assert child.poll() is None
    os.kill(child.pid, signal.SIGKILL)
    assert child.wait(timeout=10) == -1  # its status went to whoever reaped it
    # the next spawn starts a new launcher
    again = spawn(launcher, tmp_path, "sh", "-c", "exit 4")
    assert again.wait(timeout=10) == 4
    assert launcher._proc is not None and launcher._proc.pid != launcher_pid


def test_closing_the_launcher_leaves_its_children_running(tmp_path: Path) -> None:
    lau = Launcher()
    child = spawn(lau, tmp_path, "sleep", "30")
    proc = lau._proc
    lau.close()
    assert proc is not None and proc.returncode == 0  # it exited on the closed socket
    try:
        time.sleep(0.2)
        os.kill(child.pid, 0)  # still there
    finally:
        os.kill(child.pid, signal.SIGKILL)
    wait_for(lambda: child.poll() is not None, timeout=10)


def test_a_listening_socket_becomes_the_childs_descriptor_3(
    launcher: Launcher, tmp_path: Path
) -> None:
    import socket

    with socket.socket() as listen:
        listen.bind(("127.0.0.1", 0))
        listen.listen(1)
        port = listen.getsockname()[1]
        with (tmp_path / "out.log").open("ab") as out:
            child = launcher.spawn(
                [
                    sys.executable,
                    "-c",
                    "import socket; s = socket.socket(fileno=3); print(s.getsockname()[1])",
                ],
                cwd=str(tmp_path),
                env={"PATH": os.defpath},
                output=out.fileno(),
                isolation=PLAIN,
                listen=listen.fileno(),
            )
    assert child.wait(timeout=10) == 0
    assert (tmp_path / "out.log").read_text().strip() == str(port)
