"""Results as DICOM (runtime/dicom_out.py): the SR, the Segmentations and the Secondary Captures of a study, made
from real ultrasound files (pydicom's and pydicom-data's, single- and multi-frame) and synthetic records, written
to disk, and read back with highdicom; pydicom's value validation (RAISE) while writing and reading, and the
DICOM IOD validator dciodvfy (dicom3tools) where it is installed; de-identification checked by planting names, IDs,
dates and UIDs in the inputs and searching every byte of every file written.
"""
from __future__ import annotations

import copy
import hashlib
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
hd = pytest.importorskip("highdicom")
pytest.importorskip("dicognito")

from pydicom.data import get_testdata_file  # noqa: E402
from pydicom.uid import UID  # noqa: E402

from runtime import dicom_out as D  # noqa: E402
from runtime.errors import UserError  # noqa: E402
from runtime.preprocess import Region  # noqa: E402

ROOT_UID = "1.2.826.0.1.3680043.10.4711."
SHA = hashlib.sha256(b"manifest").hexdigest()
BUNDLE = {"name": "kidney-ifta-demo", "version": "2.3.1", "manifest_sha256": SHA,
          "classes": ["IFTA <25%", "IFTA 25-49%", "IFTA 50-74%", "IFTA >=75%"]}
SINGLE = "US1_UNCR.dcm"            # Ultrasound Image Storage, 480 x 640 RGB
MULTI = "examples_ybr_color.dcm"   # Ultrasound Multi-frame Image Storage, 30 frames of 240 x 320, JPEG baseline

# Patient and study attributes (Patient, General Study, Patient Study modules) a result must carry over exactly.
PATIENT_STUDY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge", "PatientSize",
                 "PatientWeight", "OtherPatientIDsSequence", "PatientComments", "StudyInstanceUID", "StudyDate",
                 "StudyTime", "AccessionNumber", "StudyID", "ReferringPhysicianName", "StudyDescription")
TYPE2 = {"PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "AccessionNumber",
         "StudyID", "ReferringPhysicianName"}


def data_file(name: str) -> Path:
    path = get_testdata_file(name, download=False)
    assert path is not None, f"{name} is not available offline: install pydicom-data (pip install pydicom-data)"
    return Path(path)


def source(name: str):
    return pydicom.dcmread(data_file(name))


@pytest.fixture(autouse=True)
def strict_pydicom():
    """pydicom raises on any value its VR does not allow, when writing and when reading."""
    cfg = pydicom.config.settings
    saved = cfg.reading_validation_mode, cfg.writing_validation_mode
    cfg.reading_validation_mode = cfg.writing_validation_mode = pydicom.config.RAISE
    yield
    cfg.reading_validation_mode, cfg.writing_validation_mode = saved


def block_mask() -> np.ndarray:
    """224x224: rows 50-99, columns 60-139 are kidney."""
    m = np.zeros((224, 224), np.uint8)
    m[50:100, 60:140] = 1
    return m


def multi_records(n_frames: int = 30, accepted=lambda i: i % 3 != 2):
    """One record per frame of the 240 x 320 multi-frame file: the crop (48, 8)-(272, 232) is 224 x 224, so the mask
    maps 1:1, shifted by the crop's corner."""
    return [{"source": 0, "frame_in_file": i, "accepted": accepted(i), "mask": block_mask() if accepted(i) else None,
             "frame_region": (48, 8, 272, 232), "kidney_length_mm": 70.0 + i, "kidney_area_mm2": 1800.0 + i,
             "grade": 3, "probabilities": [0.1, 0.2, 0.6, 0.1]} for i in range(n_frames)]


def summary_of(records, grade=3, probs=(0.1, 0.2, 0.6, 0.1)):
    acc = sum(1 for r in records if r["accepted"])
    return {"frames": len(records), "accepted": acc, "rejected": len(records) - acc, "errors": 0, "dropped": 0,
            "final_grade": grade, "mean_probabilities": list(probs), "confidence": max(probs)}


def make(sources, records, summary, tmp_path, **kw):
    kw.setdefault("uid_root", ROOT_UID)
    datasets = D.study_results(sources, records, summary, BUNDLE, **kw)
    paths = D.write_results(datasets, tmp_path / "out")
    return datasets, paths


def by_modality(paths):
    """{kind: paths}, kind SR, SEG or SC (runtime.dicom_out.result_kind)."""
    out: dict[str, list[Path]] = {}
    for p in paths:
        out.setdefault(D.result_kind(pydicom.dcmread(p, stop_before_pixels=True)), []).append(p)
    return out


