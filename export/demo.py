"""`sonoscore demo`: build the demo bundle if it is missing, then run it on the simulated probe.

out/demo/
  bundle/          the trained demo bundle (synthetic phantom, small widths)
  data/train,      synthetic labelled datasets (labelme), made by `sonoscore sim`
  data/heldout
  results.jsonl    one record per streamed frame
  overlay.mp4      the annotated stream
  summary.json     the study aggregate
  eval.json        metrics on held-out synthetic patients (+ eval.confusion.png)
  calibration.json the INT8 accuracy report (INT8 and FP16 against FP32 on frames not used for calibration)
  bench.json       `sonoscore bench --precision fp32,int8` at full width 1.0 of both networks (random weights:
                   timing only), the two precisions taking turns frame by frame; INT8 quantizes the networks
                   the demo bundle's INT8 set quantizes (calibrate_bench)
  bench.png        its latency picture
"""
from __future__ import annotations

import time
from pathlib import Path

from runtime import logs
from runtime.bundle import Bundle, BundleError

# Sized so the first run (install excluded) fits well inside 15 minutes on a 2-core machine.
TRAIN_PATIENTS, TRAIN_FRAMES = 112, 8      # more patients, not more frames, is what generalises to new patients
HELDOUT_PATIENTS, HELDOUT_FRAMES = 64, 6

log = logs.get("demo")


def _bundle_ok(path: Path) -> bool:
    try:
        Bundle.load(path)
        return True
    except BundleError:
        return False


def _heldout(heldout: Path) -> None:
    from runtime.dataset import write_dataset
    if not (heldout / "labels.csv").is_file():
        log.info(f"demo: simulating {HELDOUT_PATIENTS} held-out patients (never seen in training)")
        write_dataset(heldout, HELDOUT_PATIENTS, seed=1000, frames_per_patient=HELDOUT_FRAMES)


def _calibrate_demo(bundle: Path, out: Path) -> None:
    """INT8 for the demo bundle: calibrated on training frames, checked on the training frames it did not use
    and on every held-out patient's frames. Both networks in INT8 when they pass, else the VGG alone (the UNet stays
    FP32) when that passes; a missed threshold leaves the bundle FP32/FP16 and says so."""
    from calibration.run import CalibrationFailed, calibrate_bundle
    report = out / "calibration.json"
    if report.is_file() and report.stat().st_mtime > (bundle / "manifest.json").stat().st_mtime:
        log.info(f"demo: INT8 for this bundle was already tried and missed its accuracy check ({report}); the demo "
             f"runs FP32 (delete that file to calibrate again)")
        return
    log.info("demo: calibrating INT8 networks (Q/DQ ONNX) and checking them against FP32")
    try:
        calibrate_bundle(bundle, [str(out / "data" / "train" / "images")],
                         check=[str(out / "data" / "heldout" / "images")], report=report, networks="auto")
    except CalibrationFailed as e:
        log.info(f"demo: {e}")


def calibrate_bench(bundle: Path, bench: Path, *, frames: str = "sim://kidney?frames=32&fps=0&seed=5",
                    count: int = 16) -> tuple[str, ...]:
    """INT8 for the full-width timing bundle, quantizing the networks the demo bundle's INT8 set quantizes, so
    bench.json times the set that passed its accuracy check (random weights: accuracy is not checked here). Both
    networks when the demo bundle has no INT8 set. Calibrates again when the timing bundle's set differs."""
    from calibration.run import calibrate_bundle
    chosen = tuple(Bundle.load(bundle).int8_networks)
    want = chosen or ("unet", "vgg")
    timing = Bundle.load(bench)
    if "int8" in timing.precisions and tuple(timing.int8_networks) == want:
        return want
    if chosen:
        what = " and ".join({"unet": "UNet", "vgg": "VGG"}[n] for n in want) + (
            " (the UNet stays FP32)" if "unet" not in want else "")
        log.info(f"demo: INT8 for the full-width timing bundle, as in the demo bundle's INT8 set: {what}; random "
             f"weights, so timing only")
    else:
        log.info("demo: the demo bundle has no INT8 set; the full-width timing bundle quantizes both networks, timing "
             "only (random weights)")
    calibrate_bundle(bench, [frames], count=count, holdout=count, timing_only=True, networks=want,
                     report=bench / "calibration_report.json")
    return want


