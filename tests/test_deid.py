"""`sonoscore deid` (runtime/deid/): studies made from pydicom's and pydicom-data's real US, CT and MR files with
identifiers planted in every basic-profile attribute set here (and in the file names), de-identified by the real
command in a subprocess; every byte written (files, manifest, stdout, stderr) and every output name is searched
for them. dciodvfy (dicom3tools) checks that no IOD error appears that the input did not already have."""
from __future__ import annotations

import datetime
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
pytest.importorskip("dicognito")
pytest.importorskip("dicomanonymizer")

from pydicom.data import get_testdata_file  # noqa: E402
from pydicom.dataset import Dataset  # noqa: E402

from runtime import deid as DE  # noqa: E402
from tests.conftest import sonoscore  # noqa: E402

KEY = "test-key-1"
US_CLASS = "1.2.840.10008.5.1.4.1.1.6.1"
ROOT_UID = "1.2.826.0.1.3680043.8.498.99"

PATIENTS = {
    "janet": dict(PatientName="Plantedname^Janet", PatientID="PID778899", PatientBirthDate="19610417",
                  PatientAddress="12 Secretlane Road Hiddentown", PatientTelephoneNumbers="5550199321",
                  OtherPatientIDs="OTHERID4455", PatientMotherBirthName="Mothnamo^Magdalena"),
    "olga": dict(PatientName="Otherperson^Olga", PatientID="PIDOLGA55", PatientBirthDate="19500102",
                 PatientAddress="7 Quietstreet Farville", PatientTelephoneNumbers="5550111888",
                 OtherPatientIDs="OTHERIDOLGA", PatientMotherBirthName="Mumname^Mathilda"),
}
COMMON = dict(AccessionNumber="ACC99812", StudyID="STUDYID42", IssuerOfPatientID="ISSUERHOSPX",
              InstitutionName="Saint Plantedia Hospital", InstitutionAddress="1 Clinicroad Plantville",
              InstitutionalDepartmentName="Plantology Dept", ReferringPhysicianName="Refnamo^Rudolpho",
              PerformingPhysicianName="Perfnamo^Petronella", OperatorsName="Opnamo^Oswinda",
              NameOfPhysiciansReadingStudy="Readnamo^Rowena", PhysiciansOfRecord="Recnamo^Rosalind",
              StationName="STATIONX991", DeviceSerialNumber="SERIAL31415",
              StudyDate="20190305", SeriesDate="20190305", AcquisitionDate="20190305", ContentDate="20190305",
              StudyTime="101112", ImageComments="comment Plantedname")


def descriptions(patient: str) -> dict[str, str]:
    """Descriptions carrying identifiers the same header holds (cut out with --keep-descriptors)."""
    p = PATIENTS[patient]
    family, given = p["PatientName"].split("^")
    birth = p["PatientBirthDate"]
    return dict(StudyDescription=f"Kidney {family} scan", SeriesDescription=f"Renal series {p['PatientID']}",
                ProtocolName=f"Abdomen {given} {birth[:4]}-{birth[4:6]}-{birth[6:]}")

DEVICE = ("STATIONX991", "SERIAL31415")           # kept on purpose by --keep-device
PRIVATE_CREATOR = "SONOSCORE TEST"

# (relative path, pydicom test file, patient, study, series): the path itself carries the patient's name and ID.
SOURCES = [
    ("Plantedname_Janet/PID778899/us/Plantedname_1.dcm", "US1_UNCR.dcm", "janet", 1, 1),
    ("Plantedname_Janet/PID778899/us/Plantedname_2.dcm", "US1_J2KR.dcm", "janet", 1, 2),
    ("Plantedname_Janet/PID778899/us/Plantedname_3.dcm", "gdcm-US-ALOKA-16.dcm", "janet", 1, 3),
    ("Plantedname_Janet/PID778899/ct/Janet_CT.dcm", "CT_small.dcm", "janet", 2, 4),
    ("Plantedname_Janet/PID778899/mr/Janet_MR.dcm", "MR_small.dcm", "janet", 2, 5),
    ("Otherperson_Olga/PIDOLGA55/MR_Olga.dcm", "MR-SIEMENS-DICOM-WithOverlays.dcm", "olga", 3, 6),
]


def uid(*parts: int) -> str:
    return ".".join([ROOT_UID, *map(str, parts)])


