"""INT8 calibration: calibration frames -> Q/DQ ONNX, and the accuracy report of INT8 against FP32.

Not built yet (the INT8 issue). It will feed frames through `runtime.preprocess.preprocess`, the function the
device runs, so INT8 ranges match deployment.
"""
