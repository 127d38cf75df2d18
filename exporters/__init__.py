"""Export of the fused latency predictor (TorchScript, ONNX) and runtime helpers.

- ``tree_table``: the XGBoost prefill booster compiled into one exact lookup table.
- ``fused``: the torch module (physics baseline x table, decode network, calibrated bounds)
  that gets exported.
- ``export``: ``latkit export`` — write ``latency_predictor.onnx`` / ``.ts`` and prove parity.
- ``budget``: the exported budget query (largest output length within a latency budget).
- ``runtime``: ``LatencyPredictor``, serving the ONNX file with numpy + onnxruntime only.
- ``predict``: ``latkit predict`` — single configuration or a CSV/Parquet batch.
"""
