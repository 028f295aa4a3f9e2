"""The optimize stage: one task per variant (fan-out) that builds the variant and gates it; no timing.

Every variant is measured the same way: fidelity against the *source* reference outputs stored
by the convert stage, on the gate part of the samples, which no optimizer saw
(``worker.stages.holdout``); the optimizers get the calibration part, its reference outputs and
the job's gate. Both figures are recorded (``fidelity`` is the gate part's, ``calibration_fidelity``
the calibration part's), plus top-1 accuracy where the job gave eval data. ``fp32`` is the
baseline variant: the converted model as is.

Latency is not measured here: a variant timed in its own task, at its own moment, is compared
with an fp32 timed at another, and the verdict follows the machine's load. The select stage
(``worker.stages.select_measure``) times fp32 and every variant that passed, side by side.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from shared.arrays import load_arrays
from shared.errors import UserInputError, one_line
from shared.inference.generation import gate_reasons, is_generation_folder, read_genai_config, score_folder
from shared.jobspec import BASELINE, Gate
from shared.manifest import Manifest
from shared.storage import FileRef, digest_of_files
from worker.context import StageContext
from worker.gpu import ENGINE_CACHE, Execution
from worker.plugins import registry
from worker.plugins.base import OptimizeRequest, TensorInfo
from worker.stages.convert import REFERENCE, SAMPLES
from worker.stages.holdout import GATE_ROWS, RULE_VERSION, Holdout, fixed_batch, split
from worker.stages.steps import StepOutput, run_step, tool_versions
from worker.support.genai_builder import generation_companions
from worker.support.quant_tuning import quantization_summary

# Compute-heavy operators that run in floating point unless their inputs come from a DequantizeLinear
# (a QDQ graph runs those in int8): the second tie-break between variants of equal size.
FLOAT_OPS = ("MatMul", "Gemm", "Conv", "ConvTranspose", "Einsum", "FusedMatMul", "Attention", "MultiHeadAttention")


def holdout_of(convert: Manifest, samples: dict, reference: dict) -> Holdout:
    """The calibration and gate parts of a convert step's samples (see ``worker.stages.holdout``)."""
    inputs = [TensorInfo.from_dict(t) for t in convert.info["inputs"]]
    return split(samples, reference, gate_rows=convert.info.get(GATE_ROWS),
                 fixed=fixed_batch(inputs, convert.info["model_file"]))


