"""Issue 12 item 1: burned-in patient text must not reach the network, the video or the viewer.

A DICOM frame whose Burned In Annotation is YES or not stated and that has no Sequence of Ultrasound Regions is cut
to its scan sector (docs/design.md, "Pinned definitions", crop); with no sector it is neither scored nor shown.
The text is planted as pixels of value 255 (cv2.putText, no anti-aliasing); the speckle never reaches 255, so
"no 255 in the picture" means "no text in the picture". The speckle frame without text is the reference: the
text frame must give exactly its network image and display.
"""
from __future__ import annotations

import json
import logging
import time

import cv2
import numpy as np
import pytest

pytest.importorskip("pydicom")

from tests.conftest import sonoscore  # noqa: E402
from tests.test_dicom import region_item, write_us  # noqa: E402

from runtime import preprocess as pp  # noqa: E402
from runtime.sources import Frame  # noqa: E402
from runtime.sources.dicom import DicomFolderSource, DicomSource  # noqa: E402

TEXT = 255
TEXTS = (("DOE^JANE", (6, 20)), ("1961-04-12", (6, 42)), ("MRN 4711-0815", (262, 20)), ("ACME 7", (300, 292)))


def scan_frame(shape=(300, 400), *, seed=0, rect=False, text=True):
    """(uint8 frame: speckle in a fan or rectangle, text at the corners; the text pixels' boxes)."""
    h, w = shape
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    if rect:
        inside = (yy >= 60) & (yy < 260) & (xx >= 100) & (xx < 300)
    else:
        r, ang = np.hypot(xx - w // 2, yy - 40), np.arctan2(xx - w // 2, yy - 40)
        inside = (r > 20) & (r < 245) & (np.abs(ang) < np.radians(35))
    img = np.where(inside, np.clip(rng.rayleigh(45, (h, w)), 0, 250), 0).astype(np.uint8)
    boxes = []
    if text:
        for s, org in TEXTS:
            boxes.append(put_text(img, s, org, 0.55, 1))
    return img, inside, boxes


def put_text(img, s, org, scale, thickness):
    """Burn `s` into `img` as pixels of value TEXT exactly (cv2's glyphs are anti-aliased); its pixel box."""
    glyphs = np.zeros_like(img)
    cv2.putText(glyphs, s, org, cv2.FONT_HERSHEY_SIMPLEX, scale, 255, thickness)
    img[glyphs > 0] = TEXT
    ys, xs = np.nonzero(glyphs)
    return xs.min(), ys.min(), xs.max() + 1, ys.max() + 1


def text_only():
    text = np.zeros((300, 400), np.uint8)
    for i in range(8):
        put_text(text, "DOE^JANE 1961-04-12 MRN 4711", (5, 30 + 35 * i), 0.9, 2)
    return text


def disjoint(region, box) -> bool:
    x0, y0, x1, y1 = box
    return x1 <= region.x0 or x0 >= region.x1 or y1 <= region.y0 or y0 >= region.y1


@pytest.fixture(scope="module")
def pipe(tiny_bundle):
    from runtime.bundle import Bundle
    from runtime.pipeline import Pipeline
    with Pipeline(Bundle.load(tiny_bundle), threads=2) as p:
        yield p


# -- the detector -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rect", [False, True])
def test_the_scan_sector_is_the_speckle_not_the_text(rect):
    img, inside, boxes = scan_frame(rect=rect)
    sector = pp.scan_sector(img)
    r = sector.region
    assert sector.mask.shape == (r.y1 - r.y0, r.x1 - r.x0) and sector.mask.dtype == bool
    if rect:   # the rectangle is found exactly
        assert r == pp.Region(100, 60, 300, 260) and sector.mask.mean() > 0.98  # (corners a little cut)
        assert all(disjoint(r, b) for b in boxes)
    clean, _, _ = scan_frame(rect=rect, text=False)
    again = pp.scan_sector(clean)
    assert again.region == r and np.array_equal(again.mask, sector.mask)  # the text changes nothing
    out, region = pp.sector_frame(img, None, {"burned_in_annotation": None})
    assert region == r and out.max() < TEXT                               # every text pixel is black now
    assert not (out[~inside]).any()                                       # and everything outside the scan
    kept = np.count_nonzero(out) / np.count_nonzero(clean)
    assert kept > 0.95                                                    # nearly all the speckle is kept
    assert np.array_equal(pp.sector_frame(img, None, {"burned_in_annotation": True})[0], out)  # deterministic


def test_text_alone_or_a_flat_frame_has_no_sector():
    text = text_only()
    assert pp.scan_sector(text) is None
    assert pp.scan_sector(np.full((300, 400), 120, np.uint8)) is None
    assert pp.scan_sector(np.zeros((300, 400), np.uint8)) is None
    with pytest.raises(pp.FrameError, match="no scan sector"):
        pp.sector_frame(text, None, {"burned_in_annotation": True})
    # not DICOM, a region, or Burned In Annotation NO: the frame is left as it is (today's crop applies)
    for region, meta in ((None, {}), (pp.Region(0, 0, 10, 10), {"burned_in_annotation": True}),
                         (None, {"burned_in_annotation": False})):
        out, r = pp.sector_frame(text, region, meta)
        assert out is text and r == region


# -- through the pipeline ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("flag", ["YES", None])
@pytest.mark.parametrize("rect", [False, True])
def test_burned_in_text_is_cut_away_from_the_network_image_and_the_display(pipe, tmp_path, flag, rect):
    img, _, _ = scan_frame(rect=rect, seed=3)
    clean, _, _ = scan_frame(rect=rect, seed=3, text=False)
    extra = {"BurnedInAnnotation": flag} if flag else {}
    recs = []
    for name, pixels in (("text.dcm", img), ("clean.dcm", clean)):
        src = DicomSource(write_us(tmp_path / name, pixels, **extra), realtime=False)
        (frame,) = list(src)
        assert frame.region is None and frame.meta["burned_in_annotation"] is (True if flag else None)
        recs.append(pipe.process(frame))
    rec, ref = recs
    assert rec.error is None and rec.display is not None
    assert rec.display.max() < TEXT                                   # no text pixel in what the sinks get
    assert np.array_equal(rec.display, ref.display)                   # exactly the text-free picture
    assert np.array_equal(rec.image, ref.image)                       # and the same network input
    assert rec.grade == ref.grade and rec.mask_fraction == ref.mask_fraction
    assert rec.region == pp.Region(0, 0, rec.display.shape[1], rec.display.shape[0])
    sector = pp.scan_sector(img)
    h, w = rec.display.shape
    assert (sector.region.x1 - sector.region.x0, sector.region.y1 - sector.region.y0) == (w, h)
    assert h * w >= 0.3 * 300 * 400                                   # the scan itself is kept


def test_frames_said_to_be_free_of_text_or_with_a_region_keep_todays_crop(pipe, tmp_path):
    img, _, _ = scan_frame(seed=4)
    (frame,) = list(DicomSource(write_us(tmp_path / "no.dcm", img, BurnedInAnnotation="NO"), realtime=False))
    display, image, region = pipe.prepare(frame)
    assert display is not None and display.shape == img.shape and region == pp.auto_region(img)
    assert np.array_equal(image, pp.preprocess(img, crimmins_iterations=pipe.graph.crimmins_iterations)[0])
    (frame,) = list(DicomSource(write_us(tmp_path / "reg.dcm", img, BurnedInAnnotation="YES",
                                         SequenceOfUltrasoundRegions=[region_item(60, 50, 339, 289)]),
                                realtime=False))
    display, image, region = pipe.prepare(frame)
    assert display.shape == (240, 280) and region == pp.Region(0, 0, 280, 240)
    # a source that is not DICOM keeps the whole frame (the demo's PNG folders and simulated probe)
    display, _, region = pipe.prepare(Frame(0, "files-x", 0.0, img))
    assert display.shape == img.shape and region == pp.auto_region(img)


def test_a_frame_with_no_sector_is_an_error_record_never_shown(pipe, tmp_path):
    text = text_only()
    (frame,) = list(DicomSource(write_us(tmp_path / "t.dcm", text, BurnedInAnnotation="YES"), realtime=False))
    rec = pipe.process(frame)
    assert rec.display is None and rec.image is None and rec.grade is None and not rec.accepted
    assert rec.error == f"frame 0: {pp.NO_SECTOR}"


def test_the_command_line_video_and_masks_hold_no_text(tiny_bundle, tmp_path):
    """`sonoscore run --video --save-masks` on a cine with text, then a frame with text only: the video's
    picture is the sector (the same as the text-free cine's), the text-only frame is an error record without mask."""
    from runtime.sinks.overlay import frame_scale
    cine = np.stack([scan_frame(seed=s)[0] for s in range(3)] + [text_only()])
    clean = np.stack([scan_frame(seed=s, text=False)[0] for s in range(3)])
    out = {}
    for name, frames in (("text", cine), ("clean", clean)):
        path = write_us(tmp_path / f"{name}.dcm", frames, BurnedInAnnotation="YES")
        r = sonoscore("run", "--bundle", tiny_bundle, "--source", path, "--quiet", "--threads", 2,
                      "--video", tmp_path / f"{name}.mp4", "--save-masks", tmp_path / f"{name}-masks",
                      "--results", tmp_path / f"{name}.jsonl", timeout=300)
        # exit 3 (EXIT_FRAME_ERRORS) for the text cine: its frame with no sector is an error record
        assert r.returncode == (3 if name == "text" else 0), r.stderr
        records = [json.loads(x) for x in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
        cap = cv2.VideoCapture(str(tmp_path / f"{name}.mp4"))
        pictures = []
        while True:
            ok, bgr = cap.read()
            if not ok:
                break
            pictures.append(bgr)
        cap.release()
        out[name] = records, pictures, sorted(p.name for p in (tmp_path / f"{name}-masks").iterdir())
    (records, pictures, masks), (ref_records, ref_pictures, ref_masks) = out["text"], out["clean"]
    assert [r["frame"] for r in records] == [0, 1, 2, 3]
    assert [r["error"] for r in records[:3]] == [None] * 3 and [r["error"] for r in ref_records] == [None] * 3
    assert records[3]["error"] == f"frame 3: {pp.NO_SECTOR}" and records[3]["grade"] is None
    assert masks == ref_masks and len(masks) == 3                     # no mask for the frame not scored
    assert [r["grade"] for r in records[:3]] == [r["grade"] for r in ref_records]
    sector = pp.scan_sector(cine[0]).region
    h, w = sector.y1 - sector.y0, sector.x1 - sector.x0
    scale = frame_scale((h, w))
    H, W = int(round(h * scale)), int(round(w * scale))
    assert len(pictures) == 4 and pictures[0].shape[0] >= H
    for pic, ref in zip(pictures[:3], ref_pictures):
        diff = np.abs(pic[:H, :W].astype(int) - ref[:H, :W].astype(int))
        assert diff.mean() < 3                                        # the same picture, up to the codec


# -- items 10: a DICOM cine is a recording; a file that is not ultrasound is named -----------------------------

def test_a_dicom_cine_is_paced_but_not_live_so_its_default_policy_is_all(tmp_path):
    cine = np.random.default_rng(1).integers(0, 200, (4, 32, 40)).astype(np.uint8)
    src = DicomSource(write_us(tmp_path / "c.dcm", cine, FrameTime=20.0))
    assert not src.live and src.paced and src.fps == pytest.approx(50.0)
    assert not DicomSource(write_us(tmp_path / "c.dcm", cine, FrameTime=20.0), realtime=True).live


def test_a_dicom_that_is_not_ultrasound_is_graded_with_one_warning(tmp_path, caplog):
    img, _, _ = scan_frame(text=False)
    mr = write_us(tmp_path / "mr.dcm", img, Modality="MR")
    with caplog.at_level(logging.WARNING, logger="runtime.sources.dicom"):
        src = DicomSource(mr, realtime=False)
        frames = list(src)
    msgs = [r.getMessage() for r in caplog.records if r.name == "runtime.sources.dicom"]
    assert len(msgs) == 1 and "Modality MR" in msgs[0] and "not ultrasound" in msgs[0] and str(mr) in msgs[0]
    assert msgs[0].count(". ") == 0 and len(frames) == 1 and frames[0].error is None
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="runtime.sources.dicom"):
        DicomSource(write_us(tmp_path / "us.dcm", img), realtime=False)
    assert not [r for r in caplog.records if r.name == "runtime.sources.dicom"]
    # a folder warns once, naming the modalities and no file
    folder = tmp_path / "f"
    folder.mkdir()
    for i, modality in enumerate(("MR", "US", "CT", "MR")):
        write_us(folder / f"Doe^Jane_{i}.dcm", img, Modality=modality)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="runtime.sources.dicom"):
        DicomFolderSource(folder)
    msgs = [r.getMessage() for r in caplog.records if r.name == "runtime.sources.dicom"]
    assert len(msgs) == 1 and "3 DICOM file(s) of 4" in msgs[0] and "Modality CT, Modality MR" in msgs[0]
    assert "Doe" not in msgs[0]