def content_items(ds):
    """Every SR content item, depth first."""
    for item in ds.get("ContentSequence") or ():
        yield item
        yield from content_items(item)


def concept(item):
    c = item.ConceptNameCodeSequence[0]
    return c.CodingSchemeDesignator, c.CodeValue


def dciodvfy_errors(path: Path) -> list[str]:
    r = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (r.stdout + r.stderr).splitlines() if line.startswith("Error")]


# -- the SR ------------------------------------------------------------------------------------------------------

def test_sr_carries_the_study_grade_probabilities_counts_algorithm_and_sources(tmp_path):
    src = source(MULTI)
    records = multi_records()
    summary = summary_of(records, grade=2, probs=(0.15, 0.5, 0.3, 0.05))
    summary.update(errors=1, dropped=2, kidney_length_mm={"median": 81.5})
    _, paths = make([src], records, summary, tmp_path)
    (sr_path,) = by_modality(paths)["SR"]
    sr = hd.sr.srread(sr_path)
    assert sr.SOPClassUID == pydicom.uid.ComprehensiveSRStorage
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    (study,) = sr.content.get_image_measurement_groups()

    # the grade: coded, private scheme declared, meaning = the class name; equal to the summary's final grade
    (grade,) = study.get_qualitative_evaluations()
    assert (grade.name.scheme_designator, grade.name.value) == ("99SONOSCORE", "IFTA-GRADE")
    assert (grade.value.scheme_designator, grade.value.value) == ("99SONOSCORE", f"IFTA-{summary['final_grade']}")
    assert grade.value.meaning == BUNDLE["classes"][summary["final_grade"] - 1] == "IFTA 25-49%"
    assert [i.CodingSchemeDesignator for i in sr.CodingSchemeIdentificationSequence] == ["99SONOSCORE"]

    measured = {m.name.value: (m.value, m.unit.value) for m in study.get_measurements()}
    for g, p in enumerate(summary["mean_probabilities"], start=1):
        assert measured[f"IFTA-P{g}"] == (pytest.approx(p), "1")
    assert measured["FRAMES-ACCEPTED"] == (20, "{frames}")
    assert measured["FRAMES-REJECTED"] == (10, "{frames}")
    assert measured["FRAMES-UNSCORED"] == (3, "{frames}")
    assert measured["410668003"] == (pytest.approx(81.5), "mm")      # the study's kidney length (SCT Length)

    # algorithm identification (TID 4019) and the observer device
    items = list(content_items(sr))
    texts = {concept(i): i.TextValue for i in items if i.ValueType == "TEXT"}
    assert texts[("DCM", "111001")] == BUNDLE["name"]
    assert texts[("DCM", "111003")] == BUNDLE["version"]
    assert texts[("DCM", "111002")] == f"manifest.json sha256 {SHA}"

    # references to the source instance: evidence and the group's source images
    evidence = sr.get_evidence()
    assert (src.StudyInstanceUID, src.SeriesInstanceUID, src.SOPInstanceUID, src.SOPClassUID) in evidence
    assert [s.referenced_sop_instance_uid for s in study.source_images] == [src.SOPInstanceUID]
    assert sr.StudyInstanceUID == src.StudyInstanceUID


def test_sr_per_frame_groups_reference_the_segmentations_with_each_frames_kidney_size(tmp_path):
    src = source(MULTI)
    records = multi_records()
    records[0]["kidney_length_mm"] = None       # not measured: no length in that group
    _, paths = make([src], records, summary_of(records), tmp_path, max_seg_frames=3)
    kinds = by_modality(paths)
    sr = hd.sr.srread(kinds["SR"][0])
    segs = {str(pydicom.dcmread(p).SOPInstanceUID): p for p in kinds["SEG"]}
    groups = sr.content.get_planar_roi_measurement_groups()
    assert len(groups) == len(segs) == 3
    chosen = [0, 15, 28]     # 20 accepted frames (0, 1, 3, 4, ..., 28), 3 spread evenly: the 1st, 11th and 20th
    assert D.seg_record_indices(records, 3) == chosen
    for group, frame in zip(groups, chosen):
        assert group.reference_type == pydicom.sr.codedict.codes.DCM.ReferencedSegmentationFrame
        seg_ref, source_ref = group.referenced_segmentation_frame
        seg_uid = seg_ref.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        assert seg_uid in segs
        assert seg_ref.ReferencedSOPSequence[0].ReferencedSegmentNumber == 1
        assert source_ref.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
        assert source_ref.ReferencedSOPSequence[0].ReferencedFrameNumber == frame + 1
        measured = {m.name.value: m.value for m in group.get_measurements()}
        if frame == 0:
            assert "410668003" not in measured
        else:
            assert measured["410668003"] == pytest.approx(70.0 + frame)
        assert measured["42798000"] == pytest.approx(1800.0 + frame)


