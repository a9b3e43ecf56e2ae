"""A study's results as DICOM objects a PACS stores and a viewer shows: a TID 1500 measurement report (Comprehensive
SR), a Segmentation of the kidney per result frame, and optionally a Secondary Capture of the overlay picture. Built
with highdicom; `deidentify=True` pseudonymizes them for research (PS3.15 basic profile, through runtime.deid).

The interface (what `sonoscore listen` and `run --send` call; docs/design.md, "Results as DICOM"):

    study_results(sources, records, summary, bundle_info, *, uid_root=None, deidentify=False,
                  overlay_pictures=None, pseudonym_key=None, max_seg_frames=MAX_SEG_FRAMES) -> list[pydicom.Dataset]
    write_results(datasets, out_dir) -> list[Path]
                                                 each as <kind>.<SOPInstanceUID>.dcm, kind SR, SEG or SC
    result_kind(dataset) -> str                  SR, SEG or SC (a Secondary Capture's Modality is its source's)
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
  coded qualitative evaluation, the mean class probabilities, the frame counts (graded / not graded by either gate /
  not scored) and the frames not graded per reason (the summary's "refused_counts"), for a study without a grade
  the summary's "no_grade_reason" as text, the study's kidney length and area when the summary has them, and every source instance as
  "source image". One planar ROI group (TID 1410) per Segmentation frame: the segment it shows, and that frame's
  kidney length (SCT 410668003, mm) and area (SCT 42798000, mm2) when measured.
  No standard code names the IFTA classes, so the grade uses the private coding scheme 99SONOSCORE (declared in
  the Coding Scheme Identification Sequence): concept "IFTA-GRADE", values "IFTA-<grade>" whose meanings are the
  bundle's class names; probabilities "IFTA-P<grade>" (UCUM "1"), counts "FRAMES-ACCEPTED", "FRAMES-REJECTED",
  "FRAMES-UNSCORED", "REFUSED-NOT-US", "REFUSED-NOKIDNEY", "REFUSED-VIEW", "REFUSED-OUTLINE" (UCUM "{frames}");
  "NO-GRADE-REASON" (TEXT).
- SEG (BINARY, one segment "Kidney", SCT 64033007, algorithm AUTOMATIC with the bundle as the AI algorithm): one
  object per result frame, in the source frame's geometry (its Rows x Columns; the 224x224 mask stretched back over
  the frame region, runtime.measure.mask_to_source), referencing the source frame (SOPInstanceUID and, for a
  multi-frame source, Referenced Frame Number). Result frames are the accepted frames with a mask and a region; past
  `max_seg_frames`, that many spread evenly over them (first and last included). Ultrasound images have no Frame
  of Reference and US Multi-frame images no functional groups: highdicom 0.28 builds a Segmentation without a Frame
  of Reference from exactly one single-frame source image (highdicom issue #284), so each object is built from a
  single-frame view of its source frame and its references are then set to the real SOP class and frame number.
- SC (Secondary Capture): the overlay picture, ImageType DERIVED\\SECONDARY, Burned In Annotation YES, referencing
  the source frame; Modality the source's (US; OT when the source has none), Laterality the source's R or L (its
  Laterality, else its Image Laterality), without a value when the source says neither (never guessed; the element
  is there, empty, as PS3.3 asks of a paired organ whose side is unknown).

Patient and study: highdicom copies the Patient, General Study and Patient Study modules of the source into every
object (what the IODs require); nothing else of the source is copied, nothing is added but empty type 2 attributes
the source lacks.

De-identification (`deidentify=True`): each source header is first cut down to the attributes the results need
(SOP, study, series and frame-of-reference UIDs, the type 2 patient and study attributes, image size): everything
else (descriptions, comments, institution, physicians, other IDs, private tags) is removed, the basic profile's
action X. The rest goes through runtime.deid, the one de-identification of the project (`sonoscore deid` uses it
too; docs/deid.md), keyed with `pseudonym_key` and with the Retain Longitudinal Temporal Information with Modified
Dates option: name and ID replaced by one keyed pseudonym, UIDs replaced consistently (the same source UID always
gets the same replacement, so the SR's and SEG's references point at the replaced UIDs), dates shifted back by a
whole number of days derived from the key and the patient; Patient's Sex and the Study Time are emptied. Patient
Identity Removed YES and the De-identification Method and its Code Sequence (DCM 113100, 113107) are set. The results' own dates (content, series, instance creation, contribution) are
the shifted study date, their times 000000. No Secondary Capture is made: its pixels are the source frame's, and
text burned into them cannot be vouched for.

Logs: highdicom logs and warns with patient data in the message (a patient name it finds odd, the UIDs it copies
from), so its logger is held at ERROR and its warnings are dropped while objects are built.

Modules: build.py (study_results, write_results), sr.py (the SR and its codes), seg.py (the Segmentations), sc.py
(the Secondary Captures), deid.py (de-identification and the results' own dates), common.py (what they share: the
input, UIDs, the source header copy). The names above are imported from this package.
"""
from __future__ import annotations

from runtime.dicom_out.build import study_results, write_results
from runtime.dicom_out.common import (CODING_SCHEME, IFTA_CLASS_NAMES, MANUFACTURER, MAX_SEG_FRAMES, frame_input,
                                      result_kind, seg_frames, seg_record_indices)
from runtime.dicom_out.sr import COUNT_CODES, grade_code, grade_concept, probability_concept

__all__ = ["study_results", "write_results", "frame_input", "result_kind", "seg_record_indices", "seg_frames",
           "MAX_SEG_FRAMES", "MANUFACTURER", "CODING_SCHEME", "IFTA_CLASS_NAMES",
           "COUNT_CODES", "grade_concept", "grade_code", "probability_concept"]
