"""`run`, `listen`, `bench` and `eval` get their pipeline from one factory (runtime.pipelines.open_pipeline):
`--device cuda` is the device-resident pipeline (runtime.gpu.pipeline.DevicePipeline) that `bench --device cuda`
measures, with only what the sinks need brought back from the GPU.

Without a GPU, the device path runs on the host-memory stand-ins of the CUDA device and the GPU kernels
(tests/gpu_harness/stand_ins.py) put in place of what `cuda_parts` returns; everything else (the CLI, run_bundle,
the factory, the pipeline, the onnxruntime runners, the sinks) is the real thing. The bundle is the known-function
one (tests/known_bundle.py: identity UNet, so the mask is the image's bright part; mean-brightness VGG), so frames
with more or less bright area are accepted or rejected for a reason the test draws."""
import importlib.util
import json
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from runtime import preprocess as pp
from runtime.app import RunConfig, run_bundle
from runtime.backends import BackendUnavailable
from runtime.bundle import Bundle
from runtime.errors import UserError
from runtime.pipeline import Pipeline
from runtime.pipelines import open_pipeline
from runtime.sources import Frame

from tests.conftest import sonoscore
from tests.gpu_harness.stand_ins import HostDevice, HostKernels
from tests.known_bundle import write_known_bundle

RADII = (0, 30, 55, 80, 8, 100)        # bright discs: none, too small for the gate's 5 %, ..., most of the frame


@pytest.fixture(scope="module")
def known(tmp_path_factory):
    return write_known_bundle(tmp_path_factory.mktemp("device") / "kb", np.linspace(0, 1, 8)[:, None],
                              np.arange(8) % 4)


@pytest.fixture(scope="module")
def frames_dir(tmp_path_factory):
    """Gray frames 320x240 with a bright disc of each radius on a dim speckled background."""
    d = tmp_path_factory.mktemp("frames")
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[:240, :320]
    for i, r in enumerate(RADII):
        img = rng.integers(10, 60, (240, 320)).astype(np.uint8)
        img[(yy - 120) ** 2 + (xx - 170) ** 2 <= r * r] = 230
        cv2.imwrite(str(d / f"f{i}.png"), img)
    return d


@pytest.fixture
def stand_ins(monkeypatch):
    """The device pipeline's CUDA device and GPU kernels: the host-memory stand-ins (the only thing not real)."""
    from runtime.gpu import pipeline as gpu_pipeline
    monkeypatch.setattr(gpu_pipeline, "cuda_parts", lambda backend, kernels=None: (HostDevice, kernels or HostKernels))
    HostDevice.last = HostKernels.last = None
    return gpu_pipeline


def cuda_missing_here() -> bool:
    from runtime.gpu.pipeline import cuda_parts
    try:
        cuda_parts("ort")
    except BackendUnavailable:
        return True
    return False


def run(known, source, out: Path, device: str, **kw):
    out.mkdir(parents=True, exist_ok=True)
    cfg = RunConfig(bundle=known, source=str(source), device=device, policy="all", quiet=True,
                    results=out / "r.jsonl", **kw)
    stats = run_bundle(cfg)
    return stats, [json.loads(line) for line in (out / "r.jsonl").read_text().splitlines()]


def compare_runs():
    import importlib.util as iu
    spec = iu.spec_from_file_location("compare_runs", Path(__file__).parents[1] / "device" / "compare_runs.py")
    module = iu.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def video_frames(path: Path) -> list[np.ndarray]:
    video, out = cv2.VideoCapture(str(path)), []
    while True:
        ok, img = video.read()
        if not ok:
            break
        out.append(img)
    video.release()
    return out


def same_records(dev: list[dict], cpu: list[dict]):
    assert len(dev) == len(cpu) > 0
    for a, b in zip(dev, cpu):
        assert (a["frame"], a["accepted"], a["grade"], a["error"]) == (b["frame"], b["accepted"], b["grade"],
                                                                       b["error"])
        assert a["mask_fraction"] == pytest.approx(b["mask_fraction"], abs=1e-6)
        if b["probabilities"] is None:
            assert a["probabilities"] is None
        else:
            assert np.abs(np.subtract(a["probabilities"], b["probabilities"])).max() < 1e-5
        assert (a["kidney_length_mm"], a["kidney_area_mm2"], a["size_note"]) == \
               (b["kidney_length_mm"], b["kidney_area_mm2"], b["size_note"])


