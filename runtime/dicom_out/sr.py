"""The Comprehensive SR (TID 1500 Imaging Measurement Report) of a study, and its codes."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from runtime.dicom_out.common import CODING_SCHEME, MANUFACTURER, _Frame, _number, _software_versions, _Uids
from runtime.dicom_out.deid import _set_when, _when_kwargs

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
    "accepted": ("FRAMES-ACCEPTED", "Frames graded (mask gate and scope gate passed)"),
    "rejected": ("FRAMES-REJECTED", "Frames not graded (refused by a gate)"),
    "unscored": ("FRAMES-UNSCORED", "Frames not scored (errors, dropped)"),
}
# The frames not graded, per reason (the summary's `refused_counts`: the mask gate's `no kidney` and the scope gate's
# reasons, runtime.scope.REASONS).
REFUSED_CODES = {
    "not ultrasound": ("REFUSED-NOT-US", "Frames not graded: not ultrasound"),
    "no kidney": ("REFUSED-NOKIDNEY", "Frames not graded: no kidney"),
    "not a kidney view: unlike the training frames": ("REFUSED-VIEW", "Frames not graded: not a kidney view"),
    "kidney outline unsure": ("REFUSED-OUTLINE", "Frames not graded: kidney outline unsure"),
}
NO_GRADE_CODE = ("NO-GRADE-REASON", "Why the study has no grade")


def _unit(code: str, meaning: str):
    import highdicom as hd
    return hd.sr.CodedConcept(code, "UCUM", meaning)


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
    for reason, value in (summary.get("refused_counts") or {}).items():
        if reason in REFUSED_CODES and value is not None:
            code, meaning = REFUSED_CODES[reason]
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
    why = summary.get("no_grade_reason")
    if grade is None and why:             # no study grade: the reason, as text, in the study group
        groups[0][0].ContentSequence.append(hd.sr.TextContentItem(
            name=_private(*NO_GRADE_CODE), value=str(why)[:1024],
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
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


