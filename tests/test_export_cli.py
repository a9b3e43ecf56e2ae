"""`sonoscore export` through real subprocesses: checkpoints as their owners save them, users' ONNX files, the
booster checked before anything is written, no half bundles, input normalizations and the model card in the
manifest, and the bundle then loaded and run on PNG frames.

Networks are small (UNet first stage 2 channels, VGG features at 1/16 width) so each export takes seconds; the
torchvision-keyed VGG is cut at Fc2 = 1024, as in the acceptance check.
"""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from tests.conftest import ROOT, sonoscore  # noqa: E402
from tests.test_checkpoints import Fc2, RefNet, RefVGG, main_py_save, make_booster, randomize_bn, \
    torchscript_export  # noqa: E402

FC2 = 1024


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """Checkpoints, ONNX files, boosters and PNG frames, made once."""
    d = tmp_path_factory.mktemp("export_inputs")
    torch.manual_seed(11)
    unet_bn = randomize_bn(RefNet(True), seed=1)
    main_py_save(unet_bn, d / "unet_bn.tar")                                   # main.py --useBN
    unet_relu = RefNet(False).eval()
    torch.save({"epoch": 25, "state_dict": torch.nn.DataParallel(unet_relu).state_dict(), "loss": 0.01},
               d / "unet_relu.tar", _use_new_zipfile_serialization=False)      # main.py default, DataParallel, legacy
    vgg = randomize_bn(RefVGG(width=1 / 16, fc1=64, fc2=FC2), seed=2)
    vgg.classifier = vgg.classifier[:-1]                                       # cut at Fc2: no classifier.6
    torch.save(vgg.state_dict(), d / "vgg_tv.pth")
    torchscript_export(Fc2(vgg), d / "vgg_user.onnx", (1, 3, 224, 224), "input", ["fc2"])
    torchscript_export(unet_relu, d / "unet_user.onnx", (1, 1, 224, 224), "input.1", ["output"])
    boosters = {"ok": make_booster(d / "booster.json", FC2), "three": make_booster(d / "three.json", FC2, 3),
                "f512": make_booster(d / "f512.ubj", 512)}
    (d / "broken.json").write_text('{"learner": {"gradient_booster": ')
    boosters["broken"] = d / "broken.json"
    frames = d / "frames"
    frames.mkdir()
    from runtime.phantom import KidneyPhantom
    ph = KidneyPhantom(grade=2, seed=4)
    for i in range(5):
        cv2.imwrite(str(frames / f"scan_{i:02d}.png"), ph.frame(i * 3).image)
    return {"dir": d, "unet_bn": unet_bn, "unet_relu": unet_relu, "vgg": vgg, "boosters": boosters,
            "frames": frames}


def run_frames(bundle, frames, tmp_path):
    results = tmp_path / "results.jsonl"
    r = sonoscore("run", "--bundle", bundle, "--source", frames, "--results", results, "--quiet")
    assert r.returncode == 0, r.stderr
    recs = [json.loads(line) for line in results.read_text().splitlines()]
    assert len(recs) == len(list(Path(frames).glob("*.png")))
    assert all(rec["error"] is None for rec in recs)
    return recs, r.stderr


def ort(path):
    from export.onnx_export import ort_session
    return ort_session(path)


def leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}.") or p.name == name)


