"""Training, pruning, ONNX export and quantization, the manifest, and the ONNX Runtime wrapper."""
