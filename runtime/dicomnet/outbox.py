"""The outbox: DICOM results wait on disk until every destination has them (a PACS outage, a restart).

    <outbox>/tmp/                      a batch being put (`<batch>.<pid>.<random>`; never seen by delivery)
    <outbox>/deliver.lock              one delivery pass at a time (`listen` and `run --send` may share an outbox)
    <outbox>/batches/<batch>/          one batch: the results of one study round (or of one `run --send`)
        batch.json                     {"id", "label", "created", "destinations": [names], "files": [names],
                                        "kinds": [each file's kind: SR, SEG, SC (runtime.dicom_out.result_kind)]}
        <n>-<sop key>.dcm              a result, DICOM Part 10
        <n>-<sop key>.dcm.sent-<dest>  written (and fsynced) right after <dest> acknowledged that file
    <outbox>/done/<batch>              the batch was delivered everywhere (kept so that a study round redone after
                                       a crash is known to have been delivered already)

`put` writes a whole batch in tmp/, fsyncs it and renames it into batches/: a batch is there complete or not at
all. `Deliverer` sends what is not yet sent, destination by destination; a file leaves the outbox only when every
destination of its batch has acknowledged it, so a result is never lost and, as far as a destination sees, sent
once: the only way it is sent twice is a crash between the destination's acknowledgement and the marker's fsync
(and a PACS stores a SOP Instance UID it already holds once; Orthanc ignores the copy).

Back-off: a destination that cannot be reached waits `retry.delay(n)` after its n-th failure in a row (first_s,
doubling by `factor`, at most max_s) and is reset by a delivery. An instance the destination refuses waits the same
way on its own. Logging (logger `sonoscore.dicomnet`, opaque ids only): each delivery once; a destination going
down once (with its reason, and again only when the reason changes) and coming back once; each refusal of an
instance once.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from runtime.dicomnet import uid_key
from runtime.dicomnet.config import Destination, Retry
from runtime.dicomnet.senders import Outcome, Unreachable, make_sender
from runtime.dicomnet.spool import fsync_dir
from runtime.sinks import fsync_path

log = logging.getLogger("sonoscore.dicomnet")

SENT = ".sent-"


class Outbox:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.tmp = self.root / "tmp"
        self.batches = self.root / "batches"
        self.done = self.root / "done"

    def open(self) -> "Outbox":
        for d in (self.root, self.tmp, self.batches, self.done):
            d.mkdir(parents=True, exist_ok=True)
        for stale in self.tmp.iterdir():   # a put cut short by a crash (its round is redone); not another's put
            if not _alive(stale.name.split(".")[-2] if stale.name.count(".") >= 2 else ""):
                shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
        return self

    @contextlib.contextmanager
    def lock(self):
        """One delivery pass at a time over this outbox, across processes (`listen` and a `run --send` may share
        it): an exclusive lock on `deliver.lock`."""
        with open(self.root / "deliver.lock", "a+b") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def has(self, batch: str) -> bool:
        """The batch was put (waiting or delivered)."""
        return (self.batches / batch).is_dir() or (self.done / batch).exists()

    def put(self, batch: str, label: str, items: Iterable, destinations: Iterable[str]) -> list[str]:
        """Put a batch of results: `items` are pydicom Datasets (written as DICOM Part 10) or paths of DICOM files
        (copied). Returns the file names, in order. Putting a batch that is already there does nothing."""
        import pydicom
        from runtime.dicom_out import result_kind
        if self.has(batch):
            return []
        work = self.tmp / f"{batch}.{os.getpid()}.{secrets.token_hex(4)}"
        work.mkdir(parents=True)
        names, kinds = [], []
        try:
            for n, item in enumerate(items, 1):
                if isinstance(item, (str, os.PathLike)):
                    head = pydicom.dcmread(item, stop_before_pixels=True)
                    name = f"{n:03d}-{uid_key(str(head.SOPInstanceUID), 32)}.dcm"
                    shutil.copyfile(item, work / name)
                else:
                    head = item
                    name = f"{n:03d}-{uid_key(str(item.SOPInstanceUID), 32)}.dcm"
                    item.save_as(work / name, enforce_file_format=True)
                fsync_path(work / name)
                names.append(name)
                kinds.append(result_kind(head))
            meta = {"id": batch, "label": label, "created": time.time(), "destinations": sorted(set(destinations)),
                    "files": names, "kinds": kinds}
            (work / "batch.json").write_text(json.dumps(meta))
            fsync_path(work / "batch.json")
            fsync_dir(work)
            os.replace(work, self.batches / batch)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        fsync_dir(self.batches)
        return names

    def pending(self) -> list["Batch"]:
        """The batches waiting, oldest first."""
        out = []
        for d in self.batches.iterdir() if self.batches.is_dir() else []:
            try:
                meta = json.loads((d / "batch.json").read_text())
            except (OSError, ValueError):
                continue
            out.append(Batch(d, meta))
        return sorted(out, key=lambda b: (b.meta.get("created", 0), b.id))

    def finish(self, batch: "Batch") -> None:
        """Every destination has every file: note the batch as delivered, then remove it."""
        marker = self.done / batch.id
        marker.write_text(json.dumps({"delivered": time.time(), "label": batch.label}))
        fsync_path(marker)
        fsync_dir(self.done)
        shutil.rmtree(batch.path, ignore_errors=True)
        fsync_dir(self.batches)

    def count(self) -> int:
        return sum(len(b.files) for b in self.pending())


@dataclass
class Batch:
    path: Path
    meta: dict

    @property
    def id(self) -> str:
        return self.meta["id"]

    @property
    def label(self) -> str:
        return self.meta.get("label", self.id)

    @property
    def files(self) -> list[str]:
        return list(self.meta.get("files", []))

    @property
    def destinations(self) -> list[str]:
        return list(self.meta.get("destinations", []))

    def kind(self, file: Path) -> str:
        kinds = self.meta.get("kinds") or []
        files = self.files
        return kinds[files.index(file.name)] if file.name in files and len(kinds) == len(files) else "?"

    def unsent(self, dest: str) -> list[Path]:
        return [self.path / f for f in self.files if not (self.path / f"{f}{SENT}{dest}").exists()]

    def mark_sent(self, file: Path, dest: str) -> None:
        marker = file.with_name(f"{file.name}{SENT}{dest}")
        with open(marker, "wb") as f:
            os.fsync(f.fileno())
        fsync_dir(file.parent)

    def complete(self) -> bool:
        return all(not self.unsent(d) for d in self.destinations)


@dataclass
class _DestState:
    dest: Destination
    failures: int = 0
    next_try: float = 0.0
    down_reason: str | None = None
    file_failures: dict[str, int] = field(default_factory=dict)     # refused instances: failures in a row
    file_next: dict[str, float] = field(default_factory=dict)
    file_reason: dict[str, str] = field(default_factory=dict)


class Deliverer:
    """Delivers the outbox's batches to their destinations. `deliver_once()` makes one pass (each destination
    that is not backing off gets what it has not yet acknowledged); `run(stop)` passes until `stop` is set,
    sleeping until the next retry is due or `wake()` is called (a new batch)."""

    def __init__(self, outbox: Outbox, destinations: Iterable[Destination], retry: Retry, *,
                 sender_factory: Callable[[Destination], object] = make_sender,
                 clock: Callable[[], float] = time.monotonic):
        self.outbox = outbox
        self.retry = retry
        self.clock = clock
        self.states = {d.name: _DestState(d) for d in destinations}
        self.senders = {d.name: sender_factory(d) for d in destinations}
        self._wake = threading.Event()
        self._unknown_noted: set[tuple[str, str]] = set()
        self.delivered = 0

    def wake(self) -> None:
        self._wake.set()

    def deliver_once(self) -> bool:
        """One pass; True when the outbox is empty after it."""
        with self.outbox.lock():
            return self._pass()

    def _pass(self) -> bool:
        now = self.clock()
        for batch in self.outbox.pending():
            for name in batch.destinations:
                state = self.states.get(name)
                if state is None:
                    if (batch.id, name) not in self._unknown_noted:
                        self._unknown_noted.add((batch.id, name))
                        log.warning("batch %s waits for destination '%s', which the configuration no longer has; "
                                    "add it back (or remove %s) to deliver it", batch.id, name, batch.path)
                    continue
                if state.next_try > now:
                    continue
                files = [f for f in batch.unsent(name) if state.file_next.get(str(f), 0.0) <= now]
                if files:
                    self._send(batch, state, files)
            if batch.complete():
                self.outbox.finish(batch)
                log.info("batch %s (%s) delivered to every destination; removed from the outbox", batch.id,
                         batch.label)
        return not self.outbox.pending()

    def _send(self, batch: Batch, state: _DestState, files: list[Path]) -> None:
        d = state.dest
        total = len(batch.files)

        def on_result(path: Path, outcome: Outcome) -> None:
            key = str(path)
            n = batch.files.index(path.name) + 1 if path.name in batch.files else 0
            if outcome.ok:
                batch.mark_sent(path, d.name)
                self.delivered += 1
                state.file_failures.pop(key, None)
                state.file_next.pop(key, None)
                state.file_reason.pop(key, None)
                log.info("delivered result %d of %d (%s) of batch %s (%s) to %s%s", n, total, batch.kind(path),
                         batch.id, batch.label, d.label, f"; {outcome.detail}" if outcome.detail else "")
                self._back_up(state)
            else:
                k = state.file_failures.get(key, 0) + 1
                state.file_failures[key] = k
                state.file_next[key] = self.clock() + self.retry.delay(k)
                if state.file_reason.get(key) != outcome.detail:
                    state.file_reason[key] = outcome.detail
                    log.warning("%s refused result %d of %d (%s) of batch %s (%s): %s; it stays in the outbox "
                                "and is offered again with back-off", d.label, n, total, batch.kind(path), batch.id,
                                batch.label, outcome.detail)

        try:
            self.senders[d.name].send(files, on_result)
        except Unreachable as e:
            state.failures += 1
            delay = self.retry.delay(state.failures)
            state.next_try = self.clock() + delay
            reason = str(e)
            if state.down_reason != reason:
                log.warning("%s cannot be reached: %s; %d result(s) wait in the outbox, retried with back-off "
                            "(%gs, then up to %gs)", d.label, reason, self.outbox.count(), delay, self.retry.max_s)
                state.down_reason = reason
        except Exception as e:  # noqa: BLE001 - a sender's bug or an unreadable file must not end delivery
            state.failures += 1
            state.next_try = self.clock() + self.retry.delay(state.failures)
            reason = f"{type(e).__name__}: {e}"
            if state.down_reason != reason:
                log.warning("delivering batch %s to %s failed (%s); retried with back-off", batch.id, d.label,
                            reason)
                state.down_reason = reason

    def _back_up(self, state: _DestState) -> None:
        if state.down_reason is not None:
            log.info("%s reachable again after %d failed attempt(s); delivering what waited", state.dest.label,
                     state.failures)
        state.failures, state.next_try, state.down_reason = 0, 0.0, None

    def next_due(self) -> float | None:
        """Seconds until the next attempt is due; None when nothing waits."""
        pending = self.outbox.pending()
        if not pending:
            return None
        now = self.clock()
        due = []
        for batch in pending:
            for name in batch.destinations:
                st = self.states.get(name)
                if st is None:
                    continue
                for f in batch.unsent(name):
                    due.append(max(st.next_try, st.file_next.get(str(f), 0.0)) - now)
        return max(0.0, min(due)) if due else None

    def run(self, stop: threading.Event, idle_s: float = 5.0) -> None:
        while not stop.is_set():
            try:
                self.deliver_once()
            except OSError as e:   # the outbox's own disk: said once per cause, tried again
                log.error("the outbox %s cannot be read or written (%s); delivery tried again shortly",
                          self.outbox.root, e.strerror or e)
            wait = self.next_due()
            self._wake.wait(idle_s if wait is None else min(max(wait, 0.05), idle_s))
            self._wake.clear()


def _alive(pid: str) -> bool:
    """Whether the process `pid` (text) still runs."""
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


