"""A job from its file to its record and its Celery chain, shared by ``modelyard submit`` and the local runner.

``prepare`` reads a job file and finds its local inputs; ``record`` uploads them by content and
writes the job record; ``build_chain`` makes the chain convert → optimize (one task per variant,
joined by a selection, which times the variants side by side) → deploy. The chain names its tasks
(``app.signature("modelyard.convert")``), so building it needs no worker code: the producer sends
it to the queues, and
``worker.local`` applies it in-process with the same task code.

Which pool a stage runs on depends on whether an optimizer benefits from a GPU, which only the
plugin registry knows; callers pass that as ``gpu_benefit`` (a plugin name → bool). The select
stage times the variants, so it runs where the model will: the pool the gpu-benefiting variants
went to, or a worker of the job's ``optimize.target`` hardware class (queue ``<pool>.<class>``).
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from celery import Celery, chain, chord, group
from celery.canvas import Signature

from shared.errors import UserInputError
from shared.inference.hardware import class_queue, pool_of_class
from shared.jobs import JobStore, new_job_id
from shared.jobspec import BASELINE, JobSpec, load_job
from shared.storage import UPLOADS, ArtifactStore, digest_of_files

GpuBenefit = Callable[[str], bool]


@dataclass(frozen=True)
class JobInputs:
    """A validated job and the local files it names, resolved against the job file's folder."""

    spec: JobSpec  # deploy.repository made absolute, so that any worker resolves it alike
    source: Path
    samples: Path | None = None
    gate_samples: Path | None = None
    eval_data: Path | None = None
    distill_data: Path | None = None


def prepare(job_file: str | Path) -> JobInputs:
    """Read and check a job file and find its inputs. UserInputError naming the field when one is wrong."""
    spec, base = load_job(job_file)
    source = _resolve_local(spec.model.source, base, "model.source")
    samples = _resolve_local(spec.model.samples, base, "model.samples") if spec.model.samples else None
    gate_samples = _resolve_local(spec.model.gate_samples, base, "model.gate_samples") \
        if spec.model.gate_samples else None
    eval_data = None
    if spec.model.eval_data:
        eval_data = _check_eval_data(_resolve_local(spec.model.eval_data, base, "model.eval_data"))
    distill = spec.compress.distill if spec.compress else None
    distill_data = _resolve_local(distill.data, base, "compress.distill.data") if distill else None
    if spec.deploy:
        deploy = spec.deploy.model_copy(update={"repository": _resolve_uri(spec.deploy.repository, base)})
        spec = spec.model_copy(update={"deploy": deploy})
    return JobInputs(spec=spec, source=source, samples=samples, gate_samples=gate_samples, eval_data=eval_data,
                     distill_data=distill_data)


def _resolve_local(path: str, base: Path, field: str) -> Path:
    resolved = (base / path).expanduser().resolve()
    if not resolved.exists():
        raise UserInputError(f"{field}: {path} does not exist (looked for {resolved})")
    return resolved


def _resolve_uri(uri: str, base: Path) -> str:
    if uri.startswith("gs://"):
        return uri
    path = uri[len("file://"):] if uri.startswith("file://") else uri
    return (base / path).expanduser().resolve().as_uri()


def _check_eval_data(path: Path) -> Path:
    """Refuse, before anything is uploaded, an eval file that is not an .npz with a 'labels' array."""
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as data:
            names = list(data.files)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise UserInputError(f"model.eval_data: {path.name} is not a readable .npz ({exc})") from None
    if "labels" not in names:
        raise UserInputError(
            f"model.eval_data: {path.name} has no 'labels' array (it has: {', '.join(names) or 'nothing'})"
        )
    if len(names) < 2:
        raise UserInputError(f"model.eval_data: {path.name} has labels but no model inputs")
    return path


def queue_for(spec: JobSpec, stage: str, variant: str | None = None, *, gpu_benefit: GpuBenefit) -> str:
    """The pool a stage runs on: a pin in ``pools`` wins; else gpu-benefiting variants follow ``device``."""
    if stage in spec.pools:
        return spec.pools[stage]
    if stage == "compress":  # training: the gpu pool when the job asks for it
        return "gpu" if spec.device == "gpu" else "cpu"
    if stage == "optimize" and variant and variant != BASELINE and spec.device == "gpu":
        if any(gpu_benefit(part) for part in spec.optimize.variant(variant).parts):
            return "gpu"
    if stage == "select":
        return _timing_queue(spec, gpu_benefit)
    return "cpu"


def _timing_queue(spec: JobSpec, gpu_benefit: GpuBenefit) -> str:
    """Where the variants are timed: a worker of ``optimize.target``'s class, else the pool of the
    variants that benefit from a GPU (on a gpu job) or pinned to the gpu pool, else cpu."""
    if spec.optimize.target:
        return class_queue(pool_of_class(spec.optimize.target), spec.optimize.target)
    pools = {queue_for(spec, "optimize", v, gpu_benefit=gpu_benefit) for v in spec.optimize.ids}
    return "gpu" if "gpu" in pools else "cpu"


def plan(spec: JobSpec, *, gpu_benefit: GpuBenefit) -> dict[str, str]:
    """Each stage of the job (``optimize:<variant>`` per variant) and its pool, in running order."""
    stages = {"compress": queue_for(spec, "compress", gpu_benefit=gpu_benefit)} if spec.compress else {}
    stages["convert"] = queue_for(spec, "convert", gpu_benefit=gpu_benefit)
    if spec.optimize:
        for variant in [BASELINE, *spec.optimize.ids]:
            stages[f"optimize:{variant}"] = queue_for(spec, "optimize", variant, gpu_benefit=gpu_benefit)
        stages["select"] = queue_for(spec, "select", gpu_benefit=gpu_benefit)
    if spec.deploy:
        stages["deploy"] = queue_for(spec, "deploy", gpu_benefit=gpu_benefit)
    return stages


