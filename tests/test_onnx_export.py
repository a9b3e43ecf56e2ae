"""torch -> ONNX: one self-contained opset-17 file per network, the pinned tensor names, dynamic batch, parity.

The networks get random BatchNorm statistics and affine terms first: the exporter folds BN into the convs, and
with the default (0, 1) statistics a wrong fold would go unnoticed.
"""
import numpy as np
import onnx
import pytest
import torch

from export.models import UNet, VGG19BN, VGGFeaturesAndLogits
from export.onnx_export import OPSET, export_unet, export_vgg, ort_session, to_fp16

FP32_TOL = 1e-4
FP16_MASK_TOL = 5e-3  # sigmoid probabilities, absolute
FP16_REL_TOL = 1e-2  # features / logits, relative to the output's largest magnitude


def _randomize_batchnorm(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("onnx")
    unet = _randomize_batchnorm(UNet(width=1 / 8), 1)
    vgg = _randomize_batchnorm(VGG19BN(width=1 / 16, in_channels=3), 2)
    for m in (vgg.fc1, vgg.fc2, vgg.head):  # torchvision's N(0, 0.01) init makes features ~1e-3: scale them up
        torch.nn.init.kaiming_uniform_(m.weight)
    vgg.train()  # exported in eval mode regardless, and handed back in the mode it came in
    info = {"unet": export_unet(unet, d / "unet.onnx"), "vgg": export_vgg(vgg, d / "vgg.onnx")}
    info["modes_after"] = {"unet": unet.training, "vgg": vgg.training}
    vgg.eval()
    half = {name: to_fp16(d / f"{name}.onnx", d / f"{name}.fp16.onnx") for name in ("unet", "vgg")}
    return {"dir": d, "unet": unet, "vgg": vgg, "info": info, "half": half}


def test_export_writes_one_self_contained_opset17_file_per_network(exported):
    d = exported["dir"]
    assert sorted(p.name for p in d.iterdir()) == ["unet.fp16.onnx", "unet.onnx", "vgg.fp16.onnx", "vgg.onnx"]
    for name in ("unet", "vgg"):
        info = exported["info"][name]
        assert info["file"] == f"{name}.onnx" and exported["half"][name]["file"] == f"{name}.fp16.onnx"
        assert info["opset"] == OPSET == 17
        model = onnx.load(str(d / f"{name}.onnx"))
        assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
        assert [(o.domain, o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")] == [("", 17)]
        assert [i.name for i in model.graph.input] == ["image"]
        assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
        assert "BatchNormalization" not in info["ops"]  # folded into the convs by the exporter


def test_export_leaves_the_models_in_the_mode_they_came_in(exported):
    assert exported["info"]["modes_after"] == {"unet": False, "vgg": True}
    # and the VGG went out in eval mode (dropout off, BN running statistics), or parity would be far off
    assert exported["info"]["vgg"]["parity_max_abs"] < FP32_TOL


def test_export_names_and_shapes_match_the_manifest_contract(exported):
    assert exported["info"]["unet"]["inputs"] == {"image": ["N", 1, 224, 224]}
    assert exported["info"]["unet"]["outputs"] == {"mask": ["N", 1, 224, 224]}
    assert exported["info"]["vgg"]["inputs"] == {"image": ["N", 3, 224, 224]}
    assert exported["info"]["vgg"]["outputs"] == {"features": ["N", 1024], "logits": ["N", 4]}


def test_fp32_onnx_matches_torch_within_1e_4(exported):
    assert exported["info"]["unet"]["parity_max_abs"] < FP32_TOL
    assert exported["info"]["vgg"]["parity"]["features"] < FP32_TOL
    assert exported["info"]["vgg"]["parity"]["logits"] < FP32_TOL
    assert [1, 3] == sorted({s[0] for s in exported["info"]["vgg"]["parity_inputs"]} & {1, 3})


@pytest.mark.parametrize("batch", [1, 3])
def test_onnx_runs_any_batch_and_agrees_with_torch(exported, batch):
    rng = np.random.default_rng(batch)
    x1 = (rng.integers(0, 256, (batch, 1, 224, 224)) / 255).astype(np.float32)
    x3 = np.repeat(x1, 3, axis=1)
    mask = ort_session(exported["dir"] / "unet.onnx").run(["mask"], {"image": x1})[0]
    feats, logits = ort_session(exported["dir"] / "vgg.onnx").run(["features", "logits"], {"image": x3})
    with torch.no_grad():
        ref_mask = exported["unet"](torch.from_numpy(x1)).numpy()
        ref_f, ref_l = (t.numpy() for t in VGGFeaturesAndLogits(exported["vgg"])(torch.from_numpy(x3)))
    assert mask.shape == (batch, 1, 224, 224) and feats.shape == (batch, 1024) and logits.shape == (batch, 4)
    assert np.abs(mask - ref_mask).max() < FP32_TOL
    assert np.abs(feats - ref_f).max() < FP32_TOL and np.abs(logits - ref_l).max() < FP32_TOL


def test_fp16_onnx_keeps_float32_io_and_stays_within_tolerance(exported):
    d = exported["dir"]
    for name, outputs in (("unet", ["mask"]), ("vgg", ["features", "logits"])):
        model = onnx.load(str(d / f"{name}.fp16.onnx"))
        assert all(i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for i in model.graph.input)
        assert all(o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for o in model.graph.output)
        assert {t.data_type for t in model.graph.initializer if t.data_type != onnx.TensorProto.INT64} == {
            onnx.TensorProto.FLOAT16}
        assert (d / f"{name}.fp16.onnx").stat().st_size < 0.55 * (d / f"{name}.onnx").stat().st_size
        assert sorted(exported["half"][name]["parity_max_abs"]) == sorted(outputs)
    assert exported["half"]["unet"]["parity_max_abs"]["mask"] < FP16_MASK_TOL
    x = np.repeat((np.random.default_rng(0).random((2, 1, 224, 224))).astype(np.float32), 3, axis=1)
    full = dict(zip(["features", "logits"], ort_session(d / "vgg.onnx").run(["features", "logits"], {"image": x})))
    half = dict(zip(["features", "logits"], ort_session(d / "vgg.fp16.onnx").run(["features", "logits"], {"image": x})))
    for k in ("features", "logits"):
        scale = np.abs(full[k]).max()
        assert scale > 0.1  # a meaningful comparison, not two near-zero vectors
        assert half[k].dtype == np.float32
        assert np.abs(half[k] - full[k]).max() < FP16_REL_TOL * scale
        assert exported["half"]["vgg"]["parity_max_abs"][k] < FP16_REL_TOL * scale * 10