LENGTH = ("SCT", "410668003", "Length")
AREA = ("SCT", "42798000", "Area")


def size_measurements(group) -> dict[tuple[str, str, str], tuple[float, tuple[str, str]]]:
    """A measurement group's kidney sizes: {(scheme, code, meaning): (value, (unit scheme, unit code))}."""
    out = {}
    for m in group.get_measurements():
        key = (m.name.scheme_designator, m.name.value, m.name.meaning)
        if key in (LENGTH, AREA):
            out[key] = (m.value, (m.unit.scheme_designator, m.unit.value))
    return out


def test_sr_kidney_length_and_area_are_sct_coded_in_ucum_mm_and_mm2_and_equal_the_records(tmp_path):
    """Study level (the summary's medians) and per result frame (that frame's record): SCT 410668003 Length in
    UCUM mm, SCT 42798000 Area in UCUM mm2, the values as given; a size not measured is left out."""
    src = source(MULTI)
    records = multi_records()
    records[3]["kidney_area_mm2"] = None
    summary = summary_of(records)
    summary.update(kidney_length_mm={"median": 83.25, "p10": 71.0, "p90": 95.0}, kidney_area_mm2=1912.5)
    _, paths = make([src], records, summary, tmp_path, max_seg_frames=30)
    sr = hd.sr.srread(by_modality(paths)["SR"][0])
    (study,) = sr.content.get_image_measurement_groups()
    assert size_measurements(study) == {LENGTH: (pytest.approx(83.25), ("UCUM", "mm")),
                                        AREA: (pytest.approx(1912.5), ("UCUM", "mm2"))}
    groups = sr.content.get_planar_roi_measurement_groups()
    chosen = D.seg_record_indices(records, 30)
    assert len(groups) == len(chosen) == 20
    for group, i in zip(groups, chosen):
        want = {LENGTH: (pytest.approx(records[i]["kidney_length_mm"]), ("UCUM", "mm"))}
        if records[i]["kidney_area_mm2"] is not None:
            want[AREA] = (pytest.approx(records[i]["kidney_area_mm2"]), ("UCUM", "mm2"))
        assert size_measurements(group) == want, i
        (site,) = group.get_measurements()[0].finding_sites or group.finding_sites
        assert (site.value.scheme_designator, site.value.value) == ("SCT", "64033007")    # Kidney
    # a study without sizes: neither concept at study level
    summary.update(kidney_length_mm=None, kidney_area_mm2={"median": None})
    _, paths = make([src], records, summary, tmp_path / "none")
    (study,) = hd.sr.srread(by_modality(paths)["SR"][0]).content.get_image_measurement_groups()
    assert size_measurements(study) == {}


def test_the_private_coding_scheme_is_declared_with_its_name_and_organisation(tmp_path):
    """Every coding scheme the SR uses beyond PS3.16's own (DCM, SCT, UCUM, RFC5646) is declared in its Coding Scheme
    Identification Sequence (0008,0110) with designator, name and responsible organization; and each designator
    dciodvfy does not know (it checks against PS3.16's list only, declared or not) is one so declared."""
    records = multi_records(4)
    _, paths = make([source(MULTI)], records, summary_of(records), tmp_path)
    sr_path = by_modality(paths)["SR"][0]
    sr = pydicom.dcmread(sr_path)
    used: set[str] = set()

    def collect(_, elem):
        if elem.keyword == "CodingSchemeDesignator":
            used.add(str(elem.value))
    sr.walk(collect)
    declared = {str(i.CodingSchemeDesignator): i for i in sr.get("CodingSchemeIdentificationSequence") or ()}
    assert used - {"DCM", "SCT", "UCUM", "RFC5646"} == {"99SONOSCORE"} == set(declared)   # PS3.16 8.1's, and ours
    item = declared["99SONOSCORE"]
    assert item.CodingSchemeName and item.CodingSchemeResponsibleOrganization == D.MANUFACTURER
    if shutil.which("dciodvfy") is not None:
        r = subprocess.run(["dciodvfy", str(sr_path)], capture_output=True, text=True, timeout=60)
        unknown = set(re.findall(r"Unrecognized defined term <([^>]*)> for value \d+ of attribute <Coding Scheme "
                                 r"Designator>", r.stdout + r.stderr))
        assert unknown <= set(declared), unknown


