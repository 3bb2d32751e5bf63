"""Metric loggers (JSONL always; TensorBoard and Weights & Biases on request) and plots."""
