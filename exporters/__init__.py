"""Export of the fused latency predictor (TorchScript, ONNX) and runtime helpers."""