def test_run_device_cuda_gives_the_cpu_pipelines_records_masks_at_source_size_and_video(known, frames_dir,
                                                                                       tmp_path, stand_ins):
    cpu_dir, masks_dir, video_dir = tmp_path / "cpu", tmp_path / "cuda-masks", tmp_path / "cuda-video"
    _, cpu = run(known, frames_dir, cpu_dir, "cpu", masks=cpu_dir / "masks", mask_size="original",
                 video=cpu_dir / "v.mp4")
    assert HostDevice.last is None                                    # the CPU pipeline: no device
    # --save-masks --mask-size original alone: every frame's mask comes back, placed in its source frame
    stats, dev = run(known, frames_dir, masks_dir, "cuda", masks=masks_dir / "masks", mask_size="original")
    same_records(dev, cpu)
    assert [r["accepted"] for r in dev] == [False, False, True, True, False, True]   # 5 % of the image or more
    assert stats.frames == len(RADII) and stats.accepted == 3
    # the device pipeline ran: one host wait per frame, and the mask of every frame came back
    assert HostDevice.last.syncs == len(RADII) and HostKernels.last.mask_downloads == len(RADII)
    assert HostDevice.last.closed
    for i in range(len(RADII)):
        a = cv2.imread(str(masks_dir / "masks" / f"{i}.png"), cv2.IMREAD_UNCHANGED)
        b = cv2.imread(str(cpu_dir / "masks" / f"{i}.png"), cv2.IMREAD_UNCHANGED)
        assert a.shape == (240, 320) and np.array_equal(a, b)         # the source frame's size, as on the CPU
    assert cv2.imread(str(masks_dir / "masks" / "3.png"), cv2.IMREAD_UNCHANGED).any()
    # device/compare_runs.py, which the GPU session runs on the two runs' outputs, says the same
    figures = compare_runs().compare(*(compare_runs().records(d / "r.jsonl") for d in (cpu_dir, masks_dir)),
                                     masks=(cpu_dir / "masks", masks_dir / "masks"))
    assert (figures["gate_agreement"], figures["grade_agreement"], figures["accepted"]) == (1.0, 1.0, [3, 3])
    assert figures["masks"] == {"compared": len(RADII), "missing_in_second": 0, "mean_iou": 1.0, "min_iou": 1.0}
    # --video alone: the frame and its mask come back to be drawn
    _, dev = run(known, frames_dir, video_dir, "cuda", video=video_dir / "v.mp4")
    same_records(dev, cpu)
    assert HostKernels.last.mask_downloads == len(RADII)
    shown, cpu_shown = video_frames(video_dir / "v.mp4"), video_frames(cpu_dir / "v.mp4")
    assert len(shown) == len(cpu_shown) == len(RADII)
    for a, b in zip(shown, cpu_shown):      # the same frame and mask drawn (latency text apart)
        assert a.shape == b.shape and np.abs(a.astype(int) - b.astype(int)).mean() < 1.0


def test_with_results_only_nothing_but_the_features_and_the_fraction_comes_back(known, frames_dir, tmp_path,
                                                                               stand_ins):
    _, cpu = run(known, frames_dir, tmp_path / "cpu", "cpu")
    _, dev = run(known, frames_dir, tmp_path / "cuda", "cuda")
    same_records(dev, cpu)
    # image files carry no pixel spacing: no kidney size, so no mask is needed on the host
    assert HostDevice.last.syncs == len(RADII) and HostKernels.last.mask_downloads == 0


def test_kidney_size_on_the_device_path_brings_the_mask_of_accepted_frames_only(known, stand_ins):
    """Frames with a pixel spacing: an accepted frame's mask (and probabilities and image) come back for its
    kidney's length and area, the same as the CPU pipeline's; a rejected frame's do not."""
    b = Bundle.load(known)
    yy, xx = np.mgrid[:224, :224]
    meta = {"pixel_spacing_rc_mm": (0.5, 0.5)}
    frames = []
    for i, r in enumerate((60, 5, 40)):
        px = np.full((224, 224), 20, np.uint8)
        px[(yy - 112) ** 2 + (xx - 112) ** 2 <= r * r] = 235
        frames.append(Frame(i, "sim-x", time.time(), px, region=pp.Region(0, 0, 224, 224), meta=meta))
    with Pipeline(b, threads=1) as cpu, open_pipeline(b, device="cuda") as dev:
        recs = [(dev.process(f), cpu.process(f)) for f in frames]
    assert [d.accepted for d, _ in recs] == [True, False, True]
    for d, c in recs:
        assert (d.kidney_length_mm, d.kidney_area_mm2, d.size_note) == (c.kidney_length_mm, c.kidney_area_mm2,
                                                                         c.size_note)
        assert d.mask is None                      # used for the size, not kept: no sink asked for it
    assert recs[0][0].kidney_length_mm == pytest.approx(60.5, abs=1.0)
    assert HostKernels.last.mask_downloads == 2


