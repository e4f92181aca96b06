"""`fsutil.atomic_write`: the target holds the old or the new content, never a half-written file."""

import os

import pytest

from nemo_rl_fp16.fsutil import atomic_write


def test_writes_str_bytes_and_callback_creating_parents(tmp_path):
    p = atomic_write(tmp_path / "a" / "b" / "x.txt", "héllo")
    assert p == tmp_path / "a" / "b" / "x.txt" and p.read_bytes() == "héllo".encode()
    atomic_write(p, b"\x00\x01")
    assert p.read_bytes() == b"\x00\x01"
    atomic_write(p, lambda f: f.write(b"from callback"))
    assert p.read_bytes() == b"from callback"
    assert sorted(os.listdir(p.parent)) == ["x.txt"]  # no temp file left behind


def test_failed_write_keeps_the_old_content_and_leaves_no_temp(tmp_path):
    p = atomic_write(tmp_path / "cfg.yaml", "old: 1\n")

    def half_then_crash(f):
        f.write(b"new: ")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic_write(p, half_then_crash)
    assert p.read_text() == "old: 1\n"
    assert sorted(os.listdir(tmp_path)) == ["cfg.yaml"]


def test_interrupt_also_cleans_up(tmp_path):
    def interrupted(f):
        f.write(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "r.json", interrupted)
    assert os.listdir(tmp_path) == []  # neither a target nor a temp file


def test_replaces_a_symlinked_target_itself_not_through_the_link(tmp_path):
    real = tmp_path / "real.txt"
    real.write_text("real")
    link = tmp_path / "link.txt"
    link.symlink_to(real)
    atomic_write(link, "new")
    assert not link.is_symlink() and link.read_text() == "new" and real.read_text() == "real"


def test_sha256_disk_full_and_mount_point(tmp_path):
    import errno
    import hashlib

    from nemo_rl_fp16.fsutil import is_disk_full, mount_point, sha256_file

    f = tmp_path / "x.bin"
    f.write_bytes(b"\x01" * (5 << 20))  # more than one 4 MiB chunk
    assert sha256_file(f) == hashlib.sha256(b"\x01" * (5 << 20)).hexdigest()
    assert is_disk_full(OSError(errno.ENOSPC, "x"), tmp_path) and is_disk_full(OSError(errno.EDQUOT, "x"), tmp_path)
    assert is_disk_full(RuntimeError("write failed: No space left on device"), tmp_path)
    st = os.statvfs(tmp_path)
    if st.f_bavail * st.f_frsize >= (64 << 20):  # with under 64 MiB free every write failure counts as a full disk
        assert not is_disk_full(OSError(errno.EACCES, "denied"), tmp_path)
    mp = mount_point(tmp_path / "not" / "yet")
    assert os.path.ismount(mp) and (tmp_path == mp or mp in tmp_path.parents)
