"""The deploy stage: smoke-test the chosen model, publish it as a new version, move the alias.

The smoke gate loads the model in the runtime it will be served with and compares its answers
on the stored samples with the source reference; a model that fails it never gets a version
and the alias stays where it was. Deploying an artifact the repository already holds reuses
that version, so a redelivered or resubmitted deploy is harmless.
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from pathlib import Path

from shared.errors import UserInputError
from shared.manifest import load_manifest
from shared.repository import ModelRepository
from shared.storage import digest_of_files
from shared.triton import config_pbtxt
from worker.context import StageContext
from worker.stages.arrays import load_arrays
from worker.stages.convert import REFERENCE, SAMPLES
from worker.stages.optimize import gate_verdict
from worker.steps import step_lease
from worker.tf_export import SAVED_MODEL


def run_deploy(ctx: StageContext, model_key: str, convert_key: str, lineage: dict) -> dict:
    spec = ctx.spec
    deploy = spec.deploy
    model_step = load_manifest(ctx.store, model_key)
    convert = load_manifest(ctx.store, convert_key)
    if model_step is None or convert is None:
        raise UserInputError("deploy: the model to deploy has no manifest in the artifact store")
    # saved_model/: the TensorFlow source a .tflite's optimizers re-convert from, not part of the served model.
    model_files = [f for f in model_step.files
                   if f.path not in (SAMPLES, REFERENCE) and not f.path.startswith(SAVED_MODEL + "/")]
    artifact_digest = digest_of_files(model_files)
    repository = ModelRepository.open(deploy.repository)
    name = spec.model.name

    # One deploy of an artifact at a time: a redelivered or resubmitted twin of this deploy waits here,
    # then finds the version published and reuses it instead of claiming a second one.
    lease_key = hashlib.sha256(f"{repository.uri}\0{name}\0{artifact_digest}".encode()).hexdigest()
    with step_lease(ctx, f"deploy-{lease_key}"):
        version = repository.find_version(name, artifact_digest)
        smoke = None
        if version is None:
            with tempfile.TemporaryDirectory(prefix="modelyard-deploy-") as tmp:
                folder = ctx.store.get_files(model_files, Path(tmp) / "model")
                ctx.store.get_files([convert.file(SAMPLES), convert.file(REFERENCE)], Path(tmp) / "check")
                model_file = folder / model_step.info["model_file"]
                smoke = smoke_gate(ctx, model_file, Path(tmp) / "check")
                ctx.check_not_cancelled()  # a cancelled job never claims a version
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
                    "lineage": {**lineage, "smoke": smoke},
                }
                config = config_pbtxt(name, model_step.info["format"], model_step.info["inputs"], model_step.info["outputs"])
                repository.publish(name, version, files, manifest, config)
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
    }


def smoke_gate(ctx: StageContext, model_file: Path, check: Path) -> dict:
    from worker.fidelity import compare
    from worker.runtime import load_session

    samples = load_arrays(check / SAMPLES, what="samples")
    reference = load_arrays(check / REFERENCE, what="reference outputs")
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