def test_burned_in_dicom_frames_give_the_same_records_regions_and_source_sized_masks(known, tmp_path, stand_ins):
    """A DICOM frame that may carry burned-in text: its scan sector only goes up; the record's regions and the
    saved masks at the source frame's size are the CPU pipeline's."""
    pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file
    path = get_testdata_file("US1_UNCR.dcm", download=False)
    if not path:
        pytest.skip("pydicom-data is not installed")
    kw = lambda d: dict(masks=d / "masks", mask_size="original", video=d / "v.mp4")  # noqa: E731
    _, cpu = run(known, path, tmp_path / "cpu", "cpu", **kw(tmp_path / "cpu"))
    _, dev = run(known, path, tmp_path / "cuda", "cuda", **kw(tmp_path / "cuda"))
    same_records(dev, cpu)
    names = sorted(p.name for p in (tmp_path / "cpu" / "masks").iterdir())
    assert names and names == sorted(p.name for p in (tmp_path / "cuda" / "masks").iterdir())
    for n in names:
        a = cv2.imread(str(tmp_path / "cuda" / "masks" / n), cv2.IMREAD_UNCHANGED)
        b = cv2.imread(str(tmp_path / "cpu" / "masks" / n), cv2.IMREAD_UNCHANGED)
        assert np.array_equal(a, b)


def test_device_records_carry_the_regions_the_cpu_pipeline_sets(known, stand_ins):
    """frame_shape, frame_region (source frame) and region (inside what is shown) as the CPU pipeline sets them,
    with and without the display brought back, for a frame shown whole and one shown cut to its region."""
    b = Bundle.load(known)
    px = np.full((200, 300), 30, np.uint8)
    px[60:150, 90:220] = 220
    region = pp.Region(40, 20, 280, 190)
    frames = [Frame(0, "s", time.time(), px, region=region),
              Frame(1, "s", time.time(), px, region=region, meta={"burned_in_annotation": True})]
    with Pipeline(b, threads=1) as cpu, open_pipeline(b, device="cuda") as bare, \
            open_pipeline(b, device="cuda", keep_display=True, keep_mask=True) as shown:
        for f in frames:
            c, d, s = cpu.process(f), bare.process(f), shown.process(f)
            for rec in (d, s):
                assert (rec.frame_shape, rec.frame_region, rec.region) == (c.frame_shape, c.frame_region, c.region)
            assert d.display is None and d.mask is None
            assert np.array_equal(s.display, c.display) and np.array_equal(s.mask, c.mask)
    assert frames[1].meta and c.region == pp.Region(0, 0, 240, 170)


