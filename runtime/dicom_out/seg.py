"""The binary Segmentation of the kidney in one result frame, in its source frame's geometry."""
from __future__ import annotations

import copy

from runtime.dicom_out.common import MANUFACTURER, _Frame, _software_versions, _Uids
from runtime.dicom_out.deid import _set_when, _when_kwargs

def _algorithm_sequence(name: str, version: str, sha: str):
    import highdicom as hd
    from pydicom.sr.codedict import codes
    return hd.AlgorithmIdentificationSequence(name=name, family=codes.cid7162.ArtificialIntelligence,
                                              version=version, source=MANUFACTURER,
                                              parameters={"manifest.json sha256": sha})


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


