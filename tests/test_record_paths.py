"""Traceable records (issue 13 item 7): `run --record-paths` gives each record its file (relative to the source
folder) and its frame inside that file, for folders with subfolders, single files and multi-frame DICOM folders;
off by default; `--save-masks` names follow it and `--mask-size original` saves masks at the source frame's size;
the wait before the pipeline takes a frame is reported apart from the processing time."""
import json
import shutil
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from runtime.record import DROPPED, STAGES, FrameRecord
from runtime.sinks.masks import MaskSink, mask_name
from runtime.sources import Frame
from tests.conftest import sonoscore
from tests.test_labelme import KIDNEY, in_frame, kidney_frame, make_identity_bundle

PROCESSING = [s for s in STAGES if s not in ("wait", "scope")]   # scope: only a bundle with a scope reference


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return make_identity_bundle(tmp_path_factory.mktemp("known") / "bundle")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture()
def nested(tmp_path):
    """A folder as people keep one: images in subfolders, an annotation beside an image, a hidden file."""
    root = tmp_path / "scans"
    files = {"a.png": kidney_frame(), "sub/b.png": kidney_frame(False), "sub/deeper/c.jpg": kidney_frame(),
             "z.png": kidney_frame(), "sub/b2 (copy).png": kidney_frame()}
    for name, img in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(root / name), img)
    (root / "sub" / "b.json").write_text("{}")          # an annotation beside its image: not a frame
    (root / ".hidden.png").write_bytes((root / "a.png").read_bytes())
    (root / ".cache").mkdir()
    (root / ".cache" / "x.png").write_bytes((root / "a.png").read_bytes())
    return root


NESTED_ORDER = ["a.png", "sub/b.png", "sub/b2 (copy).png", "sub/deeper/c.jpg", "z.png"]


def test_record_paths_name_each_file_relative_to_the_folder_and_are_absent_by_default(bundle, nested, tmp_path):
    on, off = tmp_path / "on.jsonl", tmp_path / "off.jsonl"
    r = sonoscore("run", "--bundle", bundle, "--source", nested, "--results", on, "--record-paths", "--quiet")
    assert r.returncode == 0, r.stderr
    recs = read_jsonl(on)
    assert [(x["frame"], x["source_file"], x["frame_in_file"]) for x in recs] == \
           [(i, name, 0) for i, name in enumerate(NESTED_ORDER)]
    assert [x["accepted"] for x in recs] == [True, False, True, True, True]   # sub/b.png: no kidney drawn
    r = sonoscore("run", "--bundle", bundle, "--source", nested, "--results", off, "--quiet")
    assert r.returncode == 0, r.stderr
    recs = read_jsonl(off)
    assert len(recs) == 5 and all("source_file" not in x and "frame_in_file" not in x for x in recs)
    assert not any(name in off.read_text() for name in ("a.png", "deeper", "copy"))


def test_a_dicom_file_among_images_is_read_as_dicom_and_the_frames_know_their_files(nested):
    pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    from runtime.sources import open_source
    shutil.copy(get_testdata_file("OBXXXX1A.dcm", download=False), nested / "sub" / "IM0001")
    frames = list(open_source(str(nested)))
    assert [f.source_file for f in frames] == ["a.png", "sub/IM0001", "sub/b.png", "sub/b2 (copy).png",
                                               "sub/deeper/c.jpg", "z.png"]
    assert [f.frame_in_file for f in frames] == [0] * 6 and [f.index for f in frames] == list(range(6))
    # read as DICOM, as a folder reads images (issue 27 item 14; it was an error record before)
    assert all(f.error is None for f in frames) and "burned_in_annotation" in frames[1].meta


def test_a_single_image_is_named_by_its_file_name(bundle, nested, tmp_path):
    res = tmp_path / "r.jsonl"
    r = sonoscore("run", "--bundle", bundle, "--source", nested / "sub" / "deeper" / "c.jpg", "--results", res,
                  "--record-paths", "--quiet")
    assert r.returncode == 0, r.stderr
    (x,) = read_jsonl(res)
    assert (x["source_file"], x["frame_in_file"]) == ("c.jpg", 0)


def test_masks_follow_the_files_mirroring_their_folders(bundle, nested, tmp_path):
    masks = tmp_path / "m"
    r = sonoscore("run", "--bundle", bundle, "--source", nested, "--save-masks", masks, "--record-paths", "--quiet")
    assert r.returncode == 0, r.stderr
    written = sorted(p.relative_to(masks).as_posix() for p in masks.rglob("*.png"))
    assert written == ["a-0.png", "sub/b-0.png", "sub/b2_copy_-0.png", "sub/deeper/c-0.png", "z-0.png"]
    expected = np.zeros((224, 224), np.uint8)
    expected[KIDNEY[0]:KIDNEY[1], KIDNEY[2]:KIDNEY[3]] = 255
    assert np.array_equal(cv2.imread(str(masks / "sub/deeper/c-0.png"), cv2.IMREAD_UNCHANGED), expected)
    assert not cv2.imread(str(masks / "sub/b-0.png"), cv2.IMREAD_UNCHANGED).any()


