"""The output folder of a batch job: exactly once, resumable.

    OUT/batch.json                 what the folder holds: bundle (name, version, manifest hash), precision, whether
                                   UIDs are de-identified; a rerun with other settings is refused (exit 2)
    OUT/frames/<key>.parquet       one file per study: its frames
    OUT/studies/<key>.parquet      one file per study: its studies row; written last, so it marks the study done
    OUT/.lock                      held while a job writes (a second job on the same folder is refused)

<key> is the keyed hash of the Study UID (runtime.batch.archive.unit_key). Each file is written to a temporary
name in its folder, fsynced and renamed into place (runtime.files.atomic_write), so a reader (pyarrow, DuckDB:
the temporary names start with "." and are ignored) sees a study whole or not at all. A job killed at any moment
loses at most the studies in flight: the rerun skips every study whose studies file exists and redoes the others
(a frames file left without its studies file is replaced whole).
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

from runtime.errors import UserError
from runtime.files import atomic_write, file_lock

SETTINGS = "batch.json"


class Store:
    def __init__(self, out: str | Path, settings: dict):
        self.out = Path(out)
        self.settings = settings
        if self.out.exists() and not self.out.is_dir():
            raise UserError(f"--out '{self.out}' is a file; give a folder (it is made if missing)")

    @contextmanager
    def open(self):
        """Lock the folder, check (or write) its settings, remove temporary files a killed job left."""
        self.out.mkdir(parents=True, exist_ok=True)

        def busy():
            raise UserError(f"another batch job is writing to '{self.out}'; wait for it to end or give another --out")
        with file_lock(self.out / ".lock", on_wait=busy):
            self._settings()
            for sub in ("frames", "studies"):
                (self.out / sub).mkdir(exist_ok=True)
                for p in (self.out / sub).glob(".*.tmp"):
                    p.unlink(missing_ok=True)
            yield self

    def _settings(self) -> None:
        path = self.out / SETTINGS
        if path.exists():
            try:
                have = json.loads(path.read_text())
            except (OSError, ValueError):
                raise UserError(f"'{path}' is damaged; give a new --out (or remove the folder to start again)")
            diff = [k for k in self.settings if have.get(k) != self.settings[k]]
            if diff:
                raise UserError(f"--out '{self.out}' holds results made with other settings ({', '.join(diff)}); "
                                f"give another --out, or the same bundle and options to resume it")
        else:
            atomic_write(path, json.dumps(self.settings, indent=2) + "\n")

    def done(self) -> set[str]:
        """The keys of the studies already written whole."""
        return {p.stem for p in (self.out / "studies").glob("*.parquet") if not p.name.startswith(".")}

    def write(self, key: str, frames: bytes, studies: bytes) -> None:
        """One study's two files, frames first; the studies file's rename is the commit."""
        atomic_write(self.out / "frames" / f"{key}.parquet", frames)
        atomic_write(self.out / "studies" / f"{key}.parquet", studies)


def read(out: str | Path, which: str = "studies"):
    """The whole `which` table ("studies" or "frames") of an output folder as one pyarrow Table."""
    import pyarrow.dataset as ds
    from runtime.batch.tables import FRAMES, STUDIES
    folder = Path(out) / which
    return ds.dataset(str(folder), format="parquet", schema=STUDIES if which == "studies" else FRAMES).to_table() \
        if any(folder.glob("*.parquet")) else (STUDIES if which == "studies" else FRAMES).empty_table()


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
