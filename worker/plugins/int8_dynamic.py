"""Dynamic INT8 quantization (weights INT8 ahead of time, activations quantized at run time).

Default recipe (measured on all-MiniLM-L6-v2, batch 8 x 128, 2 threads, ORT 1.32; see
``scripts/bench/int8_recipe.py``): per-token cosine min 0.97 -> 0.994 (0.991 on held-out
sentences), 0.256x the FP32 bytes, ~0.4x FP32 latency on a VNNI CPU.

1. **Activation smoothing** (SmoothQuant, folded into the graph; exact in float). Dynamic
   quantization uses one scale per activation tensor, and transformer activations have a few
   outlier channels (MiniLM: channel 99 reaches 28 where the median channel peaks at 1.7), so
   most tokens get a handful of quantization steps. For every MatMul with a constant 2-D
   weight ``W [K, N]`` the plugin runs the float model once on ``request.samples``, takes the
   per-channel peak ``a_k`` of its input and the per-row peak ``w_k`` of ``W`` (rows of all
   MatMuls sharing that input), sets ``s_k = a_k**alpha / w_k**(1-alpha)`` (clipped to
   [0.01, 100]), scales ``W``'s rows by ``s`` and inserts ``Mul(x, 1/s)`` in front of those
   MatMuls only (other consumers of ``x`` see it unchanged). ``smooth_alpha`` 0.75 was best
   on held-out text (0.6: 0.977, 0.7: 0.990, 0.75: 0.991, 0.8: 0.986, 1.0: 0.95 per-token min).
2. **Per-channel weights**; per-tensor (``per_channel: false``) loses far more.
3. **Asymmetric int8 weights** (a zero point per output channel). Smoothing makes weight
   columns lopsided, and symmetric int8 spends half its levels on the empty side: MiniLM on an
   Intel Xeon with AVX-512 VNNI, per-token min 0.988 symmetric, 0.994 asymmetric, at the same
   speed (ORT's U8S8 kernel, 0.42x FP32). uint8 weights (U8U8) reach the same fidelity but run
   at ~1.0x FP32 latency there.
4. **Weight type checked by measurement** (``weight_type: auto``). On AVX2 CPUs without VNNI
   ORT's U8S8 kernel sums pairs of uint8 x int8 products in int16 and saturates (measured on
   an AMD EPYC: symmetric int8 weights 0.982 per-token min, 0.66x FP32; uint8 weights 0.9935,
   0.81x). ``auto`` builds the int8 model, keeps it if its per-vector cosine min against the
   float model on ``request.samples`` reaches ``target_cosine``, else also builds the uint8
   model and keeps whichever is closer. On a VNNI CPU the first build passes: one build.

Parameters (all optional):
  per_channel: bool = true        per-output-channel weight scales
  reduce_range: bool = false      7-bit weights (for old CPUs whose U8S8 kernel saturates)
  smooth: bool = true             step 1; skipped (as if false) for models above 1.8 GB or
                                  without MatMul weights; needs request.samples
  smooth_alpha: float = 0.75      migration strength, 0..1
  weight_type: str = "auto"       "auto" | "int8" | "uint8" (step 4)
  weight_symmetric: bool = false  step 3; true gives ORT's default symmetric int8 weights
  target_cosine: float = 0.99     the cosine min ``auto`` accepts int8 weights at

The chosen settings and the measured cosine are written into the model's metadata
(``modelyard.int8.*``). Cost on MiniLM (90 MB, 2 cores): one float run for the activation
peaks, then one quantize+run round (two where step 4 falls back), ~5-15 s in all.

Scratch files. Measured with onnxruntime 1.32 / onnx 1.23 and absolute paths, the quantizer
writes nothing into the process cwd, but it does write ``<name>-inferred.onnx`` beside the
*input* model and deletes it again: that fails on a read-only input folder and races when two
tasks quantize the same cached file. So the input is first copied into a scratch folder in the
workdir. Above 2 GiB (external data) ``onnx`` checks the data file's name against the cwd, so
only then the quantizer runs with the cwd in the scratch folder, under a process-wide lock.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
from pathlib import Path

from shared.errors import UserInputError
from worker.plugins.base import Optimizer, OptimizeRequest

CWD_LOCK = threading.RLock()
PARAMS = {
    "per_channel": bool,
    "reduce_range": bool,
    "smooth": bool,
    "smooth_alpha": float,
    "weight_type": str,
    "weight_symmetric": bool,
    "target_cosine": float,
}
WEIGHT_TYPES = ("auto", "int8", "uint8")
SMOOTH_CLIP = (1e-2, 1e2)


@contextlib.contextmanager
def working_directory(path: Path):
    """chdir for the block, under a process-wide lock; restores the previous cwd."""
    with CWD_LOCK:
        previous = os.getcwd()
        os.chdir(path)
        try:
            yield
        finally:
            os.chdir(previous)


def _drop_preprocess_hint(record: logging.LogRecord) -> bool:
    """quantize_dynamic logs a pre-processing hint on the root logger at every call; drop it."""
    return not str(record.msg).startswith("Please consider to run pre-processing")


def check_params(variant: str, params: dict, known: dict[str, type]) -> dict:
    for key, value in params.items():
        if key not in known:
            raise UserInputError(
                f"optimize variant {variant}: unknown parameter {key!r} (known: {', '.join(known) or 'none'})"
            )
        if not isinstance(value, known[key]):
            raise UserInputError(
                f"optimize variant {variant}: parameter {key} must be a {known[key].__name__}, got {value!r}"
            )
    return params


def stage_copy(model: Path, scratch: Path) -> Path:
    """Copy a model file and its external data into scratch; returns the copy's path."""
    from worker.runtime import external_data_files

    scratch.mkdir(parents=True, exist_ok=True)
    target = scratch / model.name
    shutil.copyfile(model, target)
    for location in external_data_files(model):
        (scratch / location).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(model.parent / location, scratch / location)
    return target


