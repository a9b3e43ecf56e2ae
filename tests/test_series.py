"""runtime/series.py: grouping into studies and series, slice order, and the plane from Image Orientation (Patient),
on synthetic series with known orientations and on the MR/CT files that ship with pydicom and pydicom-data."""
from __future__ import annotations

import math
import random
import shutil

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")

from pydicom.data import get_testdata_file  # noqa: E402
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, generate_uid  # noqa: E402

from runtime.series import OBLIQUE_TOLERANCE_DEG, group, plane_of  # noqa: E402

AXIAL, CORONAL, SAGITTAL = (1, 0, 0, 0, 1, 0), (1, 0, 0, 0, 0, -1), (0, 1, 0, 0, 0, -1)


def rotated(orientation, axis: int, degrees: float):
    """An orientation turned by `degrees` about patient axis `axis` (0 x, 1 y, 2 z)."""
    t = math.radians(degrees)
    c, s = math.cos(t), math.sin(t)
    r = {0: [[1, 0, 0], [0, c, -s], [0, s, c]], 1: [[c, 0, s], [0, 1, 0], [-s, 0, c]],
         2: [[c, -s, 0], [s, c, 0], [0, 0, 1]]}[axis]
    m = np.array(r)
    return tuple(np.concatenate([m @ np.array(orientation[:3]), m @ np.array(orientation[3:])]))


@pytest.mark.parametrize("orientation,name,angle", [
    (AXIAL, "axial", 0.0),
    (CORONAL, "coronal", 0.0),
    (SAGITTAL, "sagittal", 0.0),
    ((-1, 0, 0, 0, 1, 0), "axial", 0.0),                     # the normal points feet-ward: still axial
    ((-0.17, 0.98, 0, 0, 0, -1), "sagittal", 9.84),          # the example
    (rotated(AXIAL, 0, 20), "axial", 20.0),
    (rotated(CORONAL, 2, 30), "coronal", 30.0),
    (rotated(SAGITTAL, 1, 40), "sagittal", 40.0),
    (rotated(AXIAL, 0, 50), "coronal", 40.0),                # past 45 degrees the nearest plane changes
])
def test_plane_of_known_orientations(orientation, name, angle):
    p = plane_of(orientation)
    assert p.name == name
    assert p.oblique_deg == pytest.approx(angle, abs=0.05)
    assert p.oblique == (angle > OBLIQUE_TOLERANCE_DEG)
    assert (f"{angle:.1f} deg from {name}" in p.describe()) == p.oblique


@pytest.mark.parametrize("orientation,reason", [
    (None, "no Image Orientation (Patient)"),
    ((1, 0, 0, 0, 1), "has 5 values, not 6"),
    (("a", 0, 0, 0, 1, 0), "not numbers"),
    ((0, 0, 0, 0, 1, 0), "zero row or column"),
    ((2, 0, 0, 0, 1, 0), "not unit vectors"),
    ((1, 0, 0, 0.7071, 0.7071, 0), "not perpendicular"),
    ((float("nan"), 0, 0, 0, 1, 0), "not finite"),
])
def test_plane_of_missing_or_degenerate_is_unknown_with_a_reason(orientation, reason):
    p = plane_of(orientation)
    assert p.name == "unknown" and reason in p.reason and reason in p.describe()


def write_instance(path, study, series, *, orientation=None, position=None, number=None, modality="MR"):
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = study, series, modality
    if orientation is not None:
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in orientation]
    if position is not None:
        ds.ImagePositionPatient = [f"{v:.4f}" for v in position]
    if number is not None:
        ds.InstanceNumber = number
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return ds


