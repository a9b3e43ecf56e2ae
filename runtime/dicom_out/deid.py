"""De-identified results (`deidentify=True`): the source headers cut down and pseudonymized (runtime.dicom_out's
docstring, "De-identification"), and the results' own dates set to the shifted study date."""
from __future__ import annotations

import re

from runtime.dicom_out.common import _TYPE2, _copy_elem
from runtime.errors import UserError


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
    """Source headers cut to `_KEEP_FOR_DEID`, then de-identified by runtime.deid (the one implementation, also
    behind `sonoscore deid`) with Retain Longitudinal Temporal Information, Modified Dates: its keyed UIDs,
    pseudonyms and per-patient date shift, and its Patient Identity Removed / De-identification Method codes. The
    key is the installation's salt unless one is given, so pseudonyms stay the same across runs."""
    try:
        from runtime.deid import Deidentifier, Options
    except ImportError:
        raise UserError("de-identified DICOM results need dicognito; install it with "
                        "pip install 'sonoscore[dicom]'") from None
    from pydicom.dataset import Dataset

    if key is None:
        from runtime.sources import installation_salt
        key = installation_salt()
    deid = Deidentifier(key, Options(keep_dates_shifted=True))
    out = []
    for h in headers:
        d = Dataset()
        for kw in _KEEP_FOR_DEID:
            if kw in h:
                d.add(_copy_elem(h[kw]))
        deid.dataset(d)            # a header without pixels: never refused for burned-in text
        d.PatientSex = None
        d.StudyTime = None         # the results carry the shifted date only
        for kw in _TYPE2:
            if kw not in d:
                setattr(d, kw, None)
        out.append(d)
    return out



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


