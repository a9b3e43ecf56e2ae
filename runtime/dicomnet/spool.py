"""The spool: every instance `sonoscore listen` receives, on disk before its C-STORE is acknowledged.

    <spool>/tmp/                           a receive in progress (`<sop key>.<random>.part`)
    <spool>/studies/<study key>/<sop key>.dcm       a received instance, as the sender encoded it (Part 10)
    <spool>/studies/<study key>/done-<round>.json   a finished round of that study: the instances it covered and
                                                    the outbox batch that holds its results
    <spool>/studies/<study key>/failures.json       its pending round's failed scoring attempts so far (kept over
                                                    a restart, so the attempts are counted to their end)
    <spool>/failed/<study key>/<round>/             a round that could not be scored in `study_attempts` tries: its
                                                    instances and failed.json (why, in words; no identifier)
    <spool>/state.json                              the running listener: its pid and the study it scores now

Keys are `uid_key` keyed hashes (HMAC under the installation's salt) of the Study and SOP Instance UIDs: no
patient data in a name, and no name found by hashing a known UID. An instance is written to tmp/, fsynced, renamed
into its study's folder and the folder fsynced; only then is the C-STORE answered with success, so an
acknowledged instance survives a crash or a power cut. An instance is pending until a done file of
its study lists it; a study's pending instances are scored together as one round. Once its round is done, an
instance is removed (unless `keep_instances`); its key stays listed, so the same instance sent again is known and
not scored twice.
"""
from __future__ import annotations

import json
import os
import secrets
import threading
import time
from pathlib import Path

from runtime.dicomnet import uid_key
from runtime.sinks import fsync_path

SUFFIX = ".dcm"
RECEIVING = "recv-"     # pynetdicom's file of a data set being received, in tmp/ (listen.py)


def fsync_dir(folder: Path) -> None:
    """Make a rename or a removal in `folder` durable (runtime.sinks.fsync_path on the folder)."""
    fsync_path(folder)


def write_durably(path: Path, data: bytes, tmp_dir: Path | None = None) -> None:
    """Write `data` at `path` all or nothing: a temporary file (in `tmp_dir`, same file system, else beside the
    path), fsynced, renamed into place, the folder fsynced."""
    tmp_dir = tmp_dir or path.parent
    tmp = tmp_dir / f"{path.name}.{secrets.token_hex(4)}.part"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