def test_main_py_unet_and_torchvision_vgg_cut_at_fc2_export_and_run(made, tmp_path):
    d = made["dir"]
    (tmp_path / "card.yaml").write_text("version: 2.0.1\ndescription: IFTA grader, site A\nauthors: [A. Author]\n"
                                        "license: CC-BY-4.0\nintended_use: research\ndata_source: site A scans\n")
    out = tmp_path / "bundle"
    r = sonoscore("export", "--unet", d / "unet_bn.tar", "--vgg", d / "vgg_tv.pth", "--booster",
                  made["boosters"]["ok"], "--out", out, "--name", "ifta-site-a", "--card", tmp_path / "card.yaml")
    assert r.returncode == 0, r.stderr
    assert leftovers(tmp_path, "bundle") == ["bundle"]            # no temporary folder left beside it

    # The VGG ONNX reproduces the checkpoint's Fc2 output on a [0, 1] input.
    x = np.random.default_rng(0).random((2, 3, 224, 224), dtype=np.float32)
    with torch.no_grad():
        want = made["vgg"].fc2(torch.from_numpy(x)).numpy()
    session = ort(out / "vgg.onnx")
    assert [o.name for o in session.get_outputs()] == ["features"]  # cut at Fc2: no logits
    got = session.run(["features"], {"image": x})[0]
    assert got.shape == (2, FC2) and float(np.abs(got - want).max()) <= 1e-3
    xu = x[:, :1]
    with torch.no_grad():
        want_mask = made["unet_bn"](torch.from_numpy(xu)).numpy()
    assert float(np.abs(ort(out / "unet.onnx").run(["mask"], {"image": xu})[0] - want_mask).max()) <= 1e-4

    from runtime.bundle import Bundle
    bundle = Bundle.load(out)
    m = bundle.manifest
    assert m["name"] == "ifta-site-a" and m["disclaimer"] is None
    assert m["card"] == {"name": "ifta-site-a", "version": "2.0.1", "description": "IFTA grader, site A",
                         "authors": ["A. Author"], "license": "CC-BY-4.0", "intended_use": "research",
                         "data_source": "site A scans"}
    assert m["networks"]["unet"]["architecture"] == "unet-jakeoung-bn-leakyrelu"
    assert m["networks"]["vgg"]["architecture"] == "vgg19_bn-fc2-1024"
    assert m["networks"]["vgg"]["output"]["shape"] == ["N", FC2]
    assert m["booster"]["num_features"] == FC2 and m["booster"]["num_class"] == 4
    assert m["provenance"]["sources"]["vgg"]["layout"] == "vgg-torchvision"
    assert m["networks"]["unet"]["input"]["normalization"] == {"kind": "unit"}
    _, stderr = run_frames(out, made["frames"], tmp_path)
    assert "synthetic" not in stderr


def test_default_jakeoung_unet_from_a_legacy_dataparallel_file_and_a_users_vgg_onnx_with_normalizations(
        made, tmp_path):
    import onnx
    d = made["dir"]
    (tmp_path / "card.json").write_text(json.dumps({"name": "mine", "disclaimer": "research use only"}))
    out = tmp_path / "b2"
    r = sonoscore("export", "--unet", d / "unet_relu.tar", "--vgg-onnx", d / "vgg_user.onnx", "--booster",
                  made["boosters"]["ok"], "--out", out, "--unet-input", "minmax", "--vgg-input", "imagenet",
                  "--card", tmp_path / "card.json", "--version", "1.0")
    assert r.returncode == 0, r.stderr
    from runtime.bundle import Bundle
    m = Bundle.load(out).manifest
    assert m["name"] == "mine" and m["disclaimer"] == "research use only" and m["card"]["version"] == "1.0"
    unet = m["networks"]["unet"]
    assert unet["architecture"] == "unet-jakeoung-relu"
    assert unet["input"]["normalization"] == {"kind": "minmax"}
    assert m["networks"]["vgg"]["input"]["normalization"]["kind"] == "meanstd"
    assert m["networks"]["vgg"]["input"]["name"] == "input" and m["networks"]["vgg"]["output"]["name"] == "fc2"
    assert m["networks"]["vgg"]["architecture"] == "onnx"
    ops = {n.op_type for n in onnx.load(str(out / "unet.onnx")).graph.node}
    assert "Relu" in ops and "LeakyRelu" not in ops and "BatchNormalization" not in ops   # run as trained
    # The exported UNet takes the normalized tensor; its output is the reference network's on that tensor.
    from runtime.normalize import to_input
    img = (np.random.default_rng(3).random((224, 224)) * 200 + 20).astype(np.uint8)
    x = to_input(img, 1, {"kind": "minmax"})
    assert x.min() == 0.0 and x.max() == 1.0
    with torch.no_grad():
        want = made["unet_relu"](torch.from_numpy(x)).numpy()
    assert float(np.abs(ort(out / "unet.onnx").run(["mask"], {"image": x})[0] - want).max()) <= 1e-4
    assert float(unet["parity"]["fp32_vs_torch_max_abs"]) <= 1e-4
    run_frames(out, made["frames"], tmp_path)


