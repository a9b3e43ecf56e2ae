"""DICOM de-identification: the PS3.15 Basic Application Level Confidentiality Profile with research options, the one
implementation behind `sonoscore deid` (docs/deid.md says what it does and does not do).

    d = Deidentifier(key, Options(keep_dates_shifted=True))
    d.dataset(ds)                     # in place (and returned); raises Refused for an image it must not pass
    report = d.folder(src, out_dir)   # a folder (any depth), a file or a DICOMDIR -> OUT/<new SOP UID>.dcm + report
    report.write_manifest(path)

What decides each attribute's fate:

- Table E.1-1 of PS3.15, as dicom-anonymizer ships it (`dicomfields_2026c`, the 2026c standard): D (a dummy),
  Z (emptied), X (removed), U (a keyed UID). The table's "unless the IOD needs it" actions are resolved without
  knowing the IOD: X/Z -> Z, Z/D, X/D and X/Z/D -> D (an empty or dummy value keeps every IOD valid; X/D and
  X/Z/D sequences are removed or emptied), X/Z/U* -> the UIDs inside replaced.
- The options, before the table: Retain Longitudinal Temporal Information with Modified Dates (`keep_dates_shifted`:
  every date and date-time shifted back by a whole number of days derived from the key and the patient, times of
  day kept; birth date and time still emptied), Retain Device Identity (`keep_device`), Clean Descriptors
  (`keep_descriptors`: descriptions kept with every identifier that the header itself holds cut out), Retain Safe
  Private (`safe_private`).
- Not in the table: private attributes removed (unless safe-listed), public attributes unknown to pydicom's
  dictionary removed, overlay (60xx) and curve (50xx) groups removed whole, instance UIDs replaced, dates and
  times replaced by dummies (without `keep_dates_shifted`), sequences walked with the same rules at every depth.
- Patient's Name and Patient ID become one keyed pseudonym (12 characters), the same for a patient in every run
  with the same key.

Keyed values all come from dicognito's Randomizer (MD5 of key + value): UIDs through its UIAnonymizer, exactly
as dicognito's own Anonymizer makes them ("2." + 40 digits), pseudonyms and the date shift from its integers.

Nothing this module writes, logs or raises carries an original value: sentences name inputs by their number in
path order, the report holds actions and counts only, and pydicom's own warnings (which quote values) are muted
while a file is handled.
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from runtime.errors import UserError

INSTALL_HINT = "pip install 'sonoscore[dicom]'"
TABLE_VERSION = "dicomfields_2026c"
MANIFEST_NAME = "deid-manifest.json"
DICOMDIR_CLASS = "1.2.840.10008.1.3.10"   # Media Storage Directory Storage

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
_SHIFT_MIN_DAYS, _SHIFT_MAX_DAYS = 62, 730   # dicognito's own range for its date offset
_WELL_KNOWN_UID = "1.2.840.10008."           # the standard's root: classes, transfer syntaxes, coding schemes
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


class Refused(Exception):
    """A file this module will not write, with one sentence why (no file name, no value)."""


# -- options -----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SafePrivate:
    """A private attribute to keep: a literal tag, or (group, private creator, element byte) wherever the creator
    placed its block."""
    group: int
    element: int | None = None        # the literal tag's element
    creator: str | None = None
    offset: int | None = None         # the element's low byte inside the creator's block

    @classmethod
    def parse(cls, text: str) -> "SafePrivate":
        s = text.strip().strip("()")
        m = re.fullmatch(r"([0-9A-Fa-f]{4}),?([0-9A-Fa-f]{4})", s)
        if m:
            g, e = int(m.group(1), 16), int(m.group(2), 16)
            if g % 2 == 1 and e >= 0x1000:
                return cls(g, element=e)
        m = re.fullmatch(r"([0-9A-Fa-f]{4}),(.+),([0-9A-Fa-f]{2})", s)
        if m and int(m.group(1), 16) % 2 == 1 and m.group(2).strip():
            return cls(int(m.group(1), 16), creator=m.group(2).strip(), offset=int(m.group(3), 16))
        raise UserError(f"--safe-private '{text}' is not a private attribute; give GGGG,EEEE (an odd group, "
                        f"element 1000-FFFF, e.g. 0009,1001) or GGGG,CREATOR,EE (e.g. 0009,ACME 1.0,01)")

    def matches(self, ds, tag) -> bool:
        if tag.group != self.group:
            return False
        if self.element is not None:
            return tag.element == self.element
        block = tag.element >> 8
        creator = ds.get((tag.group, block))
        return (tag.element & 0xFF) == self.offset and creator is not None and \
            str(creator.value).strip() == self.creator

    def __str__(self) -> str:
        if self.element is not None:
            return f"{self.group:04X},{self.element:04X}"
        return f"{self.group:04X},{self.creator},{self.offset:02X}"


@dataclass(frozen=True)
class Options:
    keep_dates_shifted: bool = False
    keep_device: bool = False
    keep_descriptors: bool = False
    safe_private: tuple[SafePrivate, ...] = ()
    burned_in: str = "refuse"          # or "blank": blank everything outside the ultrasound regions

    def __post_init__(self):
        if self.burned_in not in ("refuse", "blank"):
            raise UserError(f"--burned-in '{self.burned_in}' is not a choice; give refuse or blank")

    def codes(self) -> list[str]:
        codes = ["113100"]
        if self.keep_descriptors:
            codes.append("113105")
        if self.keep_dates_shifted:
            codes.append("113107")
        if self.keep_device:
            codes.append("113109")
        if self.safe_private:
            codes.append("113111")
        return codes

    def as_dict(self) -> dict[str, Any]:
        return {"keep_dates_shifted": self.keep_dates_shifted, "keep_device": self.keep_device,
                "keep_descriptors": self.keep_descriptors, "safe_private": [str(s) for s in self.safe_private],
                "burned_in": self.burned_in}


# -- reports -----------------------------------------------------------------------------------------------------

@dataclass
class FileReport:
    """What happened to one input: no original value, no file name (the input is its number in path order)."""
    input: int
    status: str = "written"            # written | refused | skipped
    output: str | None = None          # the output's file name (the new SOP Instance UID)
    reason: str | None = None
    actions: dict[str, str] = field(default_factory=dict)   # attribute keyword (or tag) -> X Z D U K C S
    counts: dict[str, int] = field(default_factory=dict)     # action -> how many elements
    burned_in: str | None = None
    method_codes: list[str] = field(default_factory=list)

    def record(self, name: str, action: str) -> None:
        old = self.actions.get(name)
        if old is None:
            self.actions[name] = action
        elif action not in old.split("/"):
            self.actions[name] = "/".join(sorted(old.split("/") + [action]))
        self.counts[action] = self.counts.get(action, 0) + 1

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"input": self.input, "status": self.status}
        for k in ("output", "reason", "burned_in"):
            if getattr(self, k) is not None:
                d[k] = getattr(self, k)
        if self.status == "written":
            d["method_codes"] = self.method_codes
            d["counts"] = dict(sorted(self.counts.items()))
            d["actions"] = dict(sorted(self.actions.items()))
        return d


@dataclass
class Report:
    """The manifest of one run: options, codes, each input's FileReport, totals."""
    options: Options
    input_kind: str                    # folder | file | DICOMDIR
    key_id: str
    files: list[FileReport] = field(default_factory=list)

    @property
    def written(self) -> int:
        return sum(f.status == "written" for f in self.files)

    @property
    def refused(self) -> list[FileReport]:
        return [f for f in self.files if f.status == "refused"]

    @property
    def skipped(self) -> list[FileReport]:
        return [f for f in self.files if f.status == "skipped"]

    def as_dict(self) -> dict[str, Any]:
        totals: dict[str, int] = {}
        for f in self.files:
            for k, n in f.counts.items():
                totals[k] = totals.get(k, 0) + n
        return {
            "tool": "sonoscore deid",
            "profile": f"DICOM PS3.15 Basic Application Level Confidentiality Profile (Table E.1-1, {TABLE_VERSION})",
            "options": self.options.as_dict(),
            "method_codes": [{"code": c, "scheme": "DCM", "meaning": CODES[c]} for c in self.options.codes()],
            "key_id": self.key_id,
            "input": self.input_kind,
            "input_numbering": "inputs are numbered from 1 in the sorted order of their paths relative to IN",
            "counts": {"inputs": len(self.files), "written": self.written, "refused": len(self.refused),
                       "skipped": len(self.skipped), "actions": dict(sorted(totals.items()))},
            "files": [f.as_dict() for f in self.files],
        }

    def write_manifest(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        tmp = path.with_name(path.name + ".part")
        tmp.write_text(json.dumps(self.as_dict(), indent=1) + "\n")
        os.replace(tmp, path)
        return path


# -- the table ---------------------------------------------------------------------------------------------------

_TABLE: tuple[dict[int, str], list[tuple[int, int, int, int, str]]] | None = None


def _table():
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
    exact, masked = _table()
    action = exact.get(int(tag))
    if action is not None:
        return action
    g, e = int(tag) >> 16, int(tag) & 0xFFFF
    for mg, me, gm, em, a in masked:
        if (g & gm) == mg and (e & em) == (me & em):
            return a
    return None


# -- the de-identifier -------------------------------------------------------------------------------------------

class Deidentifier:
    """One key and one set of options; the same key gives the same UIDs, pseudonyms and date shifts in every run."""

    def __init__(self, key: str | bytes, options: Options | None = None):
        try:
            from dicognito.randomizer import Randomizer
            from dicognito.uianonymizer import UIAnonymizer
        except ImportError:
            raise UserError(f"de-identification needs dicognito; install it with {INSTALL_HINT}") from None
        if isinstance(key, (bytes, bytearray)):
            key = bytes(key).hex()
        if not key:
            raise UserError("de-identification needs a key: give --key KEY or set SONOSCORE_DEID_KEY (keep it "
                            "secret; the same key gives the same pseudonyms)")
        self.options = options or Options()
        self._randomizer = Randomizer(key)
        self._ui = UIAnonymizer(self._randomizer)
        self.key_id = hashlib.sha256(b"sonoscore deid key id\0" + key.encode()).hexdigest()[:16]
        _table()

    # keyed values -----------------------------------------------------------------------------------------------

    def uid(self, uid: str) -> str:
        """The keyed replacement of an instance UID (dicognito's UIAnonymizer); a UID under the standard's root
        (a class, a transfer syntax, a coding scheme) is returned as it is."""
        from pydicom.dataelem import DataElement
        uid = str(uid).strip().rstrip("\0")
        if not uid or uid.startswith(_WELL_KNOWN_UID):
            return uid
        elem = DataElement(0x00080018, "UI", uid)
        self._ui(None, elem)
        return str(elem.value)

    def pseudonym(self, patient: str) -> str:
        """The patient's keyed pseudonym (12 letters and digits), used for both Patient's Name and Patient ID."""
        alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
        ints = self._randomizer.get_ints_from_ranges("patient\0" + patient, *([len(alphabet)] * 12))
        return "".join(alphabet[i] for i in ints)

    def shift_days(self, patient: str) -> int:
        """The patient's date shift in days (negative: back in time), from the key and the patient."""
        span = _SHIFT_MAX_DAYS - _SHIFT_MIN_DAYS + 1
        return -(self._randomizer.to_int("date shift\0" + patient) % span + _SHIFT_MIN_DAYS)

    # a dataset --------------------------------------------------------------------------------------------------

    def dataset(self, ds, report: FileReport | None = None):
        """De-identify `ds` in place and return it. An image whose Burned In Annotation is not NO is refused
        (`Refused`), or, with burned_in="blank", blanked outside its ultrasound regions (refused without any)."""
        report = report if report is not None else FileReport(input=0)
        codes = self.options.codes()
        if any(kw in ds for kw in _PIXEL_KEYWORDS):
            burned = str(ds.get("BurnedInAnnotation", "") or "").strip().upper()
            if burned != "NO":
                said = "YES" if burned == "YES" else "absent"
                if self.options.burned_in != "blank":
                    raise Refused(f"Burned In Annotation is {said}, so text burned into the pixels cannot be ruled "
                                  f"out; check the images and set it to NO, or use --burned-in blank for "
                                  f"ultrasound with a Sequence of Ultrasound Regions")
                n = _blank_outside_regions(ds, said)
                ds.BurnedInAnnotation = "NO"
                report.burned_in = f"was {said}: blanked outside {n} ultrasound region(s)"
                codes = sorted(codes + ["113101"])
            else:
                report.burned_in = "NO"
        patient = _patient_key(ds)
        ctx = _Context(self, patient, self.shift_days(patient), report)
        if self.options.keep_descriptors:
            ctx.identifiers = _identifiers(ds, ctx)
        ctx.walk(ds, top=True)
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = ["PS3.15 E.1-1 Basic Profile (" + TABLE_VERSION + ")"] + \
            [CODES[c][:64] for c in codes if c != "113100"] + ["sonoscore deid, dicognito keyed pseudonyms"]
        ds.DeidentificationMethodCodeSequence = [_dcm_code(c) for c in codes]
        ds.LongitudinalTemporalInformationModified = "MODIFIED" if self.options.keep_dates_shifted else "REMOVED"
        report.method_codes = codes
        return ds

    # files ------------------------------------------------------------------------------------------------------

    def file(self, src: str | os.PathLike, out_dir: str | os.PathLike, *, number: int = 1,
             taken: dict[str, int] | None = None) -> FileReport:
        """One input file -> OUT/<new SOP Instance UID>.dcm; refused or skipped files get a reason sentence."""
        import pydicom
        from pydicom.dataset import FileMetaDataset
        from pydicom.errors import InvalidDicomError
        report = FileReport(input=number)
        with _quiet():
            try:
                ds = pydicom.dcmread(src)
            except InvalidDicomError:
                return _skip(report, "is not a DICOM file (no DICM preamble); left out")
            except Exception as e:  # truncated, unreadable: the exception text may quote values, so not shown
                return _refuse(report, f"could not be read as DICOM ({type(e).__name__}); the file is damaged, "
                                       f"export it again")
            meta = getattr(ds, "file_meta", None) or FileMetaDataset()
            sop_class = str(meta.get("MediaStorageSOPClassUID", "") or ds.get("SOPClassUID", ""))
            if sop_class == DICOMDIR_CLASS or "DirectoryRecordSequence" in ds:
                return _skip(report, "is a DICOMDIR (an index that names the patients); not copied, give the "
                                     "DICOMDIR itself as IN to read the files it lists")
            try:
                self.dataset(ds, report)
            except Refused as e:
                return _refuse(report, str(e))
            except UserError:
                raise
            except Exception as e:
                return _refuse(report, f"could not be de-identified ({type(e).__name__}); the file has a value this "
                                       f"tool cannot handle, report it with the file's manifest entry")
            new_meta = FileMetaDataset()
            new_meta.MediaStorageSOPClassUID = ds.get("SOPClassUID") or meta.get("MediaStorageSOPClassUID")
            sop = str(ds.get("SOPInstanceUID", "") or "")
            if not sop:
                sop = self.uid(hashlib.sha256(Path(src).read_bytes()).hexdigest())
                ds.SOPInstanceUID = sop
            new_meta.MediaStorageSOPInstanceUID = sop
            new_meta.TransferSyntaxUID = meta.get("TransferSyntaxUID") or pydicom.uid.ExplicitVRLittleEndian
            ds.file_meta = new_meta
            ds.preamble = b"\0" * 128
            name = f"{sop}.dcm"
            if taken is not None:
                if name in taken:
                    return _refuse(report, f"has the same SOP Instance UID as input {taken[name]}; written once")
                taken[name] = number
            out = Path(out_dir) / name
            tmp = out.with_name(name + ".part")
            try:
                ds.save_as(tmp, enforce_file_format=True)
                os.replace(tmp, out)
            except OSError as e:
                tmp.unlink(missing_ok=True)
                raise UserError(f"cannot write to output folder '{out_dir}' ({e.strerror or type(e).__name__}); "
                                f"check its space and permissions") from None
            except Exception as e:
                tmp.unlink(missing_ok=True)
                return _refuse(report, f"could not be written back as DICOM ({type(e).__name__}); report it with "
                                       f"the file's manifest entry")
        report.output = name
        return report

    def folder(self, src: str | os.PathLike, out_dir: str | os.PathLike,
               on_file: Callable[[FileReport, int], None] | None = None) -> Report:
        """Every DICOM file of `src` (a folder at any depth, a single file, or a DICOMDIR's referenced files) into
        `out_dir`, flat, named by the new SOP Instance UID; returns the Report (not yet written as a manifest).
        `on_file(report, total)` is called after each input."""
        src, out_dir = Path(src), Path(out_dir)
        kind, paths = inputs(src, exclude=out_dir)
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot make output folder '{out_dir}' ({e.strerror or type(e).__name__}); give a "
                            f"folder you can write to") from None
        report = Report(self.options, kind, self.key_id)
        taken: dict[str, int] = {}
        for n, p in enumerate(paths, 1):
            if p is None:
                fr = _refuse(FileReport(input=n), "is listed in the DICOMDIR but missing from the file-set; "
                                                  "copy the whole file-set")
            else:
                fr = self.file(p, out_dir, number=n, taken=taken)
            report.files.append(fr)
            if on_file is not None:
                on_file(fr, len(paths))
        return report


