"""The onnxruntime runner on a small real model: metadata by name, dynamic batch, numbers, and one-sentence errors
for every way a caller can get the feeds wrong. Also the backend registry that `sonoscore doctor` prints."""
import importlib.util
import os

import numpy as np
import onnxruntime as ort
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper  # noqa: E402

from runtime.backends import BackendUnavailable, TensorMeta, available_backends, make_runner  # noqa: E402
from runtime.backends.ort import OrtRunner  # noqa: E402


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """mask = sigmoid(image * gain), mean = mean of image over C, H, W (per batch item); batch is dynamic."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["image", "gain"], ["scaled"]),
         helper.make_node("Sigmoid", ["scaled"], ["mask"]),
         helper.make_node("ReduceMean", ["image"], ["mean"], axes=[1, 2, 3], keepdims=0)],
        "tiny",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, 8, 8]),
         helper.make_tensor_value_info("gain", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["batch", 1, 8, 8]),
         helper.make_tensor_value_info("mean", TensorProto.FLOAT, ["batch"])])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.checker.check_model(m)
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    onnx.save(m, str(path))
    return path


def feeds(batch=1, dtype=np.float32, seed=0):
    x = np.random.default_rng(seed).normal(size=(batch, 1, 8, 8)).astype(dtype)
    return {"image": x, "gain": np.array([2.0], dtype)}


def expected(f):
    x, g = f["image"].astype(np.float32), f["gain"].astype(np.float32)
    return 1 / (1 + np.exp(-x * g)), x.mean(axis=(1, 2, 3))


def test_metadata_names_shapes_dtypes_and_providers(model):
    with OrtRunner(model) as r:
        assert r.inputs == {"image": TensorMeta(("batch", 1, 8, 8), np.dtype(np.float32)),
                            "gain": TensorMeta((1,), np.dtype(np.float32))}
        assert r.outputs == {"mask": TensorMeta(("batch", 1, 8, 8), np.dtype(np.float32)),
                             "mean": TensorMeta(("batch",), np.dtype(np.float32))}
        assert r.providers == ["CPUExecutionProvider"]
        assert r.intra_op_threads == os.cpu_count()
        assert str(r.inputs["image"]) == "float32[batch, 1, 8, 8]"


@pytest.mark.parametrize("batch", [1, 3])
def test_infer_matches_numpy_for_any_batch(model, batch):
    f = feeds(batch)
    mask, mean = expected(f)
    with OrtRunner(model, intra_op_threads=1) as r:
        out = r.infer(f)
    assert set(out) == {"mask", "mean"}
    assert out["mask"].shape == (batch, 1, 8, 8) and out["mean"].shape == (batch,)
    assert np.abs(out["mask"] - mask).max() < 1e-6
    assert np.abs(out["mean"] - mean).max() < 1e-6


def test_infer_returns_only_the_outputs_asked_for(model):
    with make_runner("ort", model, intra_op_threads=1) as r:
        out = r.infer(feeds(), ["mean"])
    assert list(out) == ["mean"]
    assert abs(out["mean"][0] - expected(feeds())[1][0]) < 1e-6


def test_float64_feeds_are_cast_to_the_float32_the_model_wants(model):
    with OrtRunner(model, intra_op_threads=1) as r:
        a = r.infer(feeds(2, np.float64))["mask"]
        b = r.infer(feeds(2, np.float32))["mask"]
    assert a.dtype == np.float32 and np.array_equal(a, b)


def test_feed_mistakes_are_one_sentence_errors_naming_the_tensor(model):
    with OrtRunner(model, intra_op_threads=1) as r:
        with pytest.raises(ValueError, match=r"model 'tiny.onnx' has no input 'imgae'; its inputs are 'image'"):
            r.infer({"imgae": feeds()["image"], "gain": feeds()["gain"]})
        with pytest.raises(ValueError, match=r"input 'gain' of model 'tiny.onnx' is missing from the feeds"):
            r.infer({"image": feeds()["image"]})
        with pytest.raises(ValueError, match=r"has no output 'logits'; its outputs are 'mask'"):
            r.infer(feeds(), ["logits"])
        with pytest.raises(TypeError, match=r"input 'image' of model 'tiny.onnx' must be float32, got uint8"):
            r.infer({"image": np.zeros((1, 1, 8, 8), np.uint8), "gain": feeds()["gain"]})
        with pytest.raises(ValueError, match=r"input 'image' .* has shape \(1, 8, 8\), but the model takes "
                                             r"float32\[batch, 1, 8, 8\]"):
            r.infer({"image": np.zeros((1, 8, 8), np.float32), "gain": feeds()["gain"]})
        with pytest.raises(ValueError, match=r"has shape \(1, 1, 16, 16\)"):
            r.infer({"image": np.zeros((1, 1, 16, 16), np.float32), "gain": feeds()["gain"]})


def test_the_session_lives_only_inside_the_context(model):
    r = OrtRunner(model)
    with pytest.raises(RuntimeError, match="not active; use it inside `with OrtRunner"):
        r.infer(feeds())
    with r:
        r.infer(feeds())
        with pytest.raises(RuntimeError, match="already active"):
            r.__enter__()
    with pytest.raises(RuntimeError, match="not active"):
        r.inputs
    with pytest.raises(FileNotFoundError, match="does not exist"):
        OrtRunner(model.parent / "missing.onnx").__enter__()


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="this onnxruntime has CUDA")
def test_cuda_on_a_cpu_only_onnxruntime_is_one_clear_sentence(model):
    with pytest.raises(BackendUnavailable, match=r"execution provider 'cuda' is not available in the installed "
                                                 r"onnxruntime .*onnxruntime-gpu"):
        OrtRunner(model, providers=["cuda"])
    with pytest.raises(BackendUnavailable, match="CUDA graphs .* need the CUDA execution provider"):
        OrtRunner(model, cuda_graphs=True)
    with pytest.raises(BackendUnavailable, match="'warp' is not available"):
        OrtRunner(model, providers=["warp"])


def test_make_runner_and_available_backends_say_what_runs_here(model):
    assert isinstance(make_runner("ort", model), OrtRunner)
    if importlib.util.find_spec("runtime.backends.trt") is None:
        with pytest.raises(BackendUnavailable, match=r"the TensorRT backend needs TensorRT's Python bindings "
                                                     r"\(from JetPack or NVIDIA's package index\) and is not "
                                                     r"available in this install"):
            make_runner("trt", model)
    with pytest.raises(BackendUnavailable, match="backend 'tvm' is unknown; use one of ort, trt"):
        make_runner("tvm", model)
    report = available_backends()
    assert report["ort"] == "ok" and report["ort:CPUExecutionProvider"] == "ok"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert report["ort:CUDAExecutionProvider"].startswith("not in this onnxruntime")
    if importlib.util.find_spec("tensorrt") is None:
        assert "TensorRT" in report["trt"] and report["trt"] != "ok"
