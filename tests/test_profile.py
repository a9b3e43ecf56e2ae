"""`sonoscore bench --profile` (runtime/profile.py): per-operator-type time of each network per precision from
onnxruntime's profiler, on the tiny bundle with an INT8 set made for timing. Figures that depend on this CPU's
kernels (which operator an INT8 Conv becomes, the milliseconds) are not asserted."""
import json
import re
import shutil

import onnx
import pytest

from tests.conftest import sonoscore


@pytest.fixture(scope="module")
def profiled(tiny_bundle, tmp_path_factory):
    d = tmp_path_factory.mktemp("profile")
    b = d / "bundle"
    shutil.copytree(tiny_bundle, b)
    r = sonoscore("calibrate", "--bundle", b, "--frames", "sim://kidney?frames=8&fps=0&seed=5", "--count", 4,
                  "--holdout", 4, "--timing-only")
    assert r.returncode == 0, r.stderr[-3000:]
    r = sonoscore("bench", "--bundle", b, "--profile", "--precision", "fp32,int8", "--frames", 3,
                  "--threads", 1, "--json", d / "p.json")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return b, r, json.loads((d / "p.json").read_text())


def test_the_per_op_table_has_conv_rows_for_both_networks(profiled):
    b, r, out = profiled
    assert list(out["networks"]) == ["unet", "vgg"] and out["runs"] == 3 and out["threads"] == 1
    for net in ("unet", "vgg"):
        res = out["networks"][net]
        assert list(res) == ["fp32", "int8"]
        assert res["fp32"]["file"] == f"{net}.onnx" and res["int8"]["file"] == f"{net}.int8.onnx"
        convs = sum(n.op_type == "Conv" for n in onnx.load(str(b / res["fp32"]["file"])).graph.node)
        fp32_conv = res["fp32"]["ops"]["Conv"]
        assert 1 <= fp32_conv["nodes"] <= convs and fp32_conv["ms"] > 0
        int8_convs = {op: v for op, v in res["int8"]["ops"].items() if "Conv" in op}
        assert int8_convs and all(v["nodes"] >= 1 for v in int8_convs.values())
        for p in ("fp32", "int8"):
            assert res[p]["node_ms"] == pytest.approx(sum(v["ms"] for v in res[p]["ops"].values()), abs=1e-3)
            assert res[p]["wall_ms"] > 0 and res[p]["wall_p50_ms"] > 0
        # the printed table: a header per network, a Conv row with both precisions' cells
        block = r.stdout.split(f"{net}: ms per run by operator type (nodes)")[1]
        assert re.search(r"^Conv\s+[\d.]+ \(\s*\d+\)\s+", block, re.MULTILINE), r.stdout
        assert "speed-up on fp32, p50" in block


def test_profile_refuses_a_precision_the_bundle_lacks_and_options_it_does_not_take(tiny_bundle):
    r = sonoscore("bench", "--bundle", tiny_bundle, "--profile", "--precision", "fp32,int8", "--frames", 1)
    assert r.returncode == 2 and "has no int8 files" in r.stderr and "Traceback" not in r.stderr
    r = sonoscore("bench", "--bundle", tiny_bundle, "--profile", "--plot", "x.png")
    assert r.returncode == 2 and "draws no picture" in r.stderr
    r = sonoscore("bench", "--bundle", tiny_bundle, "--profile", "--baseline", "torch")
    assert r.returncode == 2 and "--baseline does not apply" in r.stderr
