"""The rules of runtime.deid: PS3.15 Table E.1-1 (from dicom-anonymizer), the options' attribute lists, and the
walk that applies them to a dataset at every depth (runtime/deid/__init__.py's docstring says how each is decided)."""
from __future__ import annotations

import datetime
import re

from runtime.errors import UserError

INSTALL_HINT = "pip install 'sonoscore[dicom]'"
TABLE_VERSION = "dicomfields_2026c"

# DCM codes of CID 7050 (De-identification Method), for (0012,0064).
CODES = {
    "113100": "Basic Application Confidentiality Profile",
    "113101": "Clean Pixel Data Option",
    "113105": "Clean Descriptors Option",
    "113107": "Retain Longitudinal Temporal Information Modified Dates Option",
    "113109": "Retain Device Identity Option",
    "113111": "Retain Safe Private Option",
}

# Retain Device Identity Option: the attributes the option keeps (PS3.15 Table E.1-1, its column).
DEVICE_KEYWORDS = frozenset({
    "CassetteID", "DetectorID", "DeviceSerialNumber", "DeviceUID", "DeviceLabel", "DeviceDescription",
    "DeviceAlternateIdentifier", "ManufacturerDeviceIdentifier", "ManufacturerDeviceClassUID", "GantryID",
    "GeneratorID", "PlateID", "PerformedStationAETitle", "PerformedStationGeographicLocationCodeSequence",
    "PerformedStationName", "PerformedStationNameCodeSequence", "ScheduledStationAETitle",
    "ScheduledStationGeographicLocationCodeSequence", "ScheduledStationName", "ScheduledStationNameCodeSequence",
    "ScheduledStudyLocation", "ScheduledStudyLocationAETitle", "SourceSerialNumber", "StationName",
    "XRayDetectorID", "XRayDetectorLabel", "TreatmentMachineName",
})

# Clean Descriptors Option: the free-text descriptions the option keeps, cleaned (PS3.15 Table E.1-1, its column).
DESCRIPTOR_KEYWORDS = frozenset({
    "AcquisitionComments", "AcquisitionDeviceProcessingDescription", "AcquisitionProtocolDescription",
    "AdditionalPatientHistory", "AdmittingDiagnosesDescription", "CommentsOnThePerformedProcedureStep",
    "ContrastBolusAgent", "DerivationDescription", "DischargeDiagnosisDescription", "FrameComments",
    "IdentifyingComments", "ImageComments", "ImagingServiceRequestComments", "InterpretationText", "MedicalAlerts",
    "PatientComments", "PatientState", "PerformedProcedureStepDescription", "ProtocolName", "ReasonForStudy",
    "ReasonForTheRequestedProcedure", "RequestedContrastAgent", "RequestedProcedureDescription", "ResultsComments",
    "ScheduledProcedureStepDescription", "SeriesDescription", "ServiceEpisodeDescription", "StudyComments",
    "StudyDescription", "VisitComments", "LabelText", "TextComments", "TextString",
})

# Attributes this module sets itself after the walk.
_OWN = frozenset({"PatientIdentityRemoved", "DeidentificationMethod", "DeidentificationMethodCodeSequence",
                  "LongitudinalTemporalInformationModified"})
_PSEUDONYM = frozenset({"PatientName", "PatientID"})
_TEXT_VRS = frozenset({"AE", "LO", "LT", "PN", "SH", "ST", "UC", "UT"})
_NUMBER_VRS = frozenset({"US", "SS", "UL", "SL", "FL", "FD", "SV", "UV"})
_DUMMY_TEXT = "ANONYMIZED"
_DUMMY = {"DA": "19000101", "TM": "000000", "DT": "19000101000000", "AS": "000Y", "DS": "0", "IS": "0",
          "CS": _DUMMY_TEXT, "UR": None}
SHIFT_MIN_DAYS, SHIFT_MAX_DAYS = 62, 730   # dicognito's own range for its date offset
WELL_KNOWN_UID = "1.2.840.10008."           # the standard's root: classes, transfer syntaxes, coding schemes
PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


class Refused(Exception):
    """A file this module will not write, with one sentence why (no file name, no value)."""


# -- options -----------------------------------------------------------------------------------------------------

# -- the table ---------------------------------------------------------------------------------------------------

_TABLE: tuple[dict[int, str], list[tuple[int, int, int, int, str]]] | None = None


def load_table():
    """Table E.1-1 as {tag: action} plus masked (repeating-group) rows, from dicom-anonymizer."""
    global _TABLE
    if _TABLE is None:
        try:
            from dicomanonymizer.dicomfields_selector import dicom_anonymization_database_selector
        except ImportError:
            raise UserError(f"de-identification needs dicom-anonymizer (its PS3.15 table); install it with "
                            f"{INSTALL_HINT}") from None
        db = dicom_anonymization_database_selector(TABLE_VERSION)
        exact: dict[int, str] = {}
        masked: list[tuple[int, int, int, int, str]] = []
        for category, action in (("D_TAGS", "D"), ("Z_TAGS", "Z"), ("X_TAGS", "X"), ("U_TAGS", "U"),
                                 ("Z_D_TAGS", "Z/D"), ("X_Z_TAGS", "X/Z"), ("X_D_TAGS", "X/D"),
                                 ("X_Z_D_TAGS", "X/Z/D"), ("X_Z_U_STAR_TAGS", "X/Z/U*")):
            for row in db[category]:
                if len(row) == 2:
                    exact[(row[0] << 16) | row[1]] = action
                else:
                    masked.append((row[0], row[1], row[2], row[3], action))
        _TABLE = (exact, masked)
    return _TABLE


