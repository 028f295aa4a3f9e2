"""Inference on converted models (ONNX Runtime, LiteRT): sessions, fidelity, latency and accuracy.

Used by the worker stages and by the serving package alike; imports only third-party code.
"""
