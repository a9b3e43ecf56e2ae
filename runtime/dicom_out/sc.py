"""The Secondary Capture of an overlay picture (not made with `deidentify`)."""
from __future__ import annotations

import re

import numpy as np

from runtime.dicom_out.common import MANUFACTURER, _Frame, _software_versions, _Uids
from runtime.errors import UserError

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
    # Modality: the source's equipment (SC Equipment module, overriding the General Series' OT), else OT
    sc.Modality = _source_modality(header)
    # Laterality: the source's R or L; else no value (not guessed). The element stays, empty: the kidney is a paired
    # structure, so PS3.3 C.7.3.1 requires it (type 2C) and empty is how it says the side is unknown.
    sc.Laterality = _laterality(header)
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




def _source_modality(header) -> str:
    """The source's Modality when it names one (a code string, e.g. US), else OT (other)."""
    value = str(header.get("Modality") or "").strip()
    return value if re.fullmatch(r"[A-Z0-9_]{1,16}", value) else "OT"


def _laterality(header) -> str | None:
    """R or L from the source's Laterality, else from its Image Laterality; None (empty) when neither says a side
    (U, B, empty, absent)."""
    for keyword in ("Laterality", "ImageLaterality"):
        value = str(header.get(keyword) or "").strip().upper()
        if value in ("R", "L"):
            return value
    return None
