"""The convert stage: source model → deployable model + sample inputs + reference outputs.

The reference outputs come from the *source* framework; every later stage is compared with
them. The conversion itself is checked here: the converted model runs on the samples and must
match the reference within the job's tolerance, or the job fails naming the output and values.
The converter, which opens the user's file, runs in the model-load sandbox (``worker.sandbox``);
the check runs here, on the files the sandbox left, after ``worker.sandbox.output`` vetted them.

After a compress stage the model converted is the *student* (the compress output) and the
reference is still the *teacher's* (the source model's) outputs: the converter runs on the
teacher for the samples and the reference, then on the student with those samples. The
conversion check compares the converted student with the student in its own framework; the
student's distance from the teacher is recorded as ``teacher_fidelity``, and the optimize gate
measures every variant against the teacher's reference.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from shared.arrays import load_arrays, save_arrays, text_lines
from shared.errors import UserInputError
from shared.manifest import Manifest
from shared.storage import FileRef, digest_of_files
from worker.context import StageContext
from worker.plugins import registry
from worker.plugins.base import TEXT_SAMPLES, ConvertRequest
from worker.sandbox import convert_model
from worker.stages.holdout import GATE_ROWS, append_gate_arrays, with_gate_part
from worker.stages.steps import StepOutput, run_step, tool_versions

SAMPLES, REFERENCE = "samples.npz", "reference.npz"


def convert_params(ctx: StageContext) -> dict:
    spec = ctx.spec
    model = spec.model.model_dump(exclude={"name", "source", "samples", "eval_data", "gate_samples"}, mode="json")
    samples = ctx.record.get("samples")
    gate = ctx.record.get("gate_samples")
    return {
        "model": model,
        "convert": spec.convert.model_dump(mode="json"),
        "samples_digest": samples["digest"] if samples else None,
        **({"gate_samples_digest": gate["digest"]} if gate else {}),
        "sandbox": ctx.settings.sandbox,  # a model loaded unsandboxed is never reused where the sandbox is on
    }


def run_convert(ctx: StageContext, compress_key: str | None = None) -> tuple[Manifest, bool]:
    if compress_key:
        return _run_convert_student(ctx, compress_key)
    spec = ctx.spec
    converter_cls = _converter(ctx)
    source_files = ctx.source_files

    def compute(tmp: Path) -> StepOutput:
        source = _download_source(ctx, source_files, tmp / "source")
        samples = _user_samples(ctx, tmp)
        out = tmp / "out"
        out.mkdir()
        request = ConvertRequest(
            source=source, model=spec.model, convert=spec.convert, workdir=out, settings=ctx.settings,
            **samples,
        )
        result, sandbox = convert_model(converter_cls, request)
        result, gate_rows = with_gate_part(ctx, tmp, result, lambda lines: convert_model(converter_cls, replace(
            request, workdir=_empty(tmp / "gate-out"), samples=None, sample_text=lines))[0])
        save_arrays(out / SAMPLES, result.samples)
        save_arrays(out / REFERENCE, result.reference)
        fidelity = check_conversion(out / result.model_file, result.samples, result.reference, ctx)
        info = {**_model_info(ctx, result, sandbox), **({GATE_ROWS: gate_rows} if gate_rows else {})}
        return StepOutput(folder=out, metrics={"fidelity": fidelity}, info=info)

    return run_step(
        ctx,
        stage="convert",
        input_digest=digest_of_files(source_files),
        params=convert_params(ctx),
        tools=tool_versions(converter_cls.tools),
        compute=compute,
    )


def _converter(ctx: StageContext):
    spec = ctx.spec
    converter_cls = registry.converters[spec.model.format]
    if spec.convert.to not in converter_cls.targets:
        raise UserInputError(
            f"convert.to: format {spec.model.format!r} converts to {', '.join(converter_cls.targets)}, "
            f"not {spec.convert.to!r}"
        )
    return converter_cls


def _run_convert_student(ctx: StageContext, compress_key: str) -> tuple[Manifest, bool]:
    from shared.inference.fidelity import compare

    spec = ctx.spec
    converter_cls = _converter(ctx)
    student = ctx.load_manifest(compress_key)
    if student is None:
        raise UserInputError(f"compress step {compress_key[:12]} has no manifest in {ctx.store.uri}")
    teacher_files = ctx.source_files

    def compute(tmp: Path) -> StepOutput:
        teacher_source = _download_source(ctx, teacher_files, tmp / "teacher")
        student_source = ctx.store.get_files(student.files, tmp / "student")
        user_samples = _user_samples(ctx, tmp)
        (tmp / "teacher-out").mkdir()
        teacher_request = ConvertRequest(
            source=teacher_source, model=spec.model, convert=spec.convert, workdir=tmp / "teacher-out",
            settings=ctx.settings, **user_samples,
        )
        teacher, _ = convert_model(converter_cls, teacher_request)
        teacher, gate_rows = with_gate_part(ctx, tmp, teacher, lambda lines: convert_model(converter_cls, replace(
            teacher_request, workdir=_empty(tmp / "gate-out"), samples=None, sample_text=lines))[0])
        model, settings, architecture = spec.model, ctx.settings, None
        if student.info.get("factory"):  # a pruned CNN: rebuilt by modelyard's factory from architecture.json
            from worker.compress import cnn

            architecture = json.loads((student_source / cnn.ARCHITECTURE).read_text())
            model = spec.model.model_copy(update={"factory": cnn.FACTORY})
            settings = ctx.settings.model_copy(update={
                "allowed_factories": [*ctx.settings.allowed_factories, cnn.FACTORY]})
        out = tmp / "out"
        out.mkdir()
        result, sandbox = convert_model(converter_cls, ConvertRequest(
            source=student_source, model=model, convert=spec.convert, workdir=out, settings=settings,
            samples=teacher.samples,
        ), architecture=architecture)
        save_arrays(out / SAMPLES, teacher.samples)
        save_arrays(out / REFERENCE, teacher.reference)
        fidelity = check_conversion(out / result.model_file, teacher.samples, result.reference, ctx)
        return StepOutput(
            folder=out,
            metrics={"fidelity": fidelity, "teacher_fidelity": compare(teacher.reference, result.reference)},
            info={
                **_model_info(ctx, result, sandbox),
                "samples": teacher.extra.get("samples", result.extra.get("samples")),
                "reference": "teacher",
                "compress_key": compress_key,
                **({GATE_ROWS: gate_rows} if gate_rows else {}),
            },
        )

    return run_step(
        ctx,
        stage="convert",
        input_digest=digest_of_files(student.files),
        params={**convert_params(ctx), "teacher_digest": digest_of_files(teacher_files)},
        tools=tool_versions(converter_cls.tools),
        compute=compute,
    )


def _user_samples(ctx: StageContext, tmp: Path) -> dict:
    """The sample inputs the job file named (model.samples) as ConvertRequest fields: arrays from an
    .npz (``samples``), or the lines of a .txt for a text model (``sample_text``)."""
    if not ctx.record.get("samples"):
        return {}
    ref = FileRef.from_dict(ctx.record["samples"])
    if ref.path.lower().endswith(TEXT_SAMPLES):
        path = ctx.store.get_file(ref, tmp / "user-samples.txt")
        return {"sample_text": text_lines(path, "model.samples")}  # gate lines: converted after (with_gate_part)
    samples = load_arrays(ctx.store.get_file(ref, tmp / "user-samples.npz"), what="model.samples")
    return {"samples": append_gate_arrays(ctx, tmp, samples)}  # model.gate_samples' rows last


def _empty(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _model_info(ctx: StageContext, result, sandbox: dict) -> dict:
    """What later stages need to know about the converted model, and the sandbox it was loaded in.

    The converter's ``extra`` (framework versions, the task it resolved) comes from the sandbox,
    so it never overrides the keys that locate and describe the model.
    """
    return {
        **result.extra,
        "model_file": result.model_file,
        "format": ctx.spec.convert.to,
        "task": result.extra.get("task", ctx.spec.model.task),
        "inputs": [t.to_dict() for t in result.inputs],
        "outputs": [t.to_dict() for t in result.outputs],
        "source_digest": ctx.record["source"]["digest"],
        "sandbox": sandbox,
    }


def _download_source(ctx: StageContext, files: list[FileRef], dest: Path) -> Path:
    ctx.store.get_files(files, dest)
    if ctx.record["source"]["is_folder"]:
        return dest
    return dest / files[0].path


def check_conversion(model: Path, samples: dict, reference: dict, ctx: StageContext) -> dict:
    from shared.inference.fidelity import compare
    from shared.inference.runtime import load_session

    session = load_session(model, threads=ctx.settings.bench_threads)
    actual = session.run(samples)
    fidelity = compare(reference, actual)
    tolerance = ctx.spec.convert.tolerance
    for name, figures in fidelity["outputs"].items():
        too_far = tolerance.max_abs is not None and figures["max_abs"] > tolerance.max_abs
        if too_far or figures["cosine_min"] < tolerance.cosine_min:
            raise UserInputError(
                f"conversion changed the model's answers: output {name!r} differs from the source "
                f"framework by max_abs {figures['max_abs']:.3g} (tolerance {tolerance.max_abs}) and "
                f"cosine_min {figures['cosine_min']:.5f} (tolerance {tolerance.cosine_min}); "
                "adjust convert.tolerance if this is expected"
            )
    return fidelity
