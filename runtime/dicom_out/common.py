"""What the DICOM results' modules share: the constants, the input (`records` as `_Frame`s, which frames get a
Segmentation), new UIDs under the configured root, the bundle's identification, and the copy of a source header
every object is built from."""
from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from runtime.errors import UserError
from runtime.preprocess import Region

MAX_SEG_FRAMES = 8
MANUFACTURER = "sonoscore"
CODING_SCHEME = "99SONOSCORE"
IFTA_CLASS_NAMES = ("IFTA <25%", "IFTA 25-49%", "IFTA 50-74%", "IFTA >=75%")  # runtime.bundle.CLASS_NAMES

_UID_ROOT = re.compile(r"^[1-9][0-9]*(\.(0|[1-9][0-9]*))*\.?$")
_MAX_ROOT_LEN = 40  # room for a 24-digit suffix within the 64 characters of a UID

# Type 2 attributes of the Patient and General Study modules: present (empty when the source lacks them).
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
          "ReferringPhysicianName", "StudyID", "AccessionNumber")


SECONDARY_CAPTURE_STORAGE = "1.2.840.10008.5.1.4.1.1.7"


def result_kind(ds) -> str:
    """What a result is, for file names and logs: SR, SEG or SC (a Secondary Capture's Modality is its source's,
    e.g. US, so the SOP class says it); another object's Modality, else '?'."""
    if str(ds.get("SOPClassUID", "")) == SECONDARY_CAPTURE_STORAGE:
        return "SC"
    return str(ds.get("Modality", "") or "?")


# -- input -------------------------------------------------------------------------------------------------------

@dataclass
class _Frame:
    index: int                      # position in `records`
    source: int                     # index into `sources`
    frame_in_file: int              # from 0
    accepted: bool
    mask: np.ndarray | None
    region: Region | None
    length_mm: float | None
    area_mm2: float | None


def frame_input(record: Any, source: int | str) -> dict[str, Any]:
    """A FrameRecord (runtime/record.py) as one item of `study_results`' records, for the instance `source`
    (index into `sources`, or its SOPInstanceUID)."""
    return {
        "source": source,
        "frame_in_file": getattr(record, "frame_in_file", None) or 0,
        "accepted": bool(getattr(record, "accepted", False)),
        "mask": getattr(record, "mask", None),
        "frame_region": getattr(record, "frame_region", None),
        "kidney_length_mm": getattr(record, "kidney_length_mm", None),
        "kidney_area_mm2": getattr(record, "kidney_area_mm2", None),
        "grade": getattr(record, "grade", None),
        "probabilities": getattr(record, "probabilities", None),
    }


def _get(item: Any, key: str, default: Any = None) -> Any:
    if isinstance(item, Mapping):
        return item.get(key, default)
    return getattr(item, key, default)


def _number(value: Any) -> float | None:
    if isinstance(value, Mapping):
        value = value.get("median")
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) and v >= 0 else None


def _region(value: Any) -> Region | None:
    if value is None:
        return None
    if isinstance(value, Region):
        return value
    try:
        x0, y0, x1, y1 = (int(v) for v in value)
    except (TypeError, ValueError):
        return None
    return Region(x0, y0, x1, y1)


def _frames(records: Sequence[Any], sources: Sequence[Any]) -> list[_Frame]:
    by_uid = {str(s.SOPInstanceUID): i for i, s in enumerate(sources)}
    out = []
    for i, rec in enumerate(records):
        src = _get(rec, "source")
        if isinstance(src, (int, np.integer)) and not isinstance(src, bool) and 0 <= int(src) < len(sources):
            s = int(src)
        elif isinstance(src, str) and src in by_uid:
            s = by_uid[src]
        else:
            raise UserError(f"result record {i} names source {src!r}, which is not one of the study's "
                            f"{len(sources)} source instances; give its index or SOPInstanceUID")
        n = _frame_count(sources[s])
        f = _get(rec, "frame_in_file", 0)
        f = 0 if f is None else f
        if not isinstance(f, (int, np.integer)) or not 0 <= int(f) < n:
            raise UserError(f"result record {i} names frame {f!r} of a source instance with {n} frame(s); "
                            f"give the frame's number inside that instance, from 0")
        mask = _get(rec, "mask")
        region = _region(_get(rec, "frame_region"))
        if region is not None:
            rows, cols = int(sources[s].get("Rows") or 0), int(sources[s].get("Columns") or 0)
            if not (0 <= region.x0 < region.x1 <= cols and 0 <= region.y0 < region.y1 <= rows):
                box = (region.x0, region.y0, region.x1, region.y1)
                raise UserError(f"result record {i} has the frame region {box}, which is not inside its {cols}x{rows} "
                                f"source frame; give the crop (x0, y0, x1, y1) in the source frame's pixels")
        out.append(_Frame(i, s, int(f), bool(_get(rec, "accepted", False)),
                          None if mask is None else np.asarray(mask), region,
                          _number(_get(rec, "kidney_length_mm")), _number(_get(rec, "kidney_area_mm2"))))
    return out


