"""The local base image's build (kingpost.images.base), with a stand-in debootstrap."""

from __future__ import annotations

import ctypes
import os
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from kingpost._cancel import Cancel
from kingpost.errors import BuildError

SOURCE = "kingpost-test-mount"
"""The source name of the stand-in's mounts, to find (and undo) them."""

# Like debootstrap's second stage: it mounts a filesystem inside the root it builds (proc
# and sysfs there; a tmpfs here) and unmounts it in an exit trap, which SIGKILL skips.
FAKE_DEBOOTSTRAP = f"""#!/bin/sh
target=$(printf '%s\\n' "$@" | tail -n 2 | head -n 1)  # debootstrap ... TARGET MIRROR
mkdir -p "$target/proc"
mount -t tmpfs {SOURCE} "$target/proc" || exit 3
echo kernel-file > "$target/proc/cpuinfo"
trap 'umount "$target/proc"' EXIT
echo "I: Installing core packages..."
sleep 60
"""


def _mounts() -> list[str]:
    lines = Path("/proc/self/mountinfo").read_text().splitlines()
    return [line.split()[4] for line in lines if f" {SOURCE} " in line]


def _can_mount(tmp_path: Path) -> bool:
    if os.geteuid() != 0:
        return False
    probe = tmp_path / "probe"
    probe.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", SOURCE, str(probe)], capture_output=True)
    if done.returncode != 0:
        return False
    subprocess.run(["umount", str(probe)], check=True)
    return True


def test_a_cancelled_debootstrap_leaves_nothing_mounted_and_nothing_walked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """debootstrap mounts proc and sysfs inside the root filesystem it builds and unmounts
    them when it exits. Cancelled (or Ctrl-C on `kingpost image base`), it is SIGKILLed
    and they stay mounted; removing the build's directory then walked the host's /proc
    and /sys as root, chmod-ing what it could not delete, and failed on the busy mount
    with an OSError in place of the reason the build stopped."""
    if not _can_mount(tmp_path):
        pytest.skip("needs root and mount(2)")
    from kingpost.images import base, client

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "debootstrap").write_text(FAKE_DEBOOTSTRAP)
    (bin_dir / "debootstrap").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    work = tmp_path / "a tmp"  # mountinfo escapes the space: \040
    work.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(work))
    monkeypatch.setattr(client, "image_exists", lambda client, tag: False)

    switch = Cancel()
    lines: list[str] = []
    errors: list[BaseException] = []

    def build() -> None:
        try:
            with switch.active():
                base.ensure_base_image(client=object(), log=lines.append)  # type: ignore[arg-type]
        except BaseException as exc:  # whatever it was: the test shows it
            errors.append(exc)

    thread = threading.Thread(target=build)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while "I: Installing core packages..." not in lines and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _mounts(), lines
        switch.cancel("the deployment was deleted")
        thread.join(20)
        assert not thread.is_alive()
        assert len(errors) == 1 and isinstance(errors[0], BuildError), errors
        assert "was stopped: the deployment was deleted" in errors[0].message
        assert _mounts() == []
        assert not [p for p in work.glob("kingpost-base-*") if p.is_dir()]
    finally:
        libc = ctypes.CDLL(None, use_errno=True)
        for point in sorted(_mounts(), key=len, reverse=True):
            libc.umount2(point.encode(), 2)  # MNT_DETACH: never leave one behind
