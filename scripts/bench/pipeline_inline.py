"""A job's work done by hand: the same library calls as the queued stages, one after another, in one process.

    python scripts/bench/pipeline_inline.py JOB.yaml [--reps 1]

The baseline of ``pipeline.py``: what a user who skips modelyard's queue would run. Convert
with the job's converter plugin and check it against the source framework; build every
variant (the fp32 baseline and the job's variants) with the optimizer plugins and measure
each exactly as the optimize stage does (fidelity against the source reference, latency with
``MODELYARD_BENCH_THREADS`` / ``MODELYARD_BENCH_RUNS``); select with the optimize stage's own
rule; smoke-check the chosen model and publish it into the job's model repository. No
Redis, no artifact store, no step cache, no Celery: files stay in a scratch folder.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def convert(spec, source: Path, workdir: Path, settings) -> tuple[Path, object]:
    from shared.errors import UserInputError
    from worker.fidelity import compare
    from worker.plugins import registry
    from worker.plugins.base import ConvertRequest
    from worker.runtime import load_session

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


def build_variant(spec, variant: str, model: Path, converted, workdir: Path) -> Path:
    from shared.jobspec import BASELINE
    from worker.plugins import registry
    from worker.plugins.base import OptimizeRequest

    if variant == BASELINE:
        return model
    variant_spec = spec.optimize.variant(variant)
    for index, name in enumerate(variant_spec.parts):
        step = workdir / f"{variant}-{index}-{name}"
        step.mkdir()
        model = registry.optimizer(name).optimize(OptimizeRequest(
            model=model, workdir=step, samples=converted.samples, task=spec.model.task,
            inputs=converted.inputs, outputs=converted.outputs, params=variant_spec.params_for(name)))
    return model


def measure(model: Path, converted, settings) -> dict:
    from worker.fidelity import compare
    from worker.latency import measure as measure_latency
    from worker.runtime import load_session
    from worker.stages.optimize import _model_files

    session = load_session(model, threads=settings.bench_threads)
    fidelity = compare(converted.reference, session.run(converted.samples))
    latency = measure_latency(session, converted.samples, runs=settings.bench_runs, warmup=settings.bench_warmup)
    size = sum(p.stat().st_size for p in _model_files(model))
    return {"fidelity": fidelity, "latency": latency, "size_bytes": size}


def deploy(spec, model: Path, converted, settings) -> int:
    from shared.errors import UserInputError
    from shared.repository import ModelRepository
    from shared.storage import FileRef, digest_of_files, sha256_file
    from shared.triton import config_pbtxt
    from worker.fidelity import compare
    from worker.runtime import load_session
    from worker.stages.optimize import _model_files, gate_verdict

    session = load_session(model, threads=settings.bench_threads)  # the smoke gate
    passed, reason = gate_verdict(spec.optimize.gate, {"fidelity": compare(converted.reference,
                                                                            session.run(converted.samples))})
    if not passed:
        raise UserInputError(f"deploy smoke gate failed: {reason}")
    files = _model_files(model)
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
        repository.publish(name, version, {(target if p == model else p.name): p for p in files}, manifest,
                           config_pbtxt(name, spec.convert.to, inputs, outputs))
    repository.set_alias(name, spec.deploy.alias, version, reason="inline benchmark")
    return version


def run_job(job_file: Path, *, scratch: Path | None = None) -> dict:
    """Do the job's work once; returns the wall seconds of each part and the selected variant."""
    from shared.jobspec import BASELINE, load_job
    from shared.settings import Settings
    from worker.stages.optimize import gate_verdict, select

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
                             "size_bytes": metrics["size_bytes"], "p50_ms": metrics["latency"]["p50_ms"],
                             "cosine_min": metrics["fidelity"]["cosine_min"], "passed": passed, "reason": reason})
            best, _table = select(SimpleNamespace(spec=spec), rows)
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