@pytest.mark.skipif(not cuda_missing_here(), reason="this machine has what --device cuda needs")
def test_run_device_cuda_without_cuda_exits_2_with_one_sentence_before_anything_is_opened(known, frames_dir,
                                                                                         tmp_path):
    out = tmp_path / "r.jsonl"
    r = sonoscore("run", "--bundle", known, "--source", frames_dir, "--device", "cuda", "--results", out,
                  timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith("sonoscore: the device pipeline needs ")
    assert lines[0].endswith(", which this machine lacks; use the CPU pipeline (--device cpu)")
    missing = [w for w in ("pycuda", "the GPU kernels", "onnxruntime's CUDA execution provider")
               if w in lines[0]]
    assert missing and ("pycuda" in missing) == (importlib.util.find_spec("pycuda") is None)
    assert not out.exists() and not r.stdout


def test_the_device_is_checked_in_one_sentence_each(known, frames_dir, tmp_path, monkeypatch, capsys):
    from runtime.cli import main
    base = ["run", "--bundle", str(known), "--source", str(frames_dir), "--quiet"]
    monkeypatch.setenv("SONOSCORE_DEVICE", "gpu")
    assert main(base) == 2
    assert capsys.readouterr().err.strip() == ("sonoscore: SONOSCORE_DEVICE is 'gpu' in the environment; set it "
                                               "to cpu or cuda (or give --device)")
    monkeypatch.setenv("SONOSCORE_DEVICE", "cpu")
    assert main(base + ["--cuda-graphs"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--cuda-graphs" in err and "--device cuda" in err
    with pytest.raises(UserError, match="^device 'tpu' is unknown; use cpu or cuda$"):
        open_pipeline(Bundle.load(known), device="tpu")


def test_sonoscore_device_in_the_environment_picks_the_device_pipeline(known, frames_dir, tmp_path, monkeypatch,
                                                                      stand_ins, capsys):
    """The service's env file sets SONOSCORE_DEVICE; --device wins over it."""
    from runtime.cli import main
    monkeypatch.setenv("SONOSCORE_DEVICE", "cuda")
    base = ["run", "--bundle", str(known), "--source", str(frames_dir), "--quiet", "--policy", "all"]
    assert main(base) == 0
    assert HostDevice.last is not None and HostDevice.last.syncs == len(RADII)
    assert "frames on the GPU" in capsys.readouterr().err
    HostDevice.last = None
    assert main(base + ["--device", "cpu"]) == 0
    assert HostDevice.last is None


def test_cuda_graphs_reach_the_device_pipeline_and_trt_refuses_them(known, stand_ins):
    b = Bundle.load(known)
    pipe = open_pipeline(b, device="cuda", cuda_graphs=True)
    assert pipe.cuda_graphs and type(pipe).__name__ == "DevicePipeline"
    with pytest.raises(BackendUnavailable, match="CUDA graphs are implemented for the ort backend"):
        open_pipeline(b, device="cuda", backend="trt", cuda_graphs=True)


# -- listen --------------------------------------------------------------------------------------------------------

def listen_config(path: Path, **processing) -> Path:
    yaml = pytest.importorskip("yaml")
    doc = {"listen": {"ae_title": "SONOSCORE", "port": 11112, "bind": "127.0.0.1", "spool": "spool"},
           "outbox": {"dir": "outbox"},
           "destinations": [{"name": "pacs", "type": "cstore", "host": "127.0.0.1", "port": 104,
                             "called_ae": "PACS"}]}
    if processing:
        doc["processing"] = processing
    path.write_text(yaml.safe_dump(doc))
    return path


def test_listen_config_takes_processing_device_and_refuses_a_bad_one(tmp_path):
    pytest.importorskip("jsonschema")
    from runtime.dicomnet.config import ConfigError, load_config
    assert load_config(listen_config(tmp_path / "a.yaml"), listen=True).device == "cpu"
    for device in ("cpu", "cuda"):
        cfg = load_config(listen_config(tmp_path / f"{device}.yaml", device=device), listen=True)
        assert cfg.device == device
    bad = listen_config(tmp_path / "bad.yaml", device="gpu")
    with pytest.raises(ConfigError) as e:
        load_config(bad, listen=True)
    lines = str(e.value).strip().splitlines()
    assert len(lines) == 1 and "'processing.device'" in lines[0] and str(bad) in lines[0], lines


@pytest.mark.skipif(not cuda_missing_here(), reason="this machine has what --device cuda needs")
def test_listen_on_cuda_without_cuda_exits_2_with_one_sentence_before_the_port_opens(known, tmp_path):
    pytest.importorskip("pynetdicom")
    cfg = listen_config(tmp_path / "l.yaml", device="cuda", bundle=str(known))
    r = sonoscore("listen", "--config", cfg, timeout=60)      # on the CPU pipeline it would listen, and time out
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("sonoscore: the device pipeline needs ")
    cfg = listen_config(tmp_path / "c.yaml", device="cpu", bundle=str(known))   # --device wins over the file
    r = sonoscore("listen", "--config", cfg, "--device", "cuda", timeout=60)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("sonoscore: the device pipeline needs ")


# -- the service ---------------------------------------------------------------------------------------------------

def test_the_service_env_file_sets_the_device_run_reads(monkeypatch):
    """device/sonoscore.env (the unit's EnvironmentFile) sets SONOSCORE_DEVICE, which `run` takes as --device; the
    unit puts the CUDA toolkit's bin folder (nvcc, for the GPU kernels) on PATH, and setup.sh writes its CUDA_ROOT."""
    from runtime.cli.streaming import run_device
    root = Path(__file__).parents[1] / "device"
    settings = dict(ln.split("=", 1) for ln in (root / "sonoscore.env").read_text().splitlines()
                    if ln and not ln.startswith("#"))
    monkeypatch.setenv("SONOSCORE_DEVICE", settings["SONOSCORE_DEVICE"])
    assert run_device(None) == settings["SONOSCORE_DEVICE"] in ("cpu", "cuda")
    assert run_device("cuda") == "cuda"
    unit = (root / "sonoscore.service").read_text()
    assert "\nEnvironment=PATH=/usr/local/cuda/bin:" in unit
    assert unit.index("Environment=PATH=") < unit.index("EnvironmentFile=")   # the env file may still override it
    assert 's#/usr/local/cuda/bin#$CUDA_ROOT/bin#g' in (root / "setup.sh").read_text()


def test_run_device_options_become_the_run_config(monkeypatch):
    import runtime.app
    from runtime.app import RunConfig
    from runtime.cli import EXIT_OK, main
    from runtime.stream import StreamStats
    seen = []
    monkeypatch.setattr(runtime.app, "run_bundle", lambda config: seen.append(config) or StreamStats())
    monkeypatch.delenv("SONOSCORE_DEVICE", raising=False)
    assert main(["run", "--bundle", "b", "--source", "s", "--device", "cuda", "--cuda-graphs"]) == EXIT_OK
    assert main(["run", "--bundle", "b", "--source", "s"]) == EXIT_OK
    assert seen == [RunConfig("b", "s", device="cuda", cuda_graphs=True), RunConfig("b", "s", device="cpu")]
