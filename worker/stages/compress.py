"""The compress stage: prune the source model into a smaller architecture, then distill it from the source.

Input: the job's source model (the *teacher*) and its distillation data (``compress.distill.data``,
uploaded by the producer). Output: the *student* in the source's own format, which the convert
stage then converts (and compares with the teacher's outputs):

* ``hf-transformers``: a model folder (config + safetensors, tokenizer files copied);
* ``torch-state-dict``: ``model.safetensors`` + ``architecture.json``, rebuilt by the
  modelyard factory ``worker.compress.cnn:build``.

Training checkpoints after every epoch to ``checkpoints/<step key>.json`` in the artifact store
(weights and optimizer state as blobs, the JSON written last). A redelivered stage — its worker
died mid-training — resumes after the last checkpointed epoch instead of starting over. While it
trains, the job record's ``compress`` stage carries ``progress`` (epoch, step, loss), which
``modelyard status`` shows. Runs on CUDA when the job says ``device: gpu`` and the worker has one.

The user's files are read only in the model-load sandbox (``worker.sandbox``): the
``compress-teacher`` task loads the teacher there and writes it back as safetensors and
re-serialized JSON (``worker.compress.teacher``), and this process trains against that copy (it
writes checkpoints to the store, progress to Redis and may use the GPU, so the training itself
stays here). The factory of a state dict comes only from ``MODELYARD_ALLOWED_FACTORIES``; the
student it writes is converted sandboxed.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shared.arrays import load_arrays, text_lines
from shared.errors import UserInputError
from shared.manifest import SIGNATURE, Manifest, sign, step_key
from shared.storage import ArtifactStore, FileRef, digest_of_files
from worker.context import StageContext
from worker.stages.steps import StepOutput, run_step, tool_versions

log = logging.getLogger("modelyard.compress")
STAGE = "compress"
TOOLS = ("torch", "transformers", "safetensors")
PROBE_ROWS, HELD_OUT_ROWS = 16, 16
PROGRESS_EVERY_S = 2.0


def checkpoint_key(key: str) -> str:
    return f"checkpoints/{key}.json"


def compress_params(ctx: StageContext) -> dict:
    spec = ctx.spec
    data = ctx.record.get("distill_data")
    return {
        "model": spec.model.model_dump(exclude={"name", "source", "samples", "eval_data"}, mode="json"),
        "compress": spec.compress.model_dump(mode="json", exclude={"distill": {"data"}}),
        "data_digest": data["digest"] if data else None,
        "device": spec.device,
        "sandbox": ctx.settings.sandbox,
    }


def run_compress(ctx: StageContext) -> tuple[Manifest, bool]:
    source_files = ctx.source_files
    params = compress_params(ctx)
    tools = tool_versions(TOOLS)
    input_digest = digest_of_files(source_files)
    key = step_key(stage=STAGE, input_digest=input_digest, params=params, tools=tools)  # as run_step computes it

    def compute(tmp: Path) -> StepOutput:
        teacher_dir = tmp / "teacher"
        ctx.store.get_files(source_files, teacher_dir)
        uploaded = teacher_dir if ctx.record["source"]["is_folder"] else teacher_dir / source_files[0].path
        teacher_path, sandbox = _plain_teacher(ctx, uploaded, tmp / "teacher-plain")
        data_path = None
        if ctx.record.get("distill_data"):
            ref = FileRef.from_dict(ctx.record["distill_data"])
            data_path = ctx.store.get_file(ref, tmp / "data" / ref.path)
        out = tmp / "out"
        out.mkdir()
        training = Training(device=_device(ctx), checkpoints=Checkpoints(ctx.store, key, tmp / "checkpoint",
                                                                           ctx.settings.signing_key),
                            progress=Progress(ctx))
        if ctx.spec.model.format == "hf-transformers":
            metrics, info = compress_transformer(ctx.spec, teacher_path, data_path, out, training)
        else:
            metrics, info = _compress_cnn(ctx, teacher_path, data_path, out, training)
        return StepOutput(folder=out, metrics=metrics, info={**info, "format": ctx.spec.model.format,
                                                             "teacher_digest": input_digest, "sandbox": sandbox})

    manifest, cached = run_step(ctx, stage=STAGE, input_digest=input_digest, params=params, tools=tools,
                                compute=compute)
    if not cached:
        ctx.store.delete(checkpoint_key(key))  # the step is done; a later run finds its manifest instead
    return manifest, cached


def _plain_teacher(ctx: StageContext, uploaded: Path, out: Path) -> tuple[Path, dict]:
    """The teacher as the sandbox wrote it back (``worker.compress.teacher``): its path, and the sandbox's record."""
    from worker.compress.teacher import STATE_FILE
    from worker.sandbox.tasks import run_task

    spec = ctx.spec
    params = {"format": spec.model.format, "task": spec.model.task, "label": f"model.source {spec.model.source}"}
    answer, sandbox = run_task("compress-teacher", params, source=uploaded, workdir=out, settings=ctx.settings)
    path = answer.get("path")
    if path not in (".", STATE_FILE) or not (out / path).exists():
        raise UserInputError(f"model.source {spec.model.source}: the sandboxed teacher load returned no teacher")
    return (out / path).resolve(), sandbox


