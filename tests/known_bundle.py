"""The known-function bundle several tests share: an identity UNet (the mask is the image), a VGG that returns the
image's mean brightness as its one feature, and a booster trained on the features and grades the test gives, so
every figure a test checks follows from the frames it draws."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


def write_known_bundle(b: Path, features: np.ndarray, grades0: np.ndarray, **booster_params) -> Path:
    """Write the bundle into the new folder `b`; the booster learns `grades0` (0..3) from `features` [N, 1]
    (xgboost multi:softprob, max_depth 2, seed 0, overridable by `booster_params`, `num_boost_round` included)."""
    onnx = pytest.importorskip("onnx")
    xgb = pytest.importorskip("xgboost")
    from onnx import TensorProto, helper

    from runtime.bundle import CLASS_NAMES, write_manifest
    from runtime.graph import Graph
    b.mkdir(parents=True)
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, 224, 224])
    unet = helper.make_graph([helper.make_node("Identity", ["image"], ["mask"])], "unet", [image],
                             [helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["N", 1, 224, 224])])
    vgg = helper.make_graph([helper.make_node("ReduceMean", ["image"], ["features"], axes=[2, 3], keepdims=0)],
                            "vgg", [image], [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", 1])])
    for name, g in (("unet", unet), ("vgg", vgg)):
        onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8),
                  str(b / f"{name}.onnx"))
    params = {"objective": "multi:softprob", "num_class": 4, "max_depth": 2, "seed": 0, **booster_params}
    rounds = params.pop("num_boost_round", 4)
    booster = xgb.train(params, xgb.DMatrix(np.asarray(features), label=np.asarray(grades0)), num_boost_round=rounds)
    booster.save_model(str(b / "booster.ubj"))
    graph = Graph(crimmins_iterations=0)     # no speckle filter: rectangles stay exact rectangles
    net = lambda name, out, shape: {"files": {"fp32": f"{name}.onnx"},  # noqa: E731
                                    "input": {"name": "image", "shape": ["N", 1, 224, 224]},
                                    "output": {"name": out, "shape": shape}, "channels": 1}
    write_manifest(b, {"name": "known-functions", "classes": CLASS_NAMES, **graph.manifest_sections(),
                       "networks": {"unet": net("unet", "mask", ["N", 1, 224, 224]),
                                    "vgg": net("vgg", "features", ["N", 1])},
                       "booster": {"file": "booster.ubj", "num_class": 4, "num_features": 1}})
    return b
