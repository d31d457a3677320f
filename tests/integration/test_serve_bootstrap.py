"""The admin key at first start: printed to a terminal, never into a redirect or log."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
from pathlib import Path

_FIRST_START = (
    "import sys; from pathlib import Path; from kingpost.serve import bootstrap; "
    "from kingpost.settings import Settings; "
    "bootstrap(Settings(home=Path(sys.argv[1]))).db.close()"
)


def _first_start(home: Path, stdout: int) -> None:
    subprocess.run(
        [sys.executable, "-c", _FIRST_START, str(home)], stdout=stdout, check=True, timeout=60
    )


def test_a_redirected_first_start_names_the_credentials_file_not_the_key(
    tmp_path: Path,
) -> None:
    """With stdout a pipe (a service manager's log), the key ended up in the server's log."""
    home = tmp_path / "home"
    out = subprocess.run(
        [sys.executable, "-c", _FIRST_START, str(home)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    key = (home / "credentials").read_text().strip()
    assert key.startswith("kp_")
    assert key not in out
    assert str(home / "credentials") in out and "not a terminal" in out


def test_a_first_start_on_a_terminal_shows_the_key_once(tmp_path: Path) -> None:
    home = tmp_path / "home"
    leader, follower = pty.openpty()
    try:
        _first_start(home, follower)
        os.close(follower)
        follower = -1
        chunks: list[bytes] = []
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # EIO: the terminal's other side is closed and drained
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(leader)
        if follower != -1:
            os.close(follower)
    key = (home / "credentials").read_text().strip()
    assert key in b"".join(chunks).decode()
    _first_start(home, subprocess.DEVNULL)  # a second start creates no other key
    assert (home / "credentials").read_text().strip() == key
