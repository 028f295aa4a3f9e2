"""Hugging Face transformers model folders: checking, loading, and the one output each task exports.

Shared by the ``hf-transformers`` converter, the compress stage (pruning and distillation),
and the gpu pool's PyTorch fallback, so that all three load a folder the same way and compute
the same output for a task.

A folder must hold ``config.json`` and safetensors weights; pickle weights
(``pytorch_model.bin``) are refused because loading them can run arbitrary code. Attention is
loaded as ``attn_implementation="eager"``: exporting the default SDPA attention with
``dynamo=False`` gives a ``Where``-masked graph that dynamic INT8 runs ~25% slower.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import warnings
from collections.abc import Iterator
from pathlib import Path

from shared.errors import UserInputError, one_line
from worker.support.sentence_pooling import pool

# task -> (transformers auto class, the output the task exports)
TASKS = {
    "feature-extraction": ("AutoModel", "last_hidden_state"),
    "sentence-embedding": ("AutoModel", "sentence_embedding"),
    "text-classification": ("AutoModelForSequenceClassification", "logits"),
}
INPUT_ORDER = ("input_ids", "attention_mask", "token_type_ids")
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "*.pt", "*.pth", "*.ckpt", "*.bin")


def task_of(requested: str | None, folder: Path) -> str:
    """The job's task, or the one config.json's architectures imply; UserInputError for an unsupported one."""
    task = requested
    if task is None:
        try:
            architectures = json.loads((folder / "config.json").read_text()).get("architectures") or []
        except (OSError, ValueError):
            architectures = []
        task = (
            "text-classification"
            if any(str(a).endswith("ForSequenceClassification") for a in architectures)
            else "feature-extraction"
        )
    if task not in TASKS:
        raise UserInputError(
            f"model.task {task!r} is not supported by format hf-transformers "
            f"(supported: {', '.join(TASKS)})"
        )
    return task


def check_folder(folder: Path, source: str) -> None:
    """Refuse a file, a folder without config.json, and pickle weights (they can run code when loaded)."""
    if not folder.is_dir():
        raise UserInputError(f"model.source {source}: format hf-transformers needs a model folder, got a file")
    if not (folder / "config.json").is_file():
        raise UserInputError(f"model.source {source}: the folder has no config.json (is it a transformers model?)")
    if any(folder.glob("*.safetensors")):
        return
    pickles = sorted({p.name for pattern in PICKLE_WEIGHTS for p in folder.glob(pattern)})
    if pickles:
        raise UserInputError(
            f"model.source {source}: weights are in pickle format ({', '.join(pickles[:3])}); "
            "pickle files can run arbitrary code when loaded and are refused. "
            "Convert them to safetensors (e.g. model.save_pretrained(dir, safe_serialization=True)) and resubmit"
        )
    raise UserInputError(f"model.source {source}: the folder has no *.safetensors weights")


def load_model(folder: Path, task: str | None, source: str):
    """The task's model from the folder: float32, eager attention, safetensors only, in eval mode."""
    import torch
    import transformers

    auto_class = getattr(transformers, TASKS[task or "feature-extraction"][0])
    try:
        with quiet(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = auto_class.from_pretrained(
                str(folder),
                local_files_only=True,
                use_safetensors=True,
                attn_implementation="eager",
                dtype=torch.float32,
                trust_remote_code=False,
            )
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, ImportError) as exc:
        message = one_line(exc)
        raise UserInputError(f"model.source {source}: transformers cannot load the model: {message}") from None
    return model.eval()


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """transformers' progress bars ("Loading weights", "Writing model shards") off: noise in a worker's log."""
    from transformers.utils import logging as hf_logging

    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()


def input_names(model) -> list[str]:
    """The inputs of INPUT_ORDER the model's forward takes, in that order."""
    accepted = set(inspect.signature(model.forward).parameters)
    return [name for name in INPUT_ORDER if name in accepted]


def task_output(model, batch: dict, task: str | None, pooling: dict | None = None):
    """The one tensor a task exports (see TASKS); ``pooling`` (``pooling_of``) for sentence-embedding."""
    if task == "sentence-embedding":
        return pool(model(**batch, return_dict=True).last_hidden_state, batch.get("attention_mask"), pooling)
    return getattr(model(**batch, return_dict=True), TASKS[task or "feature-extraction"][1])
