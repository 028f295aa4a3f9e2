"""Top-1 accuracy of a classifier on the job's labelled eval data (``model.eval_data``).

The eval file is an ``.npz`` holding the model's inputs by name plus ``labels``: class ids
``[n]`` (or one-hot / scores ``[n, classes]``, read by argmax). The model runs on the rows in
chunks; its first output shaped like classification logits (``[n, classes]``, floats) is the
prediction. Every variant, fp32 included, is measured on the same rows, so the gate can
compare a variant's accuracy with the baseline's.
"""

from __future__ import annotations

import numpy as np

from shared.errors import UserInputError
from shared.inference.fidelity import looks_like_logits
from shared.inference.runtime import Session

LABELS = "labels"
CHUNK = 256  # rows per run: bounded memory for any eval set


def split_eval_data(arrays: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The model inputs and the class ids of an eval file; UserInputError naming what is wrong."""
    if LABELS not in arrays:
        raise UserInputError(f"model.eval_data has no '{LABELS}' array (it has: {', '.join(arrays) or 'nothing'})")
    inputs = {name: value for name, value in arrays.items() if name != LABELS}
    labels = np.asarray(arrays[LABELS])
    if labels.ndim == 2:
        labels = labels.argmax(axis=1)
    if labels.ndim != 1 or not (np.issubdtype(labels.dtype, np.integer) or np.issubdtype(labels.dtype, np.floating)):
        raise UserInputError(f"model.eval_data: '{LABELS}' must be class ids [n] or one-hot [n, classes], "
                             f"not {labels.dtype} {list(labels.shape)}")
    if not inputs:
        raise UserInputError(f"model.eval_data holds '{LABELS}' but none of the model's inputs")
    for name, value in inputs.items():
        rows = len(value) if np.ndim(value) else 0
        if rows != len(labels):
            raise UserInputError(f"model.eval_data: input {name} has {rows} rows, '{LABELS}' has {len(labels)}")
    return inputs, labels.astype(np.int64)


def top1_accuracy(session: Session, arrays: dict[str, np.ndarray], *, chunk: int = CHUNK) -> dict:
    """``{"accuracy": fraction of rows whose top-1 class is the label, "eval_rows": n, "eval_output": name}``."""
    inputs, labels = split_eval_data(arrays)
    chunk = _fixed_batch(session) or chunk
    predictions: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(labels), chunk):
        outputs = session.run({name: value[start:start + chunk] for name, value in inputs.items()})
        for name, value in outputs.items():
            predictions.setdefault(name, []).append(np.asarray(value))
    merged = {name: np.concatenate(parts) for name, parts in predictions.items()}
    logits = next((name for name, value in merged.items()
                   if looks_like_logits(value) and len(value) == len(labels)), None)
    if logits is None:
        shapes = ", ".join(f"{name} {list(value.shape)}" for name, value in merged.items())
        raise UserInputError(f"model.eval_data: accuracy needs a classifier output [batch, classes] "
                             f"(the model's outputs: {shapes or 'none'})")
    hits = np.argmax(merged[logits], axis=1) == labels
    return {"accuracy": float(hits.mean()) if len(hits) else 0.0, "eval_rows": len(labels),
            "eval_output": logits}


def _fixed_batch(session: Session) -> int | None:
    """A batch size the model insists on (an ONNX input with a fixed first dimension), else None."""
    if not session._fixed_dims_are_binding:
        return None
    for info in session.inputs:
        if info.shape and isinstance(info.shape[0], int) and info.shape[0] > 0:
            return info.shape[0]
    return None