def planted_strings() -> list[str]:
    out = set()
    for p in PATIENTS.values():
        for v in p.values():
            out.add(v)
            out.update(w for w in re.split(r"[\^ ]", v) if len(w) >= 4)
    for v in list(COMMON.values()) + [v for p in PATIENTS for v in descriptions(p).values()]:
        if re.fullmatch(r"\d{6}", v):       # a time of day: too short to search for safely
            continue
        out.add(v)
        out.update(w for w in re.split(r"[\^ ]", v) if len(w) >= 5 and not w.isdigit() and w not in
                   ("Kidney", "Renal", "series", "Abdomen", "Saint", "Hospital", "Road", "comment", "Dept"))
    out.update({"REQPROC2718", "SPSID1618", "Request for Plantedname", "SEQOTHERID12", "private Plantedname note"})
    return sorted(out)


def plant(ds: Dataset, patient: str, study: int, series: int, n: int) -> Dataset:
    for k, v in {**PATIENTS[patient], **COMMON, **descriptions(patient)}.items():
        setattr(ds, k, v)
    ds.PatientBirthDate = PATIENTS[patient]["PatientBirthDate"]
    other = Dataset()
    other.PatientID = "SEQOTHERID12"
    other.TypeOfPatientID = "TEXT"
    ds.OtherPatientIDsSequence = [other]
    req = Dataset()
    req.RequestedProcedureID = "REQPROC2718"
    req.ScheduledProcedureStepID = "SPSID1618"
    req.RequestedProcedureDescription = "Request for Plantedname"
    req.AccessionNumber = "ACC99812"
    ds.RequestAttributesSequence = [req]
    block = ds.private_block(0x0009, PRIVATE_CREATOR, create=True)
    block.add_new(0x01, "LO", "private Plantedname note")
    block.add_new(0x02, "LO", "SAFEVALUE7")
    ds.StudyInstanceUID = uid(study)
    ds.SeriesInstanceUID = uid(study, series)
    ds.SOPInstanceUID = uid(study, series, n)
    ds.FrameOfReferenceUID = uid(study, 0)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.BurnedInAnnotation = "NO"
    return ds


def build_study(root: Path, sources=SOURCES) -> dict[str, Path]:
    """The planted study under `root`; returns {relative path: path}. The third US file references the first."""
    paths = {}
    for n, (rel, name, patient, study, series) in enumerate(sources, 1):
        ds = plant(pydicom.dcmread(get_testdata_file(name)), patient, study, series, n)
        if name == "gdcm-US-ALOKA-16.dcm":
            ref = Dataset()
            ref.ReferencedSOPClassUID = US_CLASS
            ref.ReferencedSOPInstanceUID = uid(1, 1, 1)
            ds.ReferencedImageSequence = [ref]
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(p)
        paths[rel] = p
    return paths


def source_uids(paths) -> set[str]:
    """Every instance UID the inputs hold (anything not under the standard's root, not a class)."""
    found = set()

    def visit(d):
        for e in d:
            if e.VR == "SQ":
                for item in e.value:
                    visit(item)
            elif e.VR == "UI" and e.value:
                for v in (e.value if isinstance(e.value, pydicom.multival.MultiValue) else [e.value]):
                    if not str(v).startswith("1.2.840.10008.") and not e.keyword.endswith("ClassUID"):
                        found.add(str(v))
    for p in paths:
        visit(pydicom.dcmread(p))
    return found


def leaks(out: Path, proc, needles) -> list[str]:
    """Every (where, needle) for a needle found in any output byte, output name, stdout or stderr."""
    blobs = {"stdout": proc.stdout.encode(), "stderr": proc.stderr.encode()}
    for p in out.rglob("*"):
        blobs[f"name {p.relative_to(out)}"] = str(p.relative_to(out)).encode()
        if p.is_file():
            blobs[str(p.relative_to(out))] = p.read_bytes()
    found = []
    for where, blob in blobs.items():
        low = blob.lower()
        for s in needles:
            if s.lower().encode() in low:
                found.append(f"{s!r} in {where}")
    return found


def manifest(out: Path) -> dict:
    return json.loads((out / DE.MANIFEST_NAME).read_text())


def outputs_by_input(out: Path, rels: list[str]) -> dict[str, Path]:
    """{input relative path: output path} through the manifest (inputs numbered in sorted path order)."""
    order = sorted(rels)
    return {order[f["input"] - 1]: out / f["output"] for f in manifest(out)["files"] if f["status"] == "written"}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study") / "in"
    paths = build_study(root)
    (root / "Plantedname_Janet" / "notes Plantedname.txt").write_text("Plantedname Janet PID778899: not DICOM\n")
    return root, paths


