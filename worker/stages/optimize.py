"""The optimize stage: one task per variant (fan-out), then a selection over their results.

Every variant is measured the same way: fidelity against the *source* reference outputs
stored by the convert stage, and latency on the samples with pinned threads, one benchmark
at a time per host. ``fp32`` is the baseline variant: the converted model as is.
"""

from __future__ import annotations

import shutil
import socket
from pathlib import Path
from typing import Any

from shared.errors import UserInputError
from shared.jobspec import BASELINE, Gate
from shared.manifest import Manifest, load_manifest
from shared.storage import FileRef, digest_of_files
from worker.context import StageContext
from worker.gpu import ENGINE_CACHE, Execution
from worker.plugins import registry
from worker.plugins.base import OptimizeRequest, TensorInfo
from worker.stages.arrays import load_arrays
from worker.stages.convert import REFERENCE, SAMPLES
from worker.steps import StepOutput, run_step, tool_versions

SLOWER = "rejected: slower than fp32"  # a verdict that passed the gate but loses to the baseline on latency


def run_variant(ctx: StageContext, convert_key: str, variant: str) -> tuple[Manifest, bool]:
    convert = load_manifest(ctx.store, convert_key)
    if convert is None:
        raise UserInputError(f"convert step {convert_key[:12]} has no manifest in {ctx.store.uri}")
    spec = ctx.spec.optimize.variant(variant)
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
                    samples=samples,
                    task=convert.info.get("task"),
                    inputs=[TensorInfo.from_dict(t) for t in convert.info["inputs"]],
                    outputs=[TensorInfo.from_dict(t) for t in convert.info["outputs"]],
                    params=spec.params_for(optimizer.name),
                )
            )
        out = tmp / "out"
        out.mkdir()
        for path in _model_files(model):
            shutil.copy2(path, out / path.name)
        if (model.parent / ENGINE_CACHE).is_dir():  # TensorRT engines: an artifact beside the model
            shutil.copytree(model.parent / ENGINE_CACHE, out / ENGINE_CACHE)
        final = out / model.name
        eval_data = None
        if eval_ref:
            eval_data = load_arrays(ctx.store.get_file(eval_ref, tmp / "eval_data.npz"), what="model.eval_data")
        metrics = measure(ctx, final, samples, reference, execution=execution, eval_data=eval_data)
        if execution.torch_fallback:
            metrics.update(_torch_fallback(ctx, tmp, samples, reference, convert.info.get("task")))
        metrics["size_bytes"] = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
        return StepOutput(folder=out, metrics=metrics, info={**convert.info, "model_file": final.name})

    return run_step(
        ctx,
        stage=f"optimize:{variant}",
        input_digest=digest_of_files(convert.files),
        params={"of": spec.of, "params": spec.params, "pool": ctx.queue, "threads": ctx.settings.bench_threads,
                "runs": ctx.settings.bench_runs, **execution.key_params(),
                **({"eval_data_digest": eval_ref.digest} if eval_ref else {})},
        tools=tool_versions(tools),
        compute=compute,
    )


def _model_files(model: Path) -> list[Path]:
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
    return files


def _initializers(graph: Any):
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.g is not None and attr.g.node:
                yield from _initializers(attr.g)


