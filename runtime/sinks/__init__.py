"""Sinks: what consumes per-frame records, and what they draw.

    jsonl.py     `--results`: one JSON object per frame
    masks.py     `--save-masks`: each frame's binary mask as PNG
    video.py     `--video`: the overlay video (MP4)
    summary.py   `--study-summary` / `--study-report`: the per-study aggregate (JSON) and its HTML report
    viewer.py    `--view`: the live browser viewer (HTTP server; its page is viewer_page.html beside it)
    display.py   `--display`: the overlay in a window on the device's own screen
    overlay.py   the overlay picture of one record (video, display; the viewer draws its frame and contour)
    report.py    the study's bounded timeline and the one-page HTML report drawn from it

The stream's worker thread hands every sink every record, in input order, one at a time; a sink needs no locks.
Each sink is a context manager and `close()` may be called any number of times (the run closes its sinks in a
`finally`, and a `with` block may close them again).

Files: the results and the video are written to a partial file beside their path (`partial_path`) and renamed
into place by `close()`, so the file at the path is the previous run's until this run has finished, and never a
torn one. `runtime.sinks.outputs.check_outputs` refuses, before anything is written, paths that cannot work (the
same path twice, a folder given as a file, a folder that cannot be written, a video name the writer cannot write). A sink whose write fails (a full disk) is told so by
`fail()`: it takes no more records and says what it kept in one sentence; `discard()` removes what a run that
never started wrote.
"""
from __future__ import annotations

import glob
import os
import secrets
import stat
import sys
import time
from pathlib import Path

from runtime.files import fsync_path  # noqa: F401  (sinks and the spool import it from here)
from runtime.record import FrameRecord


class Sink:
    """Base class. Subclasses implement `write` and, for resources to release, `_close` (called once)."""

    closed: bool = False      # a class default, so a subclass need not call super().__init__()
    failed: str | None = None  # set by fail(): the sentence saying why this output stopped

    @property
    def label(self) -> str:
        """What the output is called in messages (`results out.jsonl`)."""
        return type(self).__name__

    def write(self, record: FrameRecord) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Finish and release the output; later calls do nothing. May raise OSError when the output cannot be
        finished (the message names it)."""
        if self.closed:
            return
        self.closed = True
        self._close()

    def _close(self) -> None:
        pass

    def fail(self, error: BaseException) -> str:
        """A write raised `error`: this output takes no more records (the stream stops handing it any); `close()`
        still finishes what it holds where it can. Returns the one sentence that says so (the same on every
        call)."""
        if self.failed is None:
            self.failed = self._failure(error)
        return self.failed

    def _failure(self, error: BaseException) -> str:
        return f"{self.label} could not be written ({reason(error)}); it stopped there"

    def discard(self) -> None:
        """Release the output without finishing it (the run did not start): what it wrote is removed and the file
        at its path, if any, is left as it was. Later calls, and close(), do nothing."""
        if self.closed:
            return
        self.closed = True
        self._discard()

    def _discard(self) -> None:
        self._close()

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError(f"{type(self).__name__} is closed: it takes no more records")

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def reason(error: BaseException) -> str:
    """An exception as a short clause: an OSError's own words ("No space left on device"), else its message."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error) or type(error).__name__


def partial_path(path: str | Path) -> Path:
    """Where an output is written until it is finished: beside it, `r.jsonl` -> `r.partial-<time>-<random>.jsonl`
    (the suffix kept, so the video writer still picks the container by it). The name is new for every run (UTC
    start time and 8 random hex digits; not the process id, which a container restart gives again: PID 1), and
    `claim_partial` creates it exclusively, so a partial file is never reopened for writing and a killed run's
    records are never overwritten by the next run (`recover_partials` keeps them)."""
    path = Path(path)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    return path.with_name(f"{path.stem}.partial-{stamp}-{secrets.token_hex(4)}{path.suffix}")


def claim_partial(partial: Path) -> int:
    """Create `partial` (it must not exist: O_EXCL) and hold an exclusive advisory lock on it for as long as the
    returned descriptor is open (the run's life; the OS drops it when the process dies, SIGKILL included), so
    `recover_partials` of another run never takes a file still being written."""
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        import fcntl
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:
        pass
    return fd


def recover_partials(target: Path, label: str) -> list[Path]:
    """Keep what earlier runs left beside `target` (`<stem>.partial-*<suffix>`: a run killed by SIGKILL, a power
    cut, a container restart): each non-empty one no process holds (`claim_partial`'s lock) is renamed
    `<stem>.recovered-<its last write, UTC>-<random><suffix>` (never over another file) and one line on stderr says
    so; an empty one is removed. Returns the recovered files."""
    target = Path(target)
    kept: list[Path] = []
    for old in sorted(target.parent.glob(f"{glob.escape(target.stem)}.partial-*{glob.escape(target.suffix)}")):
        try:
            fd = os.open(old, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            continue
        try:
            try:
                import fcntl
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue                      # another run is writing it now
            except ImportError:
                pass
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                continue
            if st.st_size == 0:
                old.unlink(missing_ok=True)
                continue
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(st.st_mtime))
            new = old.with_name(f"{target.stem}.recovered-{stamp}-{secrets.token_hex(3)}{target.suffix}")
            try:
                os.link(old, new)             # fails rather than replace a file of that name
                os.unlink(old)
            except FileExistsError:
                continue
            except OSError:                   # a file system without hard links: a rename, checked first
                if new.exists():
                    continue
                try:
                    os.rename(old, new)
                except OSError:
                    continue
            kept.append(new)
        finally:
            os.close(fd)
    if kept:
        fsync_path(target.parent)
        names = ", ".join(p.name for p in kept)
        print(f"sonoscore: {label}: an earlier run stopped before finishing it; its partial output is kept as "
              f"{names} beside it", file=sys.stderr, flush=True)
    return kept


def target_path(path: str | Path) -> Path:
    """The file an output path names: symbolic links followed, so renaming into place replaces the file the
    link points at, not the link."""
    return Path(os.path.realpath(path))


def is_stream_file(path: str | Path) -> bool:
    """True when `path` exists and is not a regular file or folder (a pipe, a terminal, /dev/stdout): such an
    output is written in place, as it goes, never renamed."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return not stat.S_ISREG(mode) and not stat.S_ISDIR(mode)


