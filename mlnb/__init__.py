"""Notebook-first, reproducible ML pipeline: from raw tabular data to a signed, quantized ONNX model served at low latency.

Modules:

- `mlnb.stats.estimate`: A model's performance on a monitoring window without its labels: confidence-based estimation (CBPE) for classifiers, direct loss estimation (DLE) for regressors, each with the confidence band the window's size allows."""

__version__ = "0.0.1"
