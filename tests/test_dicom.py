"""The DICOM source: every ultrasound file pydicom and pydicom-data ship, files written here by pydicom (16-bit,
MONOCHROME1, rescale, signed, regions, YBR, RLE/JPEG 2000 cines, damage of every kind), patient identifiers kept
out of every output, and real ultrasound DICOM through the real pipeline.

Test data comes from pydicom's own test files and the `pydicom-data` package (offline: nothing is downloaded).
"""
from __future__ import annotations

import itertools
import shutil
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")

from pydicom.data import get_testdata_file  # noqa: E402
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.encaps import encapsulate, generate_frames  # noqa: E402
from pydicom.pixels import convert_color_space  # noqa: E402
from pydicom.uid import (ExplicitVRLittleEndian, JPEG2000Lossless, MPEG4HP41, RLELossless,  # noqa: E402
                         generate_uid)

from runtime import preprocess as pp  # noqa: E402
from runtime.sources import SourceError  # noqa: E402
from runtime.sources.dicom import DicomFolderSource, DicomSource, dicom_files_in, from_path, is_dicom  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
US_IMAGE = "1.2.840.10008.5.1.4.1.1.6.1"
US_MULTIFRAME = "1.2.840.10008.5.1.4.1.1.3.1"

# Every ultrasound file among pydicom 3.0.2's test files and pydicom-data 1.0.0 (Modality US or a US SOP class):
# name -> (frames, photometric, bits allocated, transfer syntax). `test_the_list_is_every_ultrasound_file_pydicom_
# knows_of` holds this table to everything pydicom knows of, as `doctor --dicom` (runtime/doctor_dicom.py)
# enumerates it: its own files, pydicom-data's, and the download-only ones (classified there by sha256).
US_FILES = {
    "ExplVR_BigEnd.dcm": (1, "RGB", 8, "Explicit VR Big Endian"),
    "JPGLosslessP14SV1_1s_1f_8b.dcm": (1, "MONOCHROME2", 8,
                                       "JPEG Lossless, Non-Hierarchical, First-Order Prediction (Process 14 "
                                       "[Selection Value 1])"),
    "OBXXXX1A.dcm": (1, "PALETTE COLOR", 8, "Explicit VR Little Endian"),
    "OBXXXX1A_2frame.dcm": (2, "PALETTE COLOR", 8, "Explicit VR Little Endian"),
    "OBXXXX1A_expb.dcm": (1, "PALETTE COLOR", 8, "Explicit VR Big Endian"),
    "OBXXXX1A_expb_2frame.dcm": (2, "PALETTE COLOR", 8, "Explicit VR Big Endian"),
    "OBXXXX1A_rle.dcm": (1, "PALETTE COLOR", 8, "RLE Lossless"),
    "OBXXXX1A_rle_2frame.dcm": (2, "PALETTE COLOR", 8, "RLE Lossless"),
    "US1_J2KI.dcm": (1, "YBR_ICT", 8, "JPEG 2000 Image Compression"),
    "US1_J2KR.dcm": (1, "YBR_RCT", 8, "JPEG 2000 Image Compression (Lossless Only)"),
    "US1_UNCI.dcm": (1, "RGB", 8, "Explicit VR Little Endian"),
    "US1_UNCR.dcm": (1, "RGB", 8, "Explicit VR Little Endian"),
    "color-pl.dcm": (1, "RGB", 8, "Explicit VR Little Endian"),
    "color-px.dcm": (1, "RGB", 8, "Explicit VR Little Endian"),
    "color3d_jpeg_baseline.dcm": (120, "YBR_FULL_422", 8, "JPEG Baseline (Process 1)"),
    "examples_jpeg2k.dcm": (1, "YBR_RCT", 8, "JPEG 2000 Image Compression (Lossless Only)"),
    "examples_palette.dcm": (1, "PALETTE COLOR", 8, "Explicit VR Little Endian"),
    "examples_rgb_color.dcm": (1, "RGB", 8, "Explicit VR Little Endian"),
    "examples_ybr_color.dcm": (30, "YBR_FULL_422", 8, "JPEG Baseline (Process 1)"),
    "gdcm-US-ALOKA-16.dcm": (1, "PALETTE COLOR", 16, "Implicit VR Little Endian"),
    "gdcm-US-ALOKA-16_big.dcm": (1, "PALETTE COLOR", 16, "Explicit VR Big Endian"),
}

# Identifiers written into the files made here; none may reach any output.
PHI = {
    "PatientName": "Doe^Jane^Quintessa",
    "PatientID": "PHI-4711-0815",
    "PatientBirthDate": "19610203",
    "StudyDate": "20240102",
    "InstitutionName": "Saint Example Hospital",
    "AccessionNumber": "ACC99887766",
    "ReferringPhysicianName": "Who^Doctor",
}
SOP_UID = "1.2.826.0.1.3680043.8.498.4711081599887766"


def data_file(name: str) -> Path:
    """A pydicom test file, found offline (pydicom itself or the pydicom-data package; never downloaded)."""
    path = get_testdata_file(name, download=False)
    assert path is not None, (f"{name} is not available offline: install pydicom-data (pip install "
                              f"pydicom-data==1.0.0), which ships pydicom's larger test files")
    return Path(path)


def write_us(path: Path, frames: np.ndarray, *, photometric: str = "MONOCHROME2", bits_stored: int | None = None,
             syntax: str = ExplicitVRLittleEndian, sop_uid: str | None = None, **elements) -> Path:
    """A real US DICOM file written by pydicom: `frames` is HxW(x3) or NxHxW(x3); extra elements by keyword."""
    multi = frames.ndim == 4 or (frames.ndim == 3 and frames.shape[-1] != 3)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.SOPClassUID = US_MULTIFRAME if multi else US_IMAGE
    ds.Modality = "US"
    for key, value in PHI.items():
        setattr(ds, key, value)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    bits = bits_stored or (8 if frames.dtype.itemsize == 1 else 16)
    ds.set_pixel_data(frames, photometric, bits)
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for key, value in elements.items():
        setattr(ds, key, value)
    if syntax != ExplicitVRLittleEndian:
        ds.compress(syntax, generate_instance_uid=False)
    ds.save_as(path, enforce_file_format=True)
    return path