def table_action(tag: int) -> str | None:
    """Table E.1-1's action for a tag (e.g. 'X', 'Z/D'), None when the table does not list it."""
    exact, masked = load_table()
    action = exact.get(int(tag))
    if action is not None:
        return action
    g, e = int(tag) >> 16, int(tag) & 0xFFFF
    for mg, me, gm, em, a in masked:
        if (g & gm) == mg and (e & em) == (me & em):
            return a
    return None


# -- the walk ----------------------------------------------------------------------------------------------------

class Walk:
    """One dataset's walk: `d` is the Deidentifier (its options, keyed values), `report` its FileReport."""

    def __init__(self, d, patient: str, shift: int, report):
        self.d, self.opt, self.patient, self.shift, self.report = d, d.options, patient, shift, report
        self.identifiers: re.Pattern | None = None

    def decide(self, elem) -> str:
        """The action for one public element: X Z D U U* K C S P (P: the patient pseudonym)."""
        kw, vr, tag = elem.keyword, elem.VR, elem.tag
        if kw in _PSEUDONYM:
            return "P"
        if not kw:
            return "X"                                    # a public attribute pydicom does not know
        if self.opt.keep_device and kw in DEVICE_KEYWORDS:
            return "K"
        if self.opt.keep_descriptors and kw in DESCRIPTOR_KEYWORDS and vr in _TEXT_VRS:
            return "C"
        if vr in ("DA", "DT", "TM"):
            if self.opt.keep_dates_shifted and tag.group != 0x0010:
                return "S" if vr != "TM" else "K"
        action = table_action(tag)
        if action is None:
            if vr == "UI":
                return "K" if kw.endswith("ClassUID") or kw == "TransferSyntaxUID" else "U"
            if vr in ("DA", "DT", "TM"):
                return "D"
            return "K"
        if action in ("X/Z",):
            return "Z"
        if action in ("Z/D", "X/D", "X/Z/D"):
            if vr == "SQ":
                return "X" if action == "X/D" else "Z"
            return "D"
        if action == "X/Z/U*":
            return "U" if vr == "UI" else "U*"
        return action

    def walk(self, ds, top: bool = False) -> None:
        creators_used: set[tuple[int, int]] = set()
        for tag in list(ds.keys()):
            if tag not in ds:
                continue
            if tag.element == 0 and tag.group != 0x0000:             # group lengths (retired)
                del ds[tag]
                continue
            g = tag.group
            if (0x5000 <= g <= 0x50FF or 0x6000 <= g <= 0x60FF) and g % 2 == 0:
                del ds[tag]                                           # curves and overlays, whole groups
                self.report.record(f"{'Overlay' if g >= 0x6000 else 'Curve'} group ({g:04X},xxxx)", "X")
                continue
            if tag.is_private:
                if tag.is_private_creator:
                    continue
                if any(s.matches(ds, tag) for s in self.opt.safe_private):
                    creators_used.add((g, tag.element >> 8))
                    self.report.record(f"private ({g:04X},{tag.element:04X})", "K")
                else:
                    del ds[tag]
                    self.report.record("private", "X")
                continue
            elem = ds[tag]
            if top and elem.keyword in _OWN:
                del ds[tag]
                continue
            action = self.decide(elem)
            self.apply(ds, elem, action)
        for tag in list(ds.keys()):                                   # private creators of removed blocks
            if tag.is_private and tag.is_private_creator and (tag.group, tag.element) not in creators_used:
                del ds[tag]

    def apply(self, ds, elem, action: str) -> None:
        name = elem.keyword or f"({elem.tag.group:04X},{elem.tag.element:04X})"
        vr = elem.VR
        if action == "K":
            if vr == "SQ":
                for item in elem.value or ():
                    self.walk(item)
                if elem.keyword in DEVICE_KEYWORDS and self.opt.keep_device:
                    self.report.record(name, "K")
                return
            if (elem.keyword in DEVICE_KEYWORDS and self.opt.keep_device) or \
                    (vr in ("DA", "DT", "TM") and self.opt.keep_dates_shifted):
                self.report.record(name, "K")
            return
        if action == "X":
            del ds[elem.tag]
        elif action == "Z":
            elem.value = [] if vr == "SQ" else None
        elif action == "P":
            elem.value = self.d.pseudonym(self.patient)
            action = "D"
        elif action == "D":
            if vr == "SQ":
                for item in elem.value or ():
                    self.dummy_tree(item)
            else:
                elem.value = _dummy(vr, elem.value, self.d)
        elif action in ("U", "U*"):
            if vr == "UI":
                vals = elem.value if _multi(elem.value) else [elem.value]
                new = [self.d.uid(v) for v in vals if v]
                elem.value = new if _multi(elem.value) else (new[0] if new else elem.value)
                action = "U"
            elif vr == "SQ":
                for item in elem.value or ():
                    self.walk(item)
                action = "U"
            else:
                elem.value = None
                action = "Z"
        elif action == "C":
            elem.value = self.clean(elem.value)
        elif action == "S":
            try:
                vals = elem.value if _multi(elem.value) else [elem.value]
                new = [_shift(str(v), self.shift, vr) for v in vals if str(v or "").strip()]
                elem.value = new if _multi(elem.value) else (new[0] if new else None)
            except ValueError:
                elem.value = None      # not a date this can shift: emptied, never kept as it was
                action = "Z"
        self.report.record(name, action)

    def dummy_tree(self, ds) -> None:
        """A D sequence's item: the table where it applies, dummies for every other text, date or UID."""
        for tag in list(ds.keys()):
            if tag.is_private or not ds[tag].keyword:
                del ds[tag]
                self.report.record("private" if tag.is_private else "unknown attribute", "X")
                continue
            elem = ds[tag]
            if elem.VR == "SQ":
                for item in elem.value or ():
                    self.dummy_tree(item)
            elif elem.VR == "UI":
                self.apply(ds, elem, "K" if elem.keyword.endswith("ClassUID") else "U")
            elif elem.VR in _TEXT_VRS or elem.VR in ("DA", "DT", "TM", "AS", "UR"):
                self.apply(ds, elem, "D")

    def clean(self, value):
        if self.identifiers is None or value is None:
            return value
        if _multi(value):
            return [self.clean(v) for v in value]
        text = str(value)
        return self.identifiers.sub("***", text)


