"""What a batch job works through: the units of work (studies) of an archive, and a synthetic archive to try it on.

    units = list_units("archive/", ids=Ids(deidentify=False))   # a folder tree, or a CSV listing files
    write_archive("archive/", studies=20, files_per_study=2, frames_per_file=4)

A unit is one study: the DICOM instances of one Study Instance UID (runtime/series.py's grouping, series in their
order, instances in slice/instance order), or, for images, the image files of one folder. A file that cannot be
grouped (not DICOM, unreadable, no Study UID) is a unit of its own that ends as a studies row with its error.
Units are plain dicts (they cross process and Ray boundaries): `key` (the keyed hash the output files are named by),
`kind` ("dicom", "images" or "unreadable"), `study_uid` (the UID, or its keyed replacement with --deidentify; None
for images), `files` ([{path, series_uid, sop_uid, name}]: `name` the path relative to the source, only with
record_paths), `error` (kind "unreadable": the sentence). The UIDs are replaced here, in the driver, so that the
key never leaves this process and every node of a cluster writes the same values.
"""
from __future__ import annotations

import csv
import hashlib
import hmac
from dataclasses import dataclass
from pathlib import Path

from runtime.errors import UserError


@dataclass
class Ids:
    """How UIDs appear in the output. Without `deidentify` they are the files' own; with it, keyed replacements:
    runtime.deid's (dicognito's, "2." + 40 digits, the very UIDs `sonoscore deid --key KEY` writes) when a `key`
    is given, else "2.25." + the decimal of an HMAC-SHA256 under the installation's salt (runtime.sources); the
    same key (or installation) gives the same values in every run."""
    deidentify: bool = False
    key: str | None = None
    record_paths: bool = False

    def __post_init__(self):
        self._deid = None
        if self.deidentify and self.key:
            from runtime.deid import Deidentifier
            self._deid = Deidentifier(self.key)

    def uid(self, uid: str | None) -> str | None:
        if uid is None or not self.deidentify:
            return uid
        if self._deid is not None:
            return self._deid.uid(uid)
        from runtime.sources import installation_salt
        digest = hmac.new(installation_salt(), b"batch uid\0" + uid.encode("ascii", "replace"), hashlib.sha256)
        return "2.25." + str(int(digest.hexdigest()[:32], 16))


def unit_key(text: str) -> str:
    """The name of a unit's output files: 32 hex digits of the keyed hash of its Study UID (runtime.dicomnet.uid_key,
    HMAC under the installation's salt), never the UID itself."""
    from runtime.dicomnet import uid_key
    return uid_key(text, 32)


def list_units(src: str | Path, ids: Ids | None = None) -> list[dict]:
    """The units of `src`: a folder (any depth) of DICOM files or of images, or a .csv whose `path` column (else its
    first column) lists files, relative to the CSV's folder or absolute. In the order of their first file's path."""
    ids = ids or Ids()
    src = Path(src)
    if not src.exists():
        raise UserError(f"source '{src}' does not exist; give a folder of DICOM studies or images, or a CSV of files")
    if src.is_file() and src.suffix.lower() == ".csv":
        root, files = src.parent, _csv_files(src)
    elif src.is_dir():
        from runtime.sources.base import folder_files
        root, files = src, folder_files(src)[0]
    else:
        raise UserError(f"source '{src}' is a file; give a folder of DICOM studies or images, or a CSV of files")
    if not files:
        raise UserError(f"source '{src}' holds no files")
    from runtime.sources.base import IMAGE_SUFFIXES, is_dicom
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    if images and not any(is_dicom(p) for p in files if p.suffix.lower() not in IMAGE_SUFFIXES):
        return _image_units(root, images, ids)
    return _dicom_units(root, files, ids)


def _csv_files(path: Path) -> list[Path]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"CSV '{path}' cannot be read ({type(e).__name__}); give a UTF-8 CSV with a 'path' column")
    if not rows:
        raise UserError(f"CSV '{path}' is empty; give one file per row under a 'path' header")
    head = [c.strip().lower() for c in rows[0]]
    col = head.index("path") if "path" in head else 0
    body = rows[1:] if "path" in head else rows
    out = []
    for r in body:
        if len(r) > col and r[col].strip():
            p = Path(r[col].strip())
            out.append(p if p.is_absolute() else path.parent / p)
    return out


def _dicom_units(root: Path, files: list[Path], ids: Ids) -> list[dict]:
    from runtime.series import read_instance
    studies: dict[str, dict] = {}
    units: list[dict] = []
    for n, p in enumerate(files):
        if p.name.upper() == "DICOMDIR":
            continue
        try:
            inst, study_uid, series_uid, _, _ = read_instance(p)
        except ValueError as e:
            rel = _rel(p, root)
            units.append({"key": unit_key("file\0" + rel), "kind": "unreadable", "study_uid": None, "files": [],
                          "error": f"file {n + 1} of {len(files)} of the source (in path order) {e}; it is not "
                                   f"part of any study", "order": rel})
            continue
        unit = studies.get(study_uid)
        if unit is None:
            unit = studies[study_uid] = {"key": unit_key(study_uid), "kind": "dicom",
                                         "study_uid": ids.uid(study_uid), "files": [], "error": None,
                                         "order": _rel(p, root), "_series": {}}
            units.append(unit)
        unit["_series"].setdefault(series_uid, []).append((inst, p))
    for unit in units:
        series = unit.pop("_series", {})
        for series_uid, members in series.items():
            members.sort(key=lambda m: (m[0].instance_number is None, m[0].instance_number or 0, str(m[1])))
            for inst, p in members:
                unit["files"].append({"path": str(p.resolve()), "series_uid": ids.uid(series_uid),
                                      "sop_uid": ids.uid(inst.sop_instance_uid),
                                      "name": _rel(p, root) if ids.record_paths else None})
    return units