def test_sr_without_an_accepted_frame_has_counts_and_no_grade(tmp_path):
    records = multi_records(accepted=lambda i: False)
    summary = summary_of(records)
    summary.update(final_grade=None, mean_probabilities=None)
    datasets, paths = make([source(MULTI)], records, summary, tmp_path)
    assert [d.Modality for d in datasets] == ["SR"]        # no accepted frame: no Segmentation
    (study,) = hd.sr.srread(paths[0]).content.get_image_measurement_groups()
    assert study.get_qualitative_evaluations() == []
    measured = {m.name.value: m.value for m in study.get_measurements()}
    assert measured == {"FRAMES-ACCEPTED": 0, "FRAMES-REJECTED": 30, "FRAMES-UNSCORED": 0}


# -- the Segmentations -------------------------------------------------------------------------------------------

def test_seg_of_a_multiframe_source_references_its_frames_in_source_geometry(tmp_path):
    src = source(MULTI)
    records = multi_records()
    _, paths = make([src], records, summary_of(records), tmp_path, max_seg_frames=30)
    seg_paths = by_modality(paths)["SEG"]
    accepted = [r["frame_in_file"] for r in records if r["accepted"]]
    assert len(seg_paths) == len(accepted) == 20
    expected = np.zeros((src.Rows, src.Columns), np.uint8)
    expected[8 + 50:8 + 100, 48 + 60:48 + 140] = 1        # the crop's corner is (48, 8); scale 1
    for path, frame in zip(seg_paths, accepted):
        seg = hd.seg.segread(path)
        assert seg.SegmentationType == "BINARY"
        assert (seg.Rows, seg.Columns) == (src.Rows, src.Columns)
        assert seg.get_source_image_uids() == [(src.StudyInstanceUID, src.SeriesInstanceUID, src.SOPInstanceUID)]
        derivation = seg.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0].SourceImageSequence[0]
        assert derivation.ReferencedSOPClassUID == src.SOPClassUID
        assert derivation.ReferencedFrameNumber == frame + 1
        pixels = seg.get_pixels_by_source_frame(source_sop_instance_uid=src.SOPInstanceUID,
                                                source_frame_numbers=[frame + 1])
        assert pixels.shape == (1, src.Rows, src.Columns, 1)
        np.testing.assert_array_equal(pixels[0, :, :, 0], expected)
        (desc,) = seg.SegmentSequence
        assert desc.SegmentedPropertyTypeCodeSequence[0].CodeValue == "64033007"      # SCT Kidney
        assert desc.SegmentAlgorithmType == "AUTOMATIC"
        assert desc.SegmentAlgorithmName == BUNDLE["name"]
        assert "FrameOfReferenceUID" not in seg


def test_seg_of_single_frame_sources_maps_a_scaled_mask_back_by_hand(tmp_path):
    """Two single-frame instances of one study (the second a copy with its own SOPInstanceUID). The crop
    (96, 16)-(544, 464) is 448 x 448: twice the mask's size, so mask rows 50-99 / columns 60-139 land on rows
    16 + 100 .. 16 + 199 and columns 96 + 120 .. 96 + 279 of the 480 x 640 frame (bilinear, > 0.5)."""
    first = source(SINGLE)
    second = copy.deepcopy(first)
    second.SOPInstanceUID = pydicom.uid.generate_uid()
    rec = {"frame_region": Region(96, 16, 544, 464), "accepted": True, "mask": block_mask()}
    records = [dict(rec, source=0), dict(rec, source=str(second.SOPInstanceUID)),
               {"source": 1, "accepted": False, "mask": None, "frame_region": None}]
    summary = {"frames": 3, "accepted": 2, "rejected": 1, "errors": 0, "dropped": 0, "final_grade": 1,
               "mean_probabilities": [0.7, 0.1, 0.1, 0.1]}
    _, paths = make([first, second], records, summary, tmp_path)
    seg_paths = by_modality(paths)["SEG"]
    assert len(seg_paths) == 2
    expected = np.zeros((480, 640), np.uint8)
    expected[116:216, 216:376] = 1
    for path, src in zip(seg_paths, (first, second)):
        seg = hd.seg.segread(path)
        derivation = seg.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0].SourceImageSequence[0]
        assert derivation.ReferencedSOPInstanceUID == src.SOPInstanceUID
        assert "ReferencedFrameNumber" not in derivation            # a single-frame image: the whole instance
        pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=[src.SOPInstanceUID])
        np.testing.assert_array_equal(pixels[0, :, :, 0], expected)
    sr = hd.sr.srread(by_modality(paths)["SR"][0])
    evidence = {e[2] for e in sr.get_evidence()}
    assert {first.SOPInstanceUID, second.SOPInstanceUID} <= evidence


