"""edgefleet's toolchain: die data, training, pruning, export, INT8 quantization, signed bundles.

Needs the `optimize` extra (torch, onnx, skl2onnx, scikit-learn); never imported on a device.
"""