def run_demo(out: Path, *, frames: int = 150, fps: float = 30.0, bench_frames: int = 20, rebuild: bool = False,
             grade: int = 3, seed: int = 11) -> None:
    from export.bundle_export import export_from_checkpoints
    from export.recipe import TrainConfig, train_bundle
    from runtime.app import RunConfig, run_bundle
    from runtime.bench import bench_bundle
    from runtime.evaluate import evaluate_bundle
    from runtime.dataset import write_dataset

    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    bundle = out / "bundle"
    heldout = out / "data" / "heldout"
    if rebuild or not _bundle_ok(bundle):
        log.info(f"demo: no demo bundle yet: building it (synthetic phantom -> training -> export) in {bundle}")
        train_data = out / "data" / "train"
        if rebuild or not (train_data / "labels.csv").is_file():
            log.info(f"demo: simulating {TRAIN_PATIENTS} training patients x {TRAIN_FRAMES} frames")
            write_dataset(train_data, TRAIN_PATIENTS, seed=0, frames_per_patient=TRAIN_FRAMES)
        _heldout(heldout)
        # `train --qat`: the INT8 set comes from quantization-aware training, installed when calibrate's check
        # passes on the validation patients and on the held-out ones (report: calibration.json).
        train_bundle(train_data, bundle, TrainConfig(demo=True, qat=True), check=[str(heldout / "images")],
                     report=out / "calibration.json")
    else:
        log.info(f"demo: using the existing bundle {bundle} (--rebuild to make a new one)")
    _heldout(heldout)

    loaded = Bundle.load(bundle)
    if "scope" not in loaded.manifest and (out / "data" / "train" / "labels.csv").is_file():
        # a bundle built before `train` fitted the scope reference: fitted now, once, as `sonoscore scope` would
        from runtime.scope_fit import fit_or_warn
        log.info("demo: the bundle has no scope reference; fitting it on the demo's training data")
        fit_or_warn(bundle, out / "data" / "train", who="demo", say=log.info)
        loaded = Bundle.load(bundle)
    if "int8" not in loaded.precisions:
        if loaded.manifest.get("provenance", {}).get("config", {}).get("qat"):
            log.info(f"demo: the quantization-aware INT8 set missed its accuracy check ({out / 'calibration.json'}); "
                 f"the demo runs FP32")
        else:
            _calibrate_demo(bundle, out)

    source = f"sim://kidney?grade={grade}&fps={fps:g}&frames={frames}&seed={seed}"
    log.info(f"demo: streaming the simulated probe {source}")
    run_bundle(RunConfig(bundle, source, results=out / "results.jsonl", video=out / "overlay.mp4",
                         summary=out / "summary.json"))

    log.info("demo: evaluating on held-out synthetic patients")
    evaluate_bundle(bundle, heldout, report=out / "eval.json", quiet=True)

    bench = out / "bench_bundle"
    if not _bundle_ok(bench):
        log.info("demo: exporting a full-width (1.0) UNet + VGG-19-BN with random weights for timing")
        export_from_checkpoints(None, None, bundle / "booster.ubj", bench, random_weights=True)
    calibrate_bench(bundle, bench)
    log.info(f"demo: benchmarking the full-width networks, FP32 and INT8 ({bench_frames} frames)")
    bench_bundle(bench, precision="fp32,int8", frames=bench_frames, json_path=out / "bench.json",
                 plot=out / "bench.png")
    log.info(f"demo: done in {time.time() - t0:.0f} s; outputs in {out}/ "
         f"(results.jsonl, overlay.mp4, summary.json, eval.json, bench.json)")
