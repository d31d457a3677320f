"""A small process that forks isolated replicas for the process engine.

Starting an isolated replica needs code between fork and exec (a session, network and
mount namespaces, a uid), so ``subprocess.Popen`` cannot use vfork: it forks the whole
control plane (hundreds of MB mapped, a dozen threads), and that copy alone took 35-80 ms
per replica here, on the path of every cold start. The launcher is started once, from a
fresh interpreter holding only this module and the isolation code (~20 MB), and forks
replicas from there in a millisecond or two.

Protocol, over a ``SOCK_SEQPACKET`` socket pair (one pickled tuple per packet; both ends are
this module, in processes of the same user):

- engine -> launcher: ``("spawn", argv, cwd, env, isolation)`` with the replica's output
  file descriptor attached (``SCM_RIGHTS``);
- launcher -> engine: ``("started", pid)`` or ``("failed", errno, message)`` in answer,
  one request at a time, and ``("exited", pid, returncode)`` whenever a replica it started
  exits (``returncode`` as ``Popen``'s: the exit status, or minus the signal).

The launcher exits when the engine's end closes (the control plane stopped, or was killed);
replicas it started keep running, as they do when the control plane that started them is
killed (``engines/_records.py`` adopts them). If the launcher dies, the processes it
started are watched through ``/proc`` like adopted ones, and the next launch starts a new
launcher.
"""

from __future__ import annotations

import contextlib
import errno as errnos
import fcntl
import logging
import os
import pickle
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence

from kingpost.engines._isolation import Isolation, preexec

__all__ = ["LaunchedProcess", "Launcher"]

log = logging.getLogger("kingpost.engines")

_PACKET = 1 << 20
_ANSWER_TIMEOUT_S = 30.0


class LaunchedProcess:
    """A replica process the launcher started: the part of ``Popen``'s interface the engine
    uses. Its exit status comes from the launcher (which reaped it); if the launcher is
    gone, the process is watched through ``/proc`` (its start time guards against a pid
    that was recycled) and an exit reads as -1, as for an adopted replica."""

    def __init__(self, pid: int, launcher: Launcher) -> None:
        # Here, not at the top: the launcher process imports this module and stays small.
        from kingpost.gateway_process import start_ticks

        self.pid = pid
        self.returncode: int | None = None
        self._launcher = launcher
        self._ticks = start_ticks(pid)
        self._exited = threading.Event()

    def _set_exit(self, code: int) -> None:
        if self.returncode is None:
            self.returncode = code
        self._exited.set()

    def poll(self) -> int | None:
        if self.returncode is None and not self._launcher.watching(self):
            from kingpost.gateway_process import process_alive, start_ticks

            if start_ticks(self.pid) != self._ticks or not process_alive(self.pid):
                self._set_exit(-1)  # its exit status went to whoever reaped it
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while (code := self.poll()) is None:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout or 0.0)
            self._exited.wait(0.05 if left is None else min(left, 0.05))
        return code


class Launcher:
    """The engine's end: starts the launcher process on first use (and again if it died),
    sends it one spawn at a time, and turns its exit reports into ``LaunchedProcess``
    return codes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        """One spawn at a time; also guards starting the launcher."""
        self._state = threading.Lock()
        self._sock: socket.socket | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._children: dict[int, LaunchedProcess] = {}
        self._early: dict[int, int] = {}
        """Exit reports read before the spawning thread registered the child (the launcher
        answers a spawn before it reaps, but the two threads here may cross)."""
        self._answer: tuple[object, ...] | None = None
        self._answered = threading.Condition(self._state)

    def watching(self, child: LaunchedProcess) -> bool:
        """Whether ``child``'s exit will be reported (its launcher still runs)."""
        with self._state:
            return self._children.get(child.pid) is child

    def spawn(
        self,
        argv: Sequence[str],
        *,
        cwd: str,
        env: Mapping[str, str],
        output: int,
        isolation: Isolation,
        listen: int | None = None,
    ) -> LaunchedProcess:
        """Start ``argv`` with stdin from /dev/null, stdout and stderr to ``output`` and,
        with ``listen``, that socket as its file descriptor 3. Raises ``OSError`` (the
        command cannot be run, or the isolation failed, with the child's own error) or
        ``subprocess.SubprocessError`` (no launcher)."""
        request = pickle.dumps(("spawn", list(argv), cwd, dict(env), isolation))
        fds = [output] if listen is None else [output, listen]
        with self._lock:
            sock = self._ensure()
            with self._state:
                self._answer = None
            try:
                socket.send_fds(sock, [request], fds)
            except OSError as exc:
                self._lost()
                raise subprocess.SubprocessError(f"the replica launcher is gone: {exc}") from exc
            with self._state:
                if not self._answered.wait_for(lambda: self._answer is not None, _ANSWER_TIMEOUT_S):
                    raise subprocess.SubprocessError("the replica launcher did not answer")
                answer = self._answer
                assert answer is not None
                if answer[0] == "lost":
                    raise subprocess.SubprocessError("the replica launcher exited")
                if answer[0] == "failed":
                    code, message = answer[1], answer[2]
                    raise OSError(code, message) if code else OSError(message)
                pid = int(str(answer[1]))
                child = LaunchedProcess(pid, self)
                self._children[pid] = child
                if pid in self._early:
                    child._set_exit(self._early.pop(pid))
                    del self._children[pid]
                return child

    def start(self) -> None:
        """Start the launcher process now rather than at the first spawn (it takes a fresh
        interpreter's start, ~0.1-0.3 s, which should not fall on a cold start)."""
        with self._lock:
            self._ensure()

    def close(self) -> None:
        """Close the engine's end: the launcher exits; replicas keep running."""
        with self._lock:
            sock, proc = self._sock, self._proc
            self._sock = self._proc = None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        if proc is not None:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def _ensure(self) -> socket.socket:
        if self._sock is not None and self._proc is not None and self._proc.poll() is None:
            return self._sock
        if self._sock is not None:
            self._lost()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            # A fresh interpreter (vfork and exec: nothing of this process is copied), in a
            # session of its own (a Ctrl-C of the control plane's terminal is not its).
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "kingpost.engines._launcher", str(theirs.fileno())],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        finally:
            theirs.close()
        self._sock = ours
        threading.Thread(
            target=self._read, args=(ours,), name="kingpost-launcher", daemon=True
        ).start()
        return ours

    def _lost(self) -> None:
        """The launcher is gone: its children are watched through ``/proc`` from now on."""
        with self._state:
            self._children.clear()
            self._answer = ("lost",)
            self._answered.notify_all()
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
        if self._proc is not None:
            with contextlib.suppress(OSError):
                self._proc.kill()
            self._proc.wait()
            self._proc = None

    def _read(self, sock: socket.socket) -> None:
        while True:
            try:
                data = sock.recv(_PACKET)
            except OSError:
                data = b""
            if not data:
                with self._state:
                    if self._sock is sock or self._sock is None:
                        self._children.clear()
                        self._answer = ("lost",)
                        self._answered.notify_all()
                return
            message = pickle.loads(data)
            with self._state:
                if message[0] == "exited":
                    child = self._children.pop(message[1], None)
                    if child is None:
                        self._early[message[1]] = message[2]
                    else:
                        child._set_exit(message[2])
                else:
                    self._answer = message
                    self._answered.notify_all()