def test_mask_names_are_sanitised_and_never_overwrite_one_another(tmp_path):
    assert mask_name("scans/Pat ient:7/x y.png", 3) == "scans/Pat_ient_7/x_y-3.png"
    assert mask_name(".hidden/..x.dcm", 0) == "_hidden/_.x-0.png"
    assert mask_name("../../etc/passwd", 1) == "etc/passwd-1.png"            # never leaves the folder
    sink = MaskSink(tmp_path / "m")
    mask = np.zeros((224, 224), np.uint8)
    for i, (name, k) in enumerate([("x.png", 0), ("x.jpg", 0), ("x_.png", 0), ("x .png", 0), ("x!.png", 0),
                                   ("x.png", 0), ("c.dcm", 0), ("c.dcm", 1)]):
        mask[:] = 0
        mask[i, i] = 1                                                      # each record's own mask
        sink.write(FrameRecord(i, "s", 0.0, mask=mask.copy(), source_file=name, frame_in_file=k))
    sink.close()
    names = {p.name: int(np.flatnonzero(cv2.imread(str(p), cv2.IMREAD_UNCHANGED).ravel())[0]) // 225
             for p in (tmp_path / "m").iterdir()}
    # x.png -> x-0.png; x.jpg would too: it keeps its suffix; "x .png" sanitises to x_-0.png, taken by "x_.png":
    # it keeps its suffix; "x!.png" would take either name: a counter; the second x.png (the same file and frame
    # again) replaces its own mask
    assert names == {"x-0.png": 5, "x.jpg-0.png": 1, "x_-0.png": 2, "x_.png-0.png": 3, "x_.png-0~2.png": 4,
                     "c-0.png": 6, "c-1.png": 7}