def run_variant(ctx: StageContext, convert_key: str, variant: str) -> tuple[Manifest, bool]:
    convert = ctx.load_manifest(convert_key)
    if convert is None:
        raise UserInputError(f"convert step {convert_key[:12]} has no manifest in {ctx.store.uri}")
    spec = ctx.spec.optimize.variant(variant)
    gate = ctx.spec.optimize.gate.model_dump(mode="json")
    parts = [] if variant == BASELINE else spec.parts
    optimizers = [registry.optimizer(name) for name in parts]
    execution = Execution.plan(ctx.queue, optimizers, ctx.worker)  # refuses TensorRT variants without TensorRT
    tools: tuple[str, ...] = ("onnx", "onnxruntime")
    eval_ref = FileRef.from_dict(ctx.record["eval_data"]) if ctx.record.get("eval_data") else None
    for optimizer in optimizers:
        tools += optimizer.tools

    def compute(tmp: Path) -> StepOutput:
        inputs = tmp / "in"
        ctx.store.get_files(convert.files, inputs)
        samples = load_arrays(inputs / SAMPLES, what="samples")
        reference = load_arrays(inputs / REFERENCE, what="reference outputs")
        holdout = holdout_of(convert, samples, reference)
        model = inputs / convert.info["model_file"]
        for index, optimizer in enumerate(optimizers):
            suffix = model.suffix.lstrip(".")
            if suffix not in optimizer.applies_to:
                raise UserInputError(f"variant {variant!r}: {optimizer.name} does not apply to .{suffix} models")
            workdir = tmp / f"step{index}-{optimizer.name}"
            workdir.mkdir()
            model = optimizer.optimize(
                OptimizeRequest(
                    model=model,
                    workdir=workdir,
                    samples=holdout.calibration,
                    reference=holdout.calibration_reference,
                    gate=dict(gate),
                    task=convert.info.get("task"),
                    inputs=[TensorInfo.from_dict(t) for t in convert.info["inputs"]],
                    outputs=[TensorInfo.from_dict(t) for t in convert.info["outputs"]],
                    params=spec.params_for(optimizer.name),
                    settings=ctx.settings,
                )
            )
        out = tmp / "out"
        out.mkdir()
        for path in model_files(model):
            shutil.copy2(path, out / path.name)
        if (model.parent / ENGINE_CACHE).is_dir():  # TensorRT engines: an artifact beside the model
            shutil.copytree(model.parent / ENGINE_CACHE, out / ENGINE_CACHE)
        final = out / model.name
        eval_data = None
        if eval_ref:
            eval_data = load_arrays(ctx.store.get_file(eval_ref, tmp / "eval_data.npz"), what="model.eval_data")
        metrics = measure_fidelity(ctx, final, holdout, execution=execution, eval_data=eval_data)
        if execution.torch_fallback:
            metrics.update(_torch_fallback(ctx, tmp, samples, reference, convert.info.get("task")))
        metrics["size_bytes"] = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
        metrics["float_ops"] = float_op_count(final)
        metrics["quantization"] = quantization_summary(final)
        return StepOutput(folder=out, metrics=metrics, info={**convert.info, "model_file": final.name})

    return run_step(
        ctx,
        stage=f"optimize:{variant}",
        input_digest=digest_of_files(convert.files),
        params={"of": spec.of, "params": spec.params, "pool": ctx.queue, "holdout": RULE_VERSION,
                "sandbox": ctx.settings.sandbox,  # the genai-* variants load the user's source
                "gate": gate if optimizers else None, **execution.key_params(),
                **({"eval_data_digest": eval_ref.digest} if eval_ref else {})},
        tools=tool_versions(tools),
        compute=compute,
    )


def model_files(model: Path) -> list[Path]:
    """The model file and the external-data files it references (same folder)."""
    files = [model]
    if model.suffix == ".onnx":
        import onnx
        from onnx.external_data_helper import uses_external_data

        proto = onnx.load(str(model), load_external_data=False)
        locations = set()
        for tensor in _initializers(proto.graph):
            if uses_external_data(tensor):
                for entry in tensor.external_data:
                    if entry.key == "location":
                        locations.add(entry.value)
        files += [model.parent / loc for loc in sorted(locations)]
        files += generation_companions(model)  # a text-generation model's genai_config.json and tokenizer
    return files


_model_files = model_files  # the name the benchmark scripts import


def _initializers(graph: Any):
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.g is not None and attr.g.node:
                yield from _initializers(attr.g)


def float_op_count(model: Path) -> int | None:
    """Compute-heavy nodes (``FLOAT_OPS``) that run in floating point; None for a non-ONNX model."""
    if model.suffix != ".onnx":
        return None
    import onnx

    graph = onnx.load(str(model), load_external_data=False).graph
    dequantized = {out for node in graph.node if node.op_type == "DequantizeLinear" for out in node.output}
    return sum(1 for node in graph.node
               if node.op_type in FLOAT_OPS and not any(name in dequantized for name in node.input))


def measure_fidelity(ctx: StageContext, model: Path, holdout: Holdout, execution: Execution | None = None,
                     eval_data: dict | None = None) -> dict:
    """Fidelity on the gate part (and the calibration part), and top-1 accuracy on the job's eval data."""
    from shared.inference.accuracy import top1_accuracy
    from shared.inference.fidelity import compare
    from shared.inference.runtime import load_session
    from worker.gpu import CUDA_PROVIDERS, gpu_name

    providers = execution.providers(model.parent / ENGINE_CACHE) if execution else None
    session = load_session(model, threads=ctx.settings.bench_threads, providers=providers)
    fidelity = compare(holdout.gate_reference, session.run(holdout.gate))
    calibration = compare(holdout.calibration_reference, session.run(holdout.calibration)) \
        if holdout.separate else fidelity
    metrics = {
        "fidelity": fidelity,
        "calibration_fidelity": {k: v for k, v in calibration.items() if k != "outputs"},
        "holdout": holdout.describe(),
        "provider": session.provider,
    }
    if is_generation_folder(model.parent):  # perplexity and next-token agreement, on the gate rows
        metrics["generation"] = score_folder(session, holdout.gate, holdout.gate_reference,
                                             read_genai_config(model.parent))
    if eval_data is not None:
        metrics.update(top1_accuracy(session, eval_data))
    if session.provider in CUDA_PROVIDERS:
        metrics["gpu"] = gpu_name()
    return metrics


