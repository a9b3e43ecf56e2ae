"""The worker side of a batch job: a `Scorer` loads the bundle once (runtime.pipelines.open_pipeline, the graph
`run` runs) and turns one unit (a study) into its two Arrow tables, frames and studies (runtime/batch/tables.py).

A unit never raises: an instance that cannot be opened, or is not ultrasound, becomes one error row naming it by its
place in the study ("instance 2 of 40 of the study"), never by a UID or a file name; a frame the pipeline cannot
process is its record's error; anything unexpected ends the study as a studies row with the error's type. Only
the error's type is logged (a message may quote a path).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from runtime.batch import tables
from runtime.sources.base import Frame, SourceError, now

log = logging.getLogger("sonoscore.batch")


class Scorer:
    """One bundle, loaded once, scoring units. `info`: the bundle's name, version, manifest hash and the precision,
    stamped on every row."""

    def __init__(self, bundle: str, *, precision: str = "fp32", threads: int | None = None, device: str = "cpu",
                 backend: str = "ort", min_mask_fraction: float | None = None):
        from runtime.bundle import Bundle
        from runtime.pipelines import open_pipeline
        self.bundle = Bundle.load(bundle)
        card = self.bundle.card
        self.info = {"bundle_name": str(card.get("name") or "sonoscore"),
                     "bundle_version": str(card.get("version") or "unversioned"),
                     "manifest_sha256": self.bundle.manifest_sha256, "precision": precision}
        self.classes = self.bundle.manifest.get("classes") or None
        self.pipe = open_pipeline(self.bundle, device=device, backend=backend, precision=precision,
                                  threads=threads, min_mask_fraction=min_mask_fraction).__enter__()

    def close(self) -> None:
        if self.pipe is not None:
            self.pipe.__exit__(None, None, None)
            self.pipe = None

    def study(self, unit: dict):
        """(frames table, studies table) of one unit; never raises."""
        t0 = time.perf_counter()
        try:
            return self._score(unit, t0)
        except Exception as e:  # noqa: BLE001 - the study ends as an error row, the job goes on
            log.warning("batch: a study failed inside the scorer (%s); it is recorded with its error",
                        type(e).__name__)
            return tables.failed(unit, self.info, f"the study could not be scored: internal error "
                                                  f"({type(e).__name__})")

    def _score(self, unit: dict, t0: float):
        from runtime.sinks.summary import StudySummary
        if unit["kind"] == "unreadable":
            return tables.failed(unit, self.info, unit["error"])
        summary = StudySummary(class_names=self.classes)
        rows: list[dict] = []
        file_errors: list[str] = []
        source_id = f"study-{unit['key'][:12]}"
        files = unit["files"]
        index = 0
        for n, f in enumerate(files):
            label = f"instance {n + 1} of {len(files)} of the study" if unit["kind"] == "dicom" \
                else f"image {n + 1} of {len(files)} of the folder"
            first_error, errors = None, 0
            for frame in self._frames(unit["kind"], Path(f["path"]), label):
                frame.index, frame.source_id = index, source_id
                rec = self.pipe.process(frame)
                summary.write(rec)
                rows.append(tables.frame_row(unit, f, frame, rec))
                if rec.error:
                    errors += 1
                    first_error = first_error or rec.error
                index += 1
            if first_error:
                file_errors.append(first_error if errors == 1 else f"{first_error} (and {errors - 1} more frame "
                                                                   f"error(s) in {label})")
        s = summary.summary()
        error = None
        if not s["accepted"] and not s["rejected"]:
            first = file_errors[0] if file_errors else "it has no frames"
            error = f"no frame of the study could be scored: {first}"
        return tables.to_tables(unit, self.info, rows, s, file_errors, error, time.perf_counter() - t0)

    def _frames(self, kind: str, path: Path, label: str):
        if kind == "images":
            from runtime.sources.files import read_image
            pixels, err = read_image(path, label)
            yield Frame(0, "", now(), pixels, channel_order="BGR", error=err, frame_in_file=0)
            return
        from runtime.sources.dicom import DicomSource
        try:
            src = DicomSource(path, realtime=False, warn_modality=False)
        except SourceError:
            yield Frame(0, "", now(), None, error=f"{label} could not be opened (not an image this runtime reads, "
                                                  f"truncated, or no decoder)", frame_in_file=0)
            return
        if src.not_ultrasound:
            yield Frame(0, "", now(), None, error=f"{label} is not ultrasound ({src.not_ultrasound}); it is not "
                                                  f"graded and has no part in the study's grade", frame_in_file=0)
            return
        try:
            yield from src
        finally:
            src.close()
