"""files.write_atomic: whole or nothing, fsynced, with the permissions the umask gives."""

import os
import stat

import pytest

from minigpt2.io import files
from minigpt2.io.files import write_atomic


@pytest.fixture
def umask():
    """Set the process umask for one test, restoring the old one afterwards."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda mask: os.umask(mask)
    os.umask(old)


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def write_with_writer(path, payload):
    def writer(tmp):
        with open(tmp, "wb") as f:
            f.write(payload)
    return write_atomic(path, writer=writer)


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_permissions_follow_the_umask(tmp_path, umask, mask, expected):
    umask(mask)
    write_atomic(tmp_path / "a.bin", b"\x00\x01")
    write_atomic(tmp_path / "b.txt", "text")
    write_with_writer(tmp_path / "c.bin", b"payload")
    # writing over an existing file gives the new file the umask's permissions too
    write_atomic(tmp_path / "a.bin", b"again")
    for name in ("a.bin", "b.txt", "c.bin"):
        assert mode(tmp_path / name) == expected, name


def test_content_bytes_str_and_writer(tmp_path):
    assert write_atomic(tmp_path / "sub" / "x.bin", b"\xff\x00") == tmp_path / "sub" / "x.bin"
    assert (tmp_path / "sub" / "x.bin").read_bytes() == b"\xff\x00"      # folder created
    write_atomic(tmp_path / "y.txt", "héllo\n")
    assert (tmp_path / "y.txt").read_bytes() == "héllo\n".encode("utf-8")
    write_with_writer(tmp_path / "z.bin", b"from a writer")
    assert (tmp_path / "z.bin").read_bytes() == b"from a writer"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["sub", "x.bin", "y.txt", "z.bin"]


def test_a_failing_writer_leaves_the_old_file_and_no_debris(tmp_path):
    target = tmp_path / "model.bin"
    target.write_bytes(b"the old, whole file")

    def crash_midway(tmp):
        with open(tmp, "wb") as f:
            f.write(b"half of the new")
        raise OSError("disk full (simulated)")

    with pytest.raises(OSError, match="simulated"):
        write_atomic(target, writer=crash_midway)
    assert target.read_bytes() == b"the old, whole file"
    assert [p.name for p in tmp_path.iterdir()] == ["model.bin"]
    # and with no previous file, nothing at all is left
    with pytest.raises(OSError, match="simulated"):
        write_atomic(tmp_path / "new.bin", writer=crash_midway)
    assert [p.name for p in tmp_path.iterdir()] == ["model.bin"]


def test_an_interrupt_during_the_write_leaves_nothing(tmp_path):
    def interrupted(tmp):
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        write_atomic(tmp_path / "x", writer=interrupted)
    assert list(tmp_path.iterdir()) == []


def test_the_file_and_its_folder_are_fsynced(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(os.fstat(fd).st_ino)
        real_fsync(fd)
    monkeypatch.setattr(files.os, "fsync", fsync)
    for how in ("content", "writer"):
        synced.clear()
        path = tmp_path / how
        if how == "content":
            write_atomic(path, b"1")
        else:
            write_with_writer(path, b"1")
        assert os.stat(path).st_ino in synced, how
        if os.name == "posix":
            assert os.stat(tmp_path).st_ino in synced, how


def test_content_or_writer_not_both(tmp_path):
    with pytest.raises(TypeError, match="either content"):
        write_atomic(tmp_path / "x")
    with pytest.raises(TypeError, match="either content"):
        write_atomic(tmp_path / "x", b"", writer=lambda tmp: None)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_a_writer_that_replaces_the_file_still_gets_the_umask_permissions(tmp_path, umask):
    np = pytest.importorskip("numpy")
    from safetensors.numpy import save_file      # writes a 0600 temporary and renames it
    umask(0o022)
    write_atomic(tmp_path / "w.safetensors",
                 writer=lambda tmp: save_file({"a": np.zeros(3, np.float32)}, str(tmp)))
    assert mode(tmp_path / "w.safetensors") == 0o644
