"""A study's results as DICOM objects a PACS stores and a viewer shows: a TID 1500 measurement report (Comprehensive
SR), a Segmentation of the kidney per result frame, and optionally a Secondary Capture of the overlay picture. Built
with highdicom; `deidentify=True` pseudonymizes them for research (PS3.15 basic profile, with dicognito).

The interface (what `sonoscore listen` and `run --send` call; docs/design.md, "Results as DICOM"):

    study_results(sources, records, summary, bundle_info, *, uid_root=None, deidentify=False,
                  overlay_pictures=None, pseudonym_key=None, max_seg_frames=MAX_SEG_FRAMES) -> list[pydicom.Dataset]
    write_results(datasets, out_dir) -> list[Path]
    frame_input(record, source) -> dict          a FrameRecord (runtime/record.py) as one `records` item
    seg_record_indices(records, max_seg_frames=MAX_SEG_FRAMES) -> list[int]
                                                 which records get a Segmentation (and so want an overlay picture)

  sources        list[pydicom.Dataset]: the study's source instances, as `pydicom.dcmread` gives them (headers are
                 enough: `stop_before_pixels=True`; nothing is read from their pixels). All of one study
                 (StudyInstanceUID), each with SOPClassUID, SOPInstanceUID, SeriesInstanceUID, Rows and Columns.
                 They are never modified.
  records        one item per frame scored (a dict, or any object with these attributes):
                   "source"            int (index into `sources`) or str (that instance's SOPInstanceUID)
                   "frame_in_file"     int, the frame inside that instance, from 0 (0 for a single-frame image)
                   "accepted"          bool: passed the quality gate and was scored
                   "mask"              224x224 0/1 array or None: the kidney mask (FrameRecord.mask)
                   "frame_region"      Region or (x0, y0, x1, y1): where the 224x224 image was cut from, in the
                                       SOURCE frame's pixels (FrameRecord.frame_region; not FrameRecord.region,
                                       which is in the displayed part's pixels when a frame may carry burned-in text)
                   "kidney_length_mm", "kidney_area_mm2"   float or None (optional)
                   "grade", "probabilities"                the frame's own result (optional; not used in the SR,
                                                           whose grade is the study's)
  summary        the study summary (runtime/sinks/summary.py, StudySummary.summary()): "final_grade",
                 "mean_probabilities", "frames", "accepted", "rejected", "errors", "dropped"; optional study-level
                 "kidney_length_mm" / "kidney_area_mm2" (a number, or a dict with "median").
  bundle_info    {"name": str, "version": str, "manifest_sha256": str (64 hex), "classes": [class names]
                 (optional; the IFTA names by default)}: Bundle.card["name"/"version"], Bundle.manifest_sha256,
                 Bundle.manifest["classes"].
  uid_root       the root of every new UID ("1.2.3.4."; the final dot may be left off), None: pydicom's root.
  deidentify     True: research results (see "De-identification" below).
  overlay_pictures  {index into `records`: BGR uint8 HxWx3 picture (runtime.sinks.overlay.render_overlay)}, or None.
                 Each becomes a Secondary Capture (not with `deidentify`).
  pseudonym_key  the secret behind the pseudonyms with `deidentify` (str or bytes); None: the installation's salt
                 (runtime.sources.installation_salt), so pseudonyms stay the same across runs of one installation.
  max_seg_frames the most Segmentation objects per study (MAX_SEG_FRAMES).

Returned, in this order: the Segmentations (one per result frame, in record order), the SR, the Secondary
Captures. Bad input (no sources, sources of several studies, a record naming a source or frame that does not
exist, a malformed UID root) raises UserError with one sentence.

What each object holds (docs/design.md, "Results as DICOM"):

- SR (Comprehensive SR, TID 1500 "Imaging Measurement Report"): observer = the algorithm as a device; procedure
  "Diagnostic ultrasonography" (SCT 16310003). One study group (TID 1501, finding site kidney) with the algorithm
  identification (TID 4019: bundle name, version, parameter "manifest.json sha256 <hex>"), the study grade as a
  coded qualitative evaluation, the mean class probabilities, the frame counts (accepted / rejected by the gate /
  not scored), the study's kidney length and area when the summary has them, and every source instance as
  "source image". One planar ROI group (TID 1410) per Segmentation frame: the segment it shows, and that frame's
  kidney length (SCT 410668003, mm) and area (SCT 42798000, mm2) when measured.
  No standard code names the IFTA classes, so the grade uses the private coding scheme 99SONOSCORE (declared in
  the Coding Scheme Identification Sequence): concept "IFTA-GRADE", values "IFTA-<grade>" whose meanings are the
  bundle's class names; probabilities "IFTA-P<grade>" (UCUM "1"), counts "FRAMES-ACCEPTED", "FRAMES-REJECTED",
  "FRAMES-UNSCORED" (UCUM "{frames}").
- SEG (BINARY, one segment "Kidney", SCT 64033007, algorithm AUTOMATIC with the bundle as the AI algorithm): one
  object per result frame, in the source frame's geometry (its Rows x Columns; the 224x224 mask stretched back over
  the frame region, runtime.measure.mask_to_source), referencing the source frame (SOPInstanceUID and, for a
  multi-frame source, Referenced Frame Number). Result frames are the accepted frames with a mask and a region; past
  `max_seg_frames`, that many spread evenly over them (first and last included). Ultrasound images have no Frame
  of Reference and US Multi-frame images no functional groups: highdicom 0.28 builds a Segmentation without a Frame
  of Reference from exactly one single-frame source image (highdicom issue #284), so each object is built from a
  single-frame view of its source frame and its references are then set to the real SOP class and frame number.
- SC (Secondary Capture): the overlay picture, ImageType DERIVED\\SECONDARY, Burned In Annotation YES, referencing
  the source frame.

Patient and study: highdicom copies the Patient, General Study and Patient Study modules of the source into every
object (what the IODs require); nothing else of the source is copied, nothing is added but empty type 2 attributes
the source lacks.

De-identification (`deidentify=True`): each source header is first cut down to the attributes the results need
(SOP, study, series and frame-of-reference UIDs, the type 2 patient and study attributes, image size): everything
else (descriptions, comments, institution, physicians, other IDs, private tags) is removed, the basic profile's
action X. The rest is pseudonymized by dicognito (one Anonymizer seeded with `pseudonym_key`): names and IDs
replaced by dummies, UIDs replaced consistently (the same source UID always gets the same replacement, so the SR's
and SEG's references point at the replaced UIDs), dates shifted back by one fixed offset (the Retain Longitudinal
Temporal Information with Modified Dates option); Patient's Sex and the Study Time are emptied (dicognito shifts
whole hours, keeping minutes and seconds). Patient Identity Removed YES and the De-identification Method Code
Sequence (DCM 113100, 113107) are set. The results' own dates (content, series, instance creation, contribution) are
the shifted study date, their times 000000. No Secondary Capture is made: its pixels are the source frame's, and
text burned into them cannot be vouched for.

Logs: highdicom logs and warns with patient data in the message (a patient name it finds odd, the UIDs it copies
from), so its logger is held at ERROR and its warnings are dropped while objects are built.
"""
from __future__ import annotations

