"""The command-line contract of docs/design.md, through real subprocesses on a real (tiny) bundle."""
import json
import shutil
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.conftest import sonoscore

RECORD_KEYS = {"frame", "source_id", "t_capture", "accepted", "mask_fraction", "grade", "probabilities",
               "latency_ms", "error", "kidney_length_mm", "kidney_area_mm2", "size_note", "refused",
               "scope"}


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_help_works_and_lists_every_command():
    r = sonoscore("--help")
    assert r.returncode == 0
    for cmd in ("demo", "run", "eval", "bench", "sim", "train", "export", "doctor"):
        assert cmd in r.stdout


def test_run_on_the_simulated_probe_writes_one_record_per_frame(tiny_bundle, tmp_path):
    res, masks, summ = tmp_path / "r.jsonl", tmp_path / "masks", tmp_path / "study.json"
    r = sonoscore("run", "--bundle", tiny_bundle, "--source", "sim://kidney?grade=2&fps=0&frames=12&seed=3",
                  "--results", res, "--save-masks", masks, "--study-summary", summ, "--video", tmp_path / "o.mp4")
    assert r.returncode == 0, r.stderr
    recs = read_jsonl(res)
    assert [x["frame"] for x in recs] == list(range(12))
    for x in recs:
        assert set(x) == RECORD_KEYS and x["error"] is None
        assert {"preprocess", "unet", "gate", "total"} <= set(x["latency_ms"])
        if x["accepted"]:
            assert x["grade"] in (1, 2, 3, 4) and abs(sum(x["probabilities"]) - 1) < 1e-4
            assert {"vgg", "booster"} <= set(x["latency_ms"])
            # the simulated probe knows its spacing: a size in mm, or the reason there is none
            assert (x["kidney_length_mm"] is None) == (x["kidney_area_mm2"] is None) != (x["size_note"] is None)
        else:
            assert x["grade"] is None and x["probabilities"] is None
    m = cv2.imread(str(masks / "0.png"), cv2.IMREAD_UNCHANGED)
    assert m.shape == (224, 224) and set(np.unique(m)) <= {0, 255}
    assert json.loads(summ.read_text())["frames"] == 12
    cap = cv2.VideoCapture(str(tmp_path / "o.mp4"))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 12
    assert "not for clinical use" in r.stderr


def test_run_options_become_one_run_config(monkeypatch):
    """`sonoscore run`'s options map field by field onto the RunConfig that runtime.app.run_bundle takes."""
    import runtime.app
    from runtime.app import RunConfig, ViewConfig
    from runtime.cli import EXIT_OK, main
    from runtime.stream import StreamStats
    seen = []
    monkeypatch.setattr(runtime.app, "run_bundle", lambda config: seen.append(config) or StreamStats())
    assert main(["run", "--bundle", "b", "--source", "s", "--backend", "trt", "--precision", "int8", "--policy",
                 "all", "--threads", "2", "--results", "r.jsonl", "--video", "v.mp4", "--save-masks", "m",
                 "--study-summary", "s.json", "--study-report", "s.html", "--smooth", "8", "--view", "--view-host",
                 "0.0.0.0", "--view-port", "0", "--view-token", "t", "--view-keep", "--display", "--quiet"]) == EXIT_OK
    assert seen == [RunConfig(bundle="b", source="s", backend="trt", precision="int8", policy="all", threads=2,
                              results="r.jsonl", video="v.mp4", masks="m", summary="s.json", report="s.html",
                              smoothing=8.0, view=ViewConfig(host="0.0.0.0", port=0, token="t", keep=True),
                              display=True, quiet=True)]
    assert main(["run", "--bundle", "b", "--source", "s"]) == EXIT_OK
    assert seen[1] == RunConfig("b", "s")                       # no --view: no viewer; the rest as documented


def _png(img):
    ok, buf = cv2.imencode(".png", img)
    assert ok
    return buf.tobytes()


def _png_chunk(kind, data):
    return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")


def make_bad_folder(folder: Path, good: np.ndarray) -> dict:
    """The issue's mixed folder: which names must carry an error."""
    folder.mkdir()
    (folder / "a_valid.png").write_bytes(_png(good))
    (folder / "b_empty.png").write_bytes(b"")
    (folder / "c_truncated.png").write_bytes(_png(good)[:200])
    (folder / "d_text.png").write_text("this is not an image\n")
    (folder / "e_16bit.png").write_bytes(_png(good.astype(np.uint16) * 257))
    (folder / "f_rgba.png").write_bytes(_png(np.dstack([good, good, good, np.full_like(good, 255)])))
    (folder / "g_1x1.png").write_bytes(_png(np.full((1, 1), 128, np.uint8)))
    ihdr = (60000).to_bytes(4, "big") + (2).to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    (folder / "h_huge_header.png").write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
                                               + _png_chunk(b"IEND", b""))
    return {"b_empty.png", "c_truncated.png", "d_text.png", "h_huge_header.png"}