def test_seg_mask_mapping_is_the_measurements_mapping(tmp_path):
    """A crop that is not a whole multiple: what the SEG holds is exactly runtime.measure.mask_to_source."""
    from runtime.measure import mask_to_source
    src = source(MULTI)
    rng = np.random.default_rng(3)
    mask = (rng.random((224, 224)) > 0.6).astype(np.uint8)
    region = Region(31, 5, 290, 201)
    _, paths = make([src], [{"source": 0, "frame_in_file": 7, "accepted": True, "mask": mask,
                             "frame_region": region}], summary_of([{"accepted": True}]), tmp_path)
    seg = hd.seg.segread(by_modality(paths)["SEG"][0])
    pixels = seg.get_pixels_by_source_frame(source_sop_instance_uid=src.SOPInstanceUID, source_frame_numbers=[8])
    np.testing.assert_array_equal(pixels[0, :, :, 0], mask_to_source(mask, region, (src.Rows, src.Columns)))


def test_frame_input_takes_a_frame_record(tmp_path):
    from runtime.record import FrameRecord
    rec = FrameRecord(frame=5, source_id="x", t_capture=0.0, accepted=True, grade=4,
                      probabilities=[0.1, 0.1, 0.1, 0.7], mask=block_mask())
    rec.frame_in_file = 5
    rec.frame_region = Region(48, 8, 272, 232)
    rec.kidney_length_mm, rec.kidney_area_mm2 = 91.25, 2100.5
    item = D.frame_input(rec, 0)
    _, paths = make([source(MULTI)], [item], summary_of([item], grade=4), tmp_path)
    kinds = by_modality(paths)
    seg = hd.seg.segread(kinds["SEG"][0])
    ref = seg.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0].SourceImageSequence[0]
    assert ref.ReferencedFrameNumber == 6
    (group,) = hd.sr.srread(kinds["SR"][0]).content.get_planar_roi_measurement_groups()
    assert {m.name.value: m.value for m in group.get_measurements()} == {"410668003": 91.25, "42798000": 2100.5}


# -- the Secondary Capture ---------------------------------------------------------------------------------------

def test_sc_is_derived_with_burned_in_annotation_and_the_overlay_pixels(tmp_path):
    src = source(MULTI)
    records = multi_records(4)
    picture = np.random.default_rng(1).integers(0, 256, (240, 320, 3), dtype=np.uint8)   # BGR
    _, paths = make([src], records, summary_of(records), tmp_path, overlay_pictures={3: picture})
    (sc_path,) = by_modality(paths)["SC"]
    sc = hd.imread(sc_path)
    assert sc.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage
    assert sc.ImageType[0] == "DERIVED"
    assert sc.BurnedInAnnotation == "YES"
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    assert sc.SourceImageSequence[0].ReferencedFrameNumber == 4
    np.testing.assert_array_equal(pydicom.dcmread(sc_path).pixel_array, picture[:, :, ::-1])   # stored as RGB