def _typed_for_contrib_ops(model: Path, target: Path) -> Path:
    """Give contrib-op outputs a type, or the quantizer cannot handle a graph-optimized model.

    The quantizer types tensors with onnx's shape inference, which does not know the
    com.microsoft ops (Attention, SkipLayerNormalization, ...) the graph optimizer fuses in,
    and fails with "Unable to find data type for weight_name=...". ONNX Runtime's symbolic
    shape inference knows them.
    """
    import onnx

    proto = onnx.load(str(model), load_external_data=False)
    if all(node.domain in ("", "ai.onnx") for node in proto.graph.node):
        return model
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    from worker.runtime import save_onnx

    try:
        inferred = SymbolicShapeInference.infer_shapes(onnx.load(str(model)), auto_merge=True)
    except Exception as exc:  # noqa: BLE001
        message = " ".join(str(exc).split())[:200]
        raise UserInputError(
            f"int8-dynamic cannot type the contrib ops of {model.name} (from a graph optimization?): {message}; "
            "quantize before optimizing the graph instead (variant 'int8-dynamic+graph')"
        ) from None
    target.parent.mkdir(parents=True, exist_ok=True)
    return save_onnx(inferred, target)


def _smooth(model: Path, target: Path, samples, alpha: float) -> Path | None:
    """Write a SmoothQuant-smoothed copy of ``model`` to ``target`` (step 1 of the docstring).

    Returns None, writing nothing, when there is nothing to smooth or the float model does not
    run on the samples. The float outputs are unchanged up to rounding.
    """
    from collections import defaultdict

    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from worker.runtime import load_session

    proto = onnx.load(str(model))
    initializers = {init.name: init for init in proto.graph.initializer}
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
    if not groups:
        return None

    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    known_outputs = {value.name for value in probe.graph.output}
    probe.graph.output.extend(
        helper.make_tensor_value_info(x, TensorProto.FLOAT, None) for x in groups if x not in known_outputs
    )
    probe_path = target.parent / "probe.onnx"
    target.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(probe, str(probe_path))
    del probe
    try:
        peaks = {}
        activations = load_session(probe_path).run(samples)
        for x in groups:
            value = np.asarray(activations[x], dtype=np.float32)
            peaks[x] = np.abs(value.reshape(-1, value.shape[-1])).max(axis=0)
        del activations
    except Exception:  # noqa: BLE001 - no smoothing rather than no model
        return None
    finally:
        probe_path.unlink(missing_ok=True)

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
        for node, w in zip(nodes, weights):
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


def _cosine_min(model: Path, samples, reference) -> float:
    from worker.fidelity import compare
    from worker.runtime import load_session

    return float(compare(reference, load_session(model).run(samples))["cosine_min"])


