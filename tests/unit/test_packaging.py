from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from kingpost import packaging
from kingpost.errors import ValidationError
from kingpost.packaging import pack_project, project_files, unpack_project


def make_project(root: Path) -> None:
    (root / "data").mkdir(parents=True)
    (root / "config.yaml").write_text("model_name: x\n")
    (root / "server.py").write_text("print('hi')\n")
    (root / "data" / "a.bin").write_bytes(b"\x00" * 10)
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_text("ref")
    (root / "secret.env").write_text("X=1")
    (root / "logs").mkdir()
    (root / "logs" / "x.log").write_text("...")
    (root / ".gitignore").write_text("*.env\n")
    (root / ".truss_ignore").write_text("logs/\n")


def test_ignores_git_gitignore_and_truss_ignore(tmp_path: Path) -> None:
    make_project(tmp_path)
    names = [p.as_posix() for p in project_files(tmp_path)]
    assert names == [".gitignore", ".truss_ignore", "config.yaml", "data/a.bin", "server.py"]


def test_archive_is_deterministic_and_round_trips(tmp_path: Path) -> None:
    make_project(tmp_path / "p")
    a, b = pack_project(tmp_path / "p"), pack_project(tmp_path / "p")
    assert a.sha256 == b.sha256 and len(a.sha256) == 64
    (tmp_path / "p" / "server.py").write_text("print('changed')\n")
    assert pack_project(tmp_path / "p").sha256 != a.sha256
    unpack_project(a.data, tmp_path / "out")
    assert (tmp_path / "out" / "server.py").read_text() == "print('hi')\n"
    assert not (tmp_path / "out" / ".git").exists()


def test_refuses_dir_without_config(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match=r"no config\.yaml"):
        pack_project(tmp_path)