def identifiers_pattern(ds, ctx: Walk) -> re.Pattern | None:
    """Every identifier the header holds in an attribute the profile removes or replaces (whole values, the
    words of names and addresses, dates in common spellings), as one case-insensitive pattern."""
    found: set[str] = set()

    def visit(d) -> None:
        for elem in d:
            if elem.VR == "SQ":
                for item in elem.value or ():
                    visit(item)
                continue
            if elem.tag.is_private:
                action = "X"
            elif elem.keyword in DESCRIPTOR_KEYWORDS:
                continue
            else:
                action = ctx.decide(elem)
            if action == "K" or elem.value in (None, "", b""):
                continue
            vals = elem.value if _multi(elem.value) else [elem.value]
            for v in vals:
                if isinstance(v, bytes):
                    continue
                s = str(v).strip()
                if elem.VR == "DA" and re.fullmatch(r"\d{8}", s):
                    y, m, dd = s[:4], s[4:6], s[6:]
                    found.update({s, f"{y}-{m}-{dd}", f"{y}/{m}/{dd}", f"{dd}.{m}.{y}", f"{dd}/{m}/{y}",
                                  f"{m}/{dd}/{y}", f"{y}.{m}.{dd}"})
                    continue
                if len(s) >= 2:
                    found.add(s)
                for word in re.split(r"[\s^=,;:/\\]+", s):
                    word = word.strip(".'\"()")
                    if len(word) >= 3 or (len(word) == 2 and elem.VR == "PN"):
                        found.add(word)
    visit(ds)
    found = {f for f in found if not re.fullmatch(r"\d{1,3}", f)}
    if not found:
        return None
    alts = sorted(found, key=len, reverse=True)
    return re.compile(r"(?<![A-Za-z0-9])(?:" + "|".join(re.escape(a) for a in alts) + r")(?![A-Za-z0-9])",
                      re.IGNORECASE)


# -- helpers -----------------------------------------------------------------------------------------------------

def _multi(value) -> bool:
    from pydicom.multival import MultiValue
    return isinstance(value, (MultiValue, list, tuple))


def _dummy(vr: str, value, d):
    if vr == "UI":
        return d.uid(str(value)) if value else value
    if vr in _TEXT_VRS:
        return _DUMMY_TEXT
    if vr in _NUMBER_VRS:
        return 0
    if vr in _DUMMY:
        return _DUMMY[vr]
    return None                        # binary and anything else: emptied


def _shift(value: str, days: int, vr: str) -> str:
    v = value.strip()
    if vr == "DA":
        v = v.replace(".", "")
    m = re.fullmatch(r"(\d{4})(\d{2})(\d{2})(.*)", v)
    if not m or (vr == "DA" and m.group(4)):
        raise ValueError("not a full date")
    d = datetime.date(int(m.group(1)), int(m.group(2)), int(m.group(3))) + datetime.timedelta(days=days)
    return d.strftime("%Y%m%d") + m.group(4)


def patient_key(ds) -> str:
    for kw in ("PatientID", "PatientName"):
        v = str(ds.get(kw, "") or "").strip()
        if v:
            return f"{kw}\0{v}\0{str(ds.get('IssuerOfPatientID', '') or '').strip()}"
    return ""


def dcm_code(value: str):
    from pydicom.dataset import Dataset
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = "DCM"
    item.CodeMeaning = CODES[value]
    return item
