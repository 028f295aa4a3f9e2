"""A quantized model that can run any of its weight MatMuls/Gemms in float, chosen per run.

The accuracy-aware tuning (``worker.support.quant_tuning``) asks, again and again, "how close
is the quantized model to the float one if these nodes stay float?". Answering that by
re-quantizing with ``nodes_to_exclude`` costs a quantizer run and a session load per question
(~5 s on MiniLM, 36 candidate nodes per step). ``SwitchModel`` answers it with one run of one
session: every candidate node has its float twin beside its quantized form, and a graph input
(a 0/1 value per node) mixes them, ``y = y_int8 + keep * (y_float - y_int8)``. The numbers are
those of the model the quantizer writes with the same ``nodes_to_exclude`` (the activation's
quantization is shared with the other consumers there too); the final model is still built by
the quantizer and measured for real.

Works on whatever the quantizer emits (QOperator or QDQ) as long as the quantized graph keeps
the float model's tensor names at a node's input and output, which ONNX Runtime's quantizers do.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared.arrays import Arrays
from worker.support.smoothing import FLOAT_PART

MASK_INPUT = "modelyard_keep_float"
WEIGHT_OPS = ("MatMul", "Gemm")


@dataclass(frozen=True)
class WeightNode:
    """A MatMul or Gemm with a constant 2-D weight: what the tuning may keep in float."""

    name: str
    output: str
    op_type: str
    macs: int  # multiply-adds per input row (K x N): the node's share of the compute

    @property
    def short(self) -> str:
        """The name without the exporter's ``/model/`` prefix and ``/MatMul`` tail, for reports."""
        name = self.name.removeprefix("/model/").removeprefix("/")
        for tail in ("/MatMul", "/Gemm", "_MatMul", "_Gemm"):
            name = name.removesuffix(tail)
        return name or self.name


def weight_nodes(proto) -> list[WeightNode]:
    """The graph's MatMul/Gemm nodes whose second input is a float 2-D initializer, in graph order."""
    from onnx import TensorProto

    initializers = {init.name: init for init in proto.graph.initializer}
    found = []
    for node in proto.graph.node:
        if node.op_type not in WEIGHT_OPS or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            continue
        weight = initializers.get(node.input[1])
        if weight is None or weight.data_type != TensorProto.FLOAT or len(weight.dims) != 2 or not node.name:
            continue
        if node.name.endswith(FLOAT_PART):  # outlier channels' MatMul: float by construction, never a candidate
            continue
        found.append(WeightNode(node.name, node.output[0], node.op_type, int(weight.dims[0] * weight.dims[1])))
    return found


class SwitchModel:
    """The quantized model plus a float twin of each candidate, selected by ``MASK_INPUT``."""

    def __init__(self, float_model: Path, quantized_model: Path, target: Path, *, threads: int = 2) -> None:
        import onnx

        from shared.inference.runtime import load_session

        float_proto = onnx.load(str(float_model))
        quantized = onnx.load(str(quantized_model))
        candidates = weight_nodes(float_proto)
        self.nodes = _add_float_twins(quantized, float_proto, candidates)
        del float_proto
        target.parent.mkdir(parents=True, exist_ok=True)
        onnx.save_model(quantized, str(target))
        del quantized
        self._session = load_session(target, threads=threads)
        self._index = {node.name: i for i, node in enumerate(self.nodes)}

    def run(self, feeds: Arrays, keep_float: Iterable[str] = ()) -> Arrays:
        mask = np.zeros(len(self.nodes), dtype=np.float32)
        for name in keep_float:
            mask[self._index[name]] = 1.0
        return self._session.run({**feeds, MASK_INPUT: mask})


def _add_float_twins(quantized, float_proto, candidates: list[WeightNode]) -> list[WeightNode]:
    """Rewire ``quantized`` in place; returns the candidates that got a twin (the quantized ones)."""
    from onnx import TensorProto, helper, numpy_helper

    producers = {out: node for node in quantized.graph.node for out in node.output}
    float_nodes = {node.name: node for node in float_proto.graph.node}
    float_inits = {init.name: init for init in float_proto.graph.initializer}
    known = {init.name for init in quantized.graph.initializer} | {i.name for i in quantized.graph.input}
    known |= {out for node in quantized.graph.node for out in node.output}
    twinned: list[WeightNode] = []
    after: dict[int, list] = {}  # position in the quantized graph -> nodes to insert right after it
    positions = {id(node): i for i, node in enumerate(quantized.graph.node)}
    for candidate in candidates:
        producer = producers.get(candidate.output)
        original = float_nodes[candidate.name]
        if producer is None or producer.op_type == original.op_type and list(producer.input) == list(original.input):
            continue  # left in float by the quantizer: nothing to switch
        inputs = []
        for name in original.input:
            if name in float_inits:
                twin_name = f"{name}/modelyard_float"
                if twin_name not in known:
                    copy = TensorProto()
                    copy.CopyFrom(float_inits[name])
                    copy.name = twin_name
                    quantized.graph.initializer.append(copy)
                    known.add(twin_name)
                inputs.append(twin_name)
            elif name in known or not name:
                inputs.append(name)
            else:
                break  # an input the quantized graph renamed away: cannot twin this node
        else:
            out = candidate.output
            q_out, f_out = f"{out}/modelyard_q", f"{out}/modelyard_f"
            index = numpy_helper.from_array(np.array(len(twinned), dtype=np.int64), f"{out}/modelyard_index")
            quantized.graph.initializer.append(index)
            for i, name in enumerate(producer.output):
                if name == out:
                    producer.output[i] = q_out
            twin = helper.make_node(original.op_type, inputs, [f_out], name=f"{original.name}/modelyard_float")
            twin.attribute.extend(original.attribute)
            after.setdefault(positions[id(producer)], []).extend([
                twin,
                helper.make_node("Gather", [MASK_INPUT, index.name], [f"{out}/modelyard_keep"]),
                helper.make_node("Sub", [f_out, q_out], [f"{out}/modelyard_delta"]),
                helper.make_node("Mul", [f"{out}/modelyard_delta", f"{out}/modelyard_keep"], [f"{out}/modelyard_kd"]),
                helper.make_node("Add", [q_out, f"{out}/modelyard_kd"], [out]),
            ])
            twinned.append(candidate)
    nodes = []
    for i, node in enumerate(quantized.graph.node):
        nodes.append(node)
        nodes.extend(after.get(i, []))
    del quantized.graph.node[:]
    quantized.graph.node.extend(nodes)
    quantized.graph.input.append(helper.make_tensor_value_info(MASK_INPUT, TensorProto.FLOAT, [len(twinned)]))
    return twinned
