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

import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared.arrays import Arrays

SMOOTH_CLIP = (1e-2, 1e2)
FLOAT_PART = "/modelyard_float_channels"  # name tail of the MatMuls that take outlier channels in float
MAX_FLOAT_SHARE = 1 / 32  # at most this share of an activation's channels is taken out of the int8 path


@dataclass(frozen=True)
class Smoothed:
    """A smoothed model: the nodes that must stay float (the outlier channels' MatMuls) and what was done."""

    path: Path
    float_nodes: tuple[str, ...]
    activations: int  # activations smoothed
    float_channels: int  # channels taken out of the int8 path, over all activations


def smooth(model: Path, target: Path, samples: Arrays, alpha: float, min_outlier: float = 0.0,
           max_steps: float = 0.0) -> Smoothed | None:
    """Write a smoothed copy of ``model`` to ``target``.

    ``min_outlier``: an activation is smoothed only when its largest channel peak is at least this
    many times its median channel's. ``max_steps`` (0: off): where the smoothed activation's range is
    more than this many times its RMS value, its most extreme channels (``float_channels``, at most
    ``MAX_FLOAT_SHARE`` of them) leave the int8 path: their smoothing factor is 0 and their weight
    rows are zeroed, so they no longer set the activation's quantization range, and ``Gather`` + a
    small float ``MatMul`` (``FLOAT_PART``) adds their exact contribution to the output
    (LLM.int8()'s decomposition, with the channels fixed at calibration).

    Returns None, writing nothing, when there is nothing to smooth or the float model does not run
    on the samples. The float outputs are unchanged up to rounding.
    """
    import onnx
    from onnx import helper, numpy_helper

    proto = onnx.load(str(model))
    initializers = {init.name: init for init in proto.graph.initializer}
    groups = _smoothable_matmuls(proto, initializers)
    if not groups:
        return None
    stats = _activation_stats(proto, groups, target.parent / "probe.onnx", samples)
    if stats is None:
        return None

    producers = {}
    for index, node in enumerate(proto.graph.node):
        for name in node.output:
            producers[name] = index
    positions = {id(node): index for index, node in enumerate(proto.graph.node)}
    after: dict[int, list] = defaultdict(list)  # nodes to insert after the node at that index
    float_nodes: list[str] = []
    smoothed_count = split_count = 0
    for x, nodes in groups.items():
        weights = [numpy_helper.to_array(initializers[n.input[1]]) for n in nodes]
        peak = stats[x].peak
        if any(w.shape[0] != peak.shape[0] for w in weights):
            continue
        median = max(float(np.median(peak)), 1e-12)
        if peak.max() < min_outlier * median:
            continue  # no outlier channels: nothing to migrate, and its Mul would cost time
        w_peak = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
        scale = np.maximum(peak, 1e-5) ** alpha / np.maximum(w_peak, 1e-5) ** (1.0 - alpha)
        scale = np.clip(scale, *SMOOTH_CLIP).astype(np.float32)
        inverse_scale = (1.0 / scale).astype(np.float32)
        outliers = (float_channels(stats[x], scale, max_steps, max(1, int(peak.shape[0] * MAX_FLOAT_SHARE)))
                    if max_steps > 0 else np.array([], dtype=np.int64))
        inverse_scale[outliers] = 0.0
        if len(outliers):
            kept = f"{x}{FLOAT_PART}"
            index_name = f"{kept}/index"
            proto.graph.initializer.append(numpy_helper.from_array(outliers.astype(np.int64), index_name))
            after[producers.get(x, -1)].append(helper.make_node("Gather", [x, index_name], [kept], name=kept, axis=-1))
        for node, w in zip(nodes, weights, strict=True):
            scaled = (w * scale[:, None]).astype(np.float32)
            scaled[outliers] = 0.0
            initializers[node.input[1]].CopyFrom(numpy_helper.from_array(scaled, node.input[1]))
            if len(outliers):
                name, output = f"{node.name}{FLOAT_PART}", node.output[0]
                part_weight = f"{name}/weight"
                proto.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w[outliers]), part_weight))
                node.output[0] = f"{output}/modelyard_int8_part"
                after[positions[id(node)]] += [
                    helper.make_node("MatMul", [f"{x}{FLOAT_PART}", part_weight], [f"{name}/out"], name=name),
                    helper.make_node("Add", [node.output[0], f"{name}/out"], [output], name=f"{name}/add"),
                ]
                float_nodes.append(name)
        inverse = f"{x}/modelyard_smooth_inv"
        smoothed = f"{x}/modelyard_smoothed"
        proto.graph.initializer.append(numpy_helper.from_array(inverse_scale, inverse))
        for node in nodes:
            node.input[0] = smoothed
        after[producers.get(x, -1)].insert(0, helper.make_node("Mul", [x, inverse], [smoothed], name=smoothed))
        smoothed_count += 1
        split_count += len(outliers)
    if not smoothed_count:
        return None
    nodes = list(after.get(-1, []))  # inserts after a graph input come first
    for index, node in enumerate(proto.graph.node):
        nodes.append(node)
        nodes.extend(after.get(index, []))  # right after the producer
    nodes = _in_topological_order(nodes)  # a split MatMul's Add now produces what a Mul after it reads
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    onnx.save_model(proto, str(target))
    return Smoothed(target, tuple(float_nodes), smoothed_count, split_count)


