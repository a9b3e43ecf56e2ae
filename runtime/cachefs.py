"""What the on-target build caches share (compiled boosters, TensorRT engines): an inter-process build lock."""
from __future__ import annotations

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