def test_bad_inputs_each_get_a_record_and_a_sentence_and_the_good_ones_are_scored(tiny_bundle, tmp_path):
    from runtime.phantom import KidneyPhantom
    good = KidneyPhantom(grade=1, seed=2).frame(0).image
    broken = make_bad_folder(tmp_path / "in", good)
    res = tmp_path / "r.jsonl"
    r = sonoscore("run", "--bundle", tiny_bundle, "--source", tmp_path / "in", "--results", res)
    assert r.returncode == 3, r.stderr  # documented: finished, some frames carried errors
    assert "Traceback" not in r.stderr + r.stdout
    assert "WARN" not in r.stderr  # decoder chatter is replaced by the records' own sentences
    recs = read_jsonl(res)
    names = sorted(p.name for p in (tmp_path / "in").iterdir())
    assert [x["frame"] for x in recs] == list(range(8))
    for name, x in zip(names, recs):
        if name in broken:
            k = names.index(name) + 1          # named by position, never by file name (no identifier in results)
            assert x["error"] and f"image {k} of 8" in x["error"] and name not in x["error"], (name, x)
            assert x["grade"] is None
        else:
            assert x["error"] is None, (name, x)
            assert 0.0 <= x["mask_fraction"] <= 1.0
    # the valid frame, its 16-bit and its RGBA copies agree on the mask (same pixels after conversion)
    fr = {n: x for n, x in zip(names, recs)}
    assert abs(fr["a_valid.png"]["mask_fraction"] - fr["f_rgba.png"]["mask_fraction"]) < 1e-9