def test_sc_modality_is_the_sources_and_laterality_is_the_sources_or_left_out(tmp_path):
    """The SC's Modality is its source's (US), OT when the source has none; Laterality the source's R or L (its
    Laterality, else its Image Laterality), never guessed: without a value when the source names no side (the
    element present and empty: type 2C for a paired organ, which dciodvfy then only notes as 'actually unknown')."""
    records = multi_records(2)
    picture = np.zeros((60, 80, 3), np.uint8)
    cases = [({}, "US", None),                          # the file's own: Laterality empty, no Image Laterality
             ({"Laterality": None}, "US", None), ({"Laterality": "R"}, "US", "R"),
             ({"ImageLaterality": "L"}, "US", "L"), ({"ImageLaterality": "U"}, "US", None),
             ({"Modality": None}, "OT", None)]
    for n, (change, modality, side) in enumerate(cases):
        src = source(MULTI)
        assert src.Modality == "US" and src.Laterality == "" and "ImageLaterality" not in src
        for kw, value in change.items():
            if value is None:
                delattr(src, kw)
            else:
                setattr(src, kw, value)
        _, paths = make([src], records, summary_of(records), tmp_path / str(n), overlay_pictures={1: picture})
        (sc_path,) = by_modality(paths)["SC"]
        assert sc_path.name.startswith("SC.")
        sc = pydicom.dcmread(sc_path)
        assert sc.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage
        assert sc.Modality == modality, change
        assert sc.Laterality == (side or ""), change
        if shutil.which("dciodvfy") is not None:
            r = subprocess.run(["dciodvfy", str(sc_path)], capture_output=True, text=True, timeout=60)
            said = [line for line in (r.stdout + r.stderr).splitlines() if "Laterality" in line or "Modality" in line]
            unknown = ["Warning - is only permitted to be empty when actually unknown; should be absent (not empty) if "
                       "an unpaired body part, and have a value if a paired body part - attribute <Laterality>"]
            assert said == ([] if side else unknown), (change, said)

# -- UIDs, patient and study -------------------------------------------------------------------------------------

def uid_values(ds) -> set[str]:
    found: set[str] = set()

    def collect(_, elem):
        if elem.VR == "UI" and elem.value:
            found.update(str(v) for v in (elem.value if elem.VM > 1 else [elem.value]))
    ds.walk(collect)
    return found


@pytest.mark.parametrize("name", [SINGLE, MULTI])
def test_new_uids_come_from_the_root_and_patient_study_attributes_are_the_sources(tmp_path, name):
    src = source(name)
    records = multi_records(3) if name == MULTI else [
        {"source": 0, "accepted": True, "mask": block_mask(), "frame_region": (96, 16, 544, 464)}]
    picture = np.zeros((64, 64, 3), np.uint8)
    datasets, paths = make([src], records, summary_of(records), tmp_path, overlay_pictures={0: picture})
    assert sorted({D.result_kind(d) for d in datasets}) == ["SC", "SEG", "SR"]
    source_uids = {str(src.get(k)) for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
                                             "FrameOfReferenceUID") if k in src}
    for path in paths:
        ds = pydicom.dcmread(path)
        assert ds.SOPInstanceUID.startswith(ROOT_UID) and ds.SeriesInstanceUID.startswith(ROOT_UID)
        assert path.name == f"{D.result_kind(ds)}.{ds.SOPInstanceUID}.dcm"
        # every UID: the source's, a registered one (SOP classes, transfer syntaxes), or new from the root
        for uid in uid_values(ds):
            assert uid in source_uids or UID(uid).name != uid or uid.startswith(ROOT_UID), (ds.Modality, uid)
        for kw in PATIENT_STUDY:
            if kw in src:
                assert ds[kw].value == src[kw].value, (ds.Modality, kw)
            elif kw in ds:                         # nothing added: only the empty type 2 attributes the IOD needs
                assert kw in TYPE2 and not ds[kw].value, (ds.Modality, kw)
    assert {str(pydicom.dcmread(p).SeriesInstanceUID) for p in paths}.isdisjoint(source_uids)


def test_the_default_root_is_pydicoms_and_a_bad_root_is_one_sentence(tmp_path):
    records = multi_records(2)
    datasets = D.study_results([source(MULTI)], records, summary_of(records), BUNDLE)
    assert all(d.SOPInstanceUID.startswith(pydicom.uid.PYDICOM_ROOT_UID) for d in datasets)
    for bad in ("1.2.03.4", "abc", "1..2", "1.2." + "9" * 60):
        with pytest.raises(UserError) as e:
            D.study_results([source(MULTI)], records, summary_of(records), BUNDLE, uid_root=bad)
        assert "UID root" in str(e.value) and "\n" not in str(e.value)


# -- de-identification -------------------------------------------------------------------------------------------