# -- the launcher process ----------------------------------------------------------------------


def _child(
    argv: list[str],
    cwd: str,
    env: dict[str, str],
    isolation: Isolation,
    fds: list[int],
    report: int,
) -> None:
    """In the forked child: set up, exec; on failure write the error to ``report``.
    ``fds``: the output, then the listening socket (if any), which becomes descriptor 3."""
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        report = fcntl.fcntl(report, fcntl.F_DUPFD_CLOEXEC, 10)  # clear of 0-3
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(fds[0], 1)
        os.dup2(fds[0], 2)
        first = 3
        if len(fds) > 1:
            os.dup2(fcntl.fcntl(fds[1], fcntl.F_DUPFD, 10), 3)
            first = 4
        os.closerange(first, report)
        os.closerange(report + 1, os.sysconf("SC_OPEN_MAX"))
        os.chdir(cwd)
        preexec(isolation)()
        os.execvpe(argv[0], argv, env)
    except BaseException as exc:
        code = exc.errno if isinstance(exc, OSError) else None
        what = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        if code == errnos.ENOENT or code == errnos.EACCES:
            what = f"{what}: {argv[0]!r}"
        with contextlib.suppress(BaseException):
            os.write(report, pickle.dumps((code, what or type(exc).__name__)))
    finally:
        os._exit(127)


def _spawn(request: tuple[object, ...], fds: list[int]) -> tuple[object, ...]:
    _, argv, cwd, env, isolation = request
    report_r, report_w = os.pipe2(os.O_CLOEXEC)
    try:
        pid = os.fork()
    except OSError as exc:
        os.close(report_r)
        os.close(report_w)
        return ("failed", exc.errno, f"fork: {exc.strerror}")
    if pid == 0:
        os.close(report_r)
        _child(argv, cwd, env, isolation, fds, report_w)  # type: ignore[arg-type]
    os.close(report_w)
    chunks = []
    while chunk := os.read(report_r, 65536):  # EOF: the exec closed it (CLOEXEC)
        chunks.append(chunk)
    os.close(report_r)
    if not chunks:
        return ("started", pid)
    os.waitpid(pid, 0)
    code, message = pickle.loads(b"".join(chunks))
    return ("failed", code, message)


def _serve(sock: socket.socket) -> None:
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    selector = selectors.DefaultSelector()
    selector.register(sock, selectors.EVENT_READ)
    selector.register(wake_r, selectors.EVENT_READ)
    while True:
        for key, _ in selector.select():
            if key.fileobj is sock:
                try:
                    data, fds, _, _ = socket.recv_fds(sock, _PACKET, 2)
                except OSError:
                    return
                if not data:
                    return  # the engine closed its end
                if not fds:
                    continue
                try:
                    answer = _spawn(pickle.loads(data), fds)
                finally:
                    for fd in fds:
                        os.close(fd)
                sock.send(pickle.dumps(answer))
            else:
                with contextlib.suppress(BlockingIOError):
                    os.read(wake_r, 4096)
        while True:  # reap every child that exited, and report it
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            with contextlib.suppress(OSError):
                sock.send(pickle.dumps(("exited", pid, os.waitstatus_to_exitcode(status))))


if __name__ == "__main__":
    _serve(socket.socket(fileno=int(sys.argv[1])))
