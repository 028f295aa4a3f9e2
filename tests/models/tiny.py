"""The small ONNX models tests build on the fly: a 4→3 MatMul (optionally + Relu) on input ``x[batch, 4]``."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def tiny_onnx(path: Path, weights: np.ndarray | None = None, *, relu: bool = False, seed: int | None = None,
              scale: float = 1.0) -> Path:
    """Write ``y = x @ w`` (``relu``: then Relu). ``w`` is ``weights``, else random from ``seed``, else
    ``arange(12) * scale`` as a 4×3 matrix. Distinct weights make a distinct model and step key."""
    import onnx
    from onnx import TensorProto, helper

    if weights is None:
        weights = (np.random.default_rng(seed).standard_normal((4, 3)) if seed is not None
                   else np.arange(12).reshape(4, 3) * scale)
    weights = np.asarray(weights, dtype=np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m" if relu else "y"])]
    if relu:
        nodes.append(helper.make_node("Relu", ["m"], ["y"]))
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor("w", TensorProto.FLOAT, [4, 3], weights.flatten().tolist())],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path