import copy
import logging
import math
import os
import re
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from runtime.errors import UserError
from runtime.preprocess import Region

log = logging.getLogger(__name__)

MAX_SEG_FRAMES = 8
MANUFACTURER = "sonoscore"
CODING_SCHEME = "99SONOSCORE"
IFTA_CLASS_NAMES = ("IFTA <25%", "IFTA 25-49%", "IFTA 50-74%", "IFTA >=75%")  # runtime.bundle.CLASS_NAMES
DEIDENTIFICATION_METHOD = ["PS3.15 Basic Profile", "Modified Dates Option", "sonoscore + dicognito"]

_UID_ROOT = re.compile(r"^[1-9][0-9]*(\.(0|[1-9][0-9]*))*\.?$")
_MAX_ROOT_LEN = 40  # room for a 24-digit suffix within the 64 characters of a UID

# The source attributes kept for de-identified results (everything else is removed, basic profile action X).
_KEEP_FOR_DEID = (
    "SpecificCharacterSet", "SOPClassUID", "SOPInstanceUID",
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
    "StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber",
    "SeriesInstanceUID", "SeriesNumber", "Modality", "FrameOfReferenceUID",
    "Rows", "Columns", "NumberOfFrames", "PatientOrientation",
    "LossyImageCompression", "LossyImageCompressionRatio", "LossyImageCompressionMethod",
)
# Type 2 attributes of the Patient and General Study modules: present (empty when the source lacks them).
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
          "ReferringPhysicianName", "StudyID", "AccessionNumber")


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