def _set_metadata(model: Path, values: dict) -> None:
    import onnx

    proto = onnx.load(str(model))
    props = {p.key: p.value for p in proto.metadata_props}
    props.update({f"modelyard.int8.{k}": str(v) for k, v in values.items()})
    del proto.metadata_props[:]
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save_model(proto, str(model))


class Int8Dynamic(Optimizer):
    name = "int8-dynamic"
    applies_to = ("onnx",)

    def optimize(self, request: OptimizeRequest) -> Path:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        from worker.runtime import PROTO_LIMIT, check_loads, load_session, model_bytes

        raw = {k: float(v) if PARAMS.get(k) is float and type(v) is int else v for k, v in request.params.items()}
        params = check_params(self.name, raw, PARAMS)
        per_channel = params.get("per_channel", True)
        weight_type = params.get("weight_type", "auto")
        if weight_type not in WEIGHT_TYPES:
            raise UserInputError(
                f"optimize variant {self.name}: weight_type must be one of {', '.join(WEIGHT_TYPES)}, got {weight_type!r}"
            )
        alpha = params.get("smooth_alpha", 0.75)
        if not 0.0 <= alpha <= 1.0:
            raise UserInputError(f"optimize variant {self.name}: smooth_alpha must be within 0..1, got {alpha}")
        symmetric = params.get("weight_symmetric", False)
        target_cosine = params.get("target_cosine", 0.99)
        samples = request.samples or None
        workdir = Path(request.workdir).absolute()
        output = workdir / "model.onnx"
        scratch = workdir / ".int8-scratch"
        shutil.rmtree(scratch, ignore_errors=True)
        meta: dict = {"per_channel": per_channel, "weight_symmetric": symmetric, "smooth_alpha": "off"}
        try:
            source = stage_copy(Path(request.model).absolute(), scratch / "input")
            source = _typed_for_contrib_ops(source, scratch / "typed" / "model.onnx")
            large = model_bytes(source) > PROTO_LIMIT
            reference = None
            if weight_type == "auto" and samples is not None and not large:
                try:
                    reference = load_session(source).run(samples)
                except UserInputError:
                    reference = None
            if params.get("smooth", True) and samples is not None and not large:
                smoothed = _smooth(source, scratch / "smooth" / "model.onnx", samples, alpha)
                if smoothed is not None:
                    source = smoothed
                    meta["smooth_alpha"] = alpha
            logging.getLogger().addFilter(_drop_preprocess_hint)

            def build(kind: str, target: Path) -> Path:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.unlink(missing_ok=True)
                target.with_name(target.name + ".data").unlink(missing_ok=True)
                with working_directory(scratch) if large else contextlib.nullcontext():
                    try:
                        quantize_dynamic(
                            model_input=str(source),
                            model_output=str(target),
                            per_channel=per_channel,
                            reduce_range=params.get("reduce_range", False),
                            weight_type=QuantType.QUInt8 if kind == "uint8" else QuantType.QInt8,
                            use_external_data_format=large,
                            extra_options={"WeightSymmetric": symmetric},
                        )
                    except Exception as exc:  # noqa: BLE001
                        message = " ".join(str(exc).split())[:300]
                        raise UserInputError(
                            f"int8-dynamic could not quantize {Path(request.model).name}: "
                            f"{type(exc).__name__}: {message}"
                        ) from None
                return target

            if weight_type != "auto" or reference is None:  # nothing to measure: int8, the fast kernel
                kind = "int8" if weight_type == "auto" else weight_type
                build(kind, output)
                meta["weight_type"] = kind if weight_type != "auto" else "int8 (auto, unmeasured)"
            else:
                candidates = {}
                for kind in ("int8", "uint8"):  # int8 first: the fast kernel, kept where it is close enough
                    path = build(kind, scratch / kind / "model.onnx")
                    candidates[kind] = (_cosine_min(path, samples, reference), path)
                    if kind == "int8" and candidates[kind][0] >= target_cosine:
                        break
                kind = max(candidates, key=lambda k: (candidates[k][0], k == "int8"))
                shutil.move(str(candidates[kind][1]), str(output))
                meta["weight_type"] = f"{kind} (auto)"
                meta["cosine_min_vs_float"] = ", ".join(f"{k} {v[0]:.4f}" for k, v in candidates.items())
            if not large:
                _set_metadata(output, meta)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        check_loads(output, self.name)
        return output