PLANTED = {
    "PatientName": "Zzyzxovich^Quintessa^Marigold",
    "PatientID": "PLANT-4711-0815",
    "PatientBirthDate": "19610203",
    "OtherPatientIDs": "OTHERID-99177",
    "PatientComments": "Kowalczykowna's kidney, ward Heliotrope",
    "PatientAddress": "17 Pumpernickel Lane",
    "StudyDate": "20240102",
    "StudyTime": "134527.123456",
    "AccessionNumber": "ACC99887766",
    "StudyID": "STUDYID-31337",
    "StudyDescription": "Renal scan for Quintessa",
    "ReferringPhysicianName": "Whomsoever^Doctor",
    "InstitutionName": "Saint Plantedia Hospital",
    "InstitutionAddress": "Plantedia Street 9",
    "StationName": "PLANTSTATION7",
    "OperatorsName": "Sonographer^Ottilie",
    "PerformingPhysicianName": "Performer^Philippa",
    "DeviceSerialNumber": "SERIAL-664422",
    "SeriesDate": "20240103",
    "AcquisitionDate": "20240104",
    "ContentDate": "20240105",
}
PLANTED_UIDS = {
    "StudyInstanceUID": "1.2.826.0.1.3680043.8.498.47110815001",
    "SeriesInstanceUID": "1.2.826.0.1.3680043.8.498.47110815002",
    "SOPInstanceUID": "1.2.826.0.1.3680043.8.498.47110815003",
    "FrameOfReferenceUID": "1.2.826.0.1.3680043.8.498.47110815004",
}


def planted(name: str, tmp_path: Path) -> Path:
    """A copy of a real ultrasound file with distinctive identifiers planted, written and read back."""
    ds = source(name)
    for kw, value in {**PLANTED, **PLANTED_UIDS}.items():
        setattr(ds, kw, value)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    block = ds.private_block(0x0011, "PLANTED CREATOR", create=True)
    block.add_new(0x01, "LO", "Private Zzyzxovich note")
    path = tmp_path / f"planted-{name}"
    ds.save_as(path, enforce_file_format=True)
    return path


def needles() -> list[bytes]:
    """Each planted value whole, and its distinctive parts (a name's components, for one)."""
    parts = [b"Zzyzxovich", b"Quintessa", b"Marigold", b"Kowalczykowna", b"Heliotrope", b"Pumpernickel",
             b"Whomsoever", b"Plantedia", b"PLANTSTATION", b"Ottilie", b"Philippa", b"PLANTED CREATOR",
             b"4527.123456"]   # digits alone are not searched for: new random UIDs may hold any short run of them
    return [v.encode() for v in {**PLANTED, **PLANTED_UIDS}.values()] + parts


@pytest.mark.parametrize("name", [SINGLE, MULTI])
def test_deidentified_results_hold_nothing_planted_and_reference_consistently(tmp_path, name):
    src = pydicom.dcmread(planted(name, tmp_path))
    records = multi_records(4) if name == MULTI else [
        {"source": 0, "accepted": True, "mask": block_mask(), "frame_region": (96, 16, 544, 464)}]
    picture = np.zeros((64, 64, 3), np.uint8)
    datasets, paths = make([src], records, summary_of(records), tmp_path, deidentify=True,
                           pseudonym_key="test-key", overlay_pictures={0: picture})
    assert sorted({d.Modality for d in datasets}) == ["SEG", "SR"]       # no Secondary Capture when de-identified
    for path in paths:
        data = path.read_bytes()
        for needle in needles():
            assert needle not in data, (path.name, needle)
    assert src.PatientName == PLANTED["PatientName"]                      # the caller's dataset is left alone

    sr = hd.sr.srread(by_modality(paths)["SR"][0])
    seg = hd.seg.segread(by_modality(paths)["SEG"][0])
    for ds in (sr, seg):
        assert ds.PatientIdentityRemoved == "YES"
        assert [c.CodeValue for c in ds.DeidentificationMethodCodeSequence] == ["113100", "113107"]
        assert ds.PatientName != "" and ds.PatientID != ""                # dummies, not blanks
        assert ds.PatientSex == ""
        assert ds.StudyDate < PLANTED["StudyDate"] and ds.ContentDate == ds.StudyDate   # shifted back, one date
    # the SEG and the SR reference the same replaced source instance, under the same replaced study
    (study_uid, series_uid, sop_uid), = seg.get_source_image_uids()
    assert sop_uid not in PLANTED_UIDS.values() and study_uid == sr.StudyInstanceUID == seg.StudyInstanceUID
    assert (study_uid, series_uid, sop_uid, src.SOPClassUID) in sr.get_evidence()

    # consistent: the same key gives the same pseudonyms, another key others
    again = D.study_results([src], records, summary_of(records), BUNDLE, uid_root=ROOT_UID, deidentify=True,
                            pseudonym_key="test-key")
    other = D.study_results([src], records, summary_of(records), BUNDLE, uid_root=ROOT_UID, deidentify=True,
                            pseudonym_key="another-key")
    assert (again[-1].StudyInstanceUID, again[-1].PatientID) == (sr.StudyInstanceUID, sr.PatientID)
    assert other[-1].StudyInstanceUID != sr.StudyInstanceUID and other[-1].PatientID != sr.PatientID

    # one de-identification in the project: the results' pseudonyms are runtime.deid's (what `sonoscore deid`
    # gives the same source with the same key)
    from runtime.deid import Deidentifier, Options
    header = pydicom.dcmread(planted(name, tmp_path), stop_before_pixels=True)   # a header, as the results use
    direct = Deidentifier("test-key", Options(keep_dates_shifted=True)).dataset(header)
    assert (direct.PatientID, direct.StudyInstanceUID, direct.StudyDate) == (sr.PatientID, sr.StudyInstanceUID,
                                                                             sr.StudyDate)