# -- codes -------------------------------------------------------------------------------------------------------

def _private(value: str, meaning: str):
    import highdicom as hd
    return hd.sr.CodedConcept(value[:16], CODING_SCHEME, meaning[:64])


def grade_concept():
    """The SR's concept name of the study grade."""
    return _private("IFTA-GRADE", "IFTA grade")


def grade_code(grade: int, class_names: Sequence[str]):
    """The coded value of a grade (1-based): code IFTA-<grade>, meaning the bundle's class name."""
    name = class_names[grade - 1] if 0 < grade <= len(class_names) else f"grade {grade}"
    return _private(f"IFTA-{grade}", name)


def probability_concept(grade: int, class_names: Sequence[str]):
    name = class_names[grade - 1] if 0 < grade <= len(class_names) else f"grade {grade}"
    return _private(f"IFTA-P{grade}", f"Probability of {name}")


COUNT_CODES = {
    "accepted": ("FRAMES-ACCEPTED", "Frames accepted by the quality gate"),
    "rejected": ("FRAMES-REJECTED", "Frames rejected by the quality gate"),
    "unscored": ("FRAMES-UNSCORED", "Frames not scored (errors, dropped)"),
}


def _unit(code: str, meaning: str):
    import highdicom as hd
    return hd.sr.CodedConcept(code, "UCUM", meaning)


# -- building ----------------------------------------------------------------------------------------------------

def study_results(sources: Sequence[Any], records: Sequence[Any], summary: Mapping[str, Any],
                  bundle_info: Mapping[str, Any], *, uid_root: str | None = None, deidentify: bool = False,
                  overlay_pictures: Mapping[int, np.ndarray] | None = None,
                  pseudonym_key: str | bytes | None = None, max_seg_frames: int = MAX_SEG_FRAMES) -> list:
    """The study's results as DICOM datasets: Segmentations, the SR, Secondary Captures (see the module docstring)."""
    _need_highdicom()
    if not sources:
        raise UserError("no source instances were given for the study's DICOM results; give the study's DICOM files")
    studies = {str(s.get("StudyInstanceUID", "")) for s in sources}
    if len(studies) != 1 or "" in studies:
        raise UserError("the source instances given for one study's DICOM results belong to "
                        f"{'no study' if '' in studies else f'{len(studies)} studies'}; "
                        "give the instances of one study")
    uids = _Uids(uid_root)
    frames = _frames(records, sources)
    name, version, sha, class_names = _bundle(bundle_info)
    hd_log = logging.getLogger("highdicom")
    if hd_log.level < logging.ERROR:  # highdicom logs patient names and UIDs at INFO and WARNING
        hd_log.setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # highdicom and pydicom warnings may quote patient data
        headers = [_header(s) for s in sources]
        when = None
        if deidentify:
            headers = _deidentify(headers, pseudonym_key)
            when = _study_when(headers[0])
        series_base = _series_base(sources)
        segs = []
        seg_series = uids.new()
        chosen = seg_frames(frames, int(max_seg_frames))
        for n, f in enumerate(chosen, start=1):
            segs.append((f, _segmentation(headers[f.source], f, n, seg_series, series_base + 1, uids,
                                          name, version, sha, when)))
        sr = _report(headers, frames, segs, summary, uids, series_base + 2, name, version, sha, class_names, when)
        out = [s for _, s in segs] + [sr]
        if overlay_pictures and not deidentify:
            sc_series = uids.new()
            for n, (index, picture) in enumerate(sorted(overlay_pictures.items()), start=1):
                if not 0 <= int(index) < len(frames):
                    raise UserError(f"overlay picture {index} names no result record (there are {len(frames)}); "
                                    f"key each picture by its record's index")
                f = frames[int(index)]
                out.append(_secondary_capture(headers[f.source], f, picture, n, sc_series, series_base + 3, uids,
                                              name, version))
    return out


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


