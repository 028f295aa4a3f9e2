"""How close a model's outputs are to the reference outputs of the source model.

``compare(reference, actual)`` returns per-output and overall numbers::

    {"cosine_min": .., "cosine_mean": .., "max_abs": .., "top1_agreement": ..,   # overall
     "outputs": {name: {"cosine_min": .., "cosine_mean": .., "max_abs": .., "vectors": n,
                        "top1_agreement": ..}}}

Cosine is computed in float64 along the last axis, one value per vector (a token's hidden
state, a row of logits). A vector that is zero in both is a match (1.0), zero in one only is
0.0, and a vector with NaN or infinity in the actual output counts as -1.0 (the worst).
``top1_agreement`` is given for outputs that look like classification logits: 2-D
``[batch, classes]`` floats with at least two classes.
"""

from __future__ import annotations

import numpy as np

from shared.errors import UserInputError


def _as_vectors(array: np.ndarray) -> np.ndarray:
    array = np.asarray(array, dtype=np.float64)
    if array.ndim == 0:
        return array.reshape(1, 1)
    return array.reshape(-1, array.shape[-1]) if array.shape[-1] else array.reshape(-1, 1)


def cosines(reference: np.ndarray, actual: np.ndarray) -> np.ndarray:
    """One cosine similarity per vector along the last axis (float64)."""
    ref = _as_vectors(reference)
    act = _as_vectors(actual)
    finite = np.isfinite(act).all(axis=1) & np.isfinite(ref).all(axis=1)
    ref = np.where(np.isfinite(ref), ref, 0.0)
    act = np.where(np.isfinite(act), act, 0.0)
    ref_norm = np.linalg.norm(ref, axis=1)
    act_norm = np.linalg.norm(act, axis=1)
    dot = np.einsum("ij,ij->i", ref, act)
    denominator = ref_norm * act_norm
    with np.errstate(invalid="ignore", divide="ignore"):
        result = np.where(denominator > 0, dot / np.where(denominator > 0, denominator, 1.0), 0.0)
    both_zero = (ref_norm == 0) & (act_norm == 0)
    result = np.where(both_zero, 1.0, result)
    result = np.clip(result, -1.0, 1.0)
    return np.where(finite, result, -1.0)


def looks_like_logits(array: np.ndarray) -> bool:
    array = np.asarray(array)
    return array.ndim == 2 and array.shape[1] >= 2 and np.issubdtype(array.dtype, np.floating)


def compare_one(reference: np.ndarray, actual: np.ndarray, *, classification: bool | None = None) -> dict:
    reference = np.asarray(reference)
    actual = np.asarray(actual)
    values = cosines(reference, actual)
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.abs(reference.astype(np.float64) - actual.astype(np.float64))
    if not diff.size:
        max_abs = 0.0
    elif not np.isfinite(diff).all():
        max_abs = float("inf")
    else:
        max_abs = float(diff.max())
    result = {
        "cosine_min": float(values.min()) if values.size else 1.0,
        "cosine_mean": float(values.mean()) if values.size else 1.0,
        "max_abs": max_abs,
        "vectors": int(values.size),
    }
    if classification is None:
        classification = looks_like_logits(reference)
    if classification and reference.ndim >= 2 and reference.shape[0]:
        ref_top = np.argmax(reference.reshape(reference.shape[0], -1), axis=1)
        act_top = np.argmax(np.nan_to_num(actual.reshape(actual.shape[0], -1), nan=-np.inf), axis=1)
        result["top1_agreement"] = float(np.mean(ref_top == act_top))
    return result


def compare(
    reference: dict[str, np.ndarray], actual: dict[str, np.ndarray], *, classification: bool | None = None
) -> dict:
    """Compare every reference output with the same-named actual output.

    Raises UserInputError when an output is missing or its shape differs.
    ``classification`` forces top-1 agreement on (True) or off (False); None guesses from shape.
    """
    missing = [name for name in reference if name not in actual]
    if missing:
        raise UserInputError(
            f"the model does not produce output(s) {', '.join(missing)} that the reference has "
            f"(it produces: {', '.join(actual) or 'nothing'})"
        )
    outputs: dict[str, dict] = {}
    for name, ref in reference.items():
        act = actual[name]
        if np.shape(ref) != np.shape(act):
            raise UserInputError(
                f"output {name} has shape {list(np.shape(act))}, the reference has {list(np.shape(ref))}"
            )
        outputs[name] = compare_one(ref, act, classification=classification)
    total = sum(o["vectors"] for o in outputs.values())
    overall: dict = {
        "cosine_min": min((o["cosine_min"] for o in outputs.values()), default=1.0),
        "cosine_mean": (
            sum(o["cosine_mean"] * o["vectors"] for o in outputs.values()) / total if total else 1.0
        ),
        "max_abs": max((o["max_abs"] for o in outputs.values()), default=0.0),
    }
    top1 = [o["top1_agreement"] for o in outputs.values() if "top1_agreement" in o]
    if top1:
        overall["top1_agreement"] = min(top1)
    overall["outputs"] = outputs
    return overall