def _in_topological_order(nodes: list) -> list:
    """``nodes`` reordered so that each comes after the producers of its inputs, otherwise as given."""
    produced = {name for node in nodes for name in node.output}
    ready: set[str] = set()
    ordered, waiting = [], list(nodes)
    while waiting:
        for position, node in enumerate(waiting):
            if all(not name or name not in produced or name in ready for name in node.input):
                ordered.append(waiting.pop(position))
                ready.update(node.output)
                break
        else:
            return nodes  # a cycle: not ours to fix; the quantizer's check reports it
    return ordered


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


def _activation_stats(proto, groups: dict[str, list], probe_path: Path, samples: Arrays) -> dict | None:
    """Per-channel statistics of each grouped activation on the samples; None when the model does not run."""
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
        stats = {}
        activations = load_session(probe_path).run(samples)
        for x in groups:
            value = np.asarray(activations[x], dtype=np.float32)
            rows = value.reshape(-1, value.shape[-1])
            stats[x] = ChannelStats(rows.max(axis=0), rows.min(axis=0), np.square(rows, dtype=np.float64).mean(axis=0))
        return stats
    except Exception:
        return None
    finally:
        probe_path.unlink(missing_ok=True)


@dataclass(frozen=True)
class ChannelStats:
    """An activation's per-channel largest and smallest value and mean square, over the calibration rows."""

    high: np.ndarray
    low: np.ndarray
    mean_square: np.ndarray

    @property
    def peak(self) -> np.ndarray:
        return np.maximum(self.high, -self.low)


def float_channels(stats: ChannelStats, scale: np.ndarray, max_steps: float, limit: int) -> np.ndarray:
    """The fewest channels (the most extreme first, at most ``limit``) whose removal brings the smoothed
    activation's range under ``max_steps`` times its RMS value; empty when it already is.

    Dynamic quantization spends 255 steps on the whole tensor's range ``[min(low, 0), high]``; a
    typical value (the RMS) is then ``255 / (range / rms)`` steps. One extreme channel sets the range
    for all of them: MiniLM's FFN down-projection inputs, smoothed, measured range/RMS 24-93, every
    other activation 10-21 (2-core AMX Xeon, alpha 0.6).
    """
    high, low = stats.high / scale, stats.low / scale
    mean_square = stats.mean_square / np.square(scale, dtype=np.float64)
    order = np.argsort(-np.maximum(high, -low))  # the most extreme channels first
    keep = np.ones(len(scale), dtype=bool)
    for count in range(min(limit, len(scale) - 1) + 1):
        spread = max(float(high[keep].max()), 0.0) - min(float(low[keep].min()), 0.0)
        rms = math.sqrt(float(mean_square[keep].mean()))
        if rms <= 0 or spread <= max_steps * rms:
            return np.sort(order[:count])
        keep[order[count]] = False
    return np.array([], dtype=np.int64)  # the limit does not reach it: not worth the float work
