"""`sonoscore calibrate --diagnose` (calibration/diagnose.py) on the tiny bundle: each quantized UNet layer back in
float in turn, ranked; the figures are the ones computed here independently (simulated quantization, the same on
every x86 CPU), the bundle's own INT8 file is the one diagnosed when it has one, and a layer made worse in that file
goes to the top of the ranking. Nothing here depends on trained weights: the checks compare the command with the
same computation done here."""
import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from calibration.quantize import float_layers, quantize_int8, quantized_layers, spread_indices
from calibration.run import read_frames
from runtime.bundle import Bundle
from runtime.pipeline import Pipeline
from tests.conftest import sonoscore

SIM = "sim://kidney?frames=16&fps=0&seed=4"


def diagnose(b, out):
    r = sonoscore("calibrate", "--bundle", b, "--frames", SIM, "--count", 8, "--holdout", 8, "--diagnose",
                  "--networks", "unet", "--report", out)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r, json.loads(out.read_text())["networks"]["unet"]


@pytest.fixture(scope="module")
def setup(tiny_bundle, tmp_path_factory):
    d = tmp_path_factory.mktemp("diagnose")
    b = d / "bundle"
    shutil.copytree(tiny_bundle, b)
    bundle = Bundle.load(b)
    data = read_frames([SIM], Pipeline(bundle), max_frames=3000, quiet=True)
    calib = [data.images[i] for i in spread_indices(len(data.images), 8)]
    return d, b, bundle, calib


def masks(model, bundle, calib):
    """The UNet's masks on the calibration frames, computed here: simulated quantization, the manifest's threshold."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    s = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    g = bundle.graph()
    name = s.get_inputs()[0].name
    return np.stack([s.run(None, {name: g.unet_feeds(img)[name]})[0][0, 0] > g.mask_threshold for img in calib])


def test_diagnose_ranks_the_layers_by_the_mask_pixels_each_one_in_float_gives_back(setup):
    d, b, bundle, calib = setup
    r, unet = diagnose(b, d / "first.json")
    assert unet["int8_file"] == "quantized here (minmax)" and not (b / "calibration-rejected").exists()
    # the file it quantized, made again here from the same frames
    g = bundle.graph()
    quantize_int8(bundle.network_file("unet", "fp32"), d / "unet.int8.onnx", g.unet_input,
                  [g.unet_feeds(img)[g.unet_input] for img in calib])
    qdq, fp32 = onnx.load(str(d / "unet.int8.onnx")), onnx.load(str(bundle.network_file("unet", "fp32")))
    layers = quantized_layers(qdq)
    assert sorted(unet["rank"]) == sorted(layers) and len(layers) > 8
    ref = masks(fp32, bundle, calib)
    assert unet["all_int8"] == int((masks(qdq, bundle, calib) != ref).sum())
    for name in (unet["rank"][0], unet["rank"][-1]):
        assert unet["with_layer_in_float"][name] == int((masks(float_layers(qdq, fp32, [name]), bundle, calib)
                                                          != ref).sum()), name
    keys = [(unet["with_layer_in_float"][n], unet["tie_break"][n]) for n in unet["rank"]]
    assert keys == sorted(keys)
    assert [row["k"] for row in unet["rows"]] == [0, 1, 2, 4, 8]
    assert all(row["float_layers"] == unet["rank"][:row["k"]] for row in unet["rows"])
    assert set(unet["rows"][0]["sets"]) == {"calibration", "held-out"}
    assert f"1. {unet['rank'][0]}: " in r.stdout and "k=8: calibration" in r.stdout
    assert Bundle.load(b).int8_networks == []                       # nothing installed


def test_the_bundles_own_int8_file_is_diagnosed_and_a_layer_made_worse_goes_first(setup):
    d, b, bundle, calib = setup
    first = json.loads((d / "first.json").read_text())["networks"]["unet"]
    rejected = b / "calibration-rejected"
    rejected.mkdir(exist_ok=True)
    shutil.copyfile(d / "unet.int8.onnx", rejected / "unet.int8.onnx")
    _, same = diagnose(b, d / "same.json")
    assert same["int8_file"] == "calibration-rejected/unet.int8.onnx"
    assert same["with_layer_in_float"] == first["with_layer_in_float"] and same["rank"] == first["rank"]
    # the weights of the layer ranked last, negated through its weight scale: that layer in float repairs it
    worst = first["rank"][-1]
    m = onnx.load(str(rejected / "unet.int8.onnx"))
    producer = {o: n for n in m.graph.node for o in n.output}
    node = next(n for n in m.graph.node if n.name == worst)
    scale_name = producer[node.input[1]].input[1]
    init = next(i for i in m.graph.initializer if i.name == scale_name)
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * -4.0, scale_name))
    onnx.save(m, str(rejected / "unet.int8.onnx"))
    _, worse = diagnose(b, d / "worse.json")
    assert worse["rank"][0] == worst != first["rank"][0]
    assert worse["all_int8"] > first["all_int8"]
    assert worse["with_layer_in_float"][worst] == first["with_layer_in_float"][worst]   # the same model


def test_diagnose_refuses_options_that_are_calibrates_alone(tiny_bundle):
    r = sonoscore("calibrate", "--bundle", tiny_bundle, "--frames", SIM, "--diagnose", "--timing-only")
    assert r.returncode == 2 and "--timing-only does not apply to --diagnose" in r.stderr