def test_unpack_refuses_path_traversal(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("../escape.txt")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(ValidationError, match="cannot unpack"):
        unpack_project(buf.getvalue(), tmp_path / "out")
    assert not (tmp_path / "escape.txt").exists()


def _escaping_archive(dest: Path, levels_up: int) -> bytes:
    """Symlinks whose expansion is longer than PATH_MAX: ``os.path.realpath`` stops
    resolving there, so tarfile's ``data`` filter (before Python 3.11.13) believes a
    link that leads out of ``dest`` stays inside it (CVE-2025-4517)."""
    comp = "d" * 247
    steps = (4095 - len(str(dest)) - 1) // (len(comp) + 1)
    letters = [chr(ord("a") + i % 26) * (1 + i // 26) for i in range(steps)]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        real = ""
        for letter in letters:
            d = tarfile.TarInfo(f"{real}{comp}")
            d.type = tarfile.DIRTYPE
            tar.addfile(d)
            s = tarfile.TarInfo(f"{real}{letter}")
            s.type, s.linkname = tarfile.SYMTYPE, comp
            tar.addfile(s)
            real += comp + "/"
        long_link = "/".join(letters) + "/" + "l" * 254
        link = tarfile.TarInfo(long_link)
        link.type, link.linkname = tarfile.SYMTYPE, "../" * steps
        tar.addfile(link)
        escape = tarfile.TarInfo("escape")
        escape.type, escape.linkname = tarfile.SYMTYPE, long_link + "/.." * levels_up
        tar.addfile(escape)
        f = tarfile.TarInfo("escape/pwned")
        f.size = 3
        tar.addfile(f, io.BytesIO(b"hi\n"))
    return buf.getvalue()


def test_unpack_refuses_links_even_those_the_data_filter_misjudges(tmp_path: Path) -> None:
    dest = tmp_path / "projects" / ("f" * 64)
    dest.parent.mkdir()
    tmp = dest.with_name(dest.name + ".tmp-" + "x" * 8)  # as long as unpack's temp dir
    with pytest.raises(ValidationError, match=r"'a' is a symbolic link") as info:
        unpack_project(_escaping_archive(tmp, 2), dest)
    assert info.value.details["field"] == "project"
    assert not list(tmp_path.rglob("pwned")) and not list(dest.parent.iterdir())


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.FIFOTYPE])
def test_unpack_accepts_only_files_and_directories(tmp_path: Path, kind: bytes) -> None:
    """pack_project writes regular files only (a link's target is stored as a file)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        config = tarfile.TarInfo("config.yaml")
        tar.addfile(config, io.BytesIO(b""))
        other = tarfile.TarInfo("other")
        other.type, other.linkname = kind, "config.yaml"
        tar.addfile(other)
    with pytest.raises(ValidationError, match=r"'other' is a .*only regular files"):
        unpack_project(buf.getvalue(), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unpack_refuses_a_compressed_archive(tmp_path: Path) -> None:
    """A gzip of zeros inflates a thousandfold: 200 KB uploaded were 200 MB on disk."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo("config.yaml")
        info.size = 1 << 20
        tar.addfile(info, io.BytesIO(b"\0" * info.size))
    with pytest.raises(ValidationError, match="not an uncompressed tar archive") as err:
        unpack_project(buf.getvalue(), tmp_path / "out")
    assert err.value.details["field"] == "project"
    assert not (tmp_path / "out").exists()


def test_unpack_refuses_files_larger_than_the_upload_limit(tmp_path: Path) -> None:
    """A PAX sparse member declares its size: 10 KB of archive made a 1 TB file, which
    every replica start then copies in full."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        sparse_map = b"1\n0\n0\n".ljust(512, b"\0")  # one hole-only region
        info = tarfile.TarInfo("big.bin")
        info.size = len(sparse_map)
        info.pax_headers = {
            "GNU.sparse.major": "1",
            "GNU.sparse.minor": "0",
            "GNU.sparse.name": "big.bin",
            "GNU.sparse.realsize": str(10**12),
        }
        tar.addfile(info, io.BytesIO(sparse_map))
    with pytest.raises(ValidationError, match=r"unpacks to more than 2 GiB.*1000000000000"):
        unpack_project(buf.getvalue(), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_spooled_archive_is_the_same_archive_and_goes_away(tmp_path: Path) -> None:
    """The CLI packs to a file while hashing: same bytes and hash as in memory."""
    from kingpost.packaging import pack_project_file

    make_project(tmp_path / "p")
    (tmp_path / "p" / "big.bin").write_bytes(bytes(range(256)) * 20_000)  # several chunks
    in_memory = pack_project(tmp_path / "p")
    with pack_project_file(tmp_path / "p", spool_dir=tmp_path) as spooled:
        assert (spooled.sha256, spooled.size) == (in_memory.sha256, len(in_memory.data))
        streamed = b"".join(spooled.chunks(size=64 * 1024))
        assert streamed == in_memory.data
        path = spooled.path
    assert not path.exists()
    with pytest.raises(ValidationError, match=r"no config\.yaml"):
        pack_project_file(tmp_path / "nothing", spool_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]  # nothing left behind


def _empty_entries(count: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(count):
            tar.addfile(tarfile.TarInfo(f"f{i}"), io.BytesIO(b""))
    return buf.getvalue()


def test_unpack_refuses_more_entries_than_the_limit_without_reading_them_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """2 GiB of empty entries is four million members, each built in memory (and a file
    on disk) before anything refused them."""
    monkeypatch.setattr(packaging, "MAX_PROJECT_ENTRIES", 50)
    unpack_project(_empty_entries(50), tmp_path / "ok")
    assert len(list((tmp_path / "ok").iterdir())) == 50
    with pytest.raises(ValidationError) as err:
        unpack_project(_empty_entries(500), tmp_path / "out")
    assert "project archive: more than 50 files and directories (51 so far)" in str(err.value)
    assert (err.value.details["field"], err.value.details["limit"]) == ("project", 50)
    assert not (tmp_path / "out").exists()


def test_pack_refuses_a_project_with_more_entries_than_the_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(packaging, "MAX_PROJECT_ENTRIES", 5)
    (tmp_path / "config.yaml").write_text("model_name: x\n")
    for i in range(5):
        (tmp_path / f"f{i}.txt").write_text("x")
    with pytest.raises(ValidationError, match=r"more than 5 files and directories \(6 so far\)"):
        pack_project(tmp_path)


def test_pack_skips_a_dangling_link_and_a_file_gone_since_listed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What an editor leaves while it works (emacs's ``.#model.py`` lock is a link to
    nowhere) and a file removed between listing and reading are not part of the project;
    `kingpost watch` and `push` must not fail on them."""
    import os

    root = tmp_path / "p"
    make_project(root)
    os.symlink("alice@laptop.4242:1733400000", root / ".#server.py")
    (root / "gone.py").write_text("x = 1\n")
    listed = packaging.project_files

    def list_then_remove(where: Path) -> list[Path]:
        files = listed(where)
        (where / "gone.py").unlink()
        return files

    monkeypatch.setattr(packaging, "project_files", list_then_remove)
    packed = pack_project(root)
    with tarfile.open(fileobj=io.BytesIO(packed.data)) as tar:
        names = tar.getnames()
    assert names == [".gitignore", ".truss_ignore", "config.yaml", "data/a.bin", "server.py"]