def _algorithm_sequence(name: str, version: str, sha: str):
    import highdicom as hd
    from pydicom.sr.codedict import codes
    return hd.AlgorithmIdentificationSequence(name=name, family=codes.cid7162.ArtificialIntelligence,
                                              version=version, source=MANUFACTURER,
                                              parameters={"manifest.json sha256": sha})


def _when_kwargs(when: tuple[str, str] | None) -> dict[str, str]:
    if when is None:
        return {}
    d, t = when
    return {"content_date": d, "content_time": t, "series_date": d, "series_time": t}


def _segmentation(header, frame: _Frame, number: int, series_uid: str, series_number: int, uids: _Uids,
                  name: str, version: str, sha: str, when):
    import highdicom as hd
    from pydicom.dataset import Dataset
    from pydicom.sr.codedict import codes
    from pydicom.uid import UltrasoundImageStorage

    from runtime.measure import mask_to_source

    rows, cols = int(header.Rows), int(header.Columns)
    pixels = mask_to_source(frame.mask, frame.region, (rows, cols)).astype(bool)
    multi = "NumberOfFrames" in header
    # A single-frame view of the source frame (highdicom issue #284; see the module docstring).
    view = Dataset()
    for elem in header:
        if elem.keyword != "NumberOfFrames":
            view.add(copy.copy(elem))  # never the header's own elements: the view's SOP class changes below
    real_class = str(header.SOPClassUID)
    if multi:
        view.SOPClassUID = UltrasoundImageStorage
    description = hd.seg.SegmentDescription(
        segment_number=1, segment_label="Kidney",
        segmented_property_category=codes.SCT.AnatomicalStructure, segmented_property_type=codes.SCT.Kidney,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=_algorithm_sequence(name, version, sha),
        tracking_uid=uids.new(), tracking_id=f"kidney, result frame {number}")
    seg = hd.seg.Segmentation(
        source_images=[view], pixel_array=pixels[None], segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description], series_instance_uid=series_uid, series_number=series_number,
        sop_instance_uid=uids.new(), instance_number=number, manufacturer=MANUFACTURER,
        manufacturer_model_name=name, software_versions=_software_versions(version),
        device_serial_number="none", omit_empty_frames=False, content_label="KIDNEY",
        content_description="Kidney mask of an accepted frame"[:64], series_description="sonoscore kidney",
        **_when_kwargs(when))
    # references: the real SOP class and, for a multi-frame source, the frame
    pf = seg.PerFrameFunctionalGroupsSequence[0]
    items = [pf.DerivationImageSequence[0].SourceImageSequence[0]]
    top = Dataset()
    top.ReferencedSOPClassUID = real_class
    top.ReferencedSOPInstanceUID = str(header.SOPInstanceUID)
    seg.SourceImageSequence = [top]
    items.append(top)
    ref = Dataset()
    ref.ReferencedSOPClassUID = real_class
    ref.ReferencedSOPInstanceUID = str(header.SOPInstanceUID)
    seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence = [ref]
    for item in items:
        item.ReferencedSOPClassUID = real_class
        if multi:
            item.ReferencedFrameNumber = frame.frame_in_file + 1
    # General Image: Patient Orientation is type 2 when there is no frame of reference
    seg.PatientOrientation = header.get("PatientOrientation") or None
    # every UID this object creates comes from the root
    dim_uid = uids.new()
    for item in seg.get("DimensionOrganizationSequence") or ():
        item.DimensionOrganizationUID = dim_uid
    for item in seg.get("DimensionIndexSequence") or ():
        if "DimensionOrganizationUID" in item:
            item.DimensionOrganizationUID = dim_uid
    if when is not None:
        _set_when(seg, when)
    return seg


