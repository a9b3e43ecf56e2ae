"""One study round: a study's instances scored as one source through the `run` pipeline and sinks, then its
DICOM results made (runtime/dicom_out/) for the outbox.

`StudySource` chains the instances' `DicomSource`s (frames numbered continuously across them; each frame keeps its
file's name, a hash, and its number inside the file), so a study's records, study summary and report are made by
the very sinks `sonoscore run` uses. `score_study` runs it; `StudyRound.records` keeps the records the DICOM
results need (accepted frames whole; the others without their pixels).
"""
from __future__ import annotations

import copy
import hashlib
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from runtime.record import FrameRecord
from runtime.sinks import Sink
from runtime.sources import Frame, Source, SourceError, now


class StudySource(Source):
    """The instances of one study round, in the order given, as one lossless source. An instance that cannot be
    opened gets one error frame naming it by its place ("instance 2 of 5 of the study"), never by a UID."""

    def __init__(self, paths: list[Path], source_id: str):
        from runtime.sources.dicom import DicomSource
        self.paths = list(paths)
        self.source_id = source_id
        self._sources: list = []
        for n, p in enumerate(self.paths):
            try:
                src = DicomSource(p, realtime=False, warn_modality=False)
            except SourceError:
                self._sources.append(f"instance {n + 1} of {len(self.paths)} of the study could not be opened (not "
                                     f"an image this runtime reads, truncated, or no decoder)")
                continue
            if src.not_ultrasound:      # the DICOM source's own check (runtime/sources/dicom.py)
                self._sources.append(f"instance {n + 1} of {len(self.paths)} of the study is not ultrasound "
                                     f"({src.not_ultrasound}); it is not graded and has no part in the study's "
                                     f"grade or DICOM results")
                continue
            self._sources.append(src)
        self.total = sum(s.total if not isinstance(s, str) else 1 for s in self._sources)

    def __iter__(self) -> Iterator[Frame]:
        index = 0
        for path, s in zip(self.paths, self._sources):
            if isinstance(s, str):
                yield Frame(index, self.source_id, now(), None, error=s, source_file=path.name, frame_in_file=0)
                index += 1
                continue
            for frame in s:
                frame.index, frame.source_id = index, self.source_id
                frame.source_file, frame.frame_in_file = path.name, frame.frame_in_file
                yield frame
                index += 1


class Collector(Sink):
    """Keeps every record for the DICOM results, in bounded memory whatever the study's length: the pixels (mask,
    displayed frame) of at most 2 x `keep` accepted frames spread evenly over the study (every frame while there
    are few; when more would be kept, every second one is let go and the stride doubles), nothing of the others
    but their figures. The Segmentations and overlay pictures are chosen among the frames kept whole."""

    def __init__(self, keep: int = 8) -> None:
        self.records: list[FrameRecord] = []
        self.keep = max(1, keep)
        self.stride = 1
        self._accepted = 0
        self._whole: list[int] = []       # indices into records of the frames kept whole

    def write(self, record: FrameRecord) -> None:
        self._check_open()
        kept = copy.copy(record)          # the other sinks still get the record as it is
        kept.image = None
        if record.accepted and self._accepted % self.stride == 0:
            self._whole.append(len(self.records))
        else:
            kept.display = kept.mask = None
        self._accepted += bool(record.accepted)
        self.records.append(kept)
        if len(self._whole) > 2 * self.keep:
            for i in self._whole[1::2]:
                self.records[i].display = self.records[i].mask = None
            self._whole = self._whole[::2]
            self.stride *= 2


@dataclass
class StudyRound:
    study: str                      # the study's key (uid_key of its Study Instance UID)
    instances: list[Path]           # the spooled instances, in scoring order
    round_id: str = ""
    records: list[FrameRecord] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    out_dir: Path | None = None
    lenient: list[str] = field(default_factory=list)   # header keywords left empty in the results (did not parse)

    def __post_init__(self) -> None:
        if not self.round_id:
            self.round_id = round_id(self.study, self.instances)

    @property
    def batch_id(self) -> str:
        return f"{self.study}-{self.round_id}"


def not_ultrasound(path: Path) -> str | None:
    """What the instance is, in words, when it is not ultrasound (runtime.sources.dicom's check: its Modality, or
    without one its SOP class); None when it is, or when it cannot be opened (its error frame says so)."""
    from runtime.sources.dicom import DicomSource
    try:
        return DicomSource(path, realtime=False, warn_modality=False).not_ultrasound
    except SourceError:
        return None


def round_id(study: str, instances: list[Path]) -> str:
    """The same set of instances of a study always makes the same round id (a round redone after a crash is
    recognised in the outbox)."""
    text = study + "|" + ",".join(sorted(p.stem for p in instances))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def scoring_order(paths: list[Path]) -> list[Path]:
    """Instances by Series Number, Instance Number, then Acquisition time and name (a scanner's order); one whose
    header cannot be read goes last."""
    import pydicom

    def key(p: Path):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(p, stop_before_pixels=True)
            return (0, _num(ds.get("SeriesNumber")), _num(ds.get("InstanceNumber")),
                    str(ds.get("AcquisitionDateTime") or ds.get("ContentTime") or ""), p.name)
        except Exception:  # noqa: BLE001 - its error frame says so when it is scored
            return (1, 0.0, 0.0, "", p.name)
    return sorted(paths, key=key)


def _num(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("inf")


def score_study(pipe, bundle, rnd: StudyRound, out_dir: Path, *, stop=None) -> StudyRound:
    """Run the round's instances through `pipe` into the `run` sinks: `out_dir`/results.jsonl (one record per
    frame), summary.json and report.html. Fills `rnd.records`, `rnd.summary` and `rnd.out_dir`."""
    from runtime.sinks.jsonl import JsonlSink
    from runtime.sinks.summary import StudySummary
    from runtime.stream import run_stream
    out_dir.mkdir(parents=True, exist_ok=True)
    source = StudySource(rnd.instances, f"study-{rnd.study[:12]}")
    card = getattr(bundle, "card", None)
    kwargs = {"card": card} if card is not None else {}
    summary = StudySummary(out_dir / "summary.json", disclaimer=bundle.disclaimer, html_path=out_dir / "report.html",
                           class_names=bundle.manifest.get("classes") or _default_classes(), **kwargs)
    collector = Collector()
    sinks = [JsonlSink(out_dir / "results.jsonl"), summary, collector]
    try:
        run_stream(source, pipe.process, sinks, policy="all", stop=stop, record_paths=True)
    finally:
        errors = []
        for s in sinks:
            try:
                s.close()
            except OSError as e:
                errors.append(e)
        source.close()
    if errors:
        raise errors[0]
    rnd.records = collector.records
    rnd.summary = summary.summary()
    rnd.out_dir = out_dir
    return rnd


def _default_classes():
    from runtime.sinks.overlay import DEFAULT_CLASS_NAMES
    return DEFAULT_CLASS_NAMES
