"""scripts/booster_int8_copies.py's --feature-noise yardstick: the noise is what its docstring says (seeded, about S
times each frame's feature norm, clipped at 0, rejected frames left alone), a run on the tiny bundle reports the
noisy FP32 features as another run graded by every booster (no noise: the FP32 grades exactly), and a bad level is
one sentence. No figure here depends on trained weights or on INT8 kernels."""
import dataclasses
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from runtime.bundle import write_manifest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "booster_int8_copies.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("booster_int8_copies", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@dataclasses.dataclass
class _Run:
    features: np.ndarray


def test_feature_noise_is_seeded_scaled_to_each_frame_and_clipped(script):
    rng = np.random.default_rng(3)
    f = np.vstack([10 + rng.random((3, 4096)), np.full((1, 4096), np.nan), 0.01 * rng.random((1, 4096))])
    f[0] *= 5                                                     # frames of different norms
    run = _Run(f.astype(np.float32))
    assert np.array_equal(script.feature_noise(run, 0.0).features, run.features, equal_nan=True)
    a, b = script.feature_noise(run, 0.05), script.feature_noise(run, 0.05)
    assert np.array_equal(a.features, b.features, equal_nan=True)  # seeded: the same on every run
    assert not np.array_equal(a.features, script.feature_noise(run, 0.05, seed=1).features, equal_nan=True)
    d = a.features[:3].astype(np.float64) - f[:3]
    rel = np.linalg.norm(d, axis=1) / np.linalg.norm(f[:3], axis=1)
    assert np.allclose(rel, 0.05, rtol=0.05)                      # about S times each frame's own norm
    assert np.isnan(a.features[3]).all()                          # a rejected frame stays not-a-number
    loud = script.feature_noise(run, 50.0).features
    assert loud[4].min() == 0.0 and (loud[4] > 0).any()           # clipped at 0, as ReLU outputs are


def test_a_run_reports_noisy_fp32_features_as_a_run_and_zero_noise_is_fp32(script, tiny_bundle, tiny_dataset,
                                                                          tmp_path, capsys):
    from calibration.run import calibrate_bundle
    b = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, b)
    m = json.loads((b / "manifest.json").read_text())
    m["gate"]["min_mask_fraction"] = 0.0      # every frame graded, whatever the tiny UNet finds
    write_manifest(b, m)
    calibrate_bundle(b, ["sim://kidney?frames=8&fps=0&seed=5"], count=4, holdout=4, timing_only=True, quiet=True)
    out = tmp_path / "r.json"
    rc = script.main(["--bundle", str(b), "--train-data", str(tiny_dataset), "--data", str(tiny_dataset),
                      "--feature-noise", "0,0.5", "--json", str(out)])
    assert rc == 0
    d = json.loads(out.read_text())
    assert d["feature_noise"] == [0.0, 0.5]
    stdout = capsys.readouterr().out
    for set_name, r in d["sets"].items():
        for booster, per in r["scores"].items():
            if "mean over seeds" in booster:
                continue
            zero, half = per["fp32 features + noise 0"], per["fp32 features + noise 0.5"]
            assert zero["grade_agreement"] == 1.0 and zero["feature_cosine_mean"] == pytest.approx(1.0, abs=1e-6)
            assert zero["frames_accepted_by_both"] == half["frames_accepted_by_both"] > 0
            assert half["feature_cosine_mean"] < 0.99
    assert "FP32 features + noise 0.5 (bundle booster): feature cosine" in stdout


@pytest.mark.parametrize("level", ["-1", "loud", "nan"])
def test_a_bad_noise_level_is_one_sentence(tiny_bundle, tiny_dataset, level):
    r = subprocess.run([sys.executable, str(SCRIPT), "--bundle", str(tiny_bundle), "--train-data", str(tiny_dataset),
                        "--data", str(tiny_dataset), "--feature-noise", f"0.1,{level}"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    message = r.stderr.strip()
    assert message.startswith("booster_int8_copies: --feature-noise") and f"holds {level}," in message, message
    assert "\n" not in message and "Traceback" not in message and message.count(". ") == 0
