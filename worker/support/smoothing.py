"""SmoothQuant activation smoothing, folded into an ONNX graph (exact in float).

Both INT8 optimizers use it before quantizing. Transformer activations have a few outlier
channels (MiniLM: channel 99 reaches 28 where the median channel peaks at 1.7), and one scale
per activation tensor then leaves most tokens a handful of quantization steps. For every
MatMul with a constant 2-D weight ``W [K, N]``, ``smooth`` runs the float model once on the
samples, takes the per-channel peak ``a_k`` of its input and the per-row peak ``w_k`` of ``W``
(rows of all MatMuls sharing that input), sets ``s_k = a_k**alpha / w_k**(1-alpha)`` (clipped
to ``SMOOTH_CLIP``), scales ``W``'s rows by ``s`` and inserts ``Mul(x, 1/s)`` in front of those
MatMuls only (other consumers of ``x`` see it unchanged). The measurements behind the default
``alpha`` are in ``worker/plugins/int8_dynamic.py``.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from shared.arrays import Arrays

SMOOTH_CLIP = (1e-2, 1e2)


def smooth(model: Path, target: Path, samples: Arrays, alpha: float) -> Path | None:
    """Write a smoothed copy of ``model`` to ``target``; returns its path.

    Returns None, writing nothing, when there is nothing to smooth or the float model does not
    run on the samples. The float outputs are unchanged up to rounding.
    """
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    proto = onnx.load(str(model))
    initializers = {init.name: init for init in proto.graph.initializer}
    groups = _smoothable_matmuls(proto, initializers)
    if not groups:
        return None
    peaks = _activation_peaks(proto, groups, target.parent / "probe.onnx", samples)
    if peaks is None:
        return None

    producers = {}
    for index, node in enumerate(proto.graph.node):
        for name in node.output:
            producers[name] = index
    inserts: list[tuple[int, object]] = []
    for x, nodes in groups.items():
        weights = [numpy_helper.to_array(initializers[n.input[1]]) for n in nodes]
        if any(w.shape[0] != peaks[x].shape[0] for w in weights):
            continue
        w_peak = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
        scale = np.maximum(peaks[x], 1e-5) ** alpha / np.maximum(w_peak, 1e-5) ** (1.0 - alpha)
        scale = np.clip(scale, *SMOOTH_CLIP).astype(np.float32)
        for node, w in zip(nodes, weights, strict=True):
            initializers[node.input[1]].CopyFrom(
                numpy_helper.from_array((w * scale[:, None]).astype(np.float32), node.input[1])
            )
        inverse = f"{x}/modelyard_smooth_inv"
        smoothed = f"{x}/modelyard_smoothed"
        proto.graph.initializer.append(numpy_helper.from_array((1.0 / scale).astype(np.float32), inverse))
        for node in nodes:
            node.input[0] = smoothed
        inserts.append((producers.get(x, -1), helper.make_node("Mul", [x, inverse], [smoothed], name=smoothed)))
    if not inserts:
        return None
    nodes = list(proto.graph.node)
    for position, mul in sorted(inserts, key=lambda item: item[0], reverse=True):
        nodes.insert(position + 1, mul)  # right after the producer keeps the order topological
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    onnx.save_model(proto, str(target))
    return target


def _smoothable_matmuls(proto, initializers: dict) -> dict[str, list]:
    """MatMuls with a float 2-D weight used nowhere else, grouped by their activation input."""
    from onnx import TensorProto

    graph_inputs = {value.name for value in proto.graph.input}
    uses: dict[str, int] = defaultdict(int)
    for node in proto.graph.node:
        for name in node.input:
            uses[name] += 1
    groups: dict[str, list] = defaultdict(list)
    for node in proto.graph.node:
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
            continue
        x, w = node.input
        init = initializers.get(w)
        if (init is None or x in initializers or w in graph_inputs or uses[w] != 1
                or init.data_type != TensorProto.FLOAT or len(init.dims) != 2):
            continue
        groups[x].append(node)
    return groups


def _activation_peaks(proto, groups: dict[str, list], probe_path: Path, samples: Arrays) -> dict | None:
    """Per-channel |max| of each grouped activation on the samples; None when the model does not run."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    from shared.inference.runtime import load_session

    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    known_outputs = {value.name for value in probe.graph.output}
    probe.graph.output.extend(
        helper.make_tensor_value_info(x, TensorProto.FLOAT, None) for x in groups if x not in known_outputs
    )
    probe_path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(probe, str(probe_path))
    del probe
    try:
        peaks = {}
        activations = load_session(probe_path).run(samples)
        for x in groups:
            value = np.asarray(activations[x], dtype=np.float32)
            peaks[x] = np.abs(value.reshape(-1, value.shape[-1])).max(axis=0)
        return peaks
    except Exception:
        return None
    finally:
        probe_path.unlink(missing_ok=True)
