"""The bundle's manifest is checked beyond its hashes: schema and ranges, files inside the bundle, and the networks'
tensor names and shapes against the manifest when a pipeline starts. Each refusal is one BundleError sentence."""
import json
import os
import shutil

import pytest

from runtime.bundle import CLASS_NAMES, Bundle, BundleError, check_runner, write_manifest
from runtime.graph import Graph
from tests.conftest import sonoscore


def _manifest(**over):
    net = lambda name, out, shape: {"files": {"fp32": f"{name}.onnx"},  # noqa: E731
                                    "input": {"name": "image", "shape": ["N", 1, 224, 224]},
                                    "output": {"name": out, "shape": shape}, "channels": 1}
    m = {"name": "t", "classes": CLASS_NAMES, **Graph().manifest_sections(),
         "networks": {"unet": net("unet", "mask", ["N", 1, 224, 224]), "vgg": net("vgg", "features", ["N", 1])},
         "booster": {"file": "booster.ubj", "num_class": 4, "num_features": 1}}
    m.update(over)
    return m


@pytest.fixture
def plain(tmp_path):
    """A bundle whose files are placeholders: enough for Bundle.load (hashes right), not for running."""
    b = tmp_path / "bundle"
    b.mkdir()
    for f in ("unet.onnx", "vgg.onnx", "booster.ubj"):
        (b / f).write_bytes(b"x")
    write_manifest(b, _manifest())
    return b


def _edit(bundle, change):
    """Edit manifest.json in place (the files, and so their hashes, stay as they are)."""
    m = json.loads((bundle / "manifest.json").read_text())
    change(m)
    (bundle / "manifest.json").write_text(json.dumps(m))


def _refusal(bundle) -> str:
    with pytest.raises(BundleError) as e:
        Bundle.load(bundle)
    msg = str(e.value)
    assert "\n" not in msg and msg.count("; ") >= 1, msg          # one sentence: what is wrong; what to do
    return msg


def test_the_plain_bundle_loads(plain):
    assert Bundle.load(plain).graph() == Graph()


@pytest.mark.parametrize("change, phrase", [
    (lambda m: m["preprocess"].update(size=20000), "preprocess.size"),
    (lambda m: m["preprocess"].update(size=8), "preprocess.size"),
    (lambda m: m["preprocess"].update(crimmins_iterations=10 ** 9), "preprocess.crimmins_iterations"),
    (lambda m: m["preprocess"].update(crimmins_iterations=-1), "preprocess.crimmins_iterations"),
    (lambda m: m["preprocess"].update(gray="bt709"), "preprocess.gray"),
    (lambda m: m["gate"].update(mask_threshold=1.5), "gate.mask_threshold"),
    (lambda m: m["gate"].update(min_mask_fraction=-0.1), "gate.min_mask_fraction"),
    (lambda m: m["gate"].update(mask_threshold="half"), "gate.mask_threshold"),
    (lambda m: m["booster"].update(num_class="four"), "booster.num_class"),
    (lambda m: m["booster"].update(num_class=5), "booster.num_class"),
    (lambda m: m["booster"].update(num_class=True), "booster.num_class"),
    (lambda m: m["booster"].update(num_features=0), "booster.num_features"),
    (lambda m: m.update(classes=["only one"]), "classes"),
    (lambda m: m.update(networks={}), "networks.unet"),
    (lambda m: m["networks"].pop("vgg"), "networks.vgg"),
    (lambda m: m["networks"]["unet"].update(files={}), "networks.unet.files.fp32"),
    (lambda m: m["networks"]["unet"]["input"].update(name=""), "networks.unet.input.name"),
    (lambda m: m["networks"]["vgg"]["output"].update(name=7), "networks.vgg.output.name"),
    (lambda m: m["networks"]["vgg"].update(channels=2), "networks.vgg.channels"),
    (lambda m: m["networks"]["unet"].update(channels=3), "networks.unet.channels"),
    (lambda m: m.update(networks=[]), "networks"),
    (lambda m: m.update(preprocess="224"), "preprocess"),
])
def test_absurd_values_are_refused_at_load_naming_the_field(plain, change, phrase):
    _edit(plain, change)
    msg = _refusal(plain)
    assert f"'{phrase}'" in msg and "manifest.json" in msg