def inputs(src: Path, exclude: Path | None = None) -> tuple[str, list[Path | None]]:
    """(kind, files): a folder's files at any depth in sorted relative-path order (hidden ones and `exclude`
    left out), a single file, or the files a DICOMDIR references (None for one that is missing)."""
    if src.is_dir():
        ex = exclude.resolve() if exclude is not None else None
        files = []
        for p in src.rglob("*"):
            rel = p.relative_to(src)
            if any(part.startswith(".") for part in rel.parts) or not p.is_file():
                continue
            if ex is not None and (p.resolve() == ex or ex in p.resolve().parents):
                continue
            files.append(p)
        return "folder", sorted(files, key=lambda p: p.relative_to(src).as_posix())
    if not src.is_file():
        raise UserError(f"input '{src}' does not exist; give a DICOM file, a folder or a DICOMDIR")
    if _is_dicomdir(src):
        from pydicom.fileset import FileSet
        with _quiet():
            import pydicom
            try:
                fs = FileSet(pydicom.dcmread(src))
            except Exception:
                raise UserError(f"DICOMDIR '{src}' could not be read as a file-set index; give the folder that "
                                f"holds its files instead") from None
            paths = []
            for inst in fs:
                p = Path(inst.path)
                paths.append(p if p.is_file() else None)
        return "DICOMDIR", paths
    return "file", [src]


