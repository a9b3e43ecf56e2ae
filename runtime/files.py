"""Files written so that a crash never leaves half of one: atomic replacement, fsync of a file or of the folder a
rename happened in, an inter-process lock (the on-target build caches: compiled boosters, TensorRT engines; the
DICOM outbox), and the test that a cached folder holds only what this user wrote (`not_private`: code is loaded from
the caches only when it passes). Every module that writes a file others read goes through here."""
from __future__ import annotations

import os
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator


@contextmanager
def file_lock(path: Path, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """An exclusive advisory lock on `path` (POSIX flock), released by the OS if the process dies mid-build.

    `on_wait` is called once if another process holds it, so the user learns why nothing seems to happen while an
    engine builds elsewhere (that can take minutes on a Jetson)."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): atomic renames alone still keep the cache consistent
        yield
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def fsync_path(path: str | Path) -> None:
    """Make a written file, or a rename or removal in a folder, durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(folder: str | Path) -> None:
    """Make a rename or a removal in `folder` durable."""
    fsync_path(folder)


def atomic_write(path: str | Path, data: bytes | str, *, durable: bool = True) -> None:
    """Write `data` (str: UTF-8) to `path` through a temporary file in the same folder, renamed into place: readers
    see the old file or the whole new one, never part of it. `durable`: the file is fsynced before the rename and
    the folder after it (off for files that only need to appear whole, such as a report rewritten often)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def not_private(path: Path, *, contents: bool = False) -> str | None:
    """Why `path` (with `contents`, also what its folder holds, its lock file aside) could hold code this process
    did not build, or None: each must be this process's user's own (not a symbolic link, owned by the effective
    user, writable by neither its group nor everyone else); a path that does not exist passes. Only this user (or
    root) can then have written the libraries and the meta.json that holds their hashes."""
    path = Path(path)
    try:
        inside = ([path / c for c in os.listdir(path) if c != ".lock"]
                  if contents and stat.S_ISDIR(os.lstat(path).st_mode) else [])
    except FileNotFoundError:
        return None
    for p in [path, *inside]:
        try:
            st = os.lstat(p)
        except FileNotFoundError:      # a build of another process finishing
            continue
        if stat.S_ISLNK(st.st_mode):
            return f"{p} is a symbolic link"
        if hasattr(os, "geteuid") and st.st_uid != os.geteuid():
            return f"{p} belongs to another user (uid {st.st_uid})"
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            return f"{p} is writable by {'everyone' if st.st_mode & stat.S_IWOTH else 'its group'}"
    return None


def private_folder(path: Path) -> None:
    """Make `path` (and missing parents) a folder only this user may enter and write (mode 0700 for those made)."""
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.mkdir(mode=0o700, exist_ok=True)