@pytest.mark.parametrize("name", ["../outside.onnx", "/etc/hostname", "sub/unet.onnx", "..", "."])
def test_a_file_entry_leaving_the_bundle_is_refused_before_it_is_read(plain, name):
    outside = plain.parent / "outside.onnx"
    outside.write_bytes(b"x")                        # exists, and its hash is recorded: only its place is wrong
    (plain / "sub").mkdir()
    (plain / "sub" / "unet.onnx").write_bytes(b"x")

    def change(m):
        m["networks"]["unet"]["files"]["fp32"] = name
        m["files"][name] = m["files"]["unet.onnx"]
    _edit(plain, change)
    msg = _refusal(plain)
    assert "networks.unet.files.fp32" in msg and "inside the bundle" in msg
    for f in ("booster.file",):
        _edit(plain, lambda m: (m["networks"]["unet"]["files"].update(fp32="unet.onnx"),
                                m["booster"].update(file=name)))
        assert f in _refusal(plain)


def test_a_link_out_of_the_bundle_is_refused(plain):
    outside = plain.parent / "elsewhere.onnx"
    outside.write_bytes(b"x")
    (plain / "unet.onnx").unlink()
    os.symlink(outside, plain / "unet.onnx")
    msg = _refusal(plain)
    assert "leads outside the bundle" in msg and "unet.onnx" in msg


def test_a_manifest_that_is_not_an_object_is_refused(plain):
    (plain / "manifest.json").write_text("[1, 2]")
    assert "not an object" in _refusal(plain)


def test_a_bad_recorded_hash_is_named(plain):
    _edit(plain, lambda m: m["files"].update({"unet.onnx": "abc"}))
    assert "files.unet.onnx" in _refusal(plain)


# -- the networks against the manifest, at pipeline start ------------------------------------------------------