@pytest.fixture(scope="module")
def basic_run(study, tmp_path_factory):
    root, _ = study
    out = tmp_path_factory.mktemp("basic") / "out"
    proc = sonoscore("deid", root, out, "--key", KEY)
    return out, proc


# -- the basic profile -------------------------------------------------------------------------------------------

def test_basic_profile_leaves_no_planted_identifier(study, basic_run):
    root, paths = study
    out, proc = basic_run
    assert proc.returncode == 3, proc.stderr            # the text file is left out, the rest written
    m = manifest(out)
    assert m["counts"]["written"] == len(SOURCES) and m["counts"]["skipped"] == 1, m["counts"]
    needles = planted_strings() + sorted(source_uids(paths.values())) + ["19610417", "20190305"]
    assert leaks(out, proc, needles) == []
    # the non-DICOM file: one sentence, naming it by number only
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "is not a DICOM file" in lines[0] and "input" in lines[0], proc.stderr
    for f in out.glob("*.dcm"):
        ds = pydicom.dcmread(f)
        assert f.name == ds.SOPInstanceUID + ".dcm" == ds.file_meta.MediaStorageSOPInstanceUID + ".dcm"
        assert ds.PatientIdentityRemoved == "YES"
        codes = [c.CodeValue for c in ds.DeidentificationMethodCodeSequence]
        assert codes == ["113100"] and all(c.CodingSchemeDesignator == "DCM" for c in
                                           ds.DeidentificationMethodCodeSequence)
        assert ds.DeidentificationMethod and ds.LongitudinalTemporalInformationModified == "REMOVED"
        assert ds.PatientName == ds.PatientID and re.fullmatch(r"[A-Z0-9]{12}", str(ds.PatientID))
        assert not ds.get("StudyDate") and not ds.get("PatientBirthDate") and not ds.get("AccessionNumber")
        assert not any(e.tag.is_private for e in ds.iterall())
        assert "RequestAttributesSequence" not in ds and "OtherPatientIDsSequence" not in ds
        assert "StudyDescription" not in ds and "InstitutionName" not in ds or ds.InstitutionName == "ANONYMIZED"
        assert not any(0x6000 <= e.tag.group <= 0x60FF for e in ds)      # overlays gone
    # the manifest says what was done per attribute, and nothing of the values
    files = {f["input"]: f for f in m["files"]}
    ct = files[sorted(paths).index("Plantedname_Janet/PID778899/ct/Janet_CT.dcm") + 1]
    assert ct["actions"]["PatientBirthDate"] == "Z" and ct["actions"]["StudyInstanceUID"] == "U"
    assert ct["actions"]["StudyDescription"] == "X" and ct["actions"]["private"] == "X"
    assert ct["actions"]["RequestAttributesSequence"] == "X" and ct["counts"]["X"] > 0


def test_same_patient_one_pseudonym_and_study_uids_consistent(study, basic_run):
    root, paths = study
    out, _ = basic_run
    by_in = outputs_by_input(out, list(paths))
    ds = {rel: pydicom.dcmread(p) for rel, p in by_in.items()}
    janet = [d for rel, d in ds.items() if rel.startswith("Plantedname_Janet")]
    olga = [d for rel, d in ds.items() if rel.startswith("Otherperson")]
    assert len({d.PatientID for d in janet}) == 1 and olga[0].PatientID != janet[0].PatientID
    us = [ds[r] for r, *_ in SOURCES[:3]]
    assert len({d.StudyInstanceUID for d in us}) == 1 and len({d.FrameOfReferenceUID for d in us}) == 1
    assert len({d.SeriesInstanceUID for d in us}) == 3 and len({d.SOPInstanceUID for d in ds.values()}) == 6
    ct, mr = ds[SOURCES[3][0]], ds[SOURCES[4][0]]
    assert ct.StudyInstanceUID == mr.StudyInstanceUID != us[0].StudyInstanceUID
    # a reference to another instance points at that instance's new UID
    assert us[2].ReferencedImageSequence[0].ReferencedSOPInstanceUID == us[0].SOPInstanceUID
    assert us[2].ReferencedImageSequence[0].ReferencedSOPClassUID == US_CLASS
    # the keyed mapping is dicognito's: the same as its own Anonymizer's for the same seed
    from dicognito.anonymizer import Anonymizer
    probe = Dataset()
    probe.StudyInstanceUID = uid(1)
    probe.file_meta = pydicom.dataset.FileMetaDataset()
    Anonymizer(seed=KEY).anonymize(probe)
    assert probe.StudyInstanceUID == us[0].StudyInstanceUID