def _torch_fallback(ctx: StageContext, tmp: Path, samples: dict, reference: dict, task: str | None) -> dict:
    """The source model timed in PyTorch on CUDA, where ONNX Runtime has no CUDA (see worker.gpu)."""
    from worker.gpu import torch_cuda_available, torch_cuda_figures

    if ctx.spec.model.format != "hf-transformers" or not torch_cuda_available():
        return {}
    try:
        source = ctx.store.get_files(ctx.source_files, tmp / "torch-source")
        return {"torch_cuda": torch_cuda_figures(source, task, samples, reference, runs=ctx.settings.bench_runs,
                                                 warmup=ctx.settings.bench_warmup)}
    except Exception as exc:  # an extra figure: its failure must not sink the variant
        return {"torch_cuda": {"error": f"{type(exc).__name__}: {one_line(exc)}"}}


def gate_verdict(gate: Gate, metrics: dict) -> tuple[bool, str]:
    """Whether a variant passes the job's fidelity gate, and why not."""
    if metrics.get("generation"):  # text-generation: perplexity and next-token agreement, not logits cosine
        reasons = gate_reasons(gate, metrics["generation"], None)
        return (not reasons, "; ".join(reasons) or "passed the gate")
    fidelity = metrics["fidelity"]
    reasons = []
    if gate.cosine_min is not None and fidelity["cosine_min"] < gate.cosine_min:
        reasons.append(f"cosine_min {fidelity['cosine_min']:.4f} < gate {gate.cosine_min}")
    if gate.max_abs is not None and fidelity["max_abs"] > gate.max_abs:
        reasons.append(f"max_abs {fidelity['max_abs']:.4g} > gate {gate.max_abs}")
    top1 = fidelity.get("top1_agreement")
    if gate.top1_min is not None and top1 is not None and top1 < gate.top1_min:
        reasons.append(f"top1_agreement {top1:.4f} < gate {gate.top1_min}")
    return (not reasons, "; ".join(reasons) or "passed the gate")


def variant_summary(variant: str, manifest: Manifest, cached: bool, ctx: StageContext) -> dict:
    """The variant's row of the selection table, before the select stage times it."""
    passed, reason = gate_verdict(ctx.spec.optimize.gate, manifest.metrics) if ctx.spec.optimize else (True, "")
    metrics = manifest.metrics
    fidelity = metrics["fidelity"]
    calibration = metrics.get("calibration_fidelity") or {}
    holdout = metrics.get("holdout") or {}
    return {
        "variant": variant,
        "step_key": manifest.step_key,
        "size_bytes": metrics["size_bytes"],
        "float_ops": metrics.get("float_ops"),
        "cosine_min": fidelity["cosine_min"],
        "cosine_mean": fidelity["cosine_mean"],
        "max_abs": fidelity["max_abs"],
        "top1_agreement": fidelity.get("top1_agreement"),
        "calibration_cosine_min": calibration.get("cosine_min"),
        "calibration_cosine_mean": calibration.get("cosine_mean"),
        "gate_rows": len(holdout.get("gate_rows") or []),
        "calibration_rows": holdout.get("calibration_rows"),
        "holdout": holdout.get("rule"),
        "accuracy": metrics.get("accuracy"),
        "generation": metrics.get("generation"),
        "quantization": metrics.get("quantization"),
        "provider": metrics.get("provider"),
        "gpu": metrics.get("gpu"),
        "passed": passed,
        "reason": reason,
        "cached": cached,
        "worker": manifest.worker if cached else ctx.worker,
        "queue": ctx.queue,
    }
