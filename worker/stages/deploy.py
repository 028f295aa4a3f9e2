"""The deploy stage: smoke-test the chosen model, publish it as a new version, move the alias.

The smoke gate loads the model in the runtime it will be served with and compares its answers
on the stored samples with the source reference; a model that fails it never gets a version
and the alias stays where it was. Deploying an artifact the repository already holds reuses
that version, so a redelivered or resubmitted deploy is harmless.

Only repositories matching ``MODELYARD_ALLOWED_REPOSITORIES`` are written, checked here by the
worker that publishes (a producer's own check can be skipped by anyone who writes to the queue).
Right before each irreversible act (claiming a version, publishing it, moving the alias) the
stage checks that the job is not cancelled and that it still holds its deploy lease.

With ``deploy.vertex`` the published version is also released on Vertex AI
(:func:`shared.vertex_release.deploy_version`) before the alias moves, so a release that fails
leaves the alias where it was, as a failed smoke gate does.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import tempfile
import time
from pathlib import Path

from shared.arrays import load_arrays
from shared.errors import UserInputError
from shared.inference.generation import GENERATION_TASK, is_generation_folder
from shared.jobspec import Gate
from shared.manifest import Manifest
from shared.repository import ModelRepository
from shared.storage import digest_of_files
from shared.triton import TensorRT, TritonConfig
from shared.vertex_release import deploy_version
from worker.context import StageContext
from worker.gpu import CALIBRATION_TABLE, ENGINE_CACHE
from worker.plugins import registry
from worker.stages.convert import REFERENCE, SAMPLES
from worker.stages.optimize import gate_verdict, holdout_of
from worker.stages.steps import step_lease
from worker.support.genai_builder import SOURCE_FOLDER
from worker.support.genai_smoke import generation_smoke
from worker.support.tf_export import SAVED_MODEL


def run_deploy(ctx: StageContext, model_key: str, convert_key: str, lineage: dict) -> dict:
    spec = ctx.spec
    deploy = spec.deploy
    model_step = ctx.load_manifest(model_key)
    convert = ctx.load_manifest(convert_key)
    if model_step is None or convert is None:
        raise UserInputError("deploy: the model to deploy has no manifest in the artifact store")
    # saved_model/, hf_source/: the sources the optimizers re-convert from (a .tflite's, a text-generation
    # model's), not part of the served model.
    model_files = [f for f in model_step.files if f.path not in (SAMPLES, REFERENCE)
                   and not f.path.startswith((SAVED_MODEL + "/", SOURCE_FOLDER + "/"))]
    artifact_digest = digest_of_files(model_files)
    check_allowed(deploy.repository, ctx.settings.allowed_repositories)
    repository = ModelRepository.open(deploy.repository)
    name = spec.model.name

    # One deploy of an artifact at a time: a redelivered or resubmitted twin of this deploy waits here,
    # then finds the version published and reuses it instead of claiming a second one.
    lease_key = hashlib.sha256(f"{repository.uri}\0{name}\0{artifact_digest}".encode()).hexdigest()
    with step_lease(ctx, f"deploy-{lease_key}") as lease:
        version = repository.find_version(name, artifact_digest)
        smoke = None
        if version is None:
            with tempfile.TemporaryDirectory(prefix="modelyard-deploy-") as tmp:
                folder = ctx.store.get_files(model_files, Path(tmp) / "model")
                ctx.store.get_files([convert.file(SAMPLES), convert.file(REFERENCE)], Path(tmp) / "check")
                model_file = folder / model_step.info["model_file"]
                smoke = smoke_gate(ctx, model_file, Path(tmp) / "check", convert)
                ctx.check_not_cancelled()  # a cancelled job never claims a version
                lease.ensure_held()
                version = repository.claim_version(name, {"job_id": ctx.job_id, "artifact_digest": artifact_digest})
                target_name = "model" + model_file.suffix
                files = {
                    (target_name if ref.path == model_file.name else ref.path): folder / ref.path for ref in model_files
                }
                manifest = {
                    "model": name,
                    "version": version,
                    "job_id": ctx.job_id,
                    "created": time.time(),
                    "artifact_digest": artifact_digest,
                    "model_file": target_name,
                    "format": model_step.info["format"],
                    "inputs": model_step.info["inputs"],
                    "outputs": model_step.info["outputs"],
                    **({"task": GENERATION_TASK} if model_step.info.get("task") == GENERATION_TASK else {}),
                    "lineage": {**lineage, "smoke": smoke},
                }
                info = model_step.info
                config = TritonConfig.for_model(name, info["format"], info["inputs"], info["outputs"],
                                                tensorrt=tensorrt_accelerator(ctx, lineage.get("variant"), files,
                                                                              name, version), task=info.get("task"))
                ctx.check_not_cancelled()  # the claimed version stays unpublished: never served, never reused
                lease.ensure_held()
                repository.publish(name, version, files, manifest, config=config)
        vertex = None
        if deploy.vertex is not None:  # before the alias moves: a failed Vertex release leaves it where it was

            def before_vertex_change() -> None:
                ctx.check_not_cancelled()
                lease.ensure_held()

            vertex = deploy_version(repository, name, version, spec, settings=ctx.settings, job_id=ctx.job_id,
                                    before_change=before_vertex_change)
        ctx.check_not_cancelled()  # a cancelled job moves no alias
        lease.ensure_held()
        previous = repository.set_alias(name, deploy.alias, version, reason=f"deploy job {ctx.job_id}")
    return {
        "repository": repository.uri,
        "model": name,
        "version": version,
        "alias": deploy.alias,
        "previous": previous,
        "uri": f"{repository.uri}/{name}/{version}/",
        "reused": smoke is None,
        "smoke": smoke,
        **({"vertex": vertex} if vertex is not None else {}),
    }


def tensorrt_accelerator(ctx: StageContext, variant: str | None, files: dict[str, Path], model: str,
                         version: int) -> TensorRT | None:
    """The Triton TensorRT block of a trt-fp16 / trt-int8 variant: its precision and its engine cache.

    The engine cache path is where Triton sees the version's ``trt_cache`` folder on local disk
    (``MODELYARD_TRITON_MODEL_ROOT``/<model>/<version>/trt_cache).
    """
    precision = None
    if variant and ctx.spec.optimize:
        for part in next((v.parts for v in ctx.spec.optimize.variants if v.id == variant), []):
            precision = precision or getattr(registry.optimizers.get(part), "tensorrt", None)
    if precision is None or not any(name.startswith(ENGINE_CACHE + "/") for name in files):
        return None
    root = ctx.settings.triton_model_root.rstrip("/")
    table = CALIBRATION_TABLE if f"{ENGINE_CACHE}/{CALIBRATION_TABLE}" in files else None
    return TensorRT(precision=precision.upper(), engine_cache=f"{root}/{model}/{version}/{ENGINE_CACHE}",
                    calibration_table=table)


def check_allowed(repository: str, patterns: list[str]) -> None:
    """Refuse a repository no pattern of MODELYARD_ALLOWED_REPOSITORIES matches (fnmatch, case-sensitive)."""
    uri = repository.rstrip("/")
    if not any(fnmatch.fnmatchcase(uri, pattern.rstrip("/")) for pattern in patterns):
        raise UserInputError(
            f"deploy.repository {repository!r} is not allowed on this worker: MODELYARD_ALLOWED_REPOSITORIES "
            f"is {json.dumps(patterns)}; an operator adds a pattern matching it to let jobs deploy there"
        )


def smoke_gate(ctx: StageContext, model_file: Path, check: Path, convert: Manifest | None = None) -> dict:
    from shared.inference.fidelity import compare
    from shared.inference.runtime import load_session

    samples = load_arrays(check / SAMPLES, what="samples")
    reference = load_arrays(check / REFERENCE, what="reference outputs")
    if ctx.spec.optimize and convert is not None:  # the optimize gate's rows: what the gate judged
        held_out = holdout_of(convert, samples, reference)
        samples, reference = held_out.gate, held_out.gate_reference
    if is_generation_folder(model_file.parent):  # perplexity, agreement, and a generation in ONNX Runtime GenAI
        gate = ctx.spec.optimize.gate if ctx.spec.optimize else Gate()
        return generation_smoke(model_file, samples, reference, gate, threads=ctx.settings.bench_threads,
                                alias=ctx.spec.deploy.alias)
    session = load_session(model_file, threads=ctx.settings.bench_threads)
    fidelity = compare(reference, session.run(samples))
    if ctx.spec.optimize:
        passed, reason = gate_verdict(ctx.spec.optimize.gate, {"fidelity": fidelity})
    else:
        tolerance = ctx.spec.convert.tolerance
        passed = fidelity["cosine_min"] >= tolerance.cosine_min
        reason = f"cosine_min {fidelity['cosine_min']:.4f} < {tolerance.cosine_min}"
    if not passed:
        raise UserInputError(f"deploy smoke gate failed, alias {ctx.spec.deploy.alias!r} not moved: {reason}")
    return fidelity