def test_same_key_same_output_other_key_other_uids(study, basic_run, tmp_path):
    root, paths = study
    out, _ = basic_run
    again = tmp_path / "again"
    sonoscore("deid", root, again, "--key", KEY)
    names = sorted(p.name for p in out.glob("*.dcm"))
    assert names == sorted(p.name for p in again.glob("*.dcm"))
    for n in names:                                  # byte for byte: nothing random, nothing from the clock
        assert (out / n).read_bytes() == (again / n).read_bytes(), n
    other = tmp_path / "other"
    sonoscore("deid", root, other, "--key", "another-key")
    other_uids = {pydicom.dcmread(p).StudyInstanceUID for p in other.glob("*.dcm")}
    first_uids = {pydicom.dcmread(p).StudyInstanceUID for p in out.glob("*.dcm")}
    assert len(other_uids) == len(first_uids) == 3 and not other_uids & first_uids
    assert not set(p.name for p in other.glob("*.dcm")) & set(names)


def test_pixel_data_byte_identical(study, basic_run):
    root, paths = study
    out, _ = basic_run
    for rel, o in outputs_by_input(out, list(paths)).items():
        a, b = pydicom.dcmread(paths[rel]), pydicom.dcmread(o)
        assert a.PixelData == b.PixelData, rel
        assert a.file_meta.TransferSyntaxUID == b.file_meta.TransferSyntaxUID


@pytest.mark.skipif(shutil.which("dciodvfy") is None,
                    reason="dciodvfy (dicom3tools) is not installed; .ci/run installs it (apt-get install dicom3tools)")
def test_dciodvfy_no_new_errors(study, basic_run):
    root, paths = study
    out, _ = basic_run

    def errors(p: Path) -> set[str]:
        r = subprocess.run(["dciodvfy", str(p)], capture_output=True, text=True, timeout=120)
        return {re.sub(r"= <[^>]*>", "= <>", ln.strip()) for ln in (r.stdout + r.stderr).splitlines()
                if ln.startswith("Error")}
    for rel, o in outputs_by_input(out, list(paths)).items():
        new = errors(o) - errors(paths[rel])
        assert not new, (rel, sorted(new))


# -- the options -------------------------------------------------------------------------------------------------

def test_keep_options_shift_dates_keep_device_clean_descriptors(study, tmp_path):
    root, paths = study
    out = tmp_path / "out"
    proc = sonoscore("deid", root, out, "--key", KEY, "--keep-dates-shifted", "--keep-device",
                     "--keep-descriptors")
    assert proc.returncode == 3, proc.stderr
    needles = [s for s in planted_strings() if s not in DEVICE] + sorted(source_uids(paths.values()))
    needles += ["19610417", "19500102", "20190305", "1961-04-17", "1950-01-02"]
    assert leaks(out, proc, needles) == []
    by_in = outputs_by_input(out, list(paths))
    shifts = {}
    for rel, o in by_in.items():
        ds = pydicom.dcmread(o)
        codes = [c.CodeValue for c in ds.DeidentificationMethodCodeSequence]
        assert codes == ["113100", "113105", "113107", "113109"]
        assert ds.StationName == "STATIONX991" and ds.DeviceSerialNumber == "SERIAL31415"   # device kept
        assert ds.StudyDescription == "Kidney *** scan" and ds.SeriesDescription == "Renal series ***"
        assert ds.ProtocolName == "Abdomen *** ***"
        assert not ds.get("PatientBirthDate")                        # never shifted, always emptied
        assert ds.StudyTime == "101112"                              # whole days: the time of day is kept
        shift = (datetime.date(2019, 3, 5) - datetime.datetime.strptime(ds.StudyDate, "%Y%m%d").date()).days
        assert ds.SeriesDate == ds.StudyDate == ds.ContentDate and 62 <= shift <= 730
        assert ds.LongitudinalTemporalInformationModified == "MODIFIED"
        shifts.setdefault(rel.split("/")[0], set()).add(shift)
    assert all(len(s) == 1 for s in shifts.values())                 # one shift per patient ...
    assert shifts["Plantedname_Janet"] != shifts["Otherperson_Olga"]  # ... derived from the patient
    d = DE.Deidentifier(KEY)
    assert shifts["Plantedname_Janet"] == {-d.shift_days("PatientID\0PID778899\0ISSUERHOSPX")}