# -- the walk ----------------------------------------------------------------------------------------------------

class _Context:
    def __init__(self, d: Deidentifier, patient: str, shift: int, report: FileReport):
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


def _identifiers(ds, ctx: _Context) -> re.Pattern | None:
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


def _dummy(vr: str, value, d: Deidentifier):
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


def _patient_key(ds) -> str:
    for kw in ("PatientID", "PatientName"):
        v = str(ds.get(kw, "") or "").strip()
        if v:
            return f"{kw}\0{v}\0{str(ds.get('IssuerOfPatientID', '') or '').strip()}"
    return ""


def _dcm_code(value: str):
    from pydicom.dataset import Dataset
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = "DCM"
    item.CodeMeaning = CODES[value]
    return item


def _blank_outside_regions(ds, said: str) -> int:
    """Every pixel outside the union of the Sequence of Ultrasound Regions set to black; returns the region count.
    Compressed pixel data is written back uncompressed (Explicit VR Little Endian)."""
    import numpy as np
    regions = []
    for r in ds.get("SequenceOfUltrasoundRegions") or ():
        try:
            x0, y0 = int(r.RegionLocationMinX0), int(r.RegionLocationMinY0)
            x1, y1 = int(r.RegionLocationMaxX1), int(r.RegionLocationMaxY1)
        except (AttributeError, TypeError, ValueError):
            continue
        if x1 >= x0 and y1 >= y0:
            regions.append((x0, y0, x1, y1))
    if not regions:
        raise Refused(f"Burned In Annotation is {said} and there is no Sequence of Ultrasound Regions to keep, so "
                      f"the pixels cannot be blanked safely; check the images and set Burned In Annotation to NO")
    pi = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    native = ts is None or not ts.is_compressed
    bits = int(ds.get("BitsAllocated") or 0)
    if bits not in (8, 16, 32) or (native and pi == "YBR_FULL_422"):
        raise Refused(f"Burned In Annotation is {said} and the pixels ({bits}-bit {pi or 'unknown'}) are of a kind "
                      f"this tool does not blank; check the images and set Burned In Annotation to NO")
    if not native and pi == "PALETTE COLOR":
        raise Refused(f"Burned In Annotation is {said} and the image is compressed PALETTE COLOR, which this tool "
                      f"does not blank; convert it to RGB first")
    rows, cols = int(ds.Rows), int(ds.Columns)
    keep = np.zeros((rows, cols), bool)
    for x0, y0, x1, y1 in regions:
        keep[max(y0, 0):min(y1, rows - 1) + 1, max(x0, 0):min(x1, cols - 1) + 1] = True
    frames = int(ds.get("NumberOfFrames") or 1)
    if native:
        # The stored values as they are (no colour conversion), written back in the file's own transfer syntax.
        ds.pixel_array_options(raw=True)
        arr = np.array(ds.pixel_array)
        black = {"MONOCHROME1": (1 << int(ds.BitsStored)) - 1, "YBR_FULL": (0, 128, 128)}.get(pi, 0)
        view = arr if frames > 1 else arr[None]
        view[:, ~keep] = black
        if ts is not None and not ts.is_little_endian:
            arr = arr.byteswap()
        if int(ds.get("SamplesPerPixel") or 1) == 3:
            ds.PlanarConfiguration = 0                 # pydicom hands colour back interleaved
        data = arr.tobytes()
        ds.PixelData = data + b"\0" * (len(data) % 2)
    else:
        # Compressed: decoded (colour as RGB) and written back uncompressed.
        arr = np.array(ds.pixel_array)
        black = (1 << int(ds.BitsStored)) - 1 if pi == "MONOCHROME1" else 0
        view = arr if frames > 1 else arr[None]
        view[:, ~keep] = black
        ds.set_pixel_data(arr, "RGB" if int(ds.get("SamplesPerPixel") or 1) == 3 else pi, int(ds.BitsStored),
                          generate_instance_uid=False)
    return len(regions)


