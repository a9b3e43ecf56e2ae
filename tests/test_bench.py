"""The bench's shared parts (runtime.bench): one percentile function, one precision parser, one summary per
configuration and the speed-up against a reference. The whole commands run in test_cli (CPU pipeline),
test_baseline (--device cpu against the torch baseline) and test_gpu_pipeline (--device cuda)."""
import math

import numpy as np
import pytest

from runtime.bench import (PRECISIONS, STAGES, bench_frames, config_names, parse_graphs, parse_precisions,
                           percentiles, speedups, summary)
from runtime.errors import UserError


def test_percentiles_are_numpys_linear_percentiles_of_known_values():
    values = [10.0, 1.0, 4.0, 2.0, 3.0, 7.0, 5.0, 6.0, 9.0, 8.0]       # 1..10, shuffled
    p = percentiles(values)
    assert p == {"p50_ms": 5.5, "p95_ms": pytest.approx(9.55), "p99_ms": pytest.approx(9.91), "max_ms": 10.0}
    for q in (50, 95, 99):
        assert p[f"p{q}_ms"] == pytest.approx(float(np.percentile(values, q)), abs=1e-12)
    assert percentiles([2.5]) == {"p50_ms": 2.5, "p95_ms": 2.5, "p99_ms": 2.5, "max_ms": 2.5}


def test_percentiles_skip_values_that_are_not_finite_and_are_nan_when_none_is():
    assert percentiles([1.0, np.nan, 3.0, np.inf]) == percentiles([1.0, 3.0])
    assert all(math.isnan(v) for v in percentiles([]).values())
    assert all(math.isnan(v) for v in percentiles([np.nan]).values())


def test_precisions_parse_in_order_once_each():
    assert parse_precisions("fp32") == ["fp32"]
    assert parse_precisions(" fp32, int8 ,fp16,") == ["fp32", "int8", "fp16"]
    assert parse_precisions("int8,fp32,int8") == ["int8", "fp32"]
    assert set(PRECISIONS) == {"fp32", "fp16", "int8"}


@pytest.mark.parametrize("text", ["fp64", "fp32,bf16", "", " , ", "FP32"])
def test_a_bad_precision_list_is_refused_in_one_sentence(text):
    with pytest.raises(UserError) as e:
        parse_precisions(text)
    assert str(e.value) == f"--precision {text}: use fp32, fp16 or int8, or several joined by commas"


def test_cuda_graph_choices_and_configuration_names():
    assert parse_graphs("both") == [False, True]
    with pytest.raises(UserError, match=r"^--cuda-graphs maybe: use off, on or both$"):
        parse_graphs("maybe")
    assert config_names("cuda", ["fp32", "fp16"], [False, True]) == [
        ("fp32", "fp32", False), ("fp32+graphs", "fp32", True), ("fp16", "fp16", False),
        ("fp16+graphs", "fp16", True)]
    assert config_names("cpu", ["fp32", "int8"], [False, True]) == [("fp32", "fp32", False), ("int8", "int8", False)]


def _samples(unet, vgg, total, **more):
    n = len(total)
    smp = {s: [1.0] * n for s in STAGES}
    smp.update(unet=unet, vgg=vgg, total=total, **more)
    return smp


def test_summary_of_one_configuration_from_known_latencies():
    smp = _samples(unet=[2.0, 4.0, 6.0], vgg=[1.0, 1.0, 1.0], total=[5.0, 8.0, 10.0])
    s = summary(smp, wall=0.5, frames=3, files={"unet": "unet.onnx", "vgg": "vgg.onnx"})
    assert s["fps"] == pytest.approx(6.0) and s["frames"] == 3
    assert s["stages"]["total"] == percentiles([5.0, 8.0, 10.0]) and set(s["stages"]) == set(STAGES)
    assert s["networks_p50_ms"] == 5.0                        # per frame UNet + VGG: 3, 5, 7
    assert s["cpu_overhead_fraction"] == pytest.approx(1 - 15 / 23)
    assert "kernels_p50_ms" not in s and "host_prep" not in s   # CPU pipelines have neither


def test_summary_takes_the_kernel_figure_from_the_kernel_timer_not_from_the_upload_span():
    smp = _samples(unet=[2.0, 2.0], vgg=[1.0, 1.0], total=[4.0, 4.0], host_prep=[0.2, 0.4],
                   host_copy_upload_preprocess=[0.9, 1.1])
    timer = {"kernels": [0.03, 0.05], "preprocess": [0.02, 0.03], "gate": [0.01, 0.02], "upload": [0.3, 0.3]}
    s = summary(smp, wall=0.01, frames=2, files={}, kernels=timer)
    assert s["kernels_p50_ms"] == pytest.approx(0.04)
    assert s["kernel_timer"]["frames"] == 2 and s["kernel_timer"]["upload"]["p50_ms"] == pytest.approx(0.3)
    assert s["host_copy_upload_preprocess"]["p50_ms"] == pytest.approx(1.0) and s["host_prep"]["max_ms"] == 0.4


def test_speedups_are_the_reference_p50_over_each_configurations():
    per = {"base": summary(_samples([8.0], [8.0], [20.0]), 1, 1, {}),
           "fast": summary(_samples([2.0], [2.0], [5.0]), 1, 1, {})}
    assert speedups(per, "base") == {"fast": {"total_p50": 4.0, "networks_p50": 4.0}}


def test_bench_frames_are_kidney_frames_made_the_same_way_each_time():
    a, b = bench_frames(3, seed=5), bench_frames(3, seed=5)
    assert [f.index for f in a] == [0, 1, 2]
    assert all(np.array_equal(x.pixels, y.pixels) for x, y in zip(a, b))