def test_safe_private_kept_other_private_removed(tmp_path):
    root = tmp_path / "in"
    build_study(root, SOURCES[3:4])
    out = tmp_path / "out"
    proc = sonoscore("deid", root, out, "--key", KEY, "--safe-private", f"0009,{PRIVATE_CREATOR},02")
    assert proc.returncode == 0, proc.stderr
    ds = pydicom.dcmread(next(out.glob("*.dcm")))
    private = [e for e in ds if e.tag.is_private]
    assert [str(e.value) for e in private] == [PRIVATE_CREATOR, "SAFEVALUE7"]
    assert "113111" in [c.CodeValue for c in ds.DeidentificationMethodCodeSequence]
    assert leaks(out, proc, ["private Plantedname note"]) == []
    bad = sonoscore("deid", root, tmp_path / "o2", "--key", KEY, "--safe-private", "0008,0080")
    assert bad.returncode == 2 and "--safe-private '0008,0080' is not a private attribute" in bad.stderr


# -- burned-in annotation ----------------------------------------------------------------------------------------

def test_burned_in_yes_or_absent_refused(tmp_path):
    root = tmp_path / "in"
    paths = build_study(root, SOURCES[:4])
    yes = pydicom.dcmread(paths[SOURCES[0][0]])
    yes.BurnedInAnnotation = "YES"
    yes.save_as(paths[SOURCES[0][0]])
    absent = pydicom.dcmread(paths[SOURCES[3][0]])
    del absent.BurnedInAnnotation
    absent.save_as(paths[SOURCES[3][0]])
    out = tmp_path / "out"
    proc = sonoscore("deid", root, out, "--key", KEY)
    assert proc.returncode == 3
    m = manifest(out)
    refused = {f["input"]: f["reason"] for f in m["files"] if f["status"] == "refused"}
    order = sorted(paths)
    assert set(refused) == {order.index(SOURCES[0][0]) + 1, order.index(SOURCES[3][0]) + 1}
    assert "Burned In Annotation is YES" in refused[order.index(SOURCES[0][0]) + 1]
    assert "Burned In Annotation is absent" in refused[order.index(SOURCES[3][0]) + 1]
    assert len(list(out.glob("*.dcm"))) == 2 and m["counts"]["refused"] == 2
    assert sum("Burned In Annotation" in ln for ln in proc.stderr.splitlines()) == 2
    assert leaks(out, proc, planted_strings()) == []


def test_burned_in_blank_outside_ultrasound_regions(tmp_path):
    root = tmp_path / "in"
    rel_us, rel_ct = SOURCES[2][0], SOURCES[3][0]
    paths = build_study(root, [SOURCES[2], SOURCES[3]])
    for rel in (rel_us, rel_ct):
        ds = pydicom.dcmread(paths[rel])
        ds.BurnedInAnnotation = "YES"
        ds.save_as(paths[rel])
    src = pydicom.dcmread(paths[rel_us])
    regions = [(int(r.RegionLocationMinX0), int(r.RegionLocationMinY0), int(r.RegionLocationMaxX1),
                int(r.RegionLocationMaxY1)) for r in src.SequenceOfUltrasoundRegions]
    out = tmp_path / "out"
    proc = sonoscore("deid", root, out, "--key", KEY, "--burned-in", "blank")
    assert proc.returncode == 3, proc.stderr                         # the CT has no regions: refused
    m = manifest(out)
    order = sorted(paths)
    files = {f["input"]: f for f in m["files"]}
    ct, us = files[order.index(rel_ct) + 1], files[order.index(rel_us) + 1]
    assert ct["status"] == "refused" and "no Sequence of Ultrasound Regions" in ct["reason"]
    assert us["status"] == "written" and us["burned_in"] == f"was YES: blanked outside {len(regions)} ultrasound region(s)"
    assert "113101" in us["method_codes"]
    ds = pydicom.dcmread(out / us["output"])
    assert ds.BurnedInAnnotation == "NO"
    before, after = src.pixel_array, ds.pixel_array
    keep = np.zeros(before.shape[:2], bool)
    for x0, y0, x1, y1 in regions:
        keep[y0:y1 + 1, x0:x1 + 1] = True
    assert (before[~keep] != 0).any()                                # there was something to blank
    assert (after[~keep] == 0).all() and np.array_equal(after[keep], before[keep])
    assert leaks(out, proc, planted_strings()) == []