def _is_dicomdir(path: Path) -> bool:
    if path.name.upper() == "DICOMDIR":
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError:
        return False
    return head[128:132] == b"DICM" and DICOMDIR_CLASS.encode() in head


def _skip(report: FileReport, reason: str) -> FileReport:
    report.status, report.reason = "skipped", reason
    report.actions, report.counts = {}, {}
    return report


def _refuse(report: FileReport, reason: str) -> FileReport:
    report.status, report.reason = "refused", reason
    report.actions, report.counts = {}, {}
    return report


@contextlib.contextmanager
def _quiet():
    """pydicom's validation warnings and log lines quote values (names, dates): muted while a file is handled,
    and values are neither checked on reading nor on writing (they are the input's own)."""
    from pydicom import config
    logger = logging.getLogger("pydicom")
    level, read_mode, write_mode = logger.level, config.settings.reading_validation_mode, \
        config.settings.writing_validation_mode
    logger.setLevel(logging.CRITICAL + 1)
    config.settings.reading_validation_mode = config.IGNORE
    config.settings.writing_validation_mode = config.IGNORE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)
        config.settings.reading_validation_mode = read_mode
        config.settings.writing_validation_mode = write_mode


def summary_lines(report: Report) -> Iterable[str]:
    """The terminal's account of a run: one sentence per refused or skipped input, then the totals."""
    total = len(report.files)
    for f in report.files:
        if f.status != "written":
            yield f"input {f.input} of {total} (in path order) {f.reason}"
    yield (f"{report.written} of {total} input(s) written, {len(report.refused)} refused, "
           f"{len(report.skipped)} skipped")