def _frame_count(ds) -> int:
    try:
        return max(1, int(ds.get("NumberOfFrames") or 1))
    except (TypeError, ValueError):
        return 1


def seg_frames(frames: Sequence[_Frame], limit: int) -> list[_Frame]:
    """The frames that get a Segmentation: accepted ones with a kidney in their mask and a region, at most `limit`,
    spread evenly (first and last included) when there are more."""
    usable = [f for f in frames if f.accepted and f.mask is not None and f.mask.ndim == 2 and f.mask.any()
              and f.region is not None]
    return [usable[k] for k in _spread(len(usable), limit)]


def seg_record_indices(records: Sequence[Any], max_seg_frames: int = MAX_SEG_FRAMES) -> list[int]:
    """The indices of the `records` (items as `study_results` takes them) whose frames get a Segmentation, in
    order: what a caller needs to draw only the overlay pictures that will be used."""
    usable = []
    for i, rec in enumerate(records):
        mask = _get(rec, "mask")
        mask = None if mask is None else np.asarray(mask)
        if (_get(rec, "accepted", False) and mask is not None and mask.ndim == 2 and mask.any()
                and _region(_get(rec, "frame_region")) is not None):
            usable.append(i)
    return [usable[k] for k in _spread(len(usable), max_seg_frames)]


def _spread(n: int, limit: int) -> list[int]:
    """All of range(n), or `limit` of them spread evenly, the first and the last included."""
    limit = int(limit)
    if limit <= 0:
        return []
    if n <= limit:
        return list(range(n))
    return sorted({int(round(k)) for k in np.linspace(0, n - 1, limit)})


# -- UIDs --------------------------------------------------------------------------------------------------------

class _Uids:
    """New UIDs under the configured root."""

    def __init__(self, root: str | None):
        from pydicom.uid import PYDICOM_ROOT_UID
        if root is None:
            root = PYDICOM_ROOT_UID
        root = str(root).strip()
        if not _UID_ROOT.match(root) or len(root.rstrip(".")) + 1 > _MAX_ROOT_LEN:
            raise UserError(f"the UID root {root!r} is not a DICOM UID root (digits separated by dots, no leading "
                            f"zeros, at most {_MAX_ROOT_LEN - 1} characters); give your organisation's root, "
                            f"e.g. 1.2.826.0.1.3680043.8.498.")
        self.root = root.rstrip(".") + "."

    def new(self, *entropy: str) -> str:
        from pydicom.uid import generate_uid
        return str(generate_uid(prefix=self.root, entropy_srcs=list(entropy) if entropy else None))


def _need_highdicom() -> None:
    import importlib.util
    if importlib.util.find_spec("highdicom") is None or importlib.util.find_spec("pydicom") is None:
        raise UserError("DICOM results need highdicom and pydicom; install them with "
                        "pip install 'sonoscore[dicom]'")


def _bundle(info: Mapping[str, Any]) -> tuple[str, str, str, tuple[str, ...]]:
    name = str(info.get("name") or "").strip()
    version = str(info.get("version") or "").strip()
    sha = str(info.get("manifest_sha256") or "").strip().lower()
    if not name or not version or not re.fullmatch(r"[0-9a-f]{64}", sha):
        raise UserError("the bundle information for DICOM results needs its name, version and the manifest's "
                        "sha256 (64 hex digits); give Bundle.card's name and version and Bundle.manifest_sha256")
    classes = info.get("classes") or IFTA_CLASS_NAMES
    return name[:64], version[:64], sha, tuple(str(c) for c in classes)


def _header(ds):
    """A copy of a source instance without its pixels, with the type 2 patient and study attributes present."""
    from pydicom.dataset import Dataset
    out = Dataset()
    for elem in ds:
        if elem.tag.group == 0x7FE0 or 0x6000 <= elem.tag.group <= 0x60FF:   # pixels, overlay planes
            continue
        out.add(_copy_elem(elem))
    for kw in _TYPE2:
        if kw not in out:
            setattr(out, kw, None)
    return out


def _copy_elem(elem):
    return copy.deepcopy(elem)


def _series_base(sources: Sequence[Any]) -> int:
    nums = []
    for s in sources:
        try:
            nums.append(int(s.get("SeriesNumber")))
        except (TypeError, ValueError):
            pass
    return max(nums, default=0)  # the results' series follow the study's highest series number


def _software_versions(version: str) -> list[str]:
    try:
        from importlib.metadata import version as dist_version
        own = dist_version("sonoscore")
    except Exception:
        own = "unknown"
    return [f"sonoscore {own}"[:64], f"bundle {version}"[:64]]