def _report(headers, frames: Sequence[_Frame], segs, summary: Mapping[str, Any], uids: _Uids, series_number: int,
            name: str, version: str, sha: str, class_names: Sequence[str], when):
    import highdicom as hd
    from highdicom.coding_schemes import CodingSchemeIdentificationItem
    from pydicom.sr.codedict import codes

    algorithm = hd.sr.AlgorithmIdentification(name=name, version=version,
                                               parameters=[f"manifest.json sha256 {sha}"],
                                               manufacturer=MANUFACTURER)
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=uids.new(sha, name, version), name=name, manufacturer_name=MANUFACTURER,
            model_name=f"{name} {version}"[:64]))
    context = hd.sr.ObservationContext(observer_person_context=None, observer_device_context=observer)
    kidney = hd.sr.FindingSite(anatomic_location=codes.SCT.Kidney)

    measurements = []
    mean = summary.get("mean_probabilities")
    if mean:
        for g, p in enumerate(mean, start=1):
            measurements.append(hd.sr.Measurement(name=probability_concept(g, class_names), value=float(p),
                                                  unit=_unit("1", "no units")))
    counts = {
        "accepted": summary.get("accepted"),
        "rejected": summary.get("rejected"),
        "unscored": (summary.get("errors") or 0) + (summary.get("dropped") or 0),
    }
    for key, value in counts.items():
        if value is None:
            continue
        code, meaning = COUNT_CODES[key]
        measurements.append(hd.sr.Measurement(name=_private(code, meaning), value=float(value),
                                              unit=_unit("{frames}", "frames")))
    for value, concept, unit in ((_number(summary.get("kidney_length_mm")), codes.SCT.Length, _unit("mm", "mm")),
                                 (_number(summary.get("kidney_area_mm2")), codes.SCT.Area, _unit("mm2", "mm2"))):
        if value is not None:
            measurements.append(hd.sr.Measurement(name=concept, value=value, unit=unit, finding_sites=[kidney]))
    evaluations = []
    grade = summary.get("final_grade")
    if grade is not None:
        evaluations.append(hd.sr.QualitativeEvaluation(grade_concept(), grade_code(int(grade), class_names)))
    source_images = []
    for h in headers:
        source_images.append(hd.sr.SourceImageForMeasurementGroup(
            referenced_sop_class_uid=str(h.SOPClassUID), referenced_sop_instance_uid=str(h.SOPInstanceUID)))
    groups = [hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=uids.new(), identifier="study result"),
        algorithm_id=algorithm, finding_sites=[kidney], measurements=measurements or None,
        qualitative_evaluations=evaluations or None, source_images=source_images)]
    for n, (f, seg) in enumerate(segs, start=1):
        h = headers[f.source]
        multi = "NumberOfFrames" in h
        source = hd.sr.SourceImageForSegmentation(
            referenced_sop_class_uid=str(h.SOPClassUID), referenced_sop_instance_uid=str(h.SOPInstanceUID),
            referenced_frame_numbers=[f.frame_in_file + 1] if multi else None)
        frame_measurements = []
        if f.length_mm is not None:
            frame_measurements.append(hd.sr.Measurement(name=codes.SCT.Length, value=f.length_mm,
                                                        unit=_unit("mm", "mm")))
        if f.area_mm2 is not None:
            frame_measurements.append(hd.sr.Measurement(name=codes.SCT.Area, value=f.area_mm2,
                                                        unit=_unit("mm2", "mm2")))
        groups.append(hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=uids.new(), identifier=f"kidney, result frame {n}"),
            referenced_segment=hd.sr.ReferencedSegmentationFrame(
                sop_class_uid=str(seg.SOPClassUID), sop_instance_uid=str(seg.SOPInstanceUID), frame_number=1,
                segment_number=1, source_image=source),
            algorithm_id=algorithm, finding_sites=[kidney], measurements=frame_measurements or None))
    report = hd.sr.MeasurementReport(observation_context=context,
                                     procedure_reported=codes.SCT.DiagnosticUltrasonography,
                                     imaging_measurements=groups)
    _segment_references_by_segment(report[0])
    scheme = CodingSchemeIdentificationItem(designator=CODING_SCHEME, name="sonoscore private codes",
                                                  responsible_organization=MANUFACTURER)
    sr = hd.sr.ComprehensiveSR(
        evidence=list(headers) + [seg for _, seg in segs], content=report[0], series_instance_uid=uids.new(),
        series_number=series_number, sop_instance_uid=uids.new(), instance_number=1, manufacturer=MANUFACTURER,
        is_complete=True, is_final=False, is_verified=False, coding_schemes=[scheme],
        series_description="sonoscore result", manufacturer_model_name=name,
        software_versions=_software_versions(version), **_when_kwargs(when))
    if when is not None:
        _set_when(sr, when)
    return sr