def test_users_onnx_files_alone_make_a_bundle(made, tmp_path):
    d = made["dir"]
    out = tmp_path / "b3"
    r = sonoscore("export", "--unet-onnx", d / "unet_user.onnx", "--vgg-onnx", d / "vgg_user.onnx", "--booster",
                  made["boosters"]["ok"], "--out", out)
    assert r.returncode == 0, r.stderr
    from runtime.bundle import Bundle
    b = Bundle.load(out)
    assert (out / "unet.onnx").read_bytes() == (d / "unet_user.onnx").read_bytes()   # copied as given
    assert set(b.precisions) == {"fp32", "fp16"}
    assert b.manifest["name"] == "b3" and b.manifest["disclaimer"] is None
    assert b.manifest["networks"]["unet"]["input"]["name"] == "input.1"
    run_frames(out, made["frames"], tmp_path)


@pytest.mark.parametrize("which,says", [
    ("three", "predicts 3 classes but the bundle grades 4"),
    ("f512", "takes 512 features but --vgg"),
    ("broken", "is not an XGBoost model XGBoost can load"),
])
def test_a_booster_that_does_not_fit_stops_export_at_once_with_nothing_written(made, tmp_path, which, says):
    d = made["dir"]
    out = tmp_path / "new" / "bundle"
    t0 = time.monotonic()
    r = sonoscore("export", "--unet", d / "unet_bn.tar", "--vgg", d / "vgg_tv.pth", "--booster",
                  made["boosters"][which], "--out", out)
    elapsed = time.monotonic() - t0
    assert r.returncode == 2, r.stderr
    assert elapsed < 10
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sonoscore: ") and says in lines[0], r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "new").exists()


def test_an_existing_bundle_is_replaced_only_by_a_complete_one_and_other_folders_are_refused(made, tmp_path):
    """A random-weights timing bundle (the synthetic disclaimer), kept through a failed export, then replaced by a
    user's bundle (no disclaimer)."""
    from runtime.bundle import DEMO_DISCLAIMER, Bundle
    d = made["dir"]
    out = tmp_path / "b"
    r = sonoscore("export", "--random-weights", "--unet-width", "0.0625", "--vgg-width", "0.03125", "--booster",
                  made["boosters"]["ok"], "--out", out)
    assert r.returncode == 0, r.stderr
    m = Bundle.load(out).manifest
    assert m["disclaimer"] == DEMO_DISCLAIMER and m["name"] == "sonoscore-random-weights-timing"
    assert m["provenance"]["random_weights"] is True
    before = (out / "manifest.json").read_bytes()
    r = sonoscore("export", "--unet-onnx", d / "unet_user.onnx", "--vgg-onnx", d / "vgg_user.onnx", "--booster",
                  made["boosters"]["f512"], "--out", out, "--name", "second")
    assert r.returncode == 2 and (out / "manifest.json").read_bytes() == before
    r = sonoscore("export", "--unet-onnx", d / "unet_user.onnx", "--vgg-onnx", d / "vgg_user.onnx", "--booster",
                  made["boosters"]["ok"], "--out", out, "--name", "second")
    assert r.returncode == 0, r.stderr
    m = Bundle.load(out).manifest
    assert m["name"] == "second" and m["disclaimer"] is None
    assert leftovers(tmp_path, "b") == ["b"]
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "keep.txt").write_text("mine")
    r = sonoscore("export", "--unet-onnx", d / "unet_user.onnx", "--vgg-onnx", d / "vgg_user.onnx", "--booster",
                  made["boosters"]["ok"], "--out", mine)
    assert r.returncode == 2 and "holds other files and no bundle" in r.stderr
    assert sorted(p.name for p in mine.iterdir()) == ["keep.txt"]


