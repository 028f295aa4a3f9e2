"""A job's work done by hand: the same library calls as the queued stages, one after another, in one process.

    python scripts/bench/pipeline_inline.py JOB.yaml [--reps 1]

The baseline of ``pipeline.py``: what a user who skips modelyard's queue would run. Convert
with the job's converter plugin and check it against the source framework; build every
variant (the fp32 baseline and the job's variants) with the optimizer plugins on the
calibration rows and gate each exactly as the optimize stage does (fidelity against the source
reference on the held-out rows); time fp32 and the variants that passed side by side as the
select stage does (``shared.inference.paired``, ``MODELYARD_PAIRED_*``); select with the select
stage's own rule; smoke-check the chosen model and publish it into the job's model repository.
No Redis, no artifact store, no step cache, no Celery: files stay in a scratch folder.
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def convert(spec, source: Path, workdir: Path, settings) -> tuple[Path, object]:
    from shared.errors import UserInputError
    from shared.inference.fidelity import compare
    from shared.inference.runtime import load_session
    from worker.plugins import registry
    from worker.plugins.base import ConvertRequest

    out = workdir / "convert"
    out.mkdir()
    request = ConvertRequest(source=source, model=spec.model, convert=spec.convert, workdir=out, settings=settings)
    result = registry.converters[spec.model.format]().convert(request)
    model = out / result.model_file
    session = load_session(model, threads=settings.bench_threads)
    fidelity = compare(result.reference, session.run(result.samples))
    if fidelity["cosine_min"] < spec.convert.tolerance.cosine_min:
        raise UserInputError(f"conversion changed the model's answers: cosine_min {fidelity['cosine_min']:.5f}")
    return model, result


def holdout(converted):
    """The calibration and gate parts of the conversion's samples, split as the optimize stage splits them."""
    from worker.stages.holdout import fixed_batch, split

    return split(converted.samples, converted.reference, gate_rows=None,
                 fixed=fixed_batch(converted.inputs, converted.model_file))


def build_variant(spec, variant: str, model: Path, converted, workdir: Path) -> Path:
    from shared.jobspec import BASELINE
    from worker.plugins import registry
    from worker.plugins.base import OptimizeRequest

    if variant == BASELINE:
        return model
    part = holdout(converted)
    variant_spec = spec.optimize.variant(variant)
    for index, name in enumerate(variant_spec.parts):
        step = workdir / f"{variant}-{index}-{name}"
        step.mkdir()
        model = registry.optimizer(name).optimize(OptimizeRequest(
            model=model, workdir=step, samples=part.calibration, reference=part.calibration_reference,
            gate=spec.optimize.gate.model_dump(mode="json"), task=spec.model.task, inputs=converted.inputs,
            outputs=converted.outputs, params=variant_spec.params_for(name)))
    return model


def measure(model: Path, converted, settings) -> dict:
    """Fidelity on the held-out (gate) rows and size, as the optimize stage measures them; no timing."""
    from shared.inference.fidelity import compare
    from shared.inference.runtime import load_session
    from worker.stages.optimize import model_files

    part = holdout(converted)
    session = load_session(model, threads=settings.bench_threads)
    fidelity = compare(part.gate_reference, session.run(part.gate))
    size = sum(p.stat().st_size for p in model_files(model))
    return {"fidelity": fidelity, "size_bytes": size}


def time_side_by_side(models: dict[str, Path], converted, settings) -> tuple[dict, dict]:
    """fp32 and the variants (``models``: name -> model file, "fp32" among them), timed as the select stage does."""
    from shared.inference.hardware import describe
    from shared.inference.paired import measure_paired
    from shared.inference.runtime import load_session
    from worker.stages.select_measure import plan_of

    runners = {}
    for name, path in models.items():
        session = load_session(path, threads=settings.bench_threads)
        runners[name] = functools.partial(session._run, session._prepare(converted.samples))  # inference only
    hardware = describe(threads=settings.bench_threads, provider="CPUExecutionProvider")
    return measure_paired(runners, "fp32", plan_of(settings)), hardware