def test_synthetic_series_grouped_ordered_and_named(tmp_path):
    rng = random.Random(3)
    study_a, study_b = generate_uid(), generate_uid()
    oblique = rotated(CORONAL, 2, 15)
    normal = np.cross(oblique[:3], oblique[3:])
    series = {  # series UID -> (study, orientation, slice positions along the normal)
        "sag": (study_a, SAGITTAL, [0, 1, 2, 3, 4]),
        "cor": (study_a, oblique, [-10, -5, 0, 5]),
        "ax": (study_b, AXIAL, [30, 10, 20]),
    }
    uids = {k: generate_uid() for k in series}
    expected = {}
    for key, (study, orient, offsets) in series.items():
        n = np.cross(orient[:3], orient[3:])
        files = []
        shuffled = offsets[:]
        rng.shuffle(shuffled)
        for i, off in enumerate(shuffled):
            # instance numbers run against position order: the position must win
            number = 100 - sorted(offsets).index(off)
            p = tmp_path / f"deep/{key}/{rng.random():.6f}.dcm"
            write_instance(p, study, uids[key], orientation=orient, position=tuple(np.array([5, -3, 2]) + off * n),
                           number=number)
            files.append((off, p))
        expected[key] = [p for _, p in sorted(files)]
    # a series without positions: ordered by instance number
    nopos = generate_uid()
    for num in (3, 1, 2):
        write_instance(tmp_path / f"nopos/{num}.dcm", study_b, nopos, orientation=AXIAL, number=num)
    # a localizer: three orientations in one series
    loc = generate_uid()
    for i, o in enumerate((AXIAL, CORONAL, SAGITTAL)):
        write_instance(tmp_path / f"loc/{i}.dcm", study_b, loc, orientation=o, position=(0, 0, 0), number=i)
    # an ultrasound series: no orientation at all
    us = generate_uid()
    write_instance(tmp_path / "us/1.dcm", study_a, us, modality="US", number=1)
    (tmp_path / "deep" / "notes.txt").write_text("not DICOM")

    g = group(tmp_path)
    assert sorted(len(s.series) for s in g.studies) == [3, 3]
    by_uid = {s.uid: s for st in g.studies for s in st.series}
    study_of = {s.uid: st.uid for st in g.studies for s in st.series}
    for key, (study, _, _) in series.items():
        s = by_uid[uids[key]]
        assert study_of[s.uid] == study
        assert [i.path for i in s.instances] == expected[key], key
        assert s.order == "position along the normal"
    assert by_uid[uids["sag"]].plane.name == "sagittal" and not by_uid[uids["sag"]].plane.oblique
    cor = by_uid[uids["cor"]].plane
    assert cor.name == "coronal" and cor.oblique and cor.oblique_deg == pytest.approx(15, abs=0.05)
    assert np.allclose(np.abs(cor.normal), np.abs(normal), atol=1e-5)
    assert by_uid[uids["ax"]].plane.name == "axial"
    s = by_uid[nopos]
    assert s.order == "instance number" and [i.instance_number for i in s.instances] == [1, 2, 3]
    assert by_uid[loc].plane.name == "mixed" and "different orientations" in by_uid[loc].plane.reason
    assert by_uid[us].plane.name == "unknown" and by_uid[us].modality == "US"
    assert [(p.name, why) for p, why in g.skipped] == [("notes.txt", "is not a DICOM file (no DICM preamble)")]


# The MR/CT test files that ship with pydicom and pydicom-data, and their planes (docs/deid.md lists the same).
REAL = [
    ("CT_small.dcm", "axial", 0.0),                     # 1\0\0\0\1\0
    ("MR_small.dcm", "axial", 0.0),                     # 1\0\0\0\1\0
    ("MR2_UNCR.dcm", "sagittal", 34.7),                 # 0.569486\0.822001\0\0\0\-1: normal (-0.822, 0.569, 0)
    ("J2K_pixelrep_mismatch.dcm", "axial", 22.0),       # 1\0\0\0\0.9272\-0.3746: normal (0, 0.375, 0.927)
    ("eCT_Supplemental.dcm", "axial", 0.0),             # enhanced CT: -1\0\0\0\1\0 in its functional groups
    ("US1_UNCR.dcm", "unknown", None),                  # ultrasound: no orientation
]


@pytest.mark.parametrize("name,plane,angle", REAL)
def test_real_test_files_planes(tmp_path, name, plane, angle):
    shutil.copy(get_testdata_file(name), tmp_path / name)
    g = group(tmp_path)
    (study,) = g.studies
    (s,) = study.series
    assert s.plane.name == plane
    if angle is not None:
        assert s.plane.oblique_deg == pytest.approx(angle, abs=0.05)
    else:
        assert "no Image Orientation (Patient)" in s.plane.reason


def test_real_files_together_each_its_own_series(tmp_path):
    """The real files in one folder tree: each is its own study and series, and keeps its plane."""
    for n, (name, _, _) in enumerate(REAL):
        (tmp_path / str(n)).mkdir()
        shutil.copy(get_testdata_file(name), tmp_path / str(n) / name)
    g = group(tmp_path)
    planes = {s.instances[0].path.name: s.plane.name for st in g.studies for s in st.series}
    assert planes == {name: plane for name, plane, _ in REAL} and len(g.studies) == len(REAL) and not g.skipped
