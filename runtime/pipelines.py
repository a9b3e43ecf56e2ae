"""Which pipeline runs a bundle: `open_pipeline(bundle, device="cpu"|"cuda", ...)`, the one factory `run`, `listen`,
`bench` and `eval` get their pipeline from. `cpu` is runtime.pipeline.Pipeline, `cuda` runtime.gpu.pipeline.
DevicePipeline; both are `FramePipeline`s with the same records. (A module of its own: runtime.gpu.pipeline builds on
runtime.pipeline, so the factory that picks between them sits above both.)
"""
from __future__ import annotations

from pathlib import Path

from runtime.bundle import Bundle
from runtime.gpu.pipeline import DevicePipeline
from runtime.pipeline import FramePipeline, Pipeline

DEVICES = ("cpu", "cuda")


def open_pipeline(bundle: Bundle, *, device: str = "cpu", backend: str = "ort", precision: str = "fp32",
                  threads: int | None = None, keep_mask: bool = False, keep_image: bool = False,
                  keep_display: bool = False, cuda_graphs: bool = False, cache_dir: Path | None = None,
                  min_mask_fraction: float | None = None, mask_threshold: float | None = None,
                  booster_backend: str = "auto", scope_open: bool = False, _kernels=None) -> FramePipeline:
    """The pipeline `run`, `listen`, `bench` and `eval` run a bundle with, not yet entered (`with
    open_pipeline(...) as pipe:` loads the networks and the booster; leaving the block releases them).

    device "cpu": `Pipeline`, each network on `backend`'s runner with the frame in host memory (onnxruntime's CPU
    provider, or TensorRT with a copy in and out per network); `threads` is its CPU threads per network.
    device "cuda": `runtime.gpu.pipeline.DevicePipeline`, the frame uploaded once and kept on the GPU (GPU kernels,
    IO binding, `cuda_graphs` with backend ort): the path `sonoscore bench --device cuda` measures.
    keep_mask / keep_image / keep_display: what the sinks need back on the host (the 224x224 mask, the preprocessed
    image, the gray frame to draw on); the device pipeline brings only those back, the CPU pipeline has them all.
    Every record carries frame_shape and frame_region on both. `scope_open`: the scope gate's check runs and is
    recorded but refuses nothing (the bench, which opens the mask gate too). `_kernels`: the bench's profiled GPU
    kernels.

    A bad device, or CUDA graphs on the CPU, is a UserError; `cuda` on a machine without pycuda, the GPU kernels
    or the backend's GPU side is BackendUnavailable: one sentence naming all that is missing, raised here, before
    anything is opened."""
    from runtime.errors import UserError
    if device not in DEVICES:
        raise UserError(f"device '{device}' is unknown; use cpu or cuda")
    if device == "cpu":
        if cuda_graphs:
            raise UserError("CUDA graphs replay the networks on the GPU: they need --device cuda; leave "
                            "--cuda-graphs out with --device cpu")
        return Pipeline(bundle, backend=backend, precision=precision, threads=threads, cache_dir=cache_dir,
                        min_mask_fraction=min_mask_fraction, mask_threshold=mask_threshold,
                        booster_backend=booster_backend, scope_open=scope_open)
    return DevicePipeline(bundle, backend=backend, precision=precision, cuda_graphs=cuda_graphs,
                          booster_backend=booster_backend, cache_dir=cache_dir, min_mask_fraction=min_mask_fraction,
                          mask_threshold=mask_threshold, keep_mask=keep_mask, keep_image=keep_image,
                          keep_display=keep_display, scope_open=scope_open, _kernels=_kernels)