def _device(ctx: StageContext) -> str:
    import torch

    return "cuda" if ctx.spec.device == "gpu" and torch.cuda.is_available() else "cpu"


def _split(data: dict[str, np.ndarray]) -> tuple[dict, dict]:
    """(training rows, held-out rows): the last HELD_OUT_ROWS rows (at most a tenth) measure the student."""
    count = len(next(iter(data.values())))
    held = min(HELD_OUT_ROWS, count // 10)
    if held == 0:
        return data, data
    return ({k: v[:count - held] for k, v in data.items()}, {k: v[count - held:] for k, v in data.items()})


@dataclass
class Training:
    """Where distillation runs, and what it reports to: a stage passes its checkpoints and progress."""

    device: str = "cpu"
    checkpoints: Checkpoints | None = None
    progress: Progress | None = None


def _train(spec, student, teacher, data, *, objective, forward, mask_of, training: Training) -> dict:
    from worker.compress.distill import DistillConfig, agreement, distill

    distill_spec = spec.compress.distill
    device = training.device
    train, held_out = _split(data)
    before = agreement(student, teacher, held_out, forward=forward, mask_of=mask_of, device=device)
    config = DistillConfig(objective=objective, epochs=distill_spec.epochs, batch_size=distill_spec.batch_size,
                           lr=distill_spec.lr, temperature=distill_spec.temperature, seed=distill_spec.seed)
    start = training.checkpoints.load() if training.checkpoints else None
    if start is not None:
        log.info("compress of %s resumes after epoch %d of %d", spec.model.name, start.epoch, distill_spec.epochs)
    if training.progress:
        training.progress.started(start.epoch + 1 if start else 1, distill_spec.epochs)
    history = distill(student, teacher, train, config, forward=forward, mask_of=mask_of, device=device, start=start,
                      on_progress=training.progress.step if training.progress else None,
                      on_epoch=training.checkpoints.save if training.checkpoints else None)
    after = agreement(student, teacher, held_out, forward=forward, mask_of=mask_of, device=device)
    student.to("cpu")
    return {"before_distillation": before, "after_distillation": after, "history": history,
            "start_epoch": start.epoch + 1 if start else 1, "device": device, "training_rows": len(
                next(iter(train.values())))}


def compress_transformer(spec, teacher_dir: Path, data_path: Path | None, out: Path,
                         training: Training | None = None) -> tuple[dict, dict]:
    """Prune (and, with distill data, distill) the Hugging Face model in teacher_dir into out; (metrics, info)."""
    import copy

    from worker.compress import transformer
    from worker.support.sentence_pooling import pooling_of
    from worker.support.transformers_samples import line_rows

    training = training or Training()
    label = f"model.source {spec.model.source}"
    task = spec.model.task
    teacher = transformer.load(teacher_dir, task, label)
    names = transformer.input_names(teacher)
    data = None
    if data_path is not None:
        lines = text_lines(data_path, "compress.distill.data")
        tokenizer = transformer.tokenizer_of(teacher_dir, label)
        data = line_rows(tokenizer, lines, spec.compress.distill.sequence, names, "compress.distill.data")
    probe = {k: v[:PROBE_ROWS] for k, v in data.items()} if data is not None else None
    pooling = pooling_of(teacher_dir, label) if task == "sentence-embedding" else None
    student = copy.deepcopy(teacher)
    pruned = transformer.prune(student, spec.compress.prune.method, spec.compress.prune.keep, probe, task, pooling)
    metrics: dict[str, Any] = {
        "parameters": {"teacher": _count(teacher), "student": _count(student),
                       "teacher_encoder": transformer.encoder_parameters(teacher),
                       "student_encoder": transformer.encoder_parameters(student)},
        "pruned": pruned,
    }
    if data is not None:
        base = getattr(student, student.base_model_prefix, student)
        for param in base.embeddings.parameters():  # the teacher's embeddings, kept: the data covers few words
            param.requires_grad_(False)
        metrics["distill"] = _train(spec, student, teacher, data, objective=transformer.objective(task),
                                    forward=transformer.forward_fn(task, pooling), mask_of=transformer.mask_fn(task),
                                    training=training)
    transformer.save(student, teacher_dir, out)
    return metrics, {"task": task}


def _compress_cnn(ctx, teacher_path: Path, data_path: Path | None, out: Path, training: Training):
    from safetensors.torch import save_file

    from worker.compress import cnn
    from worker.support.torch_weights import build_module as _build
    from worker.support.torch_weights import check_factory, load_weights
    from worker.support.torch_weights import load_state as _load_state
    from worker.support.torch_weights import weights_file as _weights_file

    spec = ctx.spec
    label = f"model.source {spec.model.source}"
    factory = check_factory(spec.model.factory, ctx.settings.allowed_factories)
    teacher = _build(factory, label)
    _load_state(teacher, load_weights(_weights_file(teacher_path, label), label), label, factory)
    teacher.eval()
    data = _array_data(data_path, spec) if data_path is not None else _zeros_from_inputs(spec)
    names = list(data)
    student, architecture = cnn.prune_channels(teacher, spec.compress.prune.keep, cnn.example_inputs(data), factory)
    metrics: dict[str, Any] = {"parameters": {"teacher": cnn.parameters(teacher), "student": cnn.parameters(student)},
                               "pruned": architecture["kept"]}
    if data_path is not None:
        task = spec.model.task or ""
        objective = "embedding" if "feature" in task or "embedding" in task else "logits"

        def forward(model, batch):
            return model(*[batch[name] for name in names])

        metrics["distill"] = _train(spec, student, teacher, data, objective=objective, forward=forward, mask_of=None,
                                    training=training)
    save_file({k: v.detach().contiguous() for k, v in student.state_dict().items()}, str(out / "model.safetensors"))
    (out / cnn.ARCHITECTURE).write_text(json.dumps({k: v for k, v in architecture.items() if k != "kept"}, indent=1))
    return metrics, {"factory": cnn.FACTORY, "teacher_factory": factory}


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _array_data(path: Path, spec) -> dict[str, np.ndarray]:
    arrays = load_arrays(path, what="compress.distill.data")
    if spec.model.inputs:
        missing = [t.name for t in spec.model.inputs if t.name not in arrays]
        if missing:
            raise UserInputError(f"compress.distill.data {path.name}: no array for input(s) {', '.join(missing)} "
                                 f"(it has: {', '.join(arrays)})")
        arrays = {t.name: arrays[t.name].astype(t.dtype) for t in spec.model.inputs}
    counts = {len(a) for a in arrays.values()}
    if not arrays or len(counts) != 1:
        raise UserInputError(f"compress.distill.data {path.name}: arrays must share their first (row) axis")
    return {k: a.astype(np.float32) if np.issubdtype(a.dtype, np.floating) else a for k, a in arrays.items()}


def _zeros_from_inputs(spec) -> dict[str, np.ndarray]:
    if not spec.model.inputs or any(isinstance(d, str) for t in spec.model.inputs for d in t.shape[1:]):
        raise UserInputError("compress.prune channels without compress.distill.data needs model.inputs with "
                             "fixed dims (after the batch) to trace the model")
    return {t.name: np.zeros([2, *t.shape[1:]], dtype=t.dtype) for t in spec.model.inputs}


class Checkpoints:
    """Per-epoch training checkpoints of one step, in the artifact store.

    Like a step manifest, a checkpoint record carries an HMAC with the workers' key
    (``MODELYARD_STEP_SIGNING_KEY``) when one is set: a record anyone else wrote into the store
    is ignored and training starts over, so a planted checkpoint cannot steer the student.
    """

    def __init__(self, store: ArtifactStore, key: str, scratch: Path, signing_key: bytes | None = None) -> None:
        self.store, self.key, self.scratch, self.signing_key = store, key, scratch, signing_key

    def save(self, checkpoint) -> None:
        import torch
        from safetensors.torch import save_file

        folder = self.scratch / f"epoch-{checkpoint.epoch}"
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in checkpoint.student.items()}, str(folder / "student.safetensors"))
        torch.save(checkpoint.optimizer, folder / "optimizer.pt")
        files = [self.store.put_file(folder / "student.safetensors"), self.store.put_file(folder / "optimizer.pt")]
        record = {"step_key": self.key, "epoch": checkpoint.epoch, "history": checkpoint.history,
                  "files": [f.to_dict() for f in files], "time": time.time()}
        if self.signing_key is not None:
            record[SIGNATURE] = sign(record, self.signing_key)
        self.store.write_json(checkpoint_key(self.key), record)
        log.info("checkpoint %s: epoch %d", self.key[:12], checkpoint.epoch)

    def load(self):
        import torch
        from safetensors.torch import load_file

        from worker.compress.distill import Checkpoint

        record = self.store.read_json_or_none(checkpoint_key(self.key))
        if record is None:
            return None
        if not self._trusted(record):
            log.warning("checkpoint %s was not written by a worker of this fleet (no valid signature, or another "
                        "step's): ignored, training starts over", self.key[:12])
            return None
        folder = self.scratch / "resume"
        self.store.get_files([FileRef.from_dict(f) for f in record["files"]], folder)
        # weights_only: the restricted unpickler that loads tensors and plain containers, nothing else
        optimizer = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)
        return Checkpoint(epoch=record["epoch"], student=load_file(str(folder / "student.safetensors")),
                          optimizer=optimizer, history=record["history"])


    def _trusted(self, record: dict) -> bool:
        if record.get("step_key") != self.key:
            return False
        if self.signing_key is None:
            return True
        signature = record.get(SIGNATURE)
        return isinstance(signature, str) and hmac.compare_digest(signature, sign(record, self.signing_key))


class Progress:
    """Writes training progress into the job record's compress stage, at most every PROGRESS_EVERY_S."""

    def __init__(self, ctx: StageContext) -> None:
        self.ctx, self.last = ctx, 0.0

    def started(self, start_epoch: int, epochs: int) -> None:
        self.ctx.jobs.update_stage(self.ctx.job_id, STAGE, progress={
            "epoch": start_epoch, "epochs": epochs, "step": 0, "start_epoch": start_epoch,
            "resumed": start_epoch > 1})
        log.info("job %s: compress training starts at epoch %d of %d", self.ctx.job_id, start_epoch, epochs)

    def step(self, progress: dict) -> None:
        now = time.monotonic()
        if now - self.last < PROGRESS_EVERY_S and progress["step"] != progress["steps"]:
            return
        self.last = now
        self.ctx.check_not_cancelled()
        self.ctx.jobs.update_stage(self.ctx.job_id, STAGE, progress={
            **progress, "loss": round(progress["loss"], 6), "resumed": progress["start_epoch"] > 1})
