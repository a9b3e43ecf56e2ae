"""The per-frame graph (runtime.graph): its gate, its dataflow, and that a bundle pins it."""
import json

import numpy as np
import pytest

from runtime.graph import Graph


class Recorder:
    """A runner that returns a fixed output and remembers what it was fed (the graph's own feeds, unchanged)."""

    def __init__(self, name: str, value: np.ndarray):
        self.name, self.value, self.fed = name, value, []

    def infer(self, feeds, outputs=None):
        self.fed.append((feeds, outputs))
        return {self.name: self.value}


class FixedBooster:
    def __init__(self):
        self.seen = []

    def predict_one(self, features):
        self.seen.append(features)
        return [0.1, 0.2, 0.6, 0.1], 3


def test_the_gate_thresholds_strictly_and_accepts_at_the_minimum_fraction():
    g = Graph(mask_threshold=0.5, min_mask_fraction=0.25)
    prob = np.array([[0.5, 0.51], [0.2, 0.9]], np.float32)      # 0.5 itself is not kidney: prob > threshold
    gate = g.gate(prob)
    assert gate.mask.dtype == np.uint8 and gate.mask.tolist() == [[0, 1], [0, 1]]
    assert gate.fraction == 0.5 and gate.accepted
    assert g.accepts(0.25) and not g.accepts(0.2499)
    assert not Graph(min_mask_fraction=0.75).gate(prob).accepted
    assert g.gate_mask(np.array([[1, 0], [0, 0]], np.uint8)).fraction == 0.25


def test_run_is_segment_gate_features_score_and_stops_at_a_closed_gate():
    image = np.full((4, 4), 200, np.uint8)
    prob = np.zeros((1, 1, 4, 4), np.float32)
    prob[0, 0, :2] = 0.9                                          # the top half is kidney
    unet = Recorder("mask", prob)
    vgg = Recorder("features", np.ones((1, 8), np.float32))
    booster = FixedBooster()
    laps = []
    g = Graph(size=4, vgg_channels=3, min_mask_fraction=0.5)
    result = g.run(image, unet, vgg, booster, laps.append)
    assert laps == ["unet", "gate", "vgg", "booster"]
    assert result.gate.fraction == 0.5 and result.grade == 3 and result.probabilities[2] == 0.6
    feeds, outputs = unet.fed[0]
    assert outputs == ["mask"] and feeds["image"].shape == (1, 1, 4, 4)
    assert np.allclose(feeds["image"], 200 / 255)
    feeds, outputs = vgg.fed[0]
    assert outputs == ["features"] and feeds["image"].shape == (1, 3, 4, 4)   # gray repeated to the VGG's channels
    x = feeds["image"][0, 0]
    assert np.allclose(x[:2], 200 / 255) and (x[2:] == 0).all()               # the image under the mask
    assert booster.seen[0].shape == (1, 8)

    laps.clear()
    closed = Graph(size=4, min_mask_fraction=0.75).run(image, unet, vgg, booster, laps.append)
    assert laps == ["unet", "gate"] and closed.features is None and closed.grade is None
    assert len(vgg.fed) == 1                                                  # the VGG did not run again


def test_the_masked_image_saturates_like_cv2_multiply():
    from runtime.graph import masked
    img = np.array([[255, 7]], np.uint8)
    assert masked(img, np.array([[1, 0]], np.uint8)).tolist() == [[255, 0]]


def test_a_bundle_pins_its_graph_and_the_runtime_reads_it_back(tmp_path):
    """What training writes is what every pipeline reads: tensor names, gate and preprocessing, overrides aside."""
    from export.bundle_files import write_bundle_manifest
    from runtime.bundle import Bundle
    pytest.importorskip("torch")
    for f in ("unet.onnx", "vgg.onnx", "booster.ubj"):
        (tmp_path / f).write_bytes(b"x")
    nets = {"unet": {"files": {"fp32": "unet.onnx"}, "input": {"name": "in0"}, "output": {"name": "prob"},
                     "channels": 1},
            "vgg": {"files": {"fp32": "vgg.onnx"}, "input": {"name": "in1"}, "output": {"name": "fc2"},
                    "channels": 3}}
    made = Graph(crimmins_iterations=3, mask_threshold=0.4, min_mask_fraction=0.1, unet_input="in0",
                 unet_output="prob", vgg_input="in1", vgg_output="fc2", vgg_channels=3)
    write_bundle_manifest(tmp_path, nets, {}, made, demo=True)
    bundle = Bundle.load(tmp_path)
    assert bundle.graph() == made
    assert json.loads((tmp_path / "manifest.json").read_text())["preprocess"]["crimmins_iterations"] == 3
    opened = bundle.graph(min_mask_fraction=0.0)
    assert opened.min_mask_fraction == 0.0 and opened.mask_threshold == 0.4