def test_a_tampered_bundle_is_refused_with_one_sentence(tiny_bundle, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(tiny_bundle, b)
    with open(b / "booster.ubj", "ab") as f:
        f.write(b"\0")
    r = sonoscore("run", "--bundle", b, "--source", "sim://kidney?fps=0&frames=1")
    assert r.returncode == 2
    assert "booster.ubj does not match the sha256" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("source, phrase", [
    ("/nonexistent/probe.mp4", "does not exist"),
    ("sim://kidney?grade=9", "is not a grade"),
    ("sim://liver", "only sim://kidney"),
    ("v4l2:///dev/video97", "no such capture device"),
    ("rtsp://camera/stream", "not available in this version"),
])
def test_a_bad_source_is_one_sentence_and_exit_2(tiny_bundle, source, phrase):
    r = sonoscore("run", "--bundle", tiny_bundle, "--source", source)
    assert r.returncode == 2 and phrase in r.stderr and "Traceback" not in r.stderr


def test_missing_bundle_says_how_to_make_one(tmp_path):
    r = sonoscore("run", "--bundle", tmp_path, "--source", "sim://kidney")
    assert r.returncode == 2 and "no manifest.json" in r.stderr


def test_eval_on_a_trained_bundle_reports_every_image(tiny_bundle, tiny_dataset, tmp_path):
    """The real command on the tiny trained bundle: every image counted, the contract's keys present. What the
    tiny model finds depends on the machine it trained on, so its figures are not checked here:
    tests/test_evaluate.py checks eval's figures against hand-computed ones on a bundle of known functions."""
    rep = tmp_path / "eval.json"
    r = sonoscore("eval", "--bundle", tiny_bundle, "--data", tiny_dataset, "--report", rep)
    assert r.returncode == 0, r.stderr
    out = json.loads(rep.read_text())
    assert out["images"] == 24 and out["errors"] == [] and out["iou_images"] > 0
    assert {"iou_mean", "gate_agreement", "graded_frames", "disclaimer"} <= set(out)
    assert ("confusion_matrix" in out) == (out["graded_frames"] > 0) == (not out.get("note"))


def test_bench_json_has_every_stage_percentile(tiny_bundle, tmp_path):
    j = tmp_path / "bench.json"
    r = sonoscore("bench", "--bundle", tiny_bundle, "--frames", 5, "--warmup", 1, "--json", j)
    assert r.returncode == 0, r.stderr
    out = json.loads(j.read_text())
    assert out["frames"] == 5 and out["fps"] > 0
    for stage in ("preprocess", "unet", "gate", "vgg", "booster", "total"):
        s = out["stages"][stage]
        assert 0 <= s["p50_ms"] <= s["p95_ms"] <= s["p99_ms"] <= s["max_ms"]
    assert out["stages"]["total"]["p50_ms"] >= out["stages"]["unet"]["p50_ms"]
    assert out["precision"] == "fp32" and out["booster_call"] in ("extension", "ctypes", "numpy")
    warm = out["booster_isolated"]
    assert warm["calls"] > 0 and 0 < warm["p50_us"] <= warm["p99_us"]
    assert 0 <= out["cpu_overhead_fraction"] < 1 and "precisions" not in out and "speedup" not in out


@pytest.mark.parametrize("extra", [(), ("--device", "cpu", "--baseline", "none")], ids=["cpu-pipeline", "device-cpu"])
def test_bench_refuses_a_bad_precision_list_in_one_sentence_before_loading_anything(extra):
    r = sonoscore("bench", "--bundle", "/nonexistent", "--precision", "fp32,fp64", *extra)
    assert r.returncode == 2
    assert r.stderr.strip() == "sonoscore: --precision fp32,fp64: use fp32, fp16 or int8, or several joined by commas"


def test_doctor_lists_the_cpu_backend():
    r = sonoscore("doctor")
    assert r.returncode == 0 and "CPUExecutionProvider" in r.stdout


def test_sim_command_writes_a_labelme_dataset(tmp_path):
    r = sonoscore("sim", "--out", tmp_path / "ds", "--patients", 2, "--seed", 3, "--frames-per-patient", 2)
    assert r.returncode == 0, r.stderr
    lines = (tmp_path / "ds" / "labels.csv").read_text().splitlines()
    assert lines[0] == "image,patient,grade" and len(lines) == 5
    assert len(list((tmp_path / "ds" / "images").glob("*.json"))) == 4


def test_export_command_builds_a_verified_bundle_from_checkpoints(tiny_bundle, tmp_path):
    import torch
    from export.models import UNet, VGG19BN
    torch.save(UNet(width=1 / 16).state_dict(), tmp_path / "unet.pt")
    torch.save(VGG19BN(width=1 / 32).state_dict(), tmp_path / "vgg.pt")
    out = tmp_path / "b"
    r = sonoscore("export", "--unet", tmp_path / "unet.pt", "--vgg", tmp_path / "vgg.pt",
                  "--booster", Path(tiny_bundle) / "booster.ubj", "--out", out)
    assert r.returncode == 0, r.stderr
    from runtime.bundle import Bundle
    b = Bundle.load(out)
    assert b.manifest["networks"]["unet"]["width"] == 1 / 16 and b.manifest["networks"]["vgg"]["width"] == 1 / 32
    assert set(b.precisions) == {"fp32", "fp16"}
    bad = sonoscore("export", "--unet", tmp_path / "vgg.pt", "--vgg", tmp_path / "vgg.pt",
                    "--booster", Path(tiny_bundle) / "booster.ubj", "--out", tmp_path / "c")
    assert bad.returncode == 2 and "does not fit the unet architecture" in bad.stderr


def test_a_video_file_is_streamed_losslessly_frame_by_frame(tiny_bundle, tmp_path):
    from runtime.phantom import KidneyPhantom
    ph = KidneyPhantom(grade=2, seed=9)
    first = ph.frame(0).image
    path = tmp_path / "probe.avi"
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 15.0, (first.shape[1], first.shape[0]))
    assert w.isOpened()
    for i in range(7):
        w.write(cv2.cvtColor(ph.frame(i).image, cv2.COLOR_GRAY2BGR))
    w.release()
    res = tmp_path / "r.jsonl"
    r = sonoscore("run", "--bundle", tiny_bundle, "--source", path, "--results", res, "--quiet")
    assert r.returncode == 0, r.stderr
    recs = read_jsonl(res)
    assert [x["frame"] for x in recs] == list(range(7)) and all(x["error"] is None for x in recs)
    assert "policy all" in r.stderr  # a file is not live: nothing may be dropped


def test_a_labelme_folder_streams_its_images_not_their_annotations(tiny_bundle, tmp_path):
    """`sonoscore sim` writes X.png beside X.json (labelme): the folder is 2 frames, not 4 with 2 errors. A .json
    with no image of its name, and any other file, is still an input and gets its record."""
    from runtime.dataset import write_dataset
    from runtime.sources import open_source
    data = write_dataset(tmp_path / "d", 1, seed=3, frames_per_patient=2, progress=False) / "images"
    pngs = sorted(p.name for p in data.glob("*.png"))
    assert len(pngs) == 2 and all((data / n).with_suffix(".json").is_file() for n in pngs)
    (data / "zz_orphan.json").write_text("{}")
    src = open_source(str(data), realtime=False)
    assert src.total == 3 and src.annotations == 2
    res = tmp_path / "r.jsonl"
    r = sonoscore("run", "--bundle", tiny_bundle, "--source", data, "--results", res, "--quiet")
    assert "2 annotation files beside their images are not frames" in r.stderr
    recs = read_jsonl(res)
    assert len(recs) == 3 and [x["error"] is None for x in recs] == [True, True, False], r.stderr
    assert "image 3 of 3" in recs[2]["error"] and "zz_orphan" not in recs[2]["error"]
