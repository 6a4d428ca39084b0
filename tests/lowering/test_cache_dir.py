"""Cache directories other users cannot write, and atomic file replacement.

The tests run as root, so ownership is tested by making `_stat` report another uid;
permission bits are only read, so chmod on tmp_path tests them for real.
"""

import os
import stat

import pytest

from qcompile.lowering import cache_dir
from qcompile.lowering.cache_dir import (
    CacheWarning,
    UnsafeCacheDirError,
    open_atomic,
    read_cache_text,
    trusted_dir,
    write_atomic,
)

posix_only = pytest.mark.skipif(not hasattr(os, "geteuid"), reason="POSIX ownership and modes")


def check(path):
    return trusted_dir(path, what="test cache directory", elsewhere="pick another one")


def mode_of(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def owned_by(uid, *paths):
    """A _stat that reports `uid` as the owner of `paths` (and the truth elsewhere)."""
    targets = {os.path.realpath(p) for p in paths}

    def fake(path):
        st = os.stat(path)
        if os.path.realpath(path) not in targets:
            return st
        fields = list(st[:10])
        fields[stat.ST_UID] = uid
        return os.stat_result(fields)

    return fake


@posix_only
def test_missing_directories_are_created_private(tmp_path):
    got = check(tmp_path / "a" / "b")
    assert got == (tmp_path / "a" / "b").resolve()
    assert mode_of(tmp_path / "a") == 0o700 and mode_of(tmp_path / "a" / "b") == 0o700


@posix_only
@pytest.mark.parametrize("mode, who", [(0o770, "group"), (0o707, "others"),
                                       (0o777, "group and others"),
                                       (0o1777, "group and others")])
def test_directory_writable_by_others_is_refused_until_fixed(tmp_path, mode, who):
    d = tmp_path / "cache"
    d.mkdir()
    d.chmod(mode)
    with pytest.raises(UnsafeCacheDirError) as e:
        check(d)
    msg = str(e.value)
    assert f"refuses the test cache directory {d}: it is writable by {who} (mode {mode:04o})" \
        in msg
    assert f"Fix: chmod go-w {d}; or pick another one." in msg
    d.chmod(0o755)  # a refusal is not remembered: the fixed directory is accepted
    assert check(d) == d


@posix_only
def test_directory_owned_by_another_user_is_refused(tmp_path, monkeypatch):
    d = tmp_path / "theirs"
    d.mkdir(mode=0o700)
    monkeypatch.setattr(cache_dir, "_stat", owned_by(os.geteuid() + 1000, d))
    with pytest.raises(UnsafeCacheDirError, match=(
        rf"it is owned by uid {os.geteuid() + 1000}, not by this process's uid {os.geteuid()}"
        rf".*Fix: chown {os.geteuid()} {d}; or pick another one\."
    )):
        check(d)


@posix_only
def test_parent_owned_by_another_user_is_refused(tmp_path, monkeypatch):
    parent = tmp_path / "home-of-someone"
    parent.mkdir(mode=0o755)
    monkeypatch.setattr(cache_dir, "_stat", owned_by(4321, parent))
    with pytest.raises(UnsafeCacheDirError, match=(
        rf"its parent {parent} is owned by uid 4321, who can replace {parent / 'cache'}"
    )):
        check(parent / "cache")
    # Root owns /tmp and the like: a parent owned by root is fine.
    monkeypatch.setattr(cache_dir, "_stat", owned_by(0, parent))
    assert check(parent / "cache") == parent / "cache"


@posix_only
def test_parent_writable_by_others_needs_the_sticky_bit(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # anyone could rename shared/cache away and put their own there
    with pytest.raises(UnsafeCacheDirError) as e:
        check(shared / "cache")
    assert (f"its parent {shared} is writable by group and others without the sticky bit "
            f"(mode 0777), so they can rename {shared / 'cache'} away") in str(e.value)
    assert f"chmod go-w {shared} (or chmod +t {shared})" in str(e.value)
    # /tmp's arrangement: sticky, so only the owner of shared/cache may rename it.
    shared.chmod(0o1777)
    assert check(shared / "cache") == shared / "cache"
    assert mode_of(shared / "cache") == 0o700


@posix_only
def test_symlinks_are_checked_where_they_point(tmp_path):
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    (tmp_path / "link").symlink_to(open_dir)
    with pytest.raises(UnsafeCacheDirError, match=f"directory {open_dir}: it is writable"):
        check(tmp_path / "link")
    open_dir.chmod(0o700)
    assert check(tmp_path / "link") == open_dir  # callers use the real path from then on


def test_a_file_is_not_a_directory(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(UnsafeCacheDirError, match=f"{tmp_path / 'f'} is not a directory"):
        check(tmp_path / "f")


@posix_only
def test_checked_once_per_directory_per_process(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(cache_dir, "_stat", lambda p: calls.append(p) or os.stat(p))
    d = tmp_path / "once"
    for _ in range(3):
        assert check(d) == d
    assert calls[0] == d and len(calls) == len(d.parts)  # itself and each parent, once


def test_write_atomic_replaces_whole_files_and_directories(tmp_path):
    target = tmp_path / "data.json"
    target.mkdir()
    (target / "junk").write_text("x")  # a directory where the file belongs
    write_atomic(target, "new")
    assert target.read_text() == "new" and mode_of(target) == 0o600
    write_atomic(target, b"\x00\x01", mode=0o644)
    assert target.read_bytes() == b"\x00\x01" and mode_of(target) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.json"]


def test_open_atomic_leaves_the_old_file_on_failure(tmp_path):
    target = tmp_path / "repro.pt"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="pickling failed"):
        with open_atomic(target) as f:
            f.write(b"half of a ")
            raise RuntimeError("pickling failed")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repro.pt"]


def test_read_cache_text_ignores_what_is_not_a_text_file(tmp_path, recwarn):
    assert read_cache_text(tmp_path / "absent", "thing") is None
    assert not recwarn.list  # a missing file is simply a miss
    (tmp_path / "dir").mkdir()
    (tmp_path / "bin").write_bytes(b"ok\xff\xfe")
    os.mkfifo(tmp_path / "fifo")  # would block a plain read forever
    for name in ("dir", "bin", "fifo", "dir"):
        assert read_cache_text(tmp_path / name, "thing") is None
    assert [(w.category, str(w.message)) for w in recwarn.list] == [
        (CacheWarning, f"qcompile: ignoring the thing {tmp_path / 'dir'}: it is a directory, "
                       "not a file; it will be rebuilt"),
        (CacheWarning, f"qcompile: ignoring the thing {tmp_path / 'bin'}: it is not UTF-8 text "
                       "(invalid start byte at byte 2); it will be rebuilt"),
        (CacheWarning, f"qcompile: ignoring the thing {tmp_path / 'fifo'}: it is not a regular "
                       "file; it will be rebuilt"),
    ]  # and the directory warned only once
