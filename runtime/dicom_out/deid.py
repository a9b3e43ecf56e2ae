"""De-identified results (`deidentify=True`): the source headers cut down and pseudonymized (runtime.dicom_out's
docstring, "De-identification"), and the results' own dates set to the shifted study date."""
from __future__ import annotations

import re

from runtime.dicom_out.common import _TYPE2, _copy_elem
from runtime.errors import UserError

DEIDENTIFICATION_METHOD = ["PS3.15 Basic Profile", "Modified Dates Option", "sonoscore + dicognito"]

# The source attributes kept for de-identified results (everything else is removed, basic profile action X).
_KEEP_FOR_DEID = (
    "SpecificCharacterSet", "SOPClassUID", "SOPInstanceUID",
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
    "StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber",
    "SeriesInstanceUID", "SeriesNumber", "Modality", "FrameOfReferenceUID",
    "Rows", "Columns", "NumberOfFrames", "PatientOrientation",
    "LossyImageCompression", "LossyImageCompressionRatio", "LossyImageCompressionMethod",
)


def _when_kwargs(when: tuple[str, str] | None) -> dict[str, str]:
    if when is None:
        return {}
    d, t = when
    return {"content_date": d, "content_time": t, "series_date": d, "series_time": t}


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