class Spool:
    def __init__(self, root: str | os.PathLike, *, keep_instances: bool = False):
        self.root = Path(root)
        self.tmp = self.root / "tmp"
        self.studies_dir = self.root / "studies"
        self.failed_dir = self.root / "failed"
        self.keep_instances = keep_instances
        self._lock = threading.Lock()

    def open(self) -> "Spool":
        """Make the folders and clear receives that a crash cut short (never acknowledged, so the sender still
        holds them and sends them again)."""
        for d in (self.root, self.tmp, self.studies_dir, self.failed_dir):
            d.mkdir(parents=True, exist_ok=True)
        for part in [*self.tmp.glob("*.part"), *self.tmp.glob(f"{RECEIVING}*")]:
            part.unlink(missing_ok=True)
        return self

    # -- receiving ---------------------------------------------------------------------------------------------

    def part_path(self, sop_uid: str) -> Path:
        return self.tmp / f"{uid_key(sop_uid, 32)}.{secrets.token_hex(4)}.part"

    def write_part(self, data: bytes, sop_uid: str) -> Path:
        """The received bytes in tmp/, fsynced; `commit` moves them into their study."""
        part = self.part_path(sop_uid)
        try:
            with open(part, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        return part

    def adopt_part(self, received: Path, sop_uid: str) -> Path:
        """A data set pynetdicom received into a file (in tmp/, so a rename; elsewhere, a copy), fsynced, as a part
        that `commit` moves into its study."""
        part = self.part_path(sop_uid)
        try:
            try:
                os.replace(received, part)
            except OSError:             # another file system: copied
                import shutil
                shutil.copyfile(received, part)
            fd = os.open(part, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        return part

    def commit(self, part: Path, study_uid: str, sop_uid: str) -> tuple[str, str]:
        """Rename a written part into its study's folder (made when needed) and fsync the folders: (study key,
        instance key). After this returns, the instance survives a crash."""
        study, sop = uid_key(study_uid), uid_key(sop_uid, 32)
        folder = self.studies_dir / study
        with self._lock:
            new_folder = not folder.is_dir()
            folder.mkdir(exist_ok=True)
            os.replace(part, folder / f"{sop}{SUFFIX}")
        fsync_dir(folder)
        if new_folder:
            fsync_dir(self.studies_dir)
        return study, sop

    # -- the worker's side -------------------------------------------------------------------------------------

    def study_keys(self) -> list[str]:
        return sorted(p.name for p in self.studies_dir.iterdir() if p.is_dir()) if self.studies_dir.is_dir() else []

    def covered(self, study: str) -> set[str]:
        """Instance keys that a finished round of the study lists."""
        out: set[str] = set()
        for done in (self.studies_dir / study).glob("done-*.json"):
            try:
                out.update(json.loads(done.read_text())["instances"])
            except (OSError, ValueError, KeyError, TypeError):
                continue  # a damaged marker covers nothing: its instances are scored again
        return out

    def covering_round(self, study: str, key: str) -> dict | None:
        """The finished round of the study that covered the instance `key` ({"round", "instances", "batch",
        "finished"}), or None."""
        for done in (self.studies_dir / study).glob("done-*.json"):
            try:
                record = json.loads(done.read_text())
                if key in record["instances"]:
                    return record
            except (OSError, ValueError, KeyError, TypeError):
                continue
        return None

    def pending(self, study: str) -> list[Path]:
        """The study's instances that no finished round covers, by name."""
        folder = self.studies_dir / study
        if not folder.is_dir():
            return []
        covered = self.covered(study)
        return sorted(p for p in folder.glob(f"*{SUFFIX}") if p.stem not in covered)

    def last_activity(self, study: str) -> float | None:
        """When the study's newest pending instance was written (time.time() clock); None: nothing pending."""
        times = []
        for p in self.pending(study):
            try:
                times.append(p.stat().st_mtime)
            except OSError:
                continue
        return max(times) if times else None

    def mark_done(self, study: str, round_id: str, instances: list[Path], batch: str | None) -> None:
        """Record that a round covered `instances` (its results are in the outbox batch `batch`), then remove
        them unless instances are kept. Covered instances are removed even when already covered by an earlier
        round (a re-sent instance)."""
        folder = self.studies_dir / study
        keys = sorted(p.stem for p in instances)
        record = {"round": round_id, "instances": keys, "batch": batch, "finished": time.time()}
        write_durably(folder / f"done-{round_id}.json", json.dumps(record).encode(), self.tmp)
        if not self.keep_instances:
            for p in instances:
                p.unlink(missing_ok=True)
            fsync_dir(folder)

    def drop_covered(self, study: str) -> list[Path]:
        """Instances received again after their round was done: removed (unless kept); returns them."""
        folder = self.studies_dir / study
        covered = self.covered(study)
        again = [p for p in folder.glob(f"*{SUFFIX}") if p.stem in covered]
        if again and not self.keep_instances:
            for p in again:
                p.unlink(missing_ok=True)
        return again

    # -- failures ----------------------------------------------------------------------------------------------

    def failures(self, study: str) -> dict | None:
        """The pending round's failed attempts ({"round", "failures", "next", "error"}), or None."""
        try:
            record = json.loads((self.studies_dir / study / "failures.json").read_text())
            return record if isinstance(record, dict) else None
        except (OSError, ValueError):
            return None

    def note_failure(self, study: str, record: dict) -> None:
        write_durably(self.studies_dir / study / "failures.json", json.dumps(record).encode(), self.tmp)

    def clear_failures(self, study: str) -> None:
        (self.studies_dir / study / "failures.json").unlink(missing_ok=True)

    def move_failed(self, study: str, round_id: str, instances: list[Path], record: dict) -> Path:
        """Give up on a round: its instances move to failed/<study>/<round>/ with failed.json (`record`); the study
        has nothing pending after this (an instance sent again later is a new round)."""
        dest = self.failed_dir / study / round_id
        dest.mkdir(parents=True, exist_ok=True)
        write_durably(dest / "failed.json", json.dumps(record, indent=1).encode(), self.tmp)
        for p in instances:
            try:
                os.replace(p, dest / p.name)
            except FileNotFoundError:
                continue
        fsync_dir(dest)
        self.clear_failures(study)
        fsync_dir(self.studies_dir / study)
        return dest

    def failed_rounds(self) -> list[dict]:
        out = []
        for f in sorted(self.failed_dir.glob("*/*/failed.json")) if self.failed_dir.is_dir() else []:
            try:
                out.append(json.loads(f.read_text()))
            except (OSError, ValueError):
                out.append({"study": f.parent.parent.name, "round": f.parent.name, "reason": "(failed.json unreadable)"})
        return out

    # -- the running listener ----------------------------------------------------------------------------------

    def write_state(self, scoring: str | None) -> None:
        record = {"pid": os.getpid(), "scoring": scoring, "since": time.time()}
        try:
            write_durably(self.root / "state.json", json.dumps(record).encode(), self.tmp)
        except OSError:
            pass                         # only the status view reads it

    def state(self) -> dict | None:
        try:
            record = json.loads((self.root / "state.json").read_text())
        except (OSError, ValueError):
            return None
        pid = record.get("pid") if isinstance(record, dict) else None
        if not isinstance(pid, int):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None                   # that listener is gone
        except PermissionError:
            pass
        return record