# -- inputs ------------------------------------------------------------------------------------------------------

def test_dicomdir_input(tmp_path):
    from pydicom.fileset import FileSet
    staged = tmp_path / "staged"
    paths = build_study(staged, SOURCES[3:5])
    fs = FileSet()
    for p in paths.values():
        fs.add(p)
    fs.write(tmp_path / "media")
    dicomdir = tmp_path / "media" / "DICOMDIR"
    assert b"Plantedname" in dicomdir.read_bytes()                   # the index itself names the patient
    out = tmp_path / "out"
    proc = sonoscore("deid", dicomdir, out, "--key", KEY)
    assert proc.returncode == 0, proc.stderr
    m = manifest(out)
    assert m["input"] == "DICOMDIR" and m["counts"]["written"] == 2
    assert sorted(p.name for p in out.iterdir()) == sorted([f["output"] for f in m["files"]] + [DE.MANIFEST_NAME])
    assert leaks(out, proc, planted_strings() + sorted(source_uids(paths.values()))) == []
    # the folder holding the DICOMDIR: its files are read, the DICOMDIR itself is skipped (never copied)
    out2 = tmp_path / "out2"
    proc2 = sonoscore("deid", tmp_path / "media", out2, "--key", KEY)
    m2 = manifest(out2)
    assert m2["counts"]["written"] == 2 and m2["counts"]["skipped"] == 1 and "DICOMDIR" in proc2.stderr
    assert sorted(p.name for p in out2.glob("*.dcm")) == sorted(p.name for p in out.glob("*.dcm"))


def test_single_file_and_missing_key(tmp_path, monkeypatch):
    root = tmp_path / "in"
    paths = build_study(root, SOURCES[4:5])
    one = next(iter(paths.values()))
    out = tmp_path / "out"
    proc = sonoscore("deid", one, out, "--key", KEY)
    assert proc.returncode == 0 and manifest(out)["input"] == "file" and len(list(out.glob("*.dcm"))) == 1
    monkeypatch.delenv("SONOSCORE_DEID_KEY", raising=False)
    nokey = sonoscore("deid", one, tmp_path / "o2")
    assert nokey.returncode == 2 and "deid needs a key" in nokey.stderr and not (tmp_path / "o2").exists()
    monkeypatch.setenv("SONOSCORE_DEID_KEY", KEY)
    env = sonoscore("deid", one, tmp_path / "o3")
    assert env.returncode == 0 and [p.name for p in (tmp_path / "o3").glob("*.dcm")] == \
        [p.name for p in out.glob("*.dcm")]


# -- the API and the table ---------------------------------------------------------------------------------------

def test_dataset_api_header_without_pixels():
    """What the results path needs: a header with no pixels is never refused; its UIDs are the keyed ones."""
    ds = Dataset()
    ds.PatientName, ds.PatientID, ds.StudyDate = "Plantedname^Janet", "PID778899", "20190305"
    ds.StudyInstanceUID, ds.SOPClassUID = uid(1), US_CLASS
    d = DE.Deidentifier(KEY, DE.Options(keep_dates_shifted=True))
    out = d.dataset(ds)
    assert out is ds and ds.StudyInstanceUID == d.uid(uid(1)) != uid(1) and ds.SOPClassUID == US_CLASS
    assert ds.PatientName == ds.PatientID == d.pseudonym("PatientID\0PID778899\0")
    assert ds.StudyDate != "20190305" and ds.PatientIdentityRemoved == "YES"
    assert d.uid("1.2.840.10008.1.2.1") == "1.2.840.10008.1.2.1"


def test_table_and_option_lists():
    kw = pydicom.datadict.tag_for_keyword
    assert DE.table_action(kw("PatientName")) == "Z" and DE.table_action(kw("PatientID")) == "Z/D"
    assert DE.table_action(kw("StudyInstanceUID")) == "U" and DE.table_action(kw("InstitutionName")) == "X/Z/D"
    assert DE.table_action(0x60023000) == "X" and DE.table_action(kw("Rows")) is None
    unknown = [k for k in DE.DEVICE_KEYWORDS | DE.DESCRIPTOR_KEYWORDS if kw(k) is None]
    assert unknown == [], "option lists name keywords pydicom does not know"