def test_the_device_pipeline_applies_the_same_rule(tiny_bundle, tmp_path):
    """runtime.gpu.pipeline (host stand-ins for the GPU): the sector goes up, and the display is the same."""
    from runtime.bundle import Bundle
    from runtime.pipeline import Pipeline
    from tests.test_gpu_pipeline import host_pipeline
    img, _, _ = scan_frame(seed=5)
    frames = [list(DicomSource(write_us(tmp_path / f"{n}.dcm", p, BurnedInAnnotation="YES"), realtime=False))[0]
              for n, p in (("text", img), ("none", text_only()))]
    bundle = Bundle.load(tiny_bundle)
    with Pipeline(bundle, threads=2) as cpu, host_pipeline(bundle, keep_display=True, keep_image=True) as dev:
        (a, b), (c, d) = [(dev.process(f), cpu.process(f)) for f in frames]
        assert a.error is None and a.region == b.region and np.array_equal(a.display, b.display)
        assert a.display.max() < TEXT and np.array_equal(a.image, b.image)
        assert c.display is None and d.display is None and c.error == d.error == f"frame 0: {pp.NO_SECTOR}"


# -- issue 27 item 1: text inside the scan sector ----------------------------------------------------------------

def burn(img, s, org, scale, thickness, value=TEXT, aa=False):
    """Burn `s` into `img` (anti-aliased with `aa`, as some scanners draw); the bool mask of its pixels."""
    glyphs = np.zeros(img.shape[:2], np.uint8)
    cv2.putText(glyphs, s, org, cv2.FONT_HERSHEY_SIMPLEX, scale, 255, thickness, cv2.LINE_AA if aa else cv2.LINE_8)
    on = glyphs > 0
    if aa:   # blended over what is there, like a scanner's anti-aliased font
        a = glyphs.astype(np.float32) / 255
        img[...] = np.round(img * (1 - a[..., None] if img.ndim == 3 else 1 - a) +
                            value * (a[..., None] if img.ndim == 3 else a)).astype(np.uint8)
    else:
        img[on] = value
    return on


