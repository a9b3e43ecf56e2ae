"""INT8 calibration: calibration frames -> Q/DQ ONNX, and the accuracy report of INT8 against FP32.

    run.py       `sonoscore calibrate`: frames -> runtime preprocessing -> quantize -> check -> bundle
    quantize.py  onnxruntime quantize_static in the form TensorRT builds from (symmetric INT8, per-channel
                 weights, each 4x4 stride-2 ConvTranspose as a sub-pixel Conv + DepthToSpace (or per tensor),
                 float biases and output layers)
    report.py    INT8/FP16 against FP32 end to end: mask IoU, gate, feature cosine, grade, probabilities
    checks.py    TensorRT-readiness rules checked on the written files

Frames go through `runtime.pipeline.Pipeline.prepare`, the preprocessing the device runs, so the INT8 ranges are
measured on the inputs deployment will feed.
"""