def select_rows(spec, rows: list[dict], converted, settings):
    """The select stage's decision over rows built by hand (``step_key``: the model file's path)."""
    from worker.stages.select import annotate, choose

    timed = {r["variant"]: Path(r["step_key"]) for r in rows if r["variant"] == "fp32" or r["passed"]}
    measurement, hardware = time_side_by_side(timed, converted, settings)
    annotate(rows, measurement, hardware)
    return choose(spec.optimize, rows, measurement=measurement, hardware_class=hardware["class"],
                  deploying=spec.deploy is not None)


def deploy(spec, model: Path, converted, settings) -> int:
    from shared.errors import UserInputError
    from shared.inference.fidelity import compare
    from shared.inference.runtime import load_session
    from shared.repository import ModelRepository
    from shared.storage import FileRef, digest_of_files, sha256_file
    from worker.stages.optimize import gate_verdict, model_files

    part = holdout(converted)
    session = load_session(model, threads=settings.bench_threads)  # the smoke gate
    passed, reason = gate_verdict(spec.optimize.gate, {"fidelity": compare(part.gate_reference,
                                                                            session.run(part.gate))})
    if not passed:
        raise UserInputError(f"deploy smoke gate failed: {reason}")
    files = model_files(model)
    digest = digest_of_files([FileRef(p.name, sha256_file(p), p.stat().st_size) for p in files])
    repository = ModelRepository.open(spec.deploy.repository)
    name = spec.model.name
    version = repository.find_version(name, digest)
    if version is None:
        version = repository.claim_version(name, {"artifact_digest": digest})
        target = "model" + model.suffix
        inputs = [t.to_dict() for t in converted.inputs]
        outputs = [t.to_dict() for t in converted.outputs]
        manifest = {"model": name, "version": version, "created": time.time(), "artifact_digest": digest,
                    "model_file": target, "format": spec.convert.to, "inputs": inputs, "outputs": outputs}
        repository.publish(name, version, {(target if p == model else p.name): p for p in files}, manifest)
    repository.set_alias(name, spec.deploy.alias, version, reason="inline benchmark")
    return version


def run_job(job_file: Path, *, scratch: Path | None = None) -> dict:
    """Do the job's work once; returns the wall seconds of each part and the selected variant."""
    from shared.jobspec import BASELINE, load_job
    from shared.settings import Settings
    from worker.stages.optimize import gate_verdict

    settings = Settings()
    spec, base = load_job(job_file)
    source = (base / spec.model.source).resolve()
    if spec.deploy and not spec.deploy.repository.startswith(("file://", "gs://")):
        raise SystemExit("the inline baseline expects deploy.repository as a file:// or gs:// URI")
    walls: dict[str, float] = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="modelyard-inline-", dir=scratch) as tmp:
        workdir = Path(tmp)
        t0 = time.perf_counter()
        model, converted = convert(spec, source, workdir, settings)
        walls["convert"] = time.perf_counter() - t0
        selected = None
        if spec.optimize:
            rows = []
            for variant in [BASELINE, *spec.optimize.ids]:
                t0 = time.perf_counter()
                built = build_variant(spec, variant, model, converted, workdir)
                metrics = measure(built, converted, settings)
                walls[f"optimize:{variant}"] = time.perf_counter() - t0
                passed, reason = gate_verdict(spec.optimize.gate, metrics)
                rows.append({"variant": variant, "step_key": str(built), "convert_key": str(model),
                             "size_bytes": metrics["size_bytes"], "cosine_min": metrics["fidelity"]["cosine_min"],
                             "passed": passed, "reason": reason})
            t0 = time.perf_counter()
            best = select_rows(spec, rows, converted, settings).best
            walls["select"] = time.perf_counter() - t0
            if best is None:
                raise SystemExit("no variant passed the gate")
            selected = best["variant"]
            model = Path(best["step_key"])
        if spec.deploy:
            t0 = time.perf_counter()
            version = deploy(spec, model, converted, settings)
            walls["deploy"] = time.perf_counter() - t0
    return {"wall_s": time.perf_counter() - started, "parts": walls, "selected": selected,
            "version": version if spec.deploy else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("job", type=Path)
    parser.add_argument("--reps", type=int, default=1)
    args = parser.parse_args()
    for rep in range(args.reps):
        result = run_job(args.job)
        parts = ", ".join(f"{k} {v:.1f}s" for k, v in result["parts"].items())
        print(f"run {rep + 1}: {result['wall_s']:.1f} s (selected {result['selected']}; {parts})", flush=True)


if __name__ == "__main__":
    main()