INSIDE = (("MRN 12345 DOE^JANE", (120, 150), 0.5, 1, False), ("1961-04-12", (140, 200), 0.7, 2, False),
          ("ID 778899", (150, 240), 0.5, 1, True))


@pytest.mark.parametrize("rect", [False, True])
def test_text_inside_the_sector_is_blanked_too(rect):
    """Before: only what lay outside the sector's hull was blacked out; text drawn over the speckle went through."""
    img, inside, _ = scan_frame(rect=rect, text=False, seed=6)
    clean = img.copy()
    text = np.zeros(img.shape, bool)
    for s, org, scale, thick, aa in INSIDE:
        text |= burn(img, s, org, scale, thick, value=255 if not aa else 230, aa=aa)
    if rect:   # the bottom of a date line that the top edge of the image cuts
        text |= burn(img, "2024-01-02 14:31 DOE^JANE", (104, 66), 0.6, 2)
    assert (text & inside).sum() > 500                                  # the text is in the scan
    out, region = pp.sector_frame(img, None, {"burned_in_annotation": True})
    near = cv2.dilate(text.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0      # glyphs and their fringe
    assert not out[near].any()                                          # not one text pixel is left
    assert out.max() < 255
    far = cv2.dilate(text.astype(np.uint8), np.ones((45, 45), np.uint8)) == 0
    sector = pp.scan_sector(clean)
    in_sector = np.zeros(img.shape, bool)
    in_sector[sector.region.y0:sector.region.y1, sector.region.x0:sector.region.x1] = sector.mask
    assert np.array_equal(out[far & in_sector], clean[far & in_sector])  # away from the text all is kept
    assert np.count_nonzero(out) / np.count_nonzero(clean) > 0.65
    out_clean, r_clean = pp.sector_frame(clean, None, {"burned_in_annotation": True})
    assert np.array_equal(out_clean, np.where(in_sector, clean, 0))    # no text: no blanking, as before


def test_a_frame_of_text_over_most_of_the_sector_is_refused():
    img, _, _ = scan_frame(rect=True, text=False, seed=7)
    for i in range(9):
        burn(img, "DOE^JANE 1961-04-12", (104, 80 + 20 * i), 0.5, 1)
    with pytest.raises(pp.FrameError) as e:
        pp.sector_frame(img, None, {"burned_in_annotation": None})
    assert str(e.value) == pp.TEXT_IN_SECTOR


def real_frame_with_text():
    """A real ultrasound frame (pydicom's US1_UNCR.dcm, RGB: a lymph node with power Doppler) and the same frame
    with a patient's text burned in over the tissue; the text's pixels."""
    from pydicom.data import get_testdata_file
    import pydicom
    rgb = pydicom.dcmread(get_testdata_file("US1_UNCR.dcm", download=False)).pixel_array.copy()
    clean = rgb.copy()
    text = burn(rgb, "MRN 12345 DOE^JANE", (330, 320), 0.5, 1, value=255)
    text |= burn(rgb, "1961-04-12", (40, 310), 0.6, 1, value=255)
    return rgb, clean, text


def video_pictures(path):
    cap = cv2.VideoCapture(str(path))
    out = []
    while True:
        ok, bgr = cap.read()
        if not ok:
            break
        out.append(bgr)
    cap.release()
    return out


def at_text(picture, text, region, scale):
    """The picture's gray values where the text's pixels land (the display is the region, scaled, top left)."""
    gray = cv2.cvtColor(picture, cv2.COLOR_BGR2GRAY) if picture.ndim == 3 else picture
    ys, xs = np.nonzero(text)
    keep = (ys >= region.y0) & (ys < region.y1) & (xs >= region.x0) & (xs < region.x1)
    ys = np.minimum(((ys[keep] - region.y0 + 0.5) * scale).astype(int), gray.shape[0] - 1)
    xs = np.minimum(((xs[keep] - region.x0 + 0.5) * scale).astype(int), gray.shape[1] - 1)
    return gray[ys, xs]


def test_text_inside_a_real_frames_sector_reaches_neither_the_video_nor_the_viewer(tiny_bundle, tmp_path):
    """A real US frame written as DICOM with Burned In Annotation YES and no ultrasound regions, text over the
    tissue: `sonoscore run --video` (decoded back) and the live viewer's picture show black where the text was."""
    from runtime.bundle import Bundle
    from runtime.pipeline import Pipeline
    from runtime.sinks.overlay import frame_scale
    from runtime.sinks.viewer import LiveViewer
    from tests.test_viewer import base_url, get
    rgb, clean, text = real_frame_with_text()
    sector = pp.scan_sector(pp.to_gray(clean, "RGB")).region
    inside = text[sector.y0:sector.y1, sector.x0:sector.x1]
    assert inside.sum() == text.sum() > 300                             # all the text is inside the sector
    path = write_us(tmp_path / "t.dcm", rgb, photometric="RGB", BurnedInAnnotation="YES")
    r = sonoscore("run", "--bundle", tiny_bundle, "--source", path, "--quiet", "--threads", 2,
                  "--video", tmp_path / "t.mp4", "--results", tmp_path / "t.jsonl", timeout=300)
    assert r.returncode == 0, r.stderr
    (picture,) = video_pictures(tmp_path / "t.mp4")
    (frame,) = list(DicomSource(path, realtime=False))
    with Pipeline(Bundle.load(tiny_bundle), threads=2) as pipe:
        rec = pipe.process(frame)
    assert rec.error is None and rec.display is not None
    region = pp.Region(sector.x0, sector.y0, sector.x0 + rec.display.shape[1], sector.y0 + rec.display.shape[0])
    scale = frame_scale(rec.display.shape)
    assert np.median(at_text(picture, text, region, scale)) < 30        # the video: black where the text was
    assert at_text(rec.display[None][0], text, region, 1.0).max() == 0  # the frame the sinks get: all of it
    with LiveViewer() as v:
        get(base_url(v) + "/state.json")                                # a page is open: pictures are drawn
        v.write(rec)
        for _ in range(50):
            status, jpeg, _ = get(base_url(v) + "/frame.jpg?n=1")
            if status == 200:
                break
            time.sleep(0.1)
    pic = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert status == 200 and np.median(at_text(pic, text, region, scale)) < 30
    # the same frame without text shows tissue there: the check would see the text
    path = write_us(tmp_path / "c.dcm", clean, photometric="RGB", BurnedInAnnotation="YES")
    (frame,) = list(DicomSource(path, realtime=False))
    with Pipeline(Bundle.load(tiny_bundle), threads=2) as pipe:
        ref = pipe.process(frame)
    assert np.median(at_text(ref.display, text, region, 1.0)) > 20
