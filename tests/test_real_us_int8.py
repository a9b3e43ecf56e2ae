"""scripts/real_us_int8.py (INT8 UNet masks against FP32 on the pydicom ultrasound DICOMs) on the tiny bundle: its
figures match ones computed here independently, the FP32 UNet given as the "INT8" one agrees with itself exactly
on this CPU's run, the exit status follows --min-iou, and bad input is one sentence with exit 2. The variants
(--activation-scale, --weights, --float-activations) change exactly what they say in a Q/DQ file quantized here from
the tiny FP32 UNet, --phantom measures the variant on a labelled folder, and --input-noise rows are the FP32 UNet on
seeded noisy copies of the frames against itself. No figure here depends on trained
weights or on INT8 kernels: the mask threshold is derived from the tiny UNet's own output, and the variants' IoUs
are compared with ones computed here from the same model."""
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "real_us_int8.py"
FRAMES = 4


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("real_us_int8", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module        # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def expected(script, tiny_bundle):
    """What the script must report for the tiny bundle's FP32 UNet given as --unet-int8, computed here: the frames
    the script picks (its own reader, the same spread), the UNet's probabilities with and without graph
    optimisations, a threshold half-way between their lowest and highest (so some pixels are mask whatever the
    weights), and the IoUs by hand."""
    from calibration.quantize import spread_indices
    from runtime.backends.ort import OrtRunner
    from runtime.bundle import Bundle
    bundle = Bundle.load(tiny_bundle)
    graph = bundle.graph()
    fp32 = bundle.network_file("unet", "fp32")
    real = script.read_real_frames(bundle)
    assert real.images, "no usable frame in the pydicom ultrasound files"
    images = [real.images[i] for i in spread_indices(len(real.images), FRAMES)]
    probs = {}
    for simulated in (False, True):
        with OrtRunner(fp32, intra_op_threads=2, simulated_quantization=simulated) as r:
            probs[simulated] = np.stack([graph.segment(r, img) for img in images])
    lo, hi = float(probs[False].min()), float(probs[False].max())
    assert hi > lo, "the tiny UNet's output is constant on real ultrasound; no threshold can split it"
    t = (lo + hi) / 2
    ref, sim = probs[False] > t, probs[True] > t
    inter = (ref & sim).reshape(FRAMES, -1).sum(1)
    union = (ref | sim).reshape(FRAMES, -1).sum(1)
    ious = inter[union > 0] / union[union > 0]
    return {"threshold": t, "fp32": str(fp32), "usable": len(real.images), "images": images,
            "fp32_with_mask": int(ref.reshape(FRAMES, -1).any(1).sum()),
            "sim_counted": int((union > 0).sum()), "sim_iou": round(float(ious.mean()), 6),
            "sim_iou_min": round(float(ious.min()), 6), "fp16": "fp16" in bundle.manifest["networks"]["unet"]["files"]}


def _run(script, tiny_bundle, expected, tmp_path, *extra):
    out = tmp_path / "real_us.json"
    rc = script.main(["--bundle", str(tiny_bundle), "--unet-int8", expected["fp32"], "--frames", str(FRAMES),
                      "--mask-threshold", repr(expected["threshold"]), "--json", str(out), *extra])
    return rc, json.loads(out.read_text())


def test_fp32_as_int8_agrees_with_itself_and_the_figures_are_the_ones_computed_here(script, tiny_bundle, expected,
                                                                                    tmp_path, capsys):
    rc, d = _run(script, tiny_bundle, expected, tmp_path)
    stdout = capsys.readouterr().out
    want = {"fp32", "int8_simulated", "int8_cpu"} | ({"fp16"} if expected["fp16"] else set())
    assert set(d["precisions"]) == want
    assert d["frames"]["picked"] == FRAMES and d["frames"]["usable"] == expected["usable"]
    assert d["frames"]["total"] >= d["frames"]["usable"] > 0 and d["files"]["used"] >= 1
    assert d["files"]["ultrasound"] == len(d["files"]["rows"]) > 0
    assert len(d["frames"]["picked_frames"]) == FRAMES
    for row in d["precisions"].values():
        assert row["frames"] == FRAMES
    assert d["precisions"]["fp32"]["frames_with_mask"] == expected["fp32_with_mask"] > 0
    # the same file with the same session options as the reference: every mask identical
    cpu = d["precisions"]["int8_cpu"]
    assert cpu["frames_counted"] == expected["fp32_with_mask"]
    assert cpu["mask_iou_mean"] == 1.0 and cpu["mask_iou_min"] == 1.0 and cpu["mask_fraction_error_mean"] == 0.0
    assert cpu["gate_agreement"] == 1.0
    # graph optimisations off: the IoU computed here (exactly 1 unless float rounding moved a pixel across)
    sim = d["precisions"]["int8_simulated"]
    assert sim["simulated_quantization"] is True and cpu["simulated_quantization"] is False
    assert sim["frames_counted"] == expected["sim_counted"]
    assert sim["mask_iou_mean"] == expected["sim_iou"] and sim["mask_iou_min"] == expected["sim_iou_min"]
    assert rc == (0 if expected["sim_iou"] >= 0.95 else 1) and d["passed"] is (rc == 0)
    assert d["mask_threshold"] == expected["threshold"]
    assert "command: .venv/bin/python scripts/real_us_int8.py --bundle" in stdout
    assert "| INT8 (simulated) |" in stdout and "| INT8 (this CPU) |" in stdout


def test_a_minimum_iou_above_one_fails_with_exit_1(script, tiny_bundle, expected, tmp_path, capsys):
    rc, d = _run(script, tiny_bundle, expected, tmp_path, "--min-iou", "1.5")
    assert rc == 1 and d["passed"] is False
    assert "FAIL" in capsys.readouterr().out


def test_noisy_frames_are_seeded_uint8_with_the_noise_asked(script):
    flat = [np.full((64, 64), 128, np.uint8) for _ in range(3)]
    assert all(np.array_equal(a, b) for a, b in zip(script.noisy(flat, 0.0), flat))
    a, b = script.noisy(flat, 2.0), script.noisy(flat, 2.0)
    assert all(x.dtype == np.uint8 and np.array_equal(x, y) for x, y in zip(a, b))      # the same on every run
    diff = np.stack(a).astype(np.float64) - 128
    assert abs(diff.std() - np.sqrt(4 + 1 / 12)) < 0.05 and abs(diff.mean()) < 0.05    # N(0, 2) then rounded
    assert not np.array_equal(a[0], a[1])                                               # each frame its own draw
    edges = script.noisy([np.array([[0, 255]], np.uint8)] * 50, 5.0)
    assert min(int(x[0, 0]) for x in edges) == 0 and max(int(x[0, 1]) for x in edges) == 255   # clipped


def test_input_noise_rows_are_the_fp32_unet_on_noisy_frames_against_itself(script, tiny_bundle, expected, tmp_path,
                                                                            capsys):
    """No noise: the same masks (IoU exactly 1). Noise of 60 gray levels: the masks computed here from the same
    noisy frames, and an IoU below 1 (the threshold sits mid-way in the tiny UNet's output on these frames)."""
    from runtime.backends.ort import OrtRunner
    from runtime.bundle import Bundle
    rc, d = _run(script, tiny_bundle, expected, tmp_path, "--input-noise", "0,60")
    stdout = capsys.readouterr().out
    assert d["input_noise"] == [0.0, 60.0]
    zero, loud = d["precisions"]["fp32_noise_0"], d["precisions"]["fp32_noise_60"]
    assert zero["mask_iou_mean"] == 1.0 and zero["frames_counted"] == expected["fp32_with_mask"]
    graph = Bundle.load(tiny_bundle).graph(mask_threshold=expected["threshold"])
    with OrtRunner(expected["fp32"], intra_op_threads=2) as r:
        ref = np.stack([graph.segment(r, img) > expected["threshold"] for img in expected["images"]])
        got = np.stack([graph.segment(r, img) > expected["threshold"]
                        for img in script.noisy(expected["images"], 60.0)])
    ious = [v for v in script.per_frame_iou(ref, got) if v is not None]
    assert loud["mask_iou_mean"] == round(float(np.mean(ious)), 6) < 1.0
    assert loud["per_frame_iou"] == script.per_frame_iou(ref, got)
    assert "| FP32, input noise 0 gray levels | 1.0000 |" in stdout and "| FP32, input noise 60 gray levels |" in stdout


@pytest.mark.parametrize("case", ["missing", "not-onnx", "no-int8"])
def test_bad_input_is_one_sentence_and_exit_2(tiny_bundle, tmp_path, case):
    bundle, args = tiny_bundle, []
    if case == "missing":
        target = tmp_path / "no-such-unet.int8.onnx"
        args = ["--unet-int8", str(target)]
    elif case == "not-onnx":
        target = tmp_path / "unet.int8.onnx"
        target.write_text("not a model\n")
        args = ["--unet-int8", str(target)]
    else:
        bundle = tmp_path / "bundle"           # a copy: no INT8 UNet installed, none left by a failed calibration
        shutil.copytree(tiny_bundle, bundle)
        shutil.rmtree(bundle / "calibration-rejected", ignore_errors=True)
        target = bundle
    r = subprocess.run([sys.executable, str(SCRIPT), "--bundle", str(bundle), *args, "--frames", "2"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    message = r.stderr.strip()
    assert message.startswith("real_us_int8: ") and str(target) in message, message
    assert "\n" not in message and "Traceback" not in message, message
    assert message.count(". ") == 0, f"more than one sentence: {message}"
    assert r.stdout == ""


# -- variants --------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=["sub-pixel", "per-tensor"])
def int8_file(request, tiny_bundle, expected, tmp_path_factory):
    """The tiny FP32 UNet quantized here by the project's quantizer (7-bit weights per channel, symmetric INT8
    activations), calibrated on the real frames: with its upsamplers rewritten as sub-pixel Convs (the default) or
    kept as per-tensor ConvTransposes (as QAT writes them)."""
    from calibration.quantize import quantize_int8
    from runtime.bundle import Bundle
    graph = Bundle.load(tiny_bundle).graph()
    out = tmp_path_factory.mktemp("int8") / f"unet.{request.param}.int8.onnx"
    feeds = [graph.unet_feeds(img)[graph.unet_input] for img in expected["images"]]
    quantize_int8(Path(expected["fp32"]), out, graph.unet_input, feeds, conv_transpose=request.param)
    return out


def _parts(path_or_model):
    """(initializers by name as arrays, activation scale names, weight scale names, activation QuantizeLinear count,
    weight DequantizeLinear nodes), found here from the node list."""
    import onnx
    from onnx import numpy_helper as nh
    m = onnx.load(str(path_or_model)) if isinstance(path_or_model, Path) else path_or_model
    inits = {i.name: nh.to_array(i) for i in m.graph.initializer}
    act_q = [n for n in m.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in inits]
    act_dq = [n for n in m.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in {q.output[0] for q in act_q}]
    w_dq = [n for n in m.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    return inits, {n.input[1] for n in act_q + act_dq}, {n.input[1] for n in w_dq}, len(act_q), w_dq


def test_activation_scale_multiplies_exactly_the_activation_scales_and_no_weight_scale(script, int8_file, expected):
    original, act, weight, n_act_q, w_dq = _parts(int8_file)
    assert act and weight and not act & weight and n_act_q > 0 and w_dq
    model, info = script.build_variant(int8_file, Path(expected["fp32"]), activation_scale=2.0)
    changed, *_ = _parts(model)
    assert set(changed) == set(original)
    for name, a in original.items():
        b = changed[name]
        assert b.dtype == a.dtype and b.shape == a.shape, name
        if name in act:
            assert np.array_equal(b, a * a.dtype.type(2)), name
        else:                                   # weight scales, weights, biases, zero points: untouched
            assert a.tobytes() == b.tobytes(), name
    assert info["activation_scales_multiplied"] == len(act) and info["activation_quantize_nodes"] == n_act_q
    assert info["weights_replaced"] == 0 and info["name"] == "activation scales x2"
    import onnx
    assert [(n.op_type, list(n.input)) for n in model.graph.node] == \
        [(n.op_type, list(n.input)) for n in onnx.load(str(int8_file)).graph.node]


@pytest.mark.parametrize("weights, levels", [("fp32-8bit", 127), ("fp32-7bit", 64)])
def test_fp32_weights_are_within_half_a_step_of_the_fp32_ones_on_the_files_granularity(script, int8_file, expected,
                                                                                         weights, levels):
    import onnx
    from onnx import numpy_helper as nh

    from calibration.quantize import sub_pixel_conv_transpose
    fp32_model = onnx.load(expected["fp32"])
    fp32 = {i.name: nh.to_array(i) for i in sub_pixel_conv_transpose(fp32_model)[0].graph.initializer}
    fp32.update({i.name: nh.to_array(i) for i in fp32_model.graph.initializer})
    original, act, weight, _, w_dq = _parts(int8_file)
    model, info = script.build_variant(int8_file, Path(expected["fp32"]), weights=weights)
    changed, *_ = _parts(model)
    assert info["weights_replaced"] == len(w_dq) > 0
    for n in w_dq:
        q, s = changed[n.input[0]], changed[n.input[1]].astype(np.float64)
        w = fp32[n.input[0].removesuffix("_quantized")].astype(np.float64)
        assert q.dtype == np.int8 and q.shape == w.shape
        assert s.shape == original[n.input[1]].shape            # the file's granularity
        if s.ndim:                                               # per channel on the node's axis
            axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
            qc = np.moveaxis(q.astype(int), axis, 0).reshape(len(s), -1)
            wc = np.moveaxis(w, axis, 0).reshape(len(s), -1)
            step = s[:, None]
        else:
            qc, wc, step = q.astype(int).reshape(1, -1), w.reshape(1, -1), s.reshape(1, 1)
        assert np.abs(qc).max() <= levels
        live = np.abs(wc).max(1) > 0
        assert (np.abs(qc).max(1)[live] == levels).all()        # every channel uses the whole range [-L, L]
        assert np.allclose(step[live, 0], np.abs(wc).max(1)[live] / levels, rtol=1e-6)
        assert (np.abs(qc * step - wc) <= step * (0.5 + 1e-5)).all(), n.input[0]
    for name, a in original.items():
        if name in weight or name.endswith("_quantized") and name in {n.input[0] for n in w_dq}:
            continue
        if name in fp32 and a.dtype.kind == "f" and fp32[name].shape == a.shape:   # biases, float layers
            assert np.array_equal(changed[name], fp32[name].astype(a.dtype)), name
        else:                                                    # activation scales and zero points untouched
            assert a.tobytes() == changed[name].tobytes(), name
    assert info["float_initializers_from_fp32"] > 0 and info["weight_error_max_steps"] <= 0.5 + 1e-5


def test_weights_of_another_network_are_refused_in_one_sentence(script, int8_file, tiny_bundle):
    from runtime.bundle import Bundle
    vgg = Bundle.load(tiny_bundle).network_file("vgg", "fp32")
    with pytest.raises(script.UserError, match="has no FP32 weight of the same name and shape") as e:
        script.build_variant(int8_file, vgg, weights="fp32-8bit")
    assert ". " not in str(e.value)


def test_float_activations_with_fp32_weights_measure_that_file_on_real_frames_and_on_the_phantom(
        script, tiny_bundle, tiny_dataset, expected, int8_file, tmp_path, capsys):
    """The run measures the variant: no activation QuantizeLinear left, every weight replaced, and its real-frame
    and phantom IoUs are the ones computed here from the model build_variant returns."""
    import onnx

    from export.recipe import load_preprocessed
    from runtime.backends.ort import OrtRunner
    from runtime.bundle import Bundle
    _, _, _, n_act_q, w_dq = _parts(int8_file)
    out = tmp_path / "variant.json"
    rc = script.main(["--bundle", str(tiny_bundle), "--unet-int8", str(int8_file), "--frames", str(FRAMES),
                      "--mask-threshold", repr(expected["threshold"]), "--float-activations", "--weights",
                      "fp32-8bit", "--phantom", str(tiny_dataset), "--json", str(out)])
    d = json.loads(out.read_text())
    stdout = capsys.readouterr().out
    v = d["variant"]
    assert v["weights"] == "fp32-8bit" and v["float_activations"] is True and v["activation_scale"] == 1
    assert v["activation_quantize_nodes"] == 0 and v["activation_pairs_removed"] == n_act_q > 0
    assert v["weights_replaced"] == v["weight_dequantize_nodes"] == len(w_dq)
    assert v["name"] in stdout and f"| INT8 (simulated), {v['name']} |" in stdout
    assert d["unet_int8"] == str(int8_file) and d["precisions"]["int8_simulated"]["variant"] == v["name"]

    model, _ = script.build_variant(int8_file, Path(expected["fp32"]), weights="fp32-8bit", float_activations=True)
    path = tmp_path / "variant.onnx"
    onnx.save(model, str(path))
    graph = Bundle.load(tiny_bundle).graph(mask_threshold=expected["threshold"])
    phantom = list(load_preprocessed(tiny_dataset, graph, progress=False)[0])

    def iou(images):
        masks = {}
        for name, p, sim in (("ref", Path(expected["fp32"]), False), ("v", path, True)):
            with OrtRunner(p, intra_op_threads=2, simulated_quantization=sim) as r:
                masks[name] = np.stack([graph.segment(r, img) > graph.mask_threshold for img in images])
        n = len(images)
        inter = (masks["ref"] & masks["v"]).reshape(n, -1).sum(1)
        union = (masks["ref"] | masks["v"]).reshape(n, -1).sum(1)
        return (round(float((inter[union > 0] / union[union > 0]).mean()), 6) if (union > 0).any() else None,
                int((union > 0).sum()))

    sim = d["precisions"]["int8_simulated"]
    assert (sim["mask_iou_mean"], sim["frames_counted"]) == iou(expected["images"])
    ph = d["phantom"]
    assert ph["dir"] == str(tiny_dataset) and ph["frames"] == len(phantom) > 0
    assert set(ph["precisions"]) == {"fp32", "int8_simulated"}
    psim = ph["precisions"]["int8_simulated"]
    assert psim["frames"] == len(phantom) and (psim["mask_iou_mean"], psim["frames_counted"]) == iou(phantom)
    assert f"phantom: {tiny_dataset}, all {len(phantom)} labelled images" in stdout
    assert rc == (0 if sim["mask_iou_mean"] is not None and sim["mask_iou_mean"] >= 0.95 else 1)


@pytest.mark.parametrize("args, names", [
    (["--activation-scale", "0"], "--activation-scale 0"),
    (["--activation-scale", "-1"], "--activation-scale -1"),
    (["--activation-scale", "two"], "--activation-scale 'two'"),
    (["--activation-scale", "nan"], "--activation-scale nan"),
    (["--weights", "fp32-4bit"], "--weights 'fp32-4bit'"),
    (["--float-activations", "--activation-scale", "2"], "--activation-scale 2"),
    (["--phantom", "no-such-folder"], "--phantom 'no-such-folder'"),
    (["--input-noise", "loud"], "--input-noise 'loud'"),
    (["--input-noise", "1,-2"], "--input-noise '1,-2'"),
])
def test_bad_variant_values_are_one_sentence_and_exit_2(tiny_bundle, args, names):
    r = subprocess.run([sys.executable, str(SCRIPT), "--bundle", str(tiny_bundle), *args, "--frames", "2"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    message = r.stderr.strip()
    assert message.startswith(f"real_us_int8: {names} "), message
    assert "\n" not in message and "Traceback" not in message and message.count(". ") == 0, message
    assert r.stdout == ""


# -- pictures, gated IoU, activation ranges ---------------------------------------------------------------------------

def test_identical_pixels_are_one_picture_and_each_picture_counts_once(script):
    a = np.arange(12, dtype=np.uint8).reshape(3, 4)
    b = a.copy()
    b[0, 0] = 1                                   # one pixel differs
    ids = script.picture_ids([a, a.copy(), b, a.reshape(4, 3), a])
    assert ids[0] == ids[1] == ids[4] and len({ids[0], ids[2], ids[3]}) == 3   # the same bytes in another shape differ
    # pictures a (0.2, 0.4: mean 0.3), b (not counted), c (0.8): (0.3 + 0.8) / 2
    assert script.mean_by_picture([0.2, 0.4, None, 0.8], ["a", "a", "b", "c"]) == (0.55, 2)
    assert script.mean_by_picture([None, None], ["a", "b"]) == (None, 0)


def test_per_picture_and_gated_means_are_the_per_frame_ious_grouped_here(script, tiny_bundle, expected, tmp_path):
    """Every row's per-picture mean and its mean over frames a gate accepts, recomputed here from its own per-frame
    IoUs and fractions, with pictures grouped by comparing the frames' pixels (not by the script's keys)."""
    _, d = _run(script, tiny_bundle, expected, tmp_path, "--input-noise", "60")
    images = expected["images"]
    group = []
    for i, img in enumerate(images):
        group.append(next(j for j in range(i + 1) if images[j].shape == img.shape and np.array_equal(images[j], img)))
    assert d["frames"]["pictures"] == len(set(group))
    assert [f["picture"] for f in d["frames"]["picked_frames"]] == script.picture_ids(images)
    minimum = d["min_mask_fraction"]
    ref_accepted = [f >= minimum for f in d["precisions"]["fp32"]["per_frame_fraction"]]
    checked = 0
    for key, row in d["precisions"].items():
        if key == "fp32":
            continue
        per = row["per_frame_iou"]
        by = {}
        for g, v in zip(group, per):
            if v is not None:
                by.setdefault(g, []).append(v)
        want = round(float(np.mean([np.mean(v) for v in by.values()])), 6) if by else None
        assert (row["mask_iou_mean_pictures"], row["pictures_counted"]) == (want, len(by)), key
        accepted = [f >= minimum for f in row["per_frame_fraction"]]
        gated = [v for v, x, y in zip(per, ref_accepted, accepted) if v is not None and (x or y)]
        assert row["frames_gated"] == len(gated), key
        assert row["mask_iou_mean_gated"] == (round(float(np.mean(gated)), 6) if gated else None), key
        checked += 1
    assert checked >= 3


class _Feeds:
    """What activation_ranges needs of a Graph: the UNet's feeds for an image (here the image itself as float)."""
    def unet_feeds(self, image):
        return {"x": image.astype(np.float32).reshape(1, 1, *image.shape)}


def _ranges_model(path: Path):
    """x -> Q/DQ (scale 0.5) -> Neg -> Q/DQ (scale 1) -> Relu -> y, and the second Q/DQ's output also -> LeakyRelu
    -> z: the first activation is read by Neg; the second by a Relu and a LeakyRelu (its low side counts)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper as nh

    def qdq(name, inp, scale):
        return ([helper.make_node("QuantizeLinear", [inp, f"{name}_s", f"{name}_z"], [f"{name}_q"]),
                 helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_s", f"{name}_z"], [f"{name}_dq"])],
                [nh.from_array(np.array(scale, np.float32), f"{name}_s"), nh.from_array(np.array(0, np.int8),
                                                                                          f"{name}_z")])
    n1, i1 = qdq("a", "x", 0.5)
    n2, i2 = qdq("b", "neg", 1.0)
    nodes = n1 + [helper.make_node("Neg", ["a_dq"], ["neg"])] + n2 + [
        helper.make_node("Relu", ["b_dq"], ["y"]), helper.make_node("LeakyRelu", ["b_dq"], ["z"], alpha=0.1)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 2, 2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 2, 2]),
                           helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 1, 2, 2])], i1 + i2)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))


def test_activation_ranges_are_how_far_values_reach_past_what_each_quantizer_holds(script, tmp_path):
    """Hand-computed: x's quantizer (scale 0.5) holds [-64, 63.5]; -x's (scale 1) holds [-128, 127]. With the Relu
    alone reading -x, values below -128 would not count; here a LeakyRelu reads it too, so they do."""
    path = tmp_path / "ranges.onnx"
    _ranges_model(path)
    frames = [np.array([[10, 20], [30, 40]], np.float32),    # inside both ranges: 40 / 63.5 of x's
              np.array([[0, 0], [0, 127]], np.float32),      # x past its top (127 / 63.5 = 2), -x at -63.5 after DQ
              np.array([[0, 0], [0, 64]], np.float32)]       # x: 64 / 63.5, level 128 > 127: saturates
    r = script.activation_ranges(path, _Feeds(), frames, threads=1)
    assert r["tensors"] == 2 and r["frames"] == 3
    a, b = r["per_tensor"]
    assert a["tensor"] == "x" and a["relu_only"] is False and b["tensor"] == "neg" and b["relu_only"] is False
    assert a["ratio_max"] == round(127 / 63.5, 4) and a["frames_clipping"] == 2
    # -x after x's Q/DQ: at most 63.5 in magnitude, inside [-128, 127]: the furthest is -63.5 / -128
    assert b["ratio_max"] == round(63.5 / 128, 4) and b["frames_clipping"] == 0
    assert [f["tensors_clipping"] for f in r["per_frame"]] == [0, 1, 1]
    assert [f["ratio_max"] for f in r["per_frame"]] == [round(40 / 63.5, 4), round(127 / 63.5, 4),
                                                         round(64 / 63.5, 4)]
    assert r["frames_clipping"] == 2 and r["ratio_max"] == round(127 / 63.5, 4)
    assert a["clipped_share_mean"] == round((0 + 0.25 + 0.25) / 3, 8)


def _edited_ranges_model(path: Path, edit) -> Path:
    """_ranges_model's file with `edit(model)` applied."""
    import onnx
    _ranges_model(path)
    m = onnx.load(str(path))
    edit(m)
    onnx.save(m, str(path))
    return path


def test_values_a_relu_alone_zeroes_do_not_count_as_saturating(script, tmp_path):
    def relu_alone(m):
        m.graph.node.remove(next(n for n in m.graph.node if n.op_type == "LeakyRelu"))
        del m.graph.output[1]
        m.graph.node[3].input[0] = "x"                # the second quantizer reads x itself: values down to -200
    path = _edited_ranges_model(tmp_path / "relu.onnx", relu_alone)
    frames = [np.array([[-200, 0], [0, 100]], np.float32)]
    r = script.activation_ranges(path, _Feeds(), frames, threads=1)
    a, b = r["per_tensor"]
    assert b["relu_only"] is True
    assert b["ratio_max"] == round(100 / 127, 4) and b["frames_clipping"] == 0      # -200 below -128: not counted
    assert a["ratio_max"] == round(200 / 64, 4) and a["frames_clipping"] == 1        # x's own: counted both sides


def test_a_scale_that_is_not_an_initializer_is_one_sentence_for_ranges(script, tmp_path):
    from onnx import helper

    def computed_scale(m):
        scale = next(i for i in m.graph.initializer if i.name == "a_s")
        m.graph.initializer.remove(scale)
        m.graph.node.insert(0, helper.make_node("Constant", [], ["a_s"], value=scale))
    path = _edited_ranges_model(tmp_path / "computed.onnx", computed_scale)
    with pytest.raises(script.UserError, match="leave --ranges out for this file") as e:
        script.activation_ranges(path, _Feeds(), [np.zeros((2, 2), np.float32)], threads=1)
    assert ". " not in str(e.value) and str(path) in str(e.value)
