"""DICOM instances grouped into studies and series, slices ordered, and each series' plane named.

    result = group(folder)              # a folder at any depth (or one file)
    for study in result.studies:
        for s in study.series:
            s.plane.name, s.plane.oblique_deg, s.order, [i.path for i in s.instances]
    plane_of((1, 0, 0, 0, 1, 0))        # Plane(name="axial", ...)

Grouping is by Study Instance UID, then Series Instance UID. Slices are ordered by Image Position (Patient)
projected on the series' normal when every instance has a position and they share one orientation, else by
Instance Number when every instance has one, else by path.

The plane: the normal is row x column of Image Orientation (Patient) (the first three values are the row direction
cosines, the last three the column's, in the patient's LPS axes); its largest absolute component names the plane:
x sagittal, y coronal, z axial. `oblique_deg` is the angle between the normal and that axis (0 for a true plane);
a series is `oblique` when it is more than OBLIQUE_TOLERANCE_DEG. A missing or degenerate orientation (not six
numbers, a zero or non-unit vector, row and column not perpendicular) gives "unknown" with a reason; instances of
one series that disagree in orientation give "mixed" (a localizer, for example). Enhanced multi-frame files give
their orientation in the Shared (else the first Per-frame) Functional Groups.

Nothing here prints or logs; reasons name no file and hold no identifier.
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

OBLIQUE_TOLERANCE_DEG = 1.0     # a normal within this of an axis is that plane, not oblique
_UNIT_TOLERANCE = 0.01          # |length - 1| and |row . column| allowed before an orientation is degenerate
_AXES = ("sagittal", "coronal", "axial")
_DICOMDIR_CLASS = "1.2.840.10008.1.3.10"


@dataclass(frozen=True)
class Plane:
    name: str                               # axial | coronal | sagittal | mixed | unknown
    oblique_deg: float | None = None        # angle between the normal and the named plane's axis
    normal: tuple[float, float, float] | None = None
    reason: str | None = None               # why unknown or mixed

    @property
    def oblique(self) -> bool:
        return self.oblique_deg is not None and self.oblique_deg > OBLIQUE_TOLERANCE_DEG

    def describe(self) -> str:
        if self.name in _AXES:
            return f"{self.name} (oblique, {self.oblique_deg:.1f} deg from {self.name})" if self.oblique \
                else self.name
        return f"{self.name}: {self.reason}"


@dataclass
class Instance:
    path: Path
    sop_instance_uid: str | None
    instance_number: int | None
    position: tuple[float, float, float] | None
    orientation: tuple[float, ...] | None
    frames: int = 1


@dataclass
class Series:
    uid: str
    number: int | None
    modality: str | None
    instances: list[Instance] = field(default_factory=list)
    plane: Plane = field(default_factory=lambda: Plane("unknown", reason="no instances"))
    order: str = "path"                     # position along the normal | instance number | path


@dataclass
class Study:
    uid: str
    series: list[Series] = field(default_factory=list)


@dataclass
class Grouping:
    studies: list[Study]
    skipped: list[tuple[Path, str]]         # (path, why), for files that are not groupable DICOM instances


def plane_of(orientation) -> Plane:
    """The plane of one Image Orientation (Patient) (six direction cosines), or "unknown" with a reason."""
    if orientation is None:
        return Plane("unknown", reason="no Image Orientation (Patient) (ultrasound and secondary captures "
                                       "usually have none)")
    try:
        v = [float(x) for x in orientation]
    except (TypeError, ValueError):
        return Plane("unknown", reason="Image Orientation (Patient) is not numbers")
    if len(v) != 6:
        return Plane("unknown", reason=f"Image Orientation (Patient) has {len(v)} values, not 6")
    if not all(math.isfinite(x) for x in v):
        return Plane("unknown", reason="Image Orientation (Patient) has a value that is not finite")
    row, col = v[:3], v[3:]
    lr, lc = _norm(row), _norm(col)
    if lr < 1e-6 or lc < 1e-6:
        return Plane("unknown", reason="Image Orientation (Patient) has a zero row or column direction")
    if abs(lr - 1) > _UNIT_TOLERANCE or abs(lc - 1) > _UNIT_TOLERANCE:
        return Plane("unknown", reason=f"Image Orientation (Patient) directions are not unit vectors "
                                       f"(lengths {lr:.3f} and {lc:.3f})")
    dot = sum(a * b for a, b in zip(row, col)) / (lr * lc)
    if abs(dot) > _UNIT_TOLERANCE:
        return Plane("unknown", reason=f"Image Orientation (Patient) row and column are not perpendicular "
                                       f"(cosine {dot:.3f})")
    n = _cross(row, col)
    ln = _norm(n)
    n = tuple(x / ln for x in n)
    axis = max(range(3), key=lambda i: abs(n[i]))
    angle = math.degrees(math.acos(min(1.0, abs(n[axis]))))
    return Plane(_AXES[axis], oblique_deg=round(angle, 3), normal=tuple(round(x, 6) for x in n))


def series_plane(instances: list[Instance]) -> Plane:
    """One plane for a series: its instances' common plane, "mixed" when their orientations disagree."""
    planes = [plane_of(i.orientation) for i in instances]
    known = [p for p in planes if p.normal is not None]
    if not instances:
        return Plane("unknown", reason="no instances")
    if not known:
        return planes[0]
    if len(known) < len(planes):
        why = next(p.reason for p in planes if p.normal is None)
        return Plane("unknown", reason=f"{len(planes) - len(known)} of {len(planes)} instances have no usable "
                                       f"orientation: {why}")
    first = known[0]
    for p in known[1:]:
        cos = abs(sum(a * b for a, b in zip(first.normal, p.normal)))
        if math.degrees(math.acos(min(1.0, cos))) > OBLIQUE_TOLERANCE_DEG:
            names = sorted({q.name for q in known})
            return Plane("mixed", reason=f"its instances lie in different orientations ({', '.join(names)}), "
                                         f"as a localizer's do")
    return first