def _onnx_bundle(b, *, vgg_out="features", width=1, unet_out_shape=(1, 224, 224), vgg_in_name="image"):
    """A bundle of two tiny ONNX graphs (tests/test_evaluate.py's known functions); the manifest always says the
    VGG gives 'features' of width 1."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper
    b.mkdir(exist_ok=True)
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, 224, 224])
    unet_node = (helper.make_node("Identity", ["image"], ["mask"]) if unet_out_shape == (1, 224, 224)
                 else helper.make_node("Concat", ["image", "image"], ["mask"], axis=1))   # [N, 2, 224, 224]
    unet = helper.make_graph([unet_node], "unet", [image],
                             [helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["N", *unet_out_shape])])
    vimage = helper.make_tensor_value_info(vgg_in_name, TensorProto.FLOAT, ["N", 1, 224, 224])
    if width == 1:
        nodes = [helper.make_node("ReduceMean", [vgg_in_name], [vgg_out], axes=[2, 3], keepdims=0)]
    else:   # [N, 1, 224, 224] -> mean over the width -> [N, 1, 224] -> flatten: [N, 224]
        nodes = [helper.make_node("ReduceMean", [vgg_in_name], ["m"], axes=[3], keepdims=0),
                 helper.make_node("Flatten", ["m"], [vgg_out], axis=1)]
    vgg = helper.make_graph(nodes, "vgg", [vimage],
                            [helper.make_tensor_value_info(vgg_out, TensorProto.FLOAT, ["N", width])])
    for name, g in (("unet", unet), ("vgg", vgg)):
        onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8),
                  str(b / f"{name}.onnx"))
    (b / "booster.ubj").write_bytes(b"x")     # never reached: the networks are checked before the booster loads
    write_manifest(b, _manifest())
    return b


@pytest.mark.parametrize("swap, phrase", [
    (dict(vgg_out="fc2"), "reads 'features'"),
    (dict(width=224), "float[N, 1]"),
    (dict(unet_out_shape=(2, 224, 224)), "float[N, 1, 224, 224]"),
    (dict(vgg_in_name="pixels"), "one input 'image'"),
])
def test_a_valid_but_wrong_network_is_refused_when_the_pipeline_starts(tmp_path, swap, phrase):
    """A network swapped in with its hash rewritten loads (the hashes match); its tensors contradict the manifest,
    so the pipeline refuses it on start instead of failing every frame."""
    from runtime.pipeline import Pipeline
    b = _onnx_bundle(tmp_path / "b", **swap)
    bundle = Bundle.load(b)
    with pytest.raises(BundleError) as e:
        with Pipeline(bundle):
            pass
    msg = str(e.value)
    assert phrase in msg and ("unet.onnx" in msg or "vgg.onnx" in msg) and "re-export" in msg and "\n" not in msg


def test_check_runner_passes_the_right_networks_and_free_dimensions():
    import numpy as np

    from runtime.backends import TensorMeta

    class R:
        def __init__(self, i, o):
            self.inputs, self.outputs = i, o
    f = np.dtype("float32")
    g = Graph(size=64, vgg_channels=3)
    check_runner("unet", R({"image": TensorMeta(("N", 1, 64, 64), f)}, {"mask": TensorMeta(("N", 1, 64, 64), f)}), g)
    check_runner("vgg", R({"image": TensorMeta((None, 3, "h", "w"), np.dtype("float16"))},
                          {"features": TensorMeta(("N", "F"), f), "logits": TensorMeta(("N", 4), f)}), g, None, 1024)
    with pytest.raises(BundleError, match="float"):      # an integer input: the pipeline feeds floats
        check_runner("unet", R({"image": TensorMeta(("N", 1, 64, 64), np.dtype("uint8"))},
                               {"mask": TensorMeta(("N", 1, 64, 64), f)}), g)
    with pytest.raises(BundleError, match=r"float\[N, 3, 64, 64\]"):
        check_runner("vgg", R({"image": TensorMeta(("N", 1, 64, 64), f)}, {"features": TensorMeta(("N", 9), f)}), g)


def test_the_cli_refuses_a_swapped_network_with_exit_2(tmp_path):
    b = _onnx_bundle(tmp_path / "b", vgg_out="fc2")
    r = sonoscore("run", "--bundle", b, "--source", "sim://kidney?frames=2", timeout=300)
    assert r.returncode == 2 and "reads 'features'" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_the_cli_refuses_an_absurd_manifest_with_exit_2(plain):
    _edit(plain, lambda m: m["preprocess"].update(crimmins_iterations=10 ** 9))
    r = sonoscore("run", "--bundle", plain, "--source", "sim://kidney?frames=2", timeout=300)
    assert r.returncode == 2 and "preprocess.crimmins_iterations" in r.stderr and "Traceback" not in r.stderr


def test_a_copied_real_bundle_still_loads(tiny_bundle, tmp_path):
    """What training writes passes every check (the tiny bundle's networks are the real architectures)."""
    from runtime.pipeline import Pipeline
    b = tmp_path / "copy"
    shutil.copytree(tiny_bundle, b)
    with Pipeline(Bundle.load(b)) as p:
        assert p.unet is not None and p.vgg is not None


# -- issue 27 item 10: a number that is not finite (json reads NaN, Infinity and 1e999) ------------------------

@pytest.mark.parametrize("literal,field", [
    ("NaN", "gate.mask_threshold"), ("Infinity", "gate.min_mask_fraction"), ("-Infinity", "gate.min_mask_fraction"),
    ("1e999", "gate.mask_threshold"), ("NaN", "provenance.history.0.loss"), ("NaN", "networks.vgg.parity"),
])
def test_a_number_that_is_not_finite_is_refused_anywhere_naming_the_field(plain, literal, field):
    """Before: a NaN gate threshold passed the schema (NaN compares false with its range), every frame was rejected
    silently and the run exited 0. The manifest.sha256 is rewritten to match, so only the value is at fault."""
    import hashlib
    m = json.loads((plain / "manifest.json").read_text())
    m.setdefault("provenance", {})["history"] = [{"loss": 0.5}]
    m["networks"]["vgg"]["parity"] = 0.0
    text = json.dumps(m)
    path = field.split(".")
    key = path[-1] if not path[-1].isdigit() else path[-2]
    old = f'"{key}": {json.dumps(m[path[0]][path[1]] if len(path) == 2 else 0.5 if key == "loss" else 0.0)}'
    assert old in text, old
    text = text.replace(old, f'"{key}": {literal}', 1)
    (plain / "manifest.json").write_text(text)
    (plain / "manifest.sha256").write_text(f"{hashlib.sha256(text.encode()).hexdigest()}  manifest.json\n")
    msg = _refusal(plain)
    assert f"'{field}'" in msg and "not a finite number" in msg and msg.count(". ") == 0


def test_the_cli_refuses_a_nan_gate_with_exit_2_and_nothing_is_written(plain, tmp_path):
    import hashlib
    text = (plain / "manifest.json").read_text()
    text = text.replace('"mask_threshold": 0.5', '"mask_threshold": NaN', 1)
    assert "NaN" in text
    (plain / "manifest.json").write_text(text)
    (plain / "manifest.sha256").write_text(f"{hashlib.sha256(text.encode()).hexdigest()}  manifest.json\n")
    r = sonoscore("run", "--bundle", plain, "--source", "sim://kidney?frames=2", "--results", tmp_path / "r.jsonl",
                  timeout=300)
    assert r.returncode == 2 and "gate.mask_threshold" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "r.jsonl").exists()


def test_write_manifest_refuses_a_number_that_is_not_finite(tmp_path):
    b = tmp_path / "b"
    b.mkdir()
    for f in ("unet.onnx", "vgg.onnx", "booster.ubj"):
        (b / f).write_bytes(b"x")
    m = _manifest()
    m["gate"]["min_mask_fraction"] = float("nan")
    with pytest.raises(BundleError, match="gate.min_mask_fraction"):
        write_manifest(b, m)
    assert not (b / "manifest.json").exists()
