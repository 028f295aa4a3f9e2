"""The compress stage's teacher, read from the user's files in the sandbox and written back as plain data.

The compress stage trains against its teacher in the worker process (checkpoints to the store,
progress to Redis, maybe the GPU), so the whole stage cannot live in the model-load sandbox.
What can: reading the user's files. ``export_teacher`` (the ``compress-teacher`` sandbox task)
loads the teacher as the stage would and writes it out again, so that what the worker process
then opens was written by the safetensors, transformers and tokenizers libraries inside the
sandbox, not by the user:

* ``hf-transformers``: ``save_pretrained`` of the loaded model (config.json + safetensors), of its
  tokenizer, and the folder's other JSON files (sentence-transformers' ``modules.json``,
  ``1_Pooling/config.json``, ...) parsed and written again; nothing else is carried over;
* ``torch-state-dict``: the state dict as one ``model.safetensors`` (a ``.pt``/``.bin`` read with
  ``torch.load(weights_only=True)`` stays inside the sandbox).
"""

from __future__ import annotations

import json
from pathlib import Path

from shared.errors import UserInputError, one_line

STATE_FILE = "model.safetensors"
JSON_LIMIT = 16 * 2**20  # bytes of one JSON file carried over
JSON_FILES = 200  # JSON files carried over at most


def export_teacher(params: dict, source: Path, out: Path) -> dict:
    """The ``compress-teacher`` task: the teacher at ``source`` written into ``out``; {"path": relative path}."""
    label = params["label"]
    if params["format"] == "hf-transformers":
        _export_transformer(source, out, params.get("task"), label)
        return {"path": "."}
    _export_state(source, out, label)
    return {"path": STATE_FILE}


def _export_transformer(source: Path, out: Path, task: str | None, label: str) -> None:
    from worker.compress import transformer
    from worker.support.transformers_models import quiet
    from worker.support.transformers_samples import load_tokenizer

    model = transformer.load(source, task, label)
    _copy_json(source, out, label)  # first: the libraries' own files below replace their copies
    with quiet():
        model.save_pretrained(str(out), safe_serialization=True)
    tokenizer = load_tokenizer(source)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))


def _copy_json(source: Path, out: Path, label: str) -> None:
    """Every JSON file under source (no links), parsed and written again at the same relative path."""
    found = sorted(p for p in source.rglob("*.json") if p.is_file() and not p.is_symlink())
    for path in found[:JSON_FILES]:
        relative = path.relative_to(source)
        if any(part.startswith(".") for part in relative.parts) or path.stat().st_size > JSON_LIMIT:
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise UserInputError(f"{label}: {relative} is not readable JSON: {one_line(exc)}") from None
        target = out / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(data, indent=1))


def _export_state(source: Path, out: Path, label: str) -> None:
    import torch
    from safetensors.torch import save_file

    from worker.support.torch_weights import load_weights, weights_file

    state = load_weights(weights_file(source, label), label)
    tensors = {}
    for name, value in state.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise UserInputError(f"{label}: the state dict holds {name!r}, which is not a named tensor")
        tensors[name] = value.detach().clone().contiguous()  # clone: shared storage cannot be saved as safetensors
    save_file(tensors, str(out / STATE_FILE))
