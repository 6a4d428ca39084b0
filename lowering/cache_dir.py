"""Cache directories and files that other users cannot tamper with and crashes cannot tear.

What: the pieces qcompile's on-disk state (generated kernels, the autotune JSON, debug
dumps) is written with:

- `trusted_dir(path)`: creates missing directories with mode 0o700 and refuses a directory
  another user could write into, once per directory per process;
- `write_atomic` / `open_atomic`: write a temporary file beside the target and rename it
  over the target, so a reader sees the old file or the new one, never half of one;
- `locked(lock_file)`: an exclusive fcntl.flock, held around a read-merge-write so two
  processes updating one file never lose each other's changes;
- `read_cache_text` and `warn_once`: a cache file that cannot be used is ignored with one
  CacheWarning naming the file and what is wrong, and the caller rebuilds it;
- `JsonEntries`: a versioned JSON file of entries built from the pieces above (the
  autotune and latency caches).

Why the directory check: generated kernels are imported and run as Python. Anyone who can
write into the kernel directory, or rename it away and put their own in its place, can run
code as the user who compiles. So (POSIX; elsewhere nothing is checked):

- the directory itself must be owned by this process's effective user and writable by
  nobody else (no group or other write bit; a sticky bit is no help here, it would still
  let others plant files under names we are about to use);
- every directory above it (of the real path: symlinks resolved, and the resolved path
  is what the callers use from then on, so swapping a symlink later changes nothing) must
  be owned by us or root, and not writable by group or others unless it has the sticky
  bit: in a sticky directory such as /tmp (mode 1777) only an entry's owner may rename or
  delete it, so our own directory below /tmp stays ours.

This is OpenSSH's StrictModes walk, with the sticky-bit exception that lets a cache live
under /tmp. The autotune cache holds no code, but it is held to the same rule: planted
configs would still change what runs.

Post: `trusted_dir` returns the resolved directory; a refusal raises UnsafeCacheDirError
saying what is wrong with which directory and how to fix it. Successful checks are
remembered per process (a dict lookup afterwards); refusals are not, so a fixed directory
is accepted on the next call.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import tempfile
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import IO

try:
    import fcntl
except ImportError:  # not POSIX: no locking (documented in `locked`)
    fcntl = None

PRIVATE_DIR_MODE = 0o700
_WRITABLE_BY_OTHERS = stat.S_IWGRP | stat.S_IWOTH


class UnsafeCacheDirError(RuntimeError):
    """A cache directory that another user could write into (or take over)."""


class CacheWarning(UserWarning):
    """A cache file could not be used; it is ignored and rebuilt."""


_TRUSTED: dict[str, Path] = {}  # as given (absolute) -> checked real path
_TRUSTED_LOCK = threading.Lock()
_WARNED: set[tuple[str, str]] = set()


def _stat(path: Path) -> os.stat_result:
    """os.stat, named so tests can pretend a directory belongs to someone else."""
    return os.stat(path)


def trusted_dir(path: str | os.PathLike, *, what: str, elsewhere: str) -> Path:
    """The real path of directory `path`, created private if missing, checked once.

    what names the directory in errors ("kernel cache directory"); elsewhere says how
    to choose another one ("pass kernel_cache_dir=..."). Raises UnsafeCacheDirError if
    another user could write into it or replace it (see the module docstring).
    """
    key = os.path.abspath(os.path.expanduser(os.fspath(path)))
    found = _TRUSTED.get(key)
    if found is not None:
        return found
    with _TRUSTED_LOCK:
        _make_private_dirs(Path(key))
        try:
            real = Path(key).resolve(strict=True)
        except FileNotFoundError:
            raise UnsafeCacheDirError(
                f"qcompile {what} {key} could not be created (a link to nowhere?); "
                f"remove it or {elsewhere}"
            ) from None
        _check_dir(real, what, elsewhere)
        _TRUSTED[key] = real
        return real


def _make_private_dirs(path: Path) -> None:
    # Path.mkdir(parents=True) would create the missing parents with the default mode.
    missing = []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):  # another process made it meanwhile
            os.mkdir(d, PRIVATE_DIR_MODE)


def _who(mode: int) -> str:
    return " and ".join(w for bit, w in ((stat.S_IWGRP, "group"), (stat.S_IWOTH, "others"))
                        if mode & bit)


def _check_dir(real: Path, what: str, elsewhere: str) -> None:
    if not hasattr(os, "geteuid"):
        return  # not POSIX: ownership and mode bits do not describe who may write
    me = os.geteuid()
    st = _stat(real)
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeCacheDirError(
            f"qcompile {what} {real} is not a directory; remove it or {elsewhere}"
        )
    problems: list[tuple[str, str]] = []  # (what is wrong, how to fix it)
    if st.st_uid != me:
        problems.append((f"it is owned by uid {st.st_uid}, not by this process's uid {me}",
                         f"chown {me} {real}"))
    if st.st_mode & _WRITABLE_BY_OTHERS:
        problems.append((f"it is writable by {_who(st.st_mode)} (mode "
                         f"{stat.S_IMODE(st.st_mode):04o})", f"chmod go-w {real}"))
    child = real
    for parent in real.parents:
        pst = _stat(parent)
        if pst.st_uid not in (me, 0):
            problems.append((f"its parent {parent} is owned by uid {pst.st_uid}, who can "
                             f"replace {child}", "choose a directory under one you own"))
        if pst.st_mode & _WRITABLE_BY_OTHERS and not pst.st_mode & stat.S_ISVTX:
            problems.append((
                f"its parent {parent} is writable by {_who(pst.st_mode)} without the sticky "
                f"bit (mode {stat.S_IMODE(pst.st_mode):04o}), so they can rename {child} "
                "away and put their own in its place",
                f"chmod go-w {parent} (or chmod +t {parent})",
            ))
        child = parent
    if problems:
        raise UnsafeCacheDirError(
            f"qcompile refuses the {what} {real}: "
            + "; ".join(p for p, _ in problems)
            + ". What qcompile keeps there decides the code it runs as you, so no other user "
            "may be able to write there. Fix: "
            + "; ".join(dict.fromkeys(f for _, f in problems))
            + f"; or {elsewhere}."
        )


@contextlib.contextmanager
def locked(lock_file: Path) -> Iterator[None]:
    """Hold an exclusive flock on lock_file (created 0o600, never removed: removing a lock
    file lets two processes lock two different files). Blocks until it is free.

    Where fcntl is missing (Windows) nothing is locked: the writes stay atomic, but two
    processes updating one file at once may lose one's changes.
    """
    if fcntl is None:
        yield
        return
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def open_atomic(path: str | os.PathLike, *, mode: int = 0o600) -> Iterator[IO[bytes]]:
    """A binary file that replaces `path` when the block ends without an exception.

    Written beside `path` (a rename is atomic only within one file system), flushed to
    disk, then renamed over it; on an exception the temporary file is removed and `path`
    is left as it was. A directory standing where the file belongs is removed first.
    """
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)  # another process may be removing it too
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if hasattr(os, "fchmod"):  # mkstemp makes it 0o600
                os.fchmod(f.fileno(), mode)
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_atomic(path: str | os.PathLike, data: str | bytes, *, mode: int = 0o600) -> None:
    """Replace `path` with `data` (str is written as UTF-8) atomically; see open_atomic."""
    with open_atomic(path, mode=mode) as f:
        f.write(data.encode() if isinstance(data, str) else data)


def warn_once(path: Path, what: str, problem: str) -> None:
    """One CacheWarning per file and problem per process: the file is ignored and rebuilt."""
    key = (str(path), problem)
    if key in _WARNED:
        return
    _WARNED.add(key)
    warnings.warn(f"qcompile: ignoring the {what} {path}: {problem}; it will be rebuilt",
                  CacheWarning, stacklevel=3)


def read_cache_text(path: Path, what: str) -> str | None:
    """The text of a cache file; None if there is none or it is unusable (warned once).

    Checked with lstat before reading: a directory, a FIFO or a link standing where the
    file belongs is not opened (reading a FIFO would block forever).
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if stat.S_ISDIR(st.st_mode):
        warn_once(path, what, "it is a directory, not a file")
        return None
    if not stat.S_ISREG(st.st_mode):
        warn_once(path, what, "it is not a regular file")
        return None
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:  # replaced or removed by another process just now
        return None
    except UnicodeDecodeError as e:
        warn_once(path, what, f"it is not UTF-8 text ({e.reason} at byte {e.start})")
        return None