def test_mask_size_original_puts_the_mask_where_the_network_saw_it(bundle, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    cv2.imwrite(str(src / "square.png"), kidney_frame())
    odd = np.zeros((300, 500), np.uint8)                   # not a multiple of 224: the general mapping
    odd[10:290, 17:480] = 20
    odd[60:200, 100:350] = 200
    cv2.imwrite(str(src / "odd.png"), odd)
    masks = tmp_path / "m"
    r = sonoscore("run", "--bundle", bundle, "--source", src, "--save-masks", masks, "--mask-size", "original",
                  "--quiet")
    assert r.returncode == 0, r.stderr
    big = cv2.imread(str(masks / "1.png"), cv2.IMREAD_UNCHANGED)          # square.png, frame 1 in name order
    assert big.shape == (512, 512)
    expected = np.zeros((512, 512), np.uint8)
    r0, r1, c0, c1 = in_frame()                                          # the 224 rectangle, twice the size
    expected[r0:r1, c0:c1] = 255
    assert np.array_equal(big, expected)
    # The odd frame: the record's own 224 mask, mapped back through its region (derived here, in-process)
    from runtime.bundle import Bundle
    from runtime.pipeline import Pipeline
    from runtime.sinks.overlay import mask_to_frame
    with Pipeline(Bundle.load(bundle), threads=1) as pipe:
        rec = pipe.process(Frame(0, "t", 0.0, cv2.imread(str(src / "odd.png"), cv2.IMREAD_UNCHANGED),
                                 channel_order="BGR"))
    assert (rec.region.x0, rec.region.y0, rec.region.x1, rec.region.y1) == (17, 10, 480, 290)
    saved = cv2.imread(str(masks / "0.png"), cv2.IMREAD_UNCHANGED)
    assert saved.shape == (300, 500)
    assert np.array_equal(saved > 0, mask_to_frame(rec.mask, rec.region, (300, 500)) > 0)
    assert saved[60:200, 100:350].mean() > 250 and not saved[:10].any() and not saved[:, 480:].any()


def test_mask_size_without_save_masks_is_one_sentence(bundle, nested):
    r = sonoscore("run", "--bundle", bundle, "--source", nested, "--mask-size", "original")
    assert r.returncode == 2 and "--save-masks DIR" in r.stderr and "Traceback" not in r.stderr


# -- DICOM ---------------------------------------------------------------------------------------------------------

def test_dicom_folder_records_carry_the_file_and_the_frame_inside_it_never_an_identifier(bundle, tmp_path):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file
    folder = tmp_path / "study"
    folder.mkdir()
    copies = {"a_single.dcm": "OBXXXX1A.dcm", "b_cine.dcm": "OBXXXX1A_2frame.dcm",
              "c_rle.dcm": "OBXXXX1A_rle_2frame.dcm"}
    for name, test_file in copies.items():
        path = get_testdata_file(test_file, download=False)
        assert path is not None, f"{test_file}: pydicom's test file is not available offline"
        shutil.copy(path, folder / name)
    res, masks = tmp_path / "r.jsonl", tmp_path / "m"
    r = sonoscore("run", "--bundle", bundle, "--source", folder, "--results", res, "--save-masks", masks,
                  "--record-paths", "--quiet")
    assert r.returncode == 0, r.stderr
    recs = read_jsonl(res)
    assert [(x["frame"], x["source_file"], x["frame_in_file"]) for x in recs] == [
        (0, "a_single.dcm", 0), (1, "b_cine.dcm", 0), (2, "b_cine.dcm", 1), (3, "c_rle.dcm", 0), (4, "c_rle.dcm", 1)]
    assert sorted(p.name for p in masks.iterdir()) == ["a_single-0.png", "b_cine-0.png", "b_cine-1.png",
                                                       "c_rle-0.png", "c_rle-1.png"]
    text = res.read_text()
    ds = pydicom.dcmread(folder / "b_cine.dcm", stop_before_pixels=True)
    for value in (ds.PatientID, ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID):
        assert str(value) not in text
    # one file alone: its name, frames from 0
    one = tmp_path / "one.jsonl"
    r = sonoscore("run", "--bundle", bundle, "--source", folder / "c_rle.dcm", "--results", one, "--record-paths",
                  "--quiet")
    assert r.returncode == 0, r.stderr
    assert [(x["source_file"], x["frame_in_file"]) for x in read_jsonl(one)] == [("c_rle.dcm", 0), ("c_rle.dcm", 1)]


# -- the stream ----------------------------------------------------------------------------------------------------

def test_dropped_records_carry_their_file_too_and_nothing_without_record_paths():
    from runtime.stream import run_stream

    def frames():
        for i in range(40):
            time.sleep(0.002)
            yield Frame(i, "s", time.time(), np.zeros((4, 4), np.uint8), source_file=f"cine{i // 10}.dcm",
                        frame_in_file=i % 10)

    def slow(frame, t0):
        time.sleep(0.01)
        return FrameRecord(frame.index, frame.source_id, frame.t_capture)

    class Collect(list):
        def write(self, rec):
            self.append(rec)

        def close(self):
            pass

    for on in (True, False):
        out = Collect()
        stats = run_stream(frames(), slow, [out], policy="newest", record_paths=on)
        assert [r.frame for r in out] == list(range(40)) and stats.dropped > 0
        got = [(r.source_file, r.frame_in_file) for r in out]
        assert got == ([(f"cine{i // 10}.dcm", i % 10) for i in range(40)] if on else [(None, None)] * 40)
        assert any(r.error == DROPPED for r in out)


# -- latency: the wait apart from the processing ---------------------------------------------------------------------

def test_wait_is_capture_to_the_pipeline_taking_the_frame_and_total_is_processing_only(bundle):
    """A frame captured 5 s before the pipeline takes it: `wait` holds those 5 s, `total` none of them, and the
    processing stages lie within `total`."""
    from runtime.bundle import Bundle
    from runtime.pipeline import Pipeline
    with Pipeline(Bundle.load(bundle), threads=1) as pipe:
        pipe.process(Frame(0, "t", time.time(), kidney_frame()))       # warm up
        frame = Frame(1, "t", time.time() - 5.0, kidney_frame())
        before = time.perf_counter()
        t0 = time.perf_counter()
        rec = pipe.process(frame, t0)
        elapsed_ms = (time.perf_counter() - before) * 1e3
    lat = rec.latency_ms
    assert "queue" not in lat and set(PROCESSING) <= set(lat) and {"wait", "total"} <= set(lat)
    assert 5000.0 - 1.0 <= lat["wait"] <= 5000.0 + elapsed_ms + 50.0      # 1 ms: time.time vs perf_counter
    assert 0.0 < lat["total"] <= elapsed_ms
    assert sum(lat[s] for s in PROCESSING) <= lat["total"] + 1e-9


def test_policy_all_on_a_folder_reports_the_wait_apart(bundle, nested, tmp_path):
    res, summary = tmp_path / "r.jsonl", tmp_path / "s.json"
    r = sonoscore("run", "--bundle", bundle, "--source", nested, "--policy", "all", "--results", res,
                  "--study-summary", summary, "--quiet", "--threads", "1")
    assert r.returncode == 0, r.stderr
    for x in read_jsonl(res):
        lat = x["latency_ms"]
        stages = [k for k in lat if k not in ("wait", "total")]          # processing (a rejected frame: fewer)
        assert list(lat)[0] == "wait" and list(lat)[-1] == "total", lat
        assert {"preprocess", "unet", "gate"} <= set(stages) and (set(PROCESSING) <= set(stages) or not x["accepted"])
        assert "queue" not in lat and lat["wait"] >= 0
        assert sum(lat[s] for s in stages) <= lat["total"] + 1e-3          # rounding to 4 decimals
    s = json.loads(summary.read_text())
    assert list(s["latency_ms"])[0] == "wait" and list(s["latency_ms"])[-1] == "total"
    assert "(processing; before it, frames waited p50" in r.stderr