def _image_units(root: Path, images: list[Path], ids: Ids) -> list[dict]:
    by_folder: dict[str, list[Path]] = {}
    for p in images:
        by_folder.setdefault(_rel(p.parent, root), []).append(p)
    return [{"key": unit_key("folder\0" + folder), "kind": "images", "study_uid": None, "error": None,
             "order": folder,
             "files": [{"path": str(p.resolve()), "series_uid": None, "sop_uid": None,
                        "name": _rel(p, root) if ids.record_paths else None} for p in paths]}
            for folder, paths in by_folder.items()]


def _rel(p: Path, root: Path) -> str:
    try:
        return p.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return p.resolve().as_posix()


# -- a synthetic archive ------------------------------------------------------------------------------------------

US_MULTIFRAME = "1.2.840.10008.5.1.4.1.1.3.1"
US_IMAGE = "1.2.840.10008.5.1.4.1.1.6.1"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


def write_archive(folder: str | Path, *, studies: int = 10, files_per_study: int = 2, frames_per_file: int = 4,
                  seed: int = 0, size: tuple[int, int] = (240, 312), planted_phi: bool = True) -> list[Path]:
    """Write `studies` DICOM studies made by the simulated probe (runtime.phantom) under `folder`:
    `study-NNNNN/series-1/img-MMM.dcm`, each file a US Multi-frame image of `frames_per_file` frames (a probe
    sweep; the patient's grade from its seed) with its Sequence of Ultrasound Regions (so kidney sizes are
    measured) and Burned In Annotation NO. Every study has its own Study UID (derived from `seed`, so the same call
    writes the same UIDs). `planted_phi`: synthetic patient names, IDs and birth dates in the headers (tests check
    that none reaches an output). Returns the study folders."""
    import numpy as np
    from runtime.phantom import KidneyPhantom
    folder = Path(folder)
    out = []
    for s in range(studies):
        ph = KidneyPhantom(seed=seed * 100_003 + s, height=size[0], width=size[1])
        study_uid = _uid(seed, s)
        study_dir = folder / f"study-{s:05d}"
        for k in range(files_per_study):
            frames = np.stack([ph.frame(k * frames_per_file + i).image for i in range(frames_per_file)])
            region = ph.frame(0).region
            spacing_cm = ph.probe.spacing_mm / 10.0
            write_us(study_dir / "series-1" / f"img-{k + 1:03d}.dcm", frames, study_uid=study_uid,
                     series_uid=_uid(seed, s, 1), sop_uid=_uid(seed, s, 1, k + 1), instance_number=k + 1,
                     region=(region.x0, region.y0, region.x1 - 1, region.y1 - 1), spacing_cm=spacing_cm,
                     phi=_phi(seed, s) if planted_phi else None)
        out.append(study_dir)
    return out


def write_us(path: Path, frames, *, study_uid: str, series_uid: str, sop_uid: str, instance_number: int = 1,
             region: tuple[int, int, int, int] | None = None, spacing_cm: float = 0.04, modality: str = "US",
             burned_in: str = "NO", phi: dict | None = None) -> Path:
    """One DICOM file written by pydicom: `frames` NxHxW uint8 (N > 1: US Multi-frame; 1: US Image; modality other
    than US: a CT image). `region` (x0, y0, x1, y1): one Sequence of Ultrasound Regions item, 2D tissue, in cm."""
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian
    frames = np.asarray(frames, np.uint8)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    multi = frames.shape[0] > 1
    ds.SOPClassUID = CT_IMAGE if modality != "US" else (US_MULTIFRAME if multi else US_IMAGE)
    ds.Modality = modality
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study_uid, series_uid, sop_uid
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.SeriesNumber, ds.InstanceNumber = 1, instance_number
    ds.BurnedInAnnotation = burned_in
    for k, v in (phi or {}).items():
        setattr(ds, k, v)
    ds.set_pixel_data(frames if multi else frames[0], "MONOCHROME2", 8, generate_instance_uid=False)
    if multi:
        ds.FrameTime = 33.3
    if region is not None:
        item = Dataset()
        item.RegionSpatialFormat, item.RegionDataType, item.RegionFlags = 1, 1, 0
        item.RegionLocationMinX0, item.RegionLocationMinY0, item.RegionLocationMaxX1, item.RegionLocationMaxY1 = region
        item.PhysicalUnitsXDirection = item.PhysicalUnitsYDirection = 3
        item.PhysicalDeltaX = item.PhysicalDeltaY = float(spacing_cm)
        ds.SequenceOfUltrasoundRegions = [item]
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _uid(*parts: int) -> str:
    """A deterministic UID under the 2.25 (UUID-derived) root."""
    h = hashlib.sha256(("sonoscore batch archive " + ".".join(map(str, parts))).encode()).hexdigest()
    return "2.25." + str(int(h[:30], 16))


def _phi(seed: int, s: int) -> dict:
    return {"PatientName": f"SYNTHETIC^PATIENT{seed:02d}X{s:05d}", "PatientID": f"SIMID{seed:02d}X{s:05d}",
            "PatientBirthDate": f"19{40 + s % 50:02d}0{1 + s % 9}1{s % 9}"}