class JsonEntries:
    """A JSON file of cache entries, {"version": V, "entries": {key: entry}}, shared by
    processes: reads are memoised per process, each write merges with what is on disk under
    the file's lock and replaces it atomically. A file that is not valid JSON or has
    another version is ignored (warned once) and rebuilt; entries `problem(entry)` finds
    fault with are dropped, with one warning. The directory must be private to this user
    (`trusted_dir`). The autotune cache and the latency cache are two of these."""

    def __init__(self, path: Path, *, version: int, what: str, elsewhere: str, problem):
        self.path, self.version, self.what, self.elsewhere = path, version, what, elsewhere
        self.problem = problem  # entry -> None, or what is wrong with it
        self._entries: dict | None = None

    def _file(self) -> Path:
        """The file in the checked, resolved directory (checked once per process)."""
        return trusted_dir(self.path.parent, what=f"{self.what} directory",
                           elsewhere=self.elsewhere) / self.path.name

    def _read(self, path: Path) -> dict:
        text = read_cache_text(path, self.what)
        if text is None:
            return {}
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            warn_once(path, self.what, f"it is not valid JSON (truncated?): {e}")
            return {}
        if not isinstance(data, dict):
            warn_once(path, self.what, f"it holds a JSON {type(data).__name__}, not an object")
            return {}
        if data.get("version") != self.version:  # another layout: rebuild, never misread
            warn_once(path, self.what, f"its version is {data.get('version')!r}, this "
                                       f"qcompile reads version {self.version}")
            return {}
        entries = data.get("entries")
        if not isinstance(entries, dict):
            warn_once(path, self.what, "its 'entries' is not an object")
            return {}
        good, bad = {}, []
        for key, entry in entries.items():
            problem = self.problem(entry)
            if problem is None:
                good[key] = entry
            else:
                bad.append(f"{key!r}: {problem}")
        if bad:
            more = f"; and {len(bad) - 3} more" if len(bad) > 3 else ""
            warn_once(path, self.what, f"{len(bad)} malformed entries are dropped: "
                                       + "; ".join(bad[:3]) + more)
        return good

    def get(self, key: str, *, refresh: bool = False):
        """The entry for key; refresh re-reads the file (another process may have written)."""
        if self._entries is None or refresh:
            self._entries = self._read(self._file())
        return self._entries.get(key)

    def put(self, key: str, entry) -> None:
        problem = self.problem(entry)
        if problem is not None:
            raise ValueError(f"refusing to store a malformed {self.what} entry for {key!r}: "
                             f"{problem}")
        path = self._file()
        with locked(path.with_name(path.name + ".lock")):
            entries = self._read(path)
            entries[key] = entry
            write_atomic(path, json.dumps({"version": self.version, "entries": entries},
                                          indent=1, sort_keys=True))
        self._entries = entries
