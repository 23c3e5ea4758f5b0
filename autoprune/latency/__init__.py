"""The latency side: target devices, measurement backends (onnxruntime, TVM), per-op latency
tables, and the predictor that scores a policy in microseconds. Never imports search/."""