def _segment_references_by_segment(item) -> None:
    """Each Referenced Segmentation Frame names its Segmentation's segment 1, not also its frame: the Image SOP
    Instance Reference macro allows one of Referenced Frame Number and Referenced Segment Number (PS3.3 C.18.4), and
    each Segmentation here holds one frame of one segment, so the segment names exactly that frame."""
    for child in item.get("ContentSequence") or ():
        concept = (child.get("ConceptNameCodeSequence") or [None])[0]
        if concept is not None and concept.CodeValue == "121214" and concept.CodingSchemeDesignator == "DCM":
            for ref in child.get("ReferencedSOPSequence") or ():
                if "ReferencedSegmentNumber" in ref and "ReferencedFrameNumber" in ref:
                    del ref.ReferencedFrameNumber
        _segment_references_by_segment(child)


def _secondary_capture(header, frame: _Frame, picture: np.ndarray, number: int, series_uid: str,
                       series_number: int, uids: _Uids, name: str, version: str):
    import highdicom as hd
    from pydicom.dataset import Dataset

    pic = np.asarray(picture)
    if pic.dtype != np.uint8 or pic.ndim != 3 or pic.shape[2] != 3:
        raise UserError(f"overlay picture {frame.index} is not a BGR uint8 picture (height x width x 3); "
                        f"give what runtime.sinks.overlay.render_overlay draws")
    rgb = np.ascontiguousarray(pic[:, :, ::-1])
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=header, pixel_array=rgb, photometric_interpretation="RGB", bits_allocated=8,
        coordinate_system="PATIENT", patient_orientation=("L", "F"), series_instance_uid=series_uid,
        series_number=series_number, sop_instance_uid=uids.new(), instance_number=number,
        manufacturer=MANUFACTURER, manufacturer_model_name=name, software_versions=_software_versions(version),
        series_description="sonoscore overlay", transfer_syntax_uid="1.2.840.10008.1.2.1")
    sc.copy_patient_and_study_information(header)
    sc.PatientOrientation = header.get("PatientOrientation") or None  # the source's (none is known to us)
    sc.Laterality = header.get("Laterality") or None  # type 2C (the kidney is paired); the source's, else empty
    sc.BurnedInAnnotation = "YES"
    sc.ImageType = ["DERIVED", "SECONDARY", "OTHER"]
    sc.DerivationDescription = "Source frame with the kidney contour and the grade drawn into it"
    ref = Dataset()
    ref.ReferencedSOPClassUID = str(header.SOPClassUID)
    ref.ReferencedSOPInstanceUID = str(header.SOPInstanceUID)
    if "NumberOfFrames" in header:
        ref.ReferencedFrameNumber = frame.frame_in_file + 1
    sc.SourceImageSequence = [ref]
    return sc