def region_item(x0, y0, x1, y1, *, data_type=1, spatial=1, delta_cm=0.02, units=3) -> Dataset:
    item = Dataset()
    item.RegionSpatialFormat, item.RegionDataType, item.RegionFlags = spatial, data_type, 0
    item.RegionLocationMinX0, item.RegionLocationMinY0 = x0, y0
    item.RegionLocationMaxX1, item.RegionLocationMaxY1 = x1, y1
    item.PhysicalUnitsXDirection = item.PhysicalUnitsYDirection = units
    item.PhysicalDeltaX, item.PhysicalDeltaY = delta_cm, delta_cm * 1.5
    return item


def speckle(shape, dtype=np.uint8, seed=0, hi=None) -> np.ndarray:
    hi = hi if hi is not None else np.iinfo(dtype).max
    return np.random.default_rng(seed).integers(0, hi + 1, size=shape, dtype=np.int64).astype(dtype)


def dicom_window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 linear VOI on real values, to 8 bit: the reference the source must reproduce."""
    y = ((values.astype(np.float64) - (center - 0.5)) / (width - 1.0) + 0.5) * 255.0
    return np.clip(np.rint(y), 0, 255).astype(np.uint8)


def one_sentence(message: str, path: Path) -> None:
    assert str(path) in message, message
    assert "\n" not in message and "Traceback" not in message, message
    assert message.count(". ") == 0, f"more than one sentence: {message}"


# -- every ultrasound test file ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sweep():
    import runtime.doctor_dicom
    return runtime.doctor_dicom


def test_the_list_is_every_ultrasound_file_pydicom_knows_of(sweep):
    """Every file pydicom knows of (its own, pydicom-data's, and those it can only download) is classified, and
    the ultrasound ones are exactly US_FILES, all here offline. A new ultrasound file in a future pydicom-data
    release, or a new or changed download-only file, fails here instead of being skipped."""
    from pydicom.data.data_manager import external_data_sources, get_url_map
    assert "pydicom-data" in external_data_sources(), "pydicom-data is not installed (pip install pydicom-data==1.0.0)"
    files = sweep.known_files()
    names = {f.name for f in files}
    assert set(get_url_map()) <= names                              # every downloadable file is accounted for
    unknown = [f"{f.name}: {f.note}" for f in files if f.ultrasound is None]
    assert not unknown, ("pydicom lists files that are not here offline and not classified in runtime/doctor_dicom.py "
                         f"DOWNLOAD_ONLY (read their headers and record them): {unknown}")
    us = {f.name: (f.frames, f.photometric, f.bits_allocated, f.transfer_syntax) for f in files if f.ultrasound}
    assert us == US_FILES
    assert all(f.path and Path(f.path).is_file() for f in files if f.ultrasound), "an ultrasound file is not here"
    assert {f.origin for f in files} == {"pydicom", "pydicom-data", "download-only"}
    # The download-only files, as pydicom 3.0.2 lists them: none is ultrasound.
    assert sorted(f.name for f in files if f.origin == "download-only") == sorted(sweep.DOWNLOAD_ONLY)
    # The classifier itself: Modality US, or an ultrasound SOP class without a Modality.
    assert sweep.is_ultrasound("US", None) and sweep.is_ultrasound(None, US_MULTIFRAME)
    assert not sweep.is_ultrasound("CT", "1.2.840.10008.5.1.4.1.1.2") and not sweep.is_ultrasound(None, None)


def test_a_download_only_file_in_a_new_version_or_unrecorded_is_unclassified(sweep, monkeypatch):
    """The recorded headers are trusted only for the exact file pydicom expects (its sha256)."""
    name = sorted(sweep.DOWNLOAD_ONLY)[0]
    _, *rest = sweep.DOWNLOAD_ONLY[name]
    monkeypatch.setitem(sweep.DOWNLOAD_ONLY, name, ("0" * 64, *rest))
    (f,) = [f for f in sweep.known_files() if f.name == name]
    assert f.ultrasound is None and "another version" in f.note
    monkeypatch.delitem(sweep.DOWNLOAD_ONLY, name)
    (f,) = [f for f in sweep.known_files() if f.name == name]
    assert f.ultrasound is None and "not recorded" in f.note


NO_SECTOR_FILES = {"ExplVR_BigEnd.dcm"}


def test_doctor_dicom_runs_every_ultrasound_file_end_to_end_one_record_per_frame(tiny_bundle, tmp_path):
    """The acceptance of issue 5, as `sonoscore doctor --dicom` checks it: each file through `run` (policy all,
    results JSONL): as many records as NumberOfFrames, none with an error, and the per-file counts in its table and
    its JSON."""
    from tests.conftest import sonoscore
    r = sonoscore("doctor", "--dicom", "--bundle", tiny_bundle, "--json", tmp_path / "d.json", timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert re.search(r"^DICOM: pydicom: \d+ files, 5 ultrasound; pydicom-data: \d+ files, 16 ultrasound; "
                     r"download-only: \d+ files, 0 ultrasound$", r.stdout, re.MULTILINE), r.stdout[-3000:]
    out = json.loads((tmp_path / "d.json").read_text())
    rows = {row["file"]: row for row in out["rows"]}
    assert sorted(rows) == sorted(US_FILES) and out["ok"] is True
    assert not out["unclassified"] and not out["unavailable_ultrasound"]
    assert {name: row["frames"] for name, row in rows.items()} == {k: v[0] for k, v in US_FILES.items()}
    assert all(row["records"] == row["frames"] for row in rows.values())
    # ExplVR_BigEnd.dcm is a 60x80 flat grey picture, no Sequence of Ultrasound Regions, Burned In Annotation not
    # stated: it has no scan sector, so its one frame is an error record, neither scored nor shown (issue 12 item 1).
    for name in NO_SECTOR_FILES:
        assert (rows[name]["errors"], rows[name]["withheld"], rows[name]["ok"]) == (1, 1, True)
        assert rows[name]["first_error"] == f"frame 0: {pp.NO_SECTOR}"
    assert all(row["errors"] == row["withheld"] for row in rows.values())    # no error but the privacy refusals
    assert sum(row["records"] for row in rows.values()) == 172
    withheld = sum(row["withheld"] for row in rows.values())
    assert f"21 files, 172 frames, 172 records, {withheld} errors ({withheld} frames withheld" in r.stdout
    for name in US_FILES:
        assert re.search(rf"^{re.escape(name)}\s.*\s{US_FILES[name][0]}\s+{US_FILES[name][0]}\s", r.stdout,
                         re.MULTILINE), name


def test_doctor_dicom_counts_a_file_whose_frames_fail_as_not_ok(sweep, tiny_bundle, tmp_path):
    """A file that gives an error record other than the burned-in-text refusal is not ok, and the table says so: a
    copy of a two-frame file whose second frame's pixel data is cut short."""
    src = Path(data_file("OBXXXX1A_rle_2frame.dcm"))
    (f,) = [f for f in sweep.ultrasound_files() if f.name == src.name]
    good = sweep.run_file(tiny_bundle, f, tmp_path)
    assert (good.frames, good.records, good.errors, good.ok) == (2, 2, 0, True)
    ds = pydicom.dcmread(src)
    frames = list(generate_frames(ds.PixelData, number_of_frames=2))
    ds.PixelData = encapsulate([frames[0], frames[1][: len(frames[1]) // 4]])
    broken = tmp_path / "broken.dcm"
    ds.save_as(broken)
    row = sweep.run_file(tiny_bundle, sweep.KnownFile("broken.dcm", "test", str(broken), True, frames=2), tmp_path)
    assert row.records == 2 and row.errors >= 1 and row.withheld == 0 and not row.ok, row
    assert "1 files not ok" in sweep.table([row]) and "NO" in sweep.table([row])

@pytest.mark.parametrize("name", sorted(US_FILES))
def test_every_ultrasound_test_file_decodes_every_frame(name):
    frames_expected, photometric, bits, _ = US_FILES[name]
    path = data_file(name)
    header = pydicom.dcmread(path, stop_before_pixels=True)
    src = DicomSource(path, realtime=False)
    assert src.total == frames_expected and not src.live
    frames = list(src)
    assert [f.index for f in frames] == list(range(frames_expected))
    for f in frames:
        assert f.error is None
        assert f.pixels.dtype in (np.uint8, np.uint16)
        assert f.pixels.shape[:2] == (header.Rows, header.Columns)
        assert f.pixels.ndim == 2 or (f.pixels.ndim == 3 and f.pixels.shape[2] == 3)
        assert f.channel_order == "RGB"
        assert f.pixels.std() > 1, "a flat frame means the decode went wrong"
        gray = pp.to_gray(f.pixels, f.channel_order, f.window)
        assert gray.dtype == np.uint8 and gray.shape == f.pixels.shape[:2]
        if f.region is not None:
            r = f.region
            assert 0 <= r.x0 < r.x1 <= header.Columns and 0 <= r.y0 < r.y1 <= header.Rows
        assert f.meta["photometric"] == photometric and f.meta["bits_allocated"] == bits
        assert f.meta["modality"] == "US" and f.meta["frames"] == frames_expected


def test_jpeg2000_lossless_and_uncompressed_copies_decode_to_the_same_rgb():
    """US1_J2KR is US1_UNCR compressed losslessly with the reversible colour transform (YBR_RCT)."""
    rgb = next(iter(DicomSource(data_file("US1_UNCR.dcm")))).pixels
    assert np.array_equal(next(iter(DicomSource(data_file("US1_J2KR.dcm")))).pixels, rgb)
    lossy = next(iter(DicomSource(data_file("US1_J2KI.dcm")))).pixels  # irreversible (YBR_ICT): close, not equal
    assert np.abs(lossy.astype(int) - rgb).mean() < 3


def test_ybr_full_422_jpeg_frames_are_rgb_in_the_right_channel_order():
    """pydicom's decode of a YBR_FULL_422 JPEG cine matches OpenCV's own decode of the same JPEG frame."""
    path = data_file("examples_ybr_color.dcm")
    ds = pydicom.dcmread(path)
    jpeg0 = next(generate_frames(ds.PixelData, number_of_frames=int(ds.NumberOfFrames)))
    reference = cv2.imdecode(np.frombuffer(jpeg0, np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]  # BGR -> RGB
    frame = next(iter(DicomSource(path)))
    assert frame.pixels.shape == reference.shape
    assert np.abs(frame.pixels.astype(int) - reference).mean() < 1.0  # chroma upsampling may differ by a level
    assert frame.pixels[..., 0].mean() != pytest.approx(frame.pixels[..., 2].mean(), abs=0.01)


def test_palette_color_is_mapped_to_8_bit_rgb_whatever_the_lut_encoding():
    """The little-endian file's LUT holds v*256, the big-endian copy's holds v: both are the same picture."""
    little = next(iter(DicomSource(data_file("OBXXXX1A.dcm")))).pixels
    for other in ("OBXXXX1A_expb.dcm", "OBXXXX1A_rle.dcm"):
        assert np.array_equal(next(iter(DicomSource(data_file(other)))).pixels, little)
    assert little.dtype == np.uint8 and little.shape[2] == 3 and little.max() == 255
    a = next(iter(DicomSource(data_file("gdcm-US-ALOKA-16.dcm")))).pixels       # 16-bit indices, 16-bit LUT
    b = next(iter(DicomSource(data_file("gdcm-US-ALOKA-16_big.dcm")))).pixels
    assert a.dtype == np.uint8 and np.array_equal(a, b)


def test_region_and_spacing_come_from_the_sequence_of_ultrasound_regions():
    f = next(iter(DicomSource(data_file("JPGLosslessP14SV1_1s_1f_8b.dcm"))))
    assert f.region == pp.Region(14, 38, 1011, 759)  # Max X1/Y1 are inclusive in DICOM, exclusive in Region
    assert f.meta["pixel_spacing_rc_mm"] == pytest.approx((0.25476696592378157, 0.25476696592378157))
    assert f.meta["pixel_spacing_mm"] == pytest.approx(0.25476696592378157)  # square pixels: one number too
    # Two equal tissue regions side by side (dual view), and a third of another type: the first of the largest.
    f = next(iter(DicomSource(data_file("gdcm-US-ALOKA-16.dcm"))))
    assert f.region == pp.Region(32, 24, 336, 416)
    # A region that does not fit the image (the image was resized after the header was written) is not trusted.
    f = next(iter(DicomSource(data_file("examples_ybr_color.dcm"))))
    assert f.region is None and "pixel_spacing_mm" not in f.meta and "pixel_spacing_rc_mm" not in f.meta


# -- files written here ------------------------------------------------------------------------------------------

def test_16_bit_frames_stay_16_bit_and_carry_the_window(tmp_path):
    img = speckle((64, 80), np.uint16, hi=4095)
    path = write_us(tmp_path / "w.dcm", img, bits_stored=12, WindowCenter=[1500, 2000], WindowWidth=[1000, 400])
    f = next(iter(DicomSource(path)))
    assert f.pixels.dtype == np.uint16 and np.array_equal(f.pixels, img)
    assert f.window == pytest.approx((1500, 1000))  # the first of several windows
    assert np.array_equal(pp.to_gray(f.pixels, window=f.window), dicom_window(img, 1500, 1000))


def test_16_bit_jpeg2000_lossless_cine_decodes_exactly(tmp_path):
    cine = speckle((3, 48, 64), np.uint16, seed=3, hi=65535)
    path = write_us(tmp_path / "j2k.dcm", cine, syntax=JPEG2000Lossless, FrameTime=40.0)
    frames = list(DicomSource(path, realtime=False))
    assert len(frames) == 3 and all(np.array_equal(f.pixels, c) for f, c in zip(frames, cine))
    assert frames[0].meta["transfer_syntax"] == "JPEG 2000 Image Compression (Lossless Only)"


def test_rescale_and_signed_data_are_windowed_as_dicom_defines(tmp_path):
    """The window is defined on rescaled values: the source carries it exactly into the pixels it yields."""
    stored = speckle((40, 50), np.uint16, seed=1, hi=4095)
    path = write_us(tmp_path / "r.dcm", stored, bits_stored=12, RescaleSlope=0.5, RescaleIntercept=-100,
                    WindowCenter=400, WindowWidth=600)
    f = next(iter(DicomSource(path)))
    expected = dicom_window(stored * 0.5 - 100, 400, 600)
    assert np.abs(pp.to_gray(f.pixels, window=f.window).astype(int) - expected).max() <= 1

    signed = (speckle((40, 50), np.uint16, seed=2, hi=4095).astype(np.int16) - 2048)
    path = write_us(tmp_path / "s.dcm", signed, bits_stored=12, WindowCenter=-200, WindowWidth=1500)
    f = next(iter(DicomSource(path)))
    assert f.pixels.dtype == np.uint16 and f.pixels.min() >= 0
    assert np.abs(pp.to_gray(f.pixels, window=f.window).astype(int) - dicom_window(signed, -200, 1500)).max() <= 1


def test_monochrome1_is_inverted(tmp_path):
    img8 = speckle((30, 40), np.uint8, seed=4)
    f = next(iter(DicomSource(write_us(tmp_path / "m8.dcm", img8, photometric="MONOCHROME1"))))
    assert f.pixels.dtype == np.uint8 and np.array_equal(f.pixels, 255 - img8)

    img16 = speckle((30, 40), np.uint16, seed=5, hi=1023)
    path = write_us(tmp_path / "m16.dcm", img16, photometric="MONOCHROME1", bits_stored=10,
                    WindowCenter=600, WindowWidth=300)
    f = next(iter(DicomSource(path)))
    assert np.array_equal(f.pixels, 1023 - img16)
    shown = pp.to_gray(f.pixels, window=f.window).astype(int)
    assert np.abs(shown - (255 - dicom_window(img16, 600, 300).astype(int))).max() <= 1


def test_16_bit_allocated_with_8_stored_becomes_uint8(tmp_path):
    img = speckle((20, 30), np.uint16, seed=6, hi=255)
    f = next(iter(DicomSource(write_us(tmp_path / "n.dcm", img, bits_stored=8))))
    assert f.pixels.dtype == np.uint8 and np.array_equal(f.pixels, img)


def test_ybr_full_and_native_ybr_full_422_become_rgb(tmp_path):
    rgb = next(iter(DicomSource(data_file("US1_UNCR.dcm")))).pixels[:64, :96]
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    f = next(iter(DicomSource(write_us(tmp_path / "ybr.dcm", ybr, photometric="YBR_FULL"))))
    assert np.abs(f.pixels.astype(int) - rgb).max() <= 2

    # Native YBR_FULL_422: per pair of pixels Y0 Y1 Cb Cr, chroma shared (PS3.3 C.7.6.3.1.2).
    pairs = ybr.reshape(64, 48, 2, 3)
    y = pairs[..., 0]
    chroma = np.rint(pairs[..., 1:].astype(float).mean(axis=2)).astype(np.uint8)
    packed = np.concatenate([y, chroma], axis=-1)  # Y0 Y1 Cb Cr
    path = write_us(tmp_path / "ybr422.dcm", ybr, photometric="YBR_FULL")
    ds = pydicom.dcmread(path)
    ds.PhotometricInterpretation = "YBR_FULL_422"
    ds.PixelData = packed.tobytes()
    ds.save_as(path, enforce_file_format=True)
    f = next(iter(DicomSource(path)))
    assert f.meta["photometric"] == "YBR_FULL_422" and f.pixels.shape == rgb.shape
    assert np.abs(f.pixels.astype(int) - rgb).mean() < 8  # chroma halved horizontally: close, not exact


def test_region_choice_tissue_first_largest_first_and_only_inside_the_image(tmp_path):
    img = speckle((100, 120), np.uint8, seed=7)
    regions = [region_item(0, 0, 119, 99, data_type=2),              # colour flow: only when no tissue region
               region_item(5, 5, 40, 40),                            # tissue, small
               region_item(10, 20, 109, 89, delta_cm=0.03),          # tissue, the largest
               region_item(0, 90, 119, 99, data_type=3, spatial=4)]  # spectral Doppler strip
    f = next(iter(DicomSource(write_us(tmp_path / "a.dcm", img, SequenceOfUltrasoundRegions=regions))))
    assert f.region == pp.Region(10, 20, 110, 90)
    assert f.meta["region"] == (10, 20, 110, 90)
    assert f.meta["pixel_spacing_rc_mm"] == pytest.approx((0.45, 0.3))  # (row = delta Y, column = delta X) in mm
    assert "pixel_spacing_mm" not in f.meta                               # not square: no single number
    image, used = pp.preprocess(pp.to_gray(f.pixels), f.region)
    assert used == f.region and image.shape == (224, 224)

    f = next(iter(DicomSource(write_us(tmp_path / "b.dcm", img, SequenceOfUltrasoundRegions=regions[:1]))))
    assert f.region == pp.Region(0, 0, 120, 100)  # colour flow when there is no tissue region

    outside = [region_item(10, 10, 300, 90)]
    f = next(iter(DicomSource(write_us(tmp_path / "c.dcm", img, SequenceOfUltrasoundRegions=outside,
                                       PixelSpacing=[0.2, 0.25]))))
    assert f.region is None and f.meta["pixel_spacing_rc_mm"] == pytest.approx((0.2, 0.25))
    assert "pixel_spacing_mm" not in f.meta

    f = next(iter(DicomSource(write_us(tmp_path / "d.dcm", img))))
    assert f.region is None and "pixel_spacing_mm" not in f.meta and "pixel_spacing_rc_mm" not in f.meta


def test_pixel_spacing_has_the_format_every_source_uses(tmp_path):
    """`pixel_spacing_rc_mm` = (row, column) floats whenever known; `pixel_spacing_mm` = one float only for square
    pixels (within 1%), as the OpenIGTLink source gives it (runtime.sources.spacing_meta)."""
    img = speckle((100, 120), np.uint8, seed=16)
    square = region_item(10, 10, 109, 89, delta_cm=0.03)
    square.PhysicalDeltaY = 0.03
    f = next(iter(DicomSource(write_us(tmp_path / "sq.dcm", img, SequenceOfUltrasoundRegions=[square]))))
    assert f.meta["pixel_spacing_rc_mm"] == pytest.approx((0.3, 0.3))
    assert all(type(v) is float for v in f.meta["pixel_spacing_rc_mm"])
    assert type(f.meta["pixel_spacing_mm"]) is float and f.meta["pixel_spacing_mm"] == pytest.approx(0.3)

    near = region_item(10, 10, 109, 89, delta_cm=0.0300)
    near.PhysicalDeltaY = 0.0302                                    # 0.7% apart: square
    f = next(iter(DicomSource(write_us(tmp_path / "near.dcm", img, SequenceOfUltrasoundRegions=[near]))))
    assert f.meta["pixel_spacing_mm"] == pytest.approx(0.302)      # the row spacing

    f = next(iter(DicomSource(write_us(tmp_path / "ps.dcm", img, PixelSpacing=[0.25, 0.25]))))
    assert f.meta["pixel_spacing_rc_mm"] == pytest.approx((0.25, 0.25)) and f.meta["pixel_spacing_mm"] == 0.25

    timed = region_item(10, 10, 109, 89, units=4)                  # seconds, not cm: no spatial spacing
    f = next(iter(DicomSource(write_us(tmp_path / "t.dcm", img, SequenceOfUltrasoundRegions=[timed]))))
    assert "pixel_spacing_rc_mm" not in f.meta and "pixel_spacing_mm" not in f.meta

    from runtime.sources import spacing_meta
    assert spacing_meta(0.2, 0.3) == {"pixel_spacing_rc_mm": (0.2, 0.3)}
    assert spacing_meta(0.0, 0.3) == {} and spacing_meta(float("nan"), 0.3) == {} and spacing_meta(None, 1) == {}


def test_a_cine_replays_at_its_own_rate(tmp_path):
    cine = speckle((6, 32, 40), np.uint8, seed=8)
    path = write_us(tmp_path / "cine.dcm", cine, syntax=RLELossless, FrameTime=20.0)  # 50 fps
    src = DicomSource(path)
    # paced at its rate, but a recording: not live, so its default policy is `all` (issue 12 item 10)
    assert src.paced and not src.live and src.fps == pytest.approx(50.0) and src.total == 6
    t0 = time.perf_counter()
    frames = list(src)
    elapsed = time.perf_counter() - t0
    assert elapsed >= 5 / 50 - 0.005
    gaps = np.diff([f.t_capture for f in frames])
    assert np.median(gaps) == pytest.approx(0.02, abs=0.008)
    assert all(np.array_equal(f.pixels, c) for f, c in zip(frames, cine))

    fast = DicomSource(path, realtime=False)
    assert not fast.paced and not fast.live and fast.fps == pytest.approx(50.0)  # rate known (video sinks)
    assert DicomSource(write_us(tmp_path / "c2.dcm", cine, CineRate=25)).fps == 25.0
    assert DicomSource(write_us(tmp_path / "c3.dcm", cine, RecommendedDisplayFrameRate=12)).fps == 12.0
    # No rate: lossless, as fast as possible; and real time cannot be asked for.
    norate = write_us(tmp_path / "c4.dcm", cine)
    assert not DicomSource(norate).paced
    with pytest.raises(SourceError) as e:
        DicomSource(norate, realtime=True)
    one_sentence(str(e.value), norate)
    # A single frame is not a cine, whatever its header says.
    assert not DicomSource(write_us(tmp_path / "one.dcm", cine[0], FrameTime=20.0)).paced


def test_a_damaged_frame_mid_cine_is_an_error_frame_and_the_others_decode(tmp_path):
    """A real RLE cine whose third frame lost most of its compressed data: the file's structure is whole (every
    fragment is there, the offsets are right), but that frame cannot be decoded."""
    cine = speckle((5, 32, 40), np.uint8, seed=9)
    path = write_us(tmp_path / "Doe^Jane_cine.dcm", cine, syntax=RLELossless)
    ds = pydicom.dcmread(path)
    frames = [bytearray(f) for f in generate_frames(ds.PixelData, number_of_frames=5)]
    frames[2] = frames[2][:64 + 10]  # the 64-byte RLE header and 10 bytes of a 1280-byte segment
    ds.PixelData = encapsulate([bytes(f) for f in frames], has_bot=True)
    ds.save_as(path, enforce_file_format=True)

    out = list(DicomSource(path))
    assert [f.index for f in out] == [0, 1, 2, 3, 4]
    assert [f.error is None for f in out] == [True, True, False, True, True]
    assert out[2].pixels is None
    assert out[2].error.startswith("DICOM frame 2 of 5 could not be decoded")
    assert "Doe" not in out[2].error and "\n" not in out[2].error and out[2].error.count(". ") == 0
    for f, c in zip(out, cine):
        if f.error is None:
            assert np.array_equal(f.pixels, c)


@pytest.mark.parametrize("kind", ["native", "encapsulated", "header"])
def test_a_truncated_file_is_one_sentence(tmp_path, kind):
    cine = speckle((4, 64, 64), np.uint8, seed=10)
    syntax = RLELossless if kind == "encapsulated" else ExplicitVRLittleEndian
    whole = write_us(tmp_path / "whole.dcm", cine, syntax=syntax).read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(whole[:300] if kind == "header" else whole[:int(len(whole) * 0.7)])
    with pytest.raises(SourceError) as e:
        DicomSource(cut)
    one_sentence(str(e.value), cut)
    assert "truncated" in str(e.value)


def test_not_dicom_and_no_pixel_data_and_undecodable_syntax_are_one_sentence(tmp_path):
    png = tmp_path / "scan.dcm"
    ok, buf = cv2.imencode(".png", speckle((10, 10), np.uint8))
    png.write_bytes(buf.tobytes())
    assert not is_dicom(png) and is_dicom(data_file("US1_UNCR.dcm"))
    with pytest.raises(SourceError) as e:
        DicomSource(png)
    one_sentence(str(e.value), png)
    assert "not a DICOM file" in str(e.value)

    report = tmp_path / "report.dcm"  # a DICOM file without an image
    ds = pydicom.dcmread(write_us(tmp_path / "tmp.dcm", speckle((8, 8), np.uint8)))
    del ds.PixelData
    ds.save_as(report, enforce_file_format=True)
    with pytest.raises(SourceError) as e:
        DicomSource(report)
    one_sentence(str(e.value), report)
    assert "no pixel data" in str(e.value)

    video = tmp_path / "cine_h264.dcm"  # a cine stored as H.264 video: pydicom has no decoder for it
    ds = pydicom.dcmread(write_us(tmp_path / "tmp2.dcm", speckle((8, 8), np.uint8)))
    ds.PixelData = encapsulate([b"\x00\x00\x00\x01" + bytes(60)])
    ds.file_meta.TransferSyntaxUID = MPEG4HP41
    ds.save_as(video, enforce_file_format=True)
    with pytest.raises(SourceError) as e:
        DicomSource(video)
    one_sentence(str(e.value), video)
    assert "cannot decode" in str(e.value)

    with pytest.raises(SourceError) as e:
        DicomSource(tmp_path / "missing.dcm")
    one_sentence(str(e.value), tmp_path / "missing.dcm")


def test_a_missing_decoder_is_one_sentence_naming_the_package(tmp_path):
    """In a fresh interpreter that sees every installed package except the JPEG 2000 decoders (pylibjpeg-openjpeg,
    and python-gdcm and Pillow, which decode JPEG 2000 too): a view of site-packages without their modules and metadata,
    exactly as if they had never been installed."""
    import openjpeg
    site = Path(openjpeg.__file__).resolve().parents[1]
    view = tmp_path / "site"
    view.mkdir()
    for entry in site.iterdir():
        if not (entry.name in ("openjpeg", "gdcm", "_gdcm", "gdcm.py") or entry.name.startswith("pylibjpeg_openjpeg")
                or entry.name.lower().startswith("python_gdcm") or entry.name == "PIL"
                or entry.name.lower().startswith("pillow")):
            (view / entry.name).symlink_to(entry)
    code = ("import site\n"
            f"site.addsitedir({str(view)!r})\n"
            "from runtime.sources.dicom import DicomSource\n"
            "from runtime.sources import SourceError\n"
            "try:\n"
            f"    DicomSource({str(data_file('US1_J2KR.dcm'))!r})\n"
            "except SourceError as e:\n"
            "    print(e)\n")
    # -S: no site-packages of this environment; the view is added as a site directory instead.
    r = subprocess.run([sys.executable, "-S", "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    message = r.stdout.strip()
    one_sentence(message, data_file("US1_J2KR.dcm"))
    assert "no decoder" in message and "pylibjpeg-openjpeg" in message


# -- safety ------------------------------------------------------------------------------------------------------

def _phi_strings(path: Path) -> list[str]:
    return [*PHI.values(), *(v.replace("^", " ") for v in PHI.values()), "Doe", "Quintessa", SOP_UID,
            path.name, path.stem, str(path)]


def test_no_patient_identifier_reaches_the_frame(tmp_path):
    cine = speckle((3, 32, 40), np.uint8, seed=11)
    path = write_us(tmp_path / "Doe^Jane^Quintessa_PHI-4711-0815.dcm", cine, syntax=RLELossless, FrameTime=10.0,
                    sop_uid=SOP_UID, SequenceOfUltrasoundRegions=[region_item(2, 2, 30, 25)])
    src = DicomSource(path, realtime=False)
    frames = list(src)
    texts = [src.source_id, repr(src.meta)] + [
        repr((f.index, f.source_id, f.t_capture, f.channel_order, f.window, f.region, f.error, f.meta))
        for f in frames]
    for text in texts:
        for phi in _phi_strings(path):
            assert phi not in text, f"{phi!r} leaked into {text!r}"
    # What meta may hold: technical facts only.
    assert set(frames[0].meta) <= {"format", "modality", "photometric", "bits_allocated", "bits_stored",
                                   "transfer_syntax", "frames", "frame_rate", "region", "pixel_spacing_mm",
                                   "pixel_spacing_rc_mm", "burned_in_annotation", "us_regions"}
    # The real test files' own identifiers do not leak either.
    real = data_file("US1_UNCR.dcm")
    f = next(iter(DicomSource(real)))
    assert "CompressedSamples" not in repr(f.meta) + f.source_id and "13US1" not in repr(f.meta) + f.source_id


def test_a_folder_of_dicom_files_numbers_frames_continuously_and_names_no_file(tmp_path):
    folder = tmp_path / "study"
    folder.mkdir()
    write_us(folder / "a_Doe^Jane.dcm", speckle((2, 16, 16), np.uint8, seed=12))
    whole = write_us(tmp_path / "x.dcm", speckle((16, 16), np.uint8, seed=13)).read_bytes()
    (folder / "b_Doe^Jane.dcm").write_bytes(whole[:len(whole) - 40])  # truncated
    write_us(folder / "c_Doe^Jane.dcm", speckle((16, 16), np.uint8, seed=14))
    (folder / "notes.txt").write_text("not DICOM")
    assert [p.name for p in dicom_files_in(folder)] == ["a_Doe^Jane.dcm", "b_Doe^Jane.dcm", "c_Doe^Jane.dcm"]
    src = from_path(folder)
    assert isinstance(src, DicomFolderSource) and src.total == 4
    frames = list(src)
    assert [f.index for f in frames] == [0, 1, 2, 3]
    assert [f.error is None for f in frames] == [True, True, False, True]
    assert {f.source_id for f in frames} == {src.source_id}
    assert all("Doe" not in (f.error or "") + repr(f.meta) + f.source_id for f in frames)


# -- through the real pipeline ----------------------------------------------------------------------------------

def test_real_ultrasound_dicom_through_the_pipeline(tiny_bundle, tmp_path):
    from runtime.bundle import Bundle
    from runtime.pipeline import Pipeline
    from runtime.record import DROPPED
    from runtime.stream import run_stream

    phi_file = write_us(tmp_path / "Doe^Jane^Quintessa_PHI-4711-0815.dcm",
                        speckle((2, 120, 160), np.uint16, seed=15, hi=4095), bits_stored=12, sop_uid=SOP_UID,
                        WindowCenter=2000, WindowWidth=3000, FrameTime=33.3,
                        SequenceOfUltrasoundRegions=[region_item(10, 10, 149, 109)])
    inputs = [data_file(n) for n in ("JPGLosslessP14SV1_1s_1f_8b.dcm", "OBXXXX1A_rle_2frame.dcm",
                                    "gdcm-US-ALOKA-16.dcm", "US1_J2KR.dcm", "examples_ybr_color.dcm")] + [phi_file]
    lines = []
    with Pipeline(Bundle.load(tiny_bundle), threads=2) as pipe:
        for path in inputs:
            src = DicomSource(path, realtime=False)
            records = []
            stats = run_stream(src, pipe.process, [], policy="all", on_record=lambda r, s: records.append(r))
            assert stats.frames == src.total == len(records), path.name
            assert [r.frame for r in records] == list(range(src.total))
            for r in records:
                assert r.error is None, f"{path.name} frame {r.frame}: {r.error}"
                assert r.image.shape == (224, 224) and "total" in r.latency_ms
            if src.region is not None:
                reg = src.region
                if records[0].meta.get("burned_in_annotation", False) is not False:  # shown as the region only
                    assert records[0].display.shape[:2] == (reg.y1 - reg.y0, reg.x1 - reg.x0)
                else:
                    assert records[0].region == reg
            lines += [json.dumps(r.to_json()) for r in records]

        # A long cine paced at its rate is still a recording: not live, so policy `all`, no frame dropped
        # (issue 12 item 10); under an explicit `newest` late ones are marked dropped, one record per frame still.
        src = DicomSource(data_file("color3d_jpeg_baseline.dcm"))
        assert src.paced and not src.live and src.fps == pytest.approx(30.0, rel=1e-3)
        records = []
        run_stream(itertools.islice(src, 6), pipe.process, [], policy="all", on_record=lambda r, s: records.append(r))
        assert [r.frame for r in records] == list(range(6)) and all(r.error is None for r in records)
        records = []
        run_stream(itertools.islice(src, 12), pipe.process, [], policy="newest",
                   on_record=lambda r, s: records.append(r))
        assert [r.frame for r in records] == list(range(12))
        assert all(r.error in (None, DROPPED) for r in records) and records[-1].error is None
    text = "\n".join(lines)
    for phi in _phi_strings(phi_file):
        assert phi not in text
    assert "CompressedSamples" not in text and "Citizen" not in text


def test_frames_that_may_carry_burned_in_text_are_shown_and_saved_as_their_region_only(tiny_bundle):
    """Names and dates burned into a DICOM's pixels sit outside the B-mode region: the display image that the
    video and the viewer use is cut to the region when BurnedInAnnotation is YES or not stated."""
    from runtime.bundle import Bundle
    from runtime.pipeline import Pipeline
    from runtime.preprocess import Region
    from runtime.sources import Frame

    pixels = np.zeros((300, 400), np.uint8)
    pixels[10:20, 10:200] = 255                      # "text" above the image
    pixels[50:290, 40:360] = 120                     # the ultrasound region
    pipe = Pipeline(Bundle.load(tiny_bundle))
    region = Region(40, 50, 360, 290)
    for flag, cropped in ((True, True), (None, True), (False, False)):
        frame = Frame(0, "dicom-x", 0.0, pixels, region=region, meta={"burned_in_annotation": flag})
        display, image, reg = pipe.prepare(frame)
        assert image.shape == (224, 224)
        if cropped:
            assert display.shape == (240, 320) and display.max() == 120 and reg == Region(0, 0, 320, 240)
        else:
            assert display.shape == (300, 400) and reg == region
    # a source that is not DICOM (no such key) keeps the whole frame
    display, _, _ = pipe.prepare(Frame(0, "files-x", 0.0, pixels, region=region))
    assert display.shape == (300, 400)


# -- issue 27 item 14: DICOM files in subfolders ----------------------------------------------------------------

def nested_study(root: Path, *, with_image: bool = False) -> Path:
    """A study export as scanners and PACS write it: real ultrasound files of pydicom's, in subfolders."""
    (root / "SERIES1").mkdir(parents=True)
    (root / "SERIES2" / "DEEPER").mkdir(parents=True)
    shutil.copy(data_file("US1_J2KR.dcm"), root / "SERIES1" / "IM0001")            # no suffix, as exported
    shutil.copy(data_file("OBXXXX1A_2frame.dcm"), root / "SERIES2" / "DEEPER" / "IM0002.dcm")
    shutil.copy(data_file("gdcm-US-ALOKA-16.dcm"), root / "SERIES2" / "IM0003.dcm")
    whole = data_file("US1_UNCR.dcm").read_bytes()
    (root / "SERIES2" / "DEEPER" / "IM0004.dcm").write_bytes(whole[:4000])          # truncated
    (root / ".hidden").mkdir()
    shutil.copy(data_file("US1_UNCR.dcm"), root / ".hidden" / "IM9.dcm")            # hidden: skipped
    if with_image:
        cv2.imwrite(str(root / "a.png"), speckle((64, 80), np.uint8, seed=3))
    return root


@pytest.mark.parametrize("with_image", [False, True], ids=["dicom-only", "with-an-image"])
def test_a_folder_reads_dicom_files_at_any_depth(tmp_path, with_image):
    from runtime.sources import open_source
    from runtime.sources.dicom import DicomFolderSource
    from runtime.sources.files import FolderSource
    root = nested_study(tmp_path / "study", with_image=with_image)
    src = open_source(str(root))
    assert isinstance(src, FolderSource if with_image else DicomFolderSource)
    frames = list(src)
    names = [f.source_file for f in frames]
    expected = ["SERIES1/IM0001", "SERIES2/DEEPER/IM0002.dcm", "SERIES2/DEEPER/IM0002.dcm",
                "SERIES2/DEEPER/IM0004.dcm", "SERIES2/IM0003.dcm"] + (["a.png"] if with_image else [])
    assert names == expected and src.total == len(frames)
    assert [f.index for f in frames] == list(range(len(frames)))
    assert [f.frame_in_file for f in frames] == [0, 0, 1, 0, 0] + ([0] if with_image else [])
    errors = [f.error for f in frames if f.error]
    assert len(errors) == 1 and "could not be opened" in errors[0] and "IM0004" not in errors[0]
    assert all("does not read" not in (f.error or "") for f in frames)
    ok = [f for f in frames if f.error is None and f.source_file != "a.png"]
    assert all("burned_in_annotation" in f.meta for f in ok)          # read as DICOM: its header, its rules
    assert [p.relative_to(root).as_posix() for p in dicom_files_in(root)] == [
        "SERIES1/IM0001", "SERIES2/DEEPER/IM0002.dcm", "SERIES2/DEEPER/IM0004.dcm", "SERIES2/IM0003.dcm"]


def test_run_grades_a_nested_dicom_folder_through_the_command_line(tiny_bundle, tmp_path):
    root = nested_study(tmp_path / "study")
    r = subprocess.run([sys.executable, "-m", "runtime.cli", "run", "--bundle", str(tiny_bundle), "--source",
                        str(root), "--quiet", "--record-paths", "--results", str(tmp_path / "r.jsonl")],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 3, r.stderr                                   # the truncated file's one error record
    records = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [x["source_file"] for x in records] == ["SERIES1/IM0001", "SERIES2/DEEPER/IM0002.dcm",
                                                   "SERIES2/DEEPER/IM0002.dcm", "SERIES2/DEEPER/IM0004.dcm",
                                                   "SERIES2/IM0003.dcm"]
    assert [x["error"] is None for x in records] == [True, True, True, False, True]
    assert records[3]["error"].startswith("DICOM file 3 of 4 (in name order) in the folder could not be opened")