def test_no_identifier_reaches_a_log_or_a_warning(tmp_path, caplog, capfd, recwarn):
    """highdicom logs the UIDs it copies from and warns about a patient name it finds odd (a one-part name here):
    neither may reach a log, a warning or the terminal, whatever the caller's logging level."""
    import logging
    src = pydicom.dcmread(planted(MULTI, tmp_path))
    src.PatientName = "Zzyzxovich"                     # one component: highdicom would warn, quoting it
    caplog.set_level(logging.DEBUG)
    records = multi_records(3)
    for deidentify in (False, True):
        datasets = D.study_results([src], records, summary_of(records), BUNDLE, uid_root=ROOT_UID,
                                   deidentify=deidentify, pseudonym_key="k")
        D.write_results(datasets, tmp_path / f"out-{deidentify}")
    out, err = capfd.readouterr()
    said = caplog.text + out + err + " ".join(str(w.message) for w in recwarn)
    for needle in needles():
        assert needle.decode() not in said, needle


# -- validation --------------------------------------------------------------------------------------------------

@pytest.mark.skipif(shutil.which("dciodvfy") is None,
                    reason="dciodvfy (Debian package dicom3tools) is not installed; .ci/run installs it")
@pytest.mark.parametrize("deidentify", [False, True])
def test_every_object_passes_the_iod_validator(tmp_path, deidentify):
    src = source(MULTI)
    records = multi_records(6)
    picture = np.zeros((120, 160, 3), np.uint8)
    _, paths = make([src], records, summary_of(records), tmp_path, deidentify=deidentify,
                    pseudonym_key="k", overlay_pictures={0: picture})
    for path in paths:
        assert dciodvfy_errors(path) == [], path.name


# -- bad input and writing ---------------------------------------------------------------------------------------

def test_bad_input_is_one_sentence():
    src = source(MULTI)
    records = multi_records(2)
    cases = [
        ([], records, BUNDLE, "no source instances"),
        ([src, source(SINGLE)], records, BUNDLE, "2 studies"),
        ([src], [dict(records[0], source=5)], BUNDLE, "names source 5"),
        ([src], [dict(records[0], source="1.2.3")], BUNDLE, "names source '1.2.3'"),
        ([src], [dict(records[0], frame_in_file=30)], BUNDLE, "names frame 30"),
        ([src], records, dict(BUNDLE, manifest_sha256="abc"), "sha256"),
        ([src], [dict(records[0], frame_region=(0, 0, 321, 240))], BUNDLE, "not inside its 320x240 source frame"),
        ([src], [dict(records[0], frame_region=(10, 10, 10, 50))], BUNDLE, "not inside"),
    ]
    for sources, recs, bundle, words in cases:
        with pytest.raises(UserError) as e:
            D.study_results(sources, recs, summary_of(records), bundle, uid_root=ROOT_UID)
        message = str(e.value)
        assert words in message and "\n" not in message, message


def test_write_results_renames_complete_files_into_place(tmp_path):
    records = multi_records(3)
    datasets = D.study_results([source(MULTI)], records, summary_of(records), BUNDLE, uid_root=ROOT_UID)
    paths = D.write_results(datasets, tmp_path / "a" / "b")
    assert [p.name for p in paths] == [f"{D.result_kind(d)}.{d.SOPInstanceUID}.dcm" for d in datasets]
    assert sorted(p.name for p in (tmp_path / "a" / "b").iterdir()) == sorted(p.name for p in paths)  # no temp left
    for p, d in zip(paths, datasets):
        assert pydicom.dcmread(p).SOPInstanceUID == d.SOPInstanceUID
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError) as e:
        D.write_results(datasets, blocker)
    assert "cannot be made" in str(e.value)