def order_instances(instances: list[Instance], plane: Plane) -> tuple[list[Instance], str]:
    """(instances in slice order, how they were ordered)."""
    if plane.normal is not None and all(i.position is not None for i in instances):
        return sorted(instances, key=lambda i: (sum(a * b for a, b in zip(i.position, plane.normal)),
                                                i.instance_number if i.instance_number is not None else 0,
                                                str(i.path))), "position along the normal"
    if all(i.instance_number is not None for i in instances):
        return sorted(instances, key=lambda i: (i.instance_number, str(i.path))), "instance number"
    return sorted(instances, key=lambda i: str(i.path)), "path"


def read_instance(path: str | os.PathLike) -> tuple[Instance, str, str, int | None, str | None]:
    """(instance, study UID, series UID, series number, modality) from a file's header; raises ValueError with a
    sentence for a file that cannot be grouped."""
    import pydicom
    from pydicom.errors import InvalidDicomError
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, stop_before_pixels=True)
    except InvalidDicomError:
        raise ValueError("is not a DICOM file (no DICM preamble)") from None
    except Exception as e:
        raise ValueError(f"could not be read as DICOM ({type(e).__name__})") from None
    meta = getattr(ds, "file_meta", None)
    if (meta is not None and str(meta.get("MediaStorageSOPClassUID", "")) == _DICOMDIR_CLASS) or \
            "DirectoryRecordSequence" in ds:
        raise ValueError("is a DICOMDIR (an index, not an instance)")
    study, series = str(ds.get("StudyInstanceUID", "") or ""), str(ds.get("SeriesInstanceUID", "") or "")
    if not study or not series:
        raise ValueError("has no Study or Series Instance UID, so it cannot be grouped")
    orientation = ds.get("ImageOrientationPatient")
    position = ds.get("ImagePositionPatient")
    if orientation is None or position is None:
        fg_o, fg_p = _functional_groups(ds)
        orientation = orientation if orientation is not None else fg_o
        position = position if position is not None else fg_p
    inst = Instance(path=path, sop_instance_uid=str(ds.get("SOPInstanceUID", "") or "") or None,
                    instance_number=_int(ds.get("InstanceNumber")), position=_triple(position),
                    orientation=tuple(orientation) if orientation is not None else None,
                    frames=_int(ds.get("NumberOfFrames")) or 1)
    modality = str(ds.get("Modality", "") or "").strip() or None
    return inst, study, series, _int(ds.get("SeriesNumber")), modality


def group(src: str | os.PathLike) -> Grouping:
    """Every DICOM instance under `src` (a folder at any depth, or one file) into studies and series, each series
    ordered and its plane named. Studies and series come in the order of their first file's path."""
    src = Path(src)
    files = sorted((p for p in src.rglob("*") if p.is_file() and not any(
        part.startswith(".") for part in p.relative_to(src).parts)), key=lambda p: p.as_posix()) \
        if src.is_dir() else [src]
    studies: dict[str, Study] = {}
    series: dict[tuple[str, str], Series] = {}
    skipped: list[tuple[Path, str]] = []
    for p in files:
        try:
            inst, study_uid, series_uid, number, modality = read_instance(p)
        except ValueError as e:
            skipped.append((p, str(e)))
            continue
        study = studies.setdefault(study_uid, Study(study_uid))
        key = (study_uid, series_uid)
        if key not in series:
            series[key] = Series(series_uid, number, modality)
            study.series.append(series[key])
        series[key].instances.append(inst)
    for s in series.values():
        s.plane = series_plane(s.instances)
        s.instances, s.order = order_instances(s.instances, s.plane)
    return Grouping(list(studies.values()), skipped)


# -- helpers -----------------------------------------------------------------------------------------------------

def _functional_groups(ds):
    """(orientation, position) from an enhanced multi-frame file's Shared, else first Per-frame, Functional Groups."""
    orientation = position = None
    for seq in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        groups = ds.get(seq)
        if not groups:
            continue
        fg = groups[0]
        if orientation is None and fg.get("PlaneOrientationSequence"):
            orientation = fg.PlaneOrientationSequence[0].get("ImageOrientationPatient")
        if position is None and fg.get("PlanePositionSequence"):
            position = fg.PlanePositionSequence[0].get("ImagePositionPatient")
    return orientation, position


def _triple(v) -> tuple[float, float, float] | None:
    try:
        t = tuple(float(x) for x in v)
    except (TypeError, ValueError):
        return None
    return t if len(t) == 3 and all(math.isfinite(x) for x in t) else None


def _int(v) -> int | None:
    try:
        return int(v) if v is not None and str(v).strip() != "" else None
    except (TypeError, ValueError):
        return None


def _norm(v) -> float:
    return math.sqrt(sum(x * x for x in v))


def _cross(a, b) -> tuple[float, float, float]:
    return (a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0])
