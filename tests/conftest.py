"""Shared fixtures. The tiny bundle is made by the project's own recipe (sim -> train -> export), at widths small
enough to train in seconds: its grades are meaningless, its plumbing is the real thing."""
import atexit
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Compiled boosters go to a throw-away cache, never the user's, removed when the test run ends.
if "SONOSCORE_CACHE" not in os.environ:
    os.environ["SONOSCORE_CACHE"] = tempfile.mkdtemp(prefix="sonoscore-test-cache-")
    atexit.register(shutil.rmtree, os.environ["SONOSCORE_CACHE"], True)


@pytest.fixture(autouse=True)
def sonoscore_logs_in_caplog(caplog):
    """sonoscore's loggers do not propagate to the root logger (runtime/logs.py), where pytest's caplog listens:
    its handler is added to them for each test, so a test reads their records with caplog as any other's."""
    logger = logging.getLogger("sonoscore")
    logger.addHandler(caplog.handler)
    yield
    logger.removeHandler(caplog.handler)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    from runtime.dataset import write_dataset
    return write_dataset(tmp_path_factory.mktemp("data") / "sim", patients=8, seed=5, frames_per_patient=3,
                         progress=False)


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, tiny_dataset):
    from export.recipe import TrainConfig, train_bundle
    cfg = TrainConfig(unet_width=1 / 16, vgg_width=1 / 32, unet_epochs=1, vgg_epochs=1, seed=0)
    return train_bundle(tiny_dataset, tmp_path_factory.mktemp("bundles") / "tiny", cfg, progress=False)


def sonoscore(*args, timeout=600, **kw):
    """Run the real command line in a subprocess."""
    return subprocess.run([sys.executable, "-m", "runtime.cli", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, **kw)


def cuda_or_skip():
    """pycuda.driver when onnxruntime has its CUDA provider and pycuda sees a device; else the test skips, saying
    which is missing (device/gpu_session.md runs the GPU tests on a lent GPU)."""
    import onnxruntime as ort
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip(f"GPU only: onnxruntime {ort.__version__} here has no CUDAExecutionProvider (onnxruntime-gpu "
                    f"has it; device/gpu_session.md runs these on the lent GPU)")
    try:
        import pycuda.driver as cuda
        cuda.init()
        if cuda.Device.count() < 1:
            pytest.skip("GPU only: pycuda sees no CUDA device")
    except ImportError:
        pytest.skip("GPU only: pycuda is not installed (pip install 'sonoscore[gpu]')")
    except Exception as e:  # pycuda.driver.Error: no driver
        pytest.skip(f"GPU only: CUDA is not usable here ({e})")
    return cuda