def measure(ctx: StageContext, model: Path, samples: dict, reference: dict,
            execution: Execution | None = None, eval_data: dict | None = None) -> dict:
    """Fidelity against the reference, latency, and top-1 accuracy when the job gave labelled eval data."""
    from worker.accuracy import top1_accuracy
    from worker.fidelity import compare
    from worker.gpu import CUDA_PROVIDERS, gpu_name
    from worker.latency import measure as measure_latency
    from worker.runtime import load_session

    providers = execution.providers(model.parent / ENGINE_CACHE) if execution else None
    session = load_session(model, threads=ctx.settings.bench_threads, providers=providers)
    fidelity = compare(reference, session.run(samples))
    lock = ctx.jobs.redis.lock(f"modelyard:bench:{socket.gethostname()}", timeout=600, sleep=0.2)
    with lock:  # one benchmark at a time per host: latency is meaningless when cores are shared
        latency = measure_latency(session, samples, runs=ctx.settings.bench_runs, warmup=ctx.settings.bench_warmup)
    metrics = {"fidelity": fidelity, "latency": latency, "provider": session.provider}
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
    except Exception as exc:  # noqa: BLE001 - an extra figure: its failure must not sink the variant
        return {"torch_cuda": {"error": f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"}}


def gate_verdict(gate: Gate, metrics: dict) -> tuple[bool, str]:
    """Whether a variant passes the job's fidelity gate, and why not."""
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
    passed, reason = gate_verdict(ctx.spec.optimize.gate, manifest.metrics) if ctx.spec.optimize else (True, "")
    latency = manifest.metrics["latency"]
    return {
        "variant": variant,
        "step_key": manifest.step_key,
        "size_bytes": manifest.metrics["size_bytes"],
        "p50_ms": latency["p50_ms"],
        "p95_ms": latency["p95_ms"],
        "cosine_min": manifest.metrics["fidelity"]["cosine_min"],
        "cosine_mean": manifest.metrics["fidelity"]["cosine_mean"],
        "max_abs": manifest.metrics["fidelity"]["max_abs"],
        "top1_agreement": manifest.metrics["fidelity"].get("top1_agreement"),
        "accuracy": manifest.metrics.get("accuracy"),
        "provider": manifest.metrics.get("provider"),
        "gpu": manifest.metrics.get("gpu"),
        "passed": passed,
        "reason": reason,
        "cached": cached,
        "worker": manifest.worker if cached else ctx.worker,
        "queue": ctx.queue,
    }


def select(ctx: StageContext, results: list[dict]) -> tuple[dict | None, list[dict]]:
    """Pick the variant to deploy (None when nothing qualifies) and the table with every verdict."""
    baseline = next((r for r in results if r["variant"] == BASELINE), None)
    table = []
    for row in results:
        row = dict(row)
        if row["variant"] != BASELINE:
            row["size_ratio"] = row["size_bytes"] / baseline["size_bytes"] if baseline else None
            row["speedup"] = baseline["p50_ms"] / row["p50_ms"] if baseline and row["p50_ms"] else None
        table.append(row)
    gate = ctx.spec.optimize.gate
    for row in table:  # the accuracy gate needs the baseline's accuracy: it is known only here
        if row["variant"] == BASELINE:
            continue
        if baseline and row.get("accuracy") is not None and baseline.get("accuracy") is not None:
            row["accuracy_drop"] = baseline["accuracy"] - row["accuracy"]
        why = accuracy_verdict(gate, row, baseline)
        if why:
            row["reason"] = f"{row['reason']}; {why}" if not row["passed"] else why
            row["passed"] = False
    objective = ctx.spec.optimize.objective
    candidates = []
    for row in table:
        if row["variant"] == BASELINE:
            row["verdict"] = "baseline"
        elif not row["passed"]:
            row["verdict"] = f"rejected: {row['reason']}"
        elif objective == "latency" and baseline and row["p50_ms"] > baseline["p50_ms"]:
            row["verdict"] = f"{SLOWER} ({row['p50_ms']:.1f} ms vs {baseline['p50_ms']:.1f} ms)"
        else:
            row["verdict"] = "candidate"
            candidates.append(row)
    if not candidates:
        return None, table
    key = (lambda r: (r["p50_ms"], r["size_bytes"])) if objective == "latency" else (
        lambda r: (r["size_bytes"], r["p50_ms"]))
    best = min(candidates, key=key)
    best["verdict"] = "selected"
    return best, table


def accuracy_verdict(gate: Gate, row: dict, baseline: dict | None) -> str | None:
    """Why a variant fails the gate's ``accuracy_drop_max`` against fp32; None when it does not."""
    if gate.accuracy_drop_max is None:
        return None
    if baseline is None or baseline.get("accuracy") is None:
        return "accuracy drop unknown: the fp32 baseline has no measured accuracy"
    if row.get("accuracy") is None:
        return "accuracy not measured"
    drop = baseline["accuracy"] - row["accuracy"]
    if drop > gate.accuracy_drop_max + 1e-9:  # accuracies are fractions of rows: allow rounding
        return (f"accuracy {row['accuracy']:.4f} is {drop:.4f} below fp32's {baseline['accuracy']:.4f} "
                f"> gate accuracy_drop_max {gate.accuracy_drop_max}")
    return None


def format_rejections(table: list[dict]) -> str:
    """What was tried and why each was rejected; names the variants that passed the gate but lost on latency."""
    rows = [f"{r['variant']} ({r['verdict']})" for r in table if r["variant"] != BASELINE]
    message = "; ".join(rows)
    slower = [r["variant"] for r in table if r.get("passed") and r.get("verdict", "").startswith(SLOWER)]
    if slower:
        message += (f". Passed the fidelity gate but are slower than fp32, so objective: latency keeps none of them: "
                    f"{', '.join(slower)}; set optimize.objective: size to deploy the smallest of them")
    return message
