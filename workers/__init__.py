"""The inference runtime: model library, ONNX Runtime sessions, the per-batch pipeline, dead letters."""
