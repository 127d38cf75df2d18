"""Export of the fused latency predictor (TorchScript, ONNX) and runtime helpers.

- ``tree_table``: XGBoost prefill boosters compiled into one exact lookup table.
- ``fused``: the torch module (table lookup + decode network) that gets exported.
- ``export``: ``latkit export`` — write ``latency_predictor.onnx`` / ``.ts`` and prove parity.
- ``runtime``: ``LatencyPredictor``, serving the ONNX file with numpy + onnxruntime only.
- ``predict``: ``latkit predict`` — single configuration or a CSV/Parquet batch.
"""