# -- de-identification -------------------------------------------------------------------------------------------

def _deidentify(headers, key: str | bytes | None):
    """Source headers cut to `_KEEP_FOR_DEID` and pseudonymized by one dicognito Anonymizer (module docstring)."""
    try:
        from dicognito.anonymizer import Anonymizer
    except ImportError:
        raise UserError("de-identified DICOM results need dicognito; install it with "
                        "pip install 'sonoscore[dicom]'") from None
    from pydicom.dataset import Dataset, FileMetaDataset

    if key is None:
        from runtime.sources import installation_salt
        key = installation_salt()
    seed = key.hex() if isinstance(key, (bytes, bytearray)) else str(key)
    anonymizer = Anonymizer(seed=seed)
    out = []
    for h in headers:
        d = Dataset()
        for kw in _KEEP_FOR_DEID:
            if kw in h:
                d.add(_copy_elem(h[kw]))
        d.file_meta = FileMetaDataset()
        anonymizer.anonymize(d)
        d.PatientSex = None
        d.StudyTime = None      # dicognito shifts whole hours and keeps minutes and seconds: no time at all
        d.PatientIdentityRemoved = "YES"
        d.DeidentificationMethod = DEIDENTIFICATION_METHOD
        d.DeidentificationMethodCodeSequence = [_dcm_code("113100", "Basic Application Confidentiality Profile"),
                                                _dcm_code("113107", "Retain Longitudinal Temporal Information "
                                                                    "Modified Dates Option")]
        for kw in _TYPE2:
            if kw not in d:
                setattr(d, kw, None)
        del d.file_meta
        out.append(d)
    return out


def _dcm_code(value: str, meaning: str):
    from pydicom.dataset import Dataset
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = "DCM"
    item.CodeMeaning = meaning
    return item


def _study_when(header) -> tuple[str, str]:
    """The (shifted) study date and time, the de-identified results' own dates; a fixed dummy without a date."""
    d = str(header.get("StudyDate") or "").strip()
    t = str(header.get("StudyTime") or "").strip()
    if not re.fullmatch(r"\d{8}", d):
        d = "19000101"
    if not re.fullmatch(r"\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?", t):
        t = "000000"
    return d, t


def _set_when(ds, when: tuple[str, str]) -> None:
    """Every date and time the object was stamped with when it was made (content, series, instance creation,
    capture, contribution) -> the shifted study date and time; what came from the de-identified source stays."""
    d, t = when

    def shift(dataset, elem) -> None:
        if elem.VR not in ("DA", "TM", "DT") or not elem.value or elem.keyword in _KEEP_FOR_DEID:
            return
        elem.value = d if elem.VR == "DA" else t if elem.VR == "TM" else d + t.split(".")[0]

    ds.walk(shift)


# -- writing -----------------------------------------------------------------------------------------------------

def write_results(datasets: Sequence[Any], out_dir: str | os.PathLike) -> list[Path]:
    """Write each dataset as a DICOM file `<Modality>.<SOPInstanceUID>.dcm` in `out_dir` (created when missing):
    written to a temporary name beside it, flushed to disk, then renamed into place, so a file is there whole or
    not at all. Returns the paths, in the order given."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"the DICOM results folder '{out}' cannot be made ({e.strerror or type(e).__name__}); "
                        f"give a folder you can write to") from None
    paths = []
    for ds in datasets:
        name = f"{ds.Modality}.{ds.SOPInstanceUID}.dcm"
        path = out / name
        fd, tmp = tempfile.mkstemp(prefix=".", suffix=".part", dir=out)
        try:
            with os.fdopen(fd, "wb") as f:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    ds.save_as(f, enforce_file_format=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as e:
            Path(tmp).unlink(missing_ok=True)
            raise UserError(f"the DICOM result '{path}' could not be written ({e.strerror or type(e).__name__}); "
                            f"free space or give another folder") from None
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        paths.append(path)
    _fsync_dir(out)
    return paths


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