def record(jobs: JobStore, store: ArtifactStore, inputs: JobInputs, queues: dict[str, str]) -> str:
    """Upload a job's inputs and write its record (not yet enqueued); returns the new job id."""
    source = inputs.source
    files = store.put_dir(source, area=UPLOADS) if source.is_dir() else [store.put_file(source, area=UPLOADS)]
    if not files:
        raise UserInputError(f"model.source: {source} is an empty folder")

    def upload(path: Path | None) -> dict | None:
        return store.put_file(path, area=UPLOADS).to_dict() if path else None

    job_id = new_job_id()
    jobs.create(job_id, {
        "spec": inputs.spec.model_dump(mode="json"),
        "model": inputs.spec.model.name,
        "artifact_store": store.uri,
        "source": {"files": [f.to_dict() for f in files], "digest": digest_of_files(files),
                   "is_folder": source.is_dir(), "path": str(source)},
        "samples": upload(inputs.samples),
        "gate_samples": upload(inputs.gate_samples),
        "eval_data": upload(inputs.eval_data),
        "distill_data": upload(inputs.distill_data),
        "queues": queues,
    })
    return job_id


def uploaded_files(record: dict) -> list[dict]:
    """Every file a job's record says the producer uploaded (source, samples, data), as FileRef dicts."""
    files = list((record.get("source") or {}).get("files") or [])
    for name in ("samples", "gate_samples", "eval_data", "distill_data"):
        if record.get(name):
            files.append(record[name])
    return files


def shown(job_id: str, model: str, stage: str, variant: str | None = None, inputs: str = "") -> dict[str, str]:
    """What Flower shows as a stage task's arguments: job, model, stage and variant, never step-key blobs.

    ``kwargsrepr`` stays a dict literal so that Flower's ``kwargs:job_id=…`` search still works.
    """
    kwargs = {"stage": stage, **({"variant": variant} if variant else {}), "model": model, "job_id": job_id}
    return {"kwargsrepr": repr(kwargs), "argsrepr": f"({inputs})" if inputs else "()"}


def build_chain(app: Celery, spec: JobSpec, job_id: str, queues: dict[str, str]) -> Signature:
    """The job's Celery chain, each stage on the pool ``queues`` (from ``plan``) names."""
    return chain(*[step for _name, step in _steps(app, spec, job_id, queues)])


RESUMABLE = ("compress", "convert", "optimize", "deploy")  # where a chain can start again (optimize: the chord)


def resume_chain(app: Celery, spec: JobSpec, job_id: str, queues: dict[str, str], start: str,
                 given: Any = None) -> Signature:
    """The rest of the job's chain from stage ``start`` (one of ``RESUMABLE``), which gets ``given``,
    the output of the stage before it, as its input: what ``worker.redrive`` sends again when a
    stage's message was lost."""
    steps = _steps(app, spec, job_id, queues)
    names = [name for name, _step in steps]
    if start not in names:
        raise ValueError(f"job {job_id} has no stage {start} to resume at (stages: {', '.join(names)})")
    rest = [step for _name, step in steps[names.index(start):]]
    first = rest[0]
    if given is not None:
        if start == "optimize":  # the chord: every variant of its group gets the converted model
            header = group([task.clone(args=(given,)) for task in first.tasks])
            first = chord(header, first.body)
        else:
            first = first.clone(args=(given,))
    return chain(first, *rest[1:]) if len(rest) > 1 else first


def _steps(app: Celery, spec: JobSpec, job_id: str, queues: dict[str, str]) -> list[tuple[str, Signature]]:
    name = spec.model.name
    common = {"job_id": job_id, "model": name}
    last = "deploy" if spec.deploy else "optimize" if spec.optimize else "convert"
    steps = []
    if spec.compress:  # the student it returns is what convert converts
        steps.append(("compress", app.signature("modelyard.compress", kwargs=common, queue=queues["compress"],
                                                immutable=True, **shown(job_id, name, "compress"))))
    inputs = "student model" if spec.compress else ""
    steps.append(("convert", app.signature("modelyard.convert", kwargs={**common, "final": last == "convert"},
                                           queue=queues["convert"], immutable=not spec.compress,
                                           **shown(job_id, name, "convert", inputs=inputs))))
    if spec.optimize:
        ids = [BASELINE, *spec.optimize.ids]
        variants = [
            app.signature("modelyard.optimize", kwargs={**common, "variant": v},
                          queue=queues[f"optimize:{v}"], ignore_result=False,  # joined by the chord
                          **shown(job_id, name, "optimize", v, "converted model"))
            for v in ids
        ]
        selector = app.signature("modelyard.select", kwargs={**common, "final": last == "optimize"},
                                 queue=queues["select"],
                                 **shown(job_id, name, "select", inputs="built variants: " + ", ".join(ids)))
        steps.append(("optimize", chord(group(variants), selector)))
    if spec.deploy:
        steps.append(("deploy", app.signature("modelyard.deploy", kwargs={**common, "final": True},
                                              queue=queues["deploy"],
                                              **shown(job_id, name, "deploy", inputs="selected variant"))))
    return steps