def test_an_export_interrupted_midway_leaves_no_folder(made, tmp_path):
    d = made["dir"]
    out = tmp_path / "sub" / "bundle"
    proc = subprocess.Popen([sys.executable, "-m", "runtime.cli", "export", "--unet", str(d / "unet_relu.tar"),
                             "--vgg", str(d / "vgg_tv.pth"), "--booster", str(made["boosters"]["ok"]), "--out",
                             str(out)], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:                    # the checks passed: the networks are being exported now
            if line.startswith("export: booster"):
                break
        # Held still as soon as its partial folder appears (exporting the networks takes seconds, the polling
        # milliseconds), so the interrupt lands midway on a fast machine as on a slow one: SIGINT is delivered
        # when the process goes on.
        t_end = time.monotonic() + 60
        while not any(p.name.startswith(".bundle.partial-") for p in (tmp_path / "sub").glob(".*")):
            assert proc.poll() is None and time.monotonic() < t_end, "no partial folder appeared"
            time.sleep(0.01)
        proc.send_signal(signal.SIGSTOP)
        assert proc.poll() is None
        proc.send_signal(signal.SIGINT)
        proc.send_signal(signal.SIGCONT)
        proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    # An interrupt is a clean exit 130 with nothing left. On a fast machine (the whole export takes about a
    # second) the run has been seen to finish with exit 0 instead; then it leaves the complete bundle: never a half
    # one. (Interrupted during a longer export, at full width, it exits 130 and leaves nothing.)
    if proc.returncode == 130:
        assert not (tmp_path / "sub").exists()
    else:
        from runtime.bundle import Bundle
        assert proc.returncode == 0
        Bundle.load(out)
        assert [p.name for p in (tmp_path / "sub").iterdir()] == ["bundle"]


def test_export_with_reference_frames_records_the_scope_and_without_says_so_once(made, tmp_path):
    """--reference-frames: the user's own frames (a folder per patient) give the bundle its scope reference, hashed
    with the networks; without it the bundle is written and one line says it has no reference statistics. The
    gate is opened (--min-mask-fraction 0) so the random-weight UNet's frames reach the fit."""
    from runtime.bundle import Bundle
    from runtime.phantom import KidneyPhantom
    from runtime.scope import FILE
    ref = tmp_path / "reference"
    for p in range(32):
        (ref / f"patient{p:02d}").mkdir(parents=True)
        ph = KidneyPhantom(grade=1 + p % 4, seed=200 + p)
        for i in range(3):
            cv2.imwrite(str(ref / f"patient{p:02d}" / f"f{i}.png"), ph.frame(i * 4).image)
    common = ["export", "--unet", made["dir"] / "unet_bn.tar", "--vgg", made["dir"] / "vgg_tv.pth",
              "--booster", made["boosters"]["ok"], "--min-mask-fraction", "0"]
    r = sonoscore(*common, "--out", tmp_path / "with", "--reference-frames", ref, "--reference-keep", "0.97")
    assert r.returncode == 0, r.stderr
    assert "no reference statistics" not in r.stdout + r.stderr
    m = Bundle.load(tmp_path / "with").manifest
    assert m["scope"]["file"] == FILE and FILE in m["files"] and m["scope"]["keep_share"] == 0.97
    assert m["scope"]["frames"]["held_out_patients"] == 8 and m["scope"]["frames"]["held_out"] == 24
    r = sonoscore(*common, "--out", tmp_path / "without")
    assert r.returncode == 0, r.stderr
    assert (r.stdout + r.stderr).count("has no reference statistics") == 1
    assert "scope" not in Bundle.load(tmp_path / "without").manifest
    bad = sonoscore(*common, "--out", tmp_path / "bad", "--reference-frames", tmp_path / "nowhere")
    assert bad.returncode == 2 and "nowhere" in bad.stderr and not (tmp_path / "bad").exists()
