"""DICOM de-identification: the PS3.15 Basic Application Level Confidentiality Profile with research options, the one
implementation behind `sonoscore deid` (docs/deid.md says what it does and does not do).

    d = Deidentifier(key, Options(keep_dates_shifted=True))
    d.dataset(ds)                     # in place (and returned); raises Refused for an image it must not pass
    report = d.folder(src, out_dir)   # a folder (any depth), a file or a DICOMDIR -> OUT/<new SOP UID>.dcm + report
    report.write_manifest(path)

The package: this module (options, reports, the Deidentifier, files and folders), profile.py (Table E.1-1, the
options' attribute lists, the walk over a dataset), pixels.py (blanking outside the ultrasound regions).

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
import hashlib
import json
import logging
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from runtime.deid.pixels import blank_outside_regions
from runtime.deid.profile import (CODES, DESCRIPTOR_KEYWORDS, DEVICE_KEYWORDS, INSTALL_HINT,  # noqa: F401
                                  PIXEL_KEYWORDS, SHIFT_MAX_DAYS, SHIFT_MIN_DAYS, TABLE_VERSION, WELL_KNOWN_UID,
                                  Refused, Walk, dcm_code, identifiers_pattern, load_table, patient_key,
                                  table_action)
from runtime.errors import UserError

__all__ = ["CODES", "DESCRIPTOR_KEYWORDS", "DEVICE_KEYWORDS", "MANIFEST_NAME", "TABLE_VERSION", "Deidentifier",
           "FileReport", "Options", "Refused", "Report", "SafePrivate", "inputs", "summary_lines", "table_action"]

MANIFEST_NAME = "deid-manifest.json"
DICOMDIR_CLASS = "1.2.840.10008.1.3.10"   # Media Storage Directory Storage


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
        load_table()

    # keyed values -----------------------------------------------------------------------------------------------

    def uid(self, uid: str) -> str:
        """The keyed replacement of an instance UID (dicognito's UIAnonymizer); a UID under the standard's root
        (a class, a transfer syntax, a coding scheme) is returned as it is."""
        from pydicom.dataelem import DataElement
        uid = str(uid).strip().rstrip("\0")
        if not uid or uid.startswith(WELL_KNOWN_UID):
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
        span = SHIFT_MAX_DAYS - SHIFT_MIN_DAYS + 1
        return -(self._randomizer.to_int("date shift\0" + patient) % span + SHIFT_MIN_DAYS)

    # a dataset --------------------------------------------------------------------------------------------------

    def dataset(self, ds, report: FileReport | None = None):
        """De-identify `ds` in place and return it. An image whose Burned In Annotation is not NO is refused
        (`Refused`), or, with burned_in="blank", blanked outside its ultrasound regions (refused without any)."""
        report = report if report is not None else FileReport(input=0)
        codes = self.options.codes()
        if any(kw in ds for kw in PIXEL_KEYWORDS):
            burned = str(ds.get("BurnedInAnnotation", "") or "").strip().upper()
            if burned != "NO":
                said = "YES" if burned == "YES" else "absent"
                if self.options.burned_in != "blank":
                    raise Refused(f"Burned In Annotation is {said}, so text burned into the pixels cannot be ruled "
                                  f"out; check the images and set it to NO, or use --burned-in blank for "
                                  f"ultrasound with a Sequence of Ultrasound Regions")
                n = blank_outside_regions(ds, said)
                ds.BurnedInAnnotation = "NO"
                report.burned_in = f"was {said}: blanked outside {n} ultrasound region(s)"
                codes = sorted(codes + ["113101"])
            else:
                report.burned_in = "NO"
        patient = patient_key(ds)
        ctx = Walk(self, patient, self.shift_days(patient), report)
        if self.options.keep_descriptors:
            ctx.identifiers = identifiers_pattern(ds, ctx)
        ctx.walk(ds, top=True)
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = ["PS3.15 E.1-1 Basic Profile (" + TABLE_VERSION + ")"] + \
            [CODES[c][:64] for c in codes if c != "113100"] + ["sonoscore deid, dicognito keyed pseudonyms"]
        ds.DeidentificationMethodCodeSequence = [dcm_code(c) for c in codes]
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
