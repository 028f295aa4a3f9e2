"""Calibration data never grades itself: which sample rows the optimizers see, and which the gate measures.

The convert stage stores the sample inputs and the source's reference outputs on them
(``samples.npz`` / ``reference.npz``). The optimize stage splits them by rows, the same way for
every variant (``split``):

* with ``model.gate_samples``, the convert stage appends the gate rows after the rows of
  ``model.samples`` and records their count (``GATE_ROWS`` in its info): the gate measures on
  those trailing rows and every row of ``model.samples`` calibrates;
* without, every 4th row (rows 3, 7, 11, …) is held out for the gate and the others calibrate,
  so 8 rows give 6 + 2; 2 or 3 rows give every 2nd row (1 row to the gate), so there is always at
  least one row on each side. Interleaved rather than trailing rows: user samples are often
  ordered (by topic, by class), and the gate should see the same mix the calibration does.

No split is possible with a single row, or when the model takes a fixed batch (an ONNX input
whose first dimension is a number): then the same rows serve both, and ``separate`` says so in
the record. A ``.txt`` of gate sentences is converted by a second run of the converter, since a
converter may pack lines into rows (feature extraction does): its rows are appended as they are,
the inputs of the narrower part padded with zeros (a zero attention mask) when the two parts'
rows differ in width but their outputs agree in shape.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from shared.arrays import Arrays, TensorInfo, load_arrays, text_lines
from shared.errors import UserInputError
from shared.storage import FileRef
from worker.context import StageContext
from worker.support.plugin_io import ConvertResult

GATE_ROWS = "gate_rows"  # convert info: how many trailing rows of the samples came from model.gate_samples
RULE = "every 4th row held out for the gate (every 2nd for 2-3 rows)"
RULE_VERSION = "holdout-v1"  # keys the optimize step: a new rule recomputes the variants
GATE_FILE = "gate-samples"


@dataclass(frozen=True)
class Holdout:
    """The calibration part (for the optimizers) and the gate part (for the fidelity gate) of the samples."""

    calibration: Arrays
    calibration_reference: Arrays
    gate: Arrays
    gate_reference: Arrays
    calibration_rows: list[int]
    gate_rows: list[int]
    rule: str
    separate: bool  # False: the same rows serve both (a single row, or a fixed batch)

    def describe(self) -> dict:
        """For the record: the rule, the calibration row count and the gate's row indices."""
        return {"rule": self.rule, "separate": self.separate, "calibration_rows": len(self.calibration_rows),
                "gate_rows": self.gate_rows}


def rows_of(*parts: Arrays) -> int | None:
    """The number of rows every array of ``parts`` shares (its first dimension), else None."""
    counts = {int(np.shape(value)[0]) if np.ndim(value) else -1 for part in parts for value in part.values()}
    return counts.pop() if len(counts) == 1 and -1 not in counts else None


def gate_indices(total: int) -> list[int]:
    """The rows the default rule holds out of ``total`` (>= 2): every 4th, or every 2nd below 4 rows."""
    stride = 4 if total >= 4 else 2
    return [i for i in range(total) if i % stride == stride - 1]


def fixed_batch(inputs: list[TensorInfo], model_file: str) -> bool:
    """Whether the model insists on its batch size (ONNX with a numeric first dimension; LiteRT resizes)."""
    if not model_file.lower().endswith(".onnx"):
        return False
    return any(info.shape and isinstance(info.shape[0], int) and info.shape[0] > 0 for info in inputs)


def split(samples: Arrays, reference: Arrays, *, gate_rows: int | None, fixed: bool = False) -> Holdout:
    """Split the samples and reference by rows: the trailing ``gate_rows`` (from model.gate_samples), else the rule."""
    total = rows_of(samples, reference)
    if gate_rows:
        if total is None or gate_rows >= total:
            raise UserInputError(f"the stored samples do not end in the {gate_rows} rows of model.gate_samples; "
                                 "resubmit the job to convert again")
        held = list(range(total - gate_rows, total))
        rule = f"the {gate_rows} rows of model.gate_samples"
    elif total is None or total < 2 or fixed:
        why = ("the model takes a fixed batch" if fixed else "only 1 sample row" if total == 1
               else "the samples and outputs do not share a row count")
        every = list(range(total or 0))
        return Holdout(samples, reference, samples, reference, every, every, f"no split: {why}", separate=False)
    else:
        held = gate_indices(total)
        rule = RULE
    kept = [i for i in range(total) if i not in set(held)]
    return Holdout(_take(samples, kept), _take(reference, kept), _take(samples, held), _take(reference, held),
                   kept, held, rule, separate=True)


def timing_inputs(samples: Arrays, gate_rows: int | None) -> Arrays:
    """The rows latency is timed on: those of model.samples (the job's batch), without appended gate rows."""
    total = rows_of(samples)
    if not gate_rows or total is None or gate_rows >= total:
        return samples
    return _take(samples, list(range(total - gate_rows)))


def _take(arrays: Arrays, rows: list[int]) -> Arrays:
    index = np.asarray(rows, dtype=np.int64)
    return {name: np.ascontiguousarray(np.asarray(value)[index]) for name, value in arrays.items()}


# -- the convert stage's side: model.gate_samples appended after model.samples ------------------

def gate_ref(ctx: StageContext) -> FileRef | None:
    data = ctx.record.get("gate_samples")
    return FileRef.from_dict(data) if data else None


def append_gate_arrays(ctx: StageContext, tmp: Path, samples: Arrays) -> Arrays:
    """model.samples with model.gate_samples' rows appended (an .npz job); unchanged without gate samples."""
    ref = gate_ref(ctx)
    if ref is None or ref.path.lower().endswith(".txt"):
        return samples
    gate = load_arrays(ctx.store.get_file(ref, tmp / f"{GATE_FILE}.npz"), what="model.gate_samples")
    if set(gate) != set(samples):
        raise UserInputError(f"model.gate_samples has arrays {', '.join(sorted(gate))}; model.samples has "
                             f"{', '.join(sorted(samples))}: give both the same inputs")
    if rows_of(gate) is None or rows_of(samples) is None:
        raise UserInputError("model.samples and model.gate_samples: every array needs the same number of rows")
    for name, value in gate.items():
        if np.shape(value)[1:] != np.shape(samples[name])[1:]:
            raise UserInputError(f"model.gate_samples: {name} has rows of shape {list(np.shape(value)[1:])}, "
                                 f"model.samples' have {list(np.shape(samples[name])[1:])}")
    return {name: np.concatenate([np.asarray(samples[name]), np.asarray(gate[name]).astype(samples[name].dtype)])
            for name in samples}


def with_gate_part(ctx: StageContext, tmp: Path, result: ConvertResult,
                   convert_text: Callable[[list[str]], ConvertResult]) -> tuple[ConvertResult, int | None]:
    """The conversion's samples and reference with the gate part last, and how many rows it has.

    An .npz's gate rows were appended before the conversion (``append_gate_arrays``); a .txt's are
    converted now by ``convert_text`` (the converter run again on the gate lines alone).
    """
    ref = gate_ref(ctx)
    if ref is None:
        return result, None
    if ref.path.lower().endswith(".txt"):
        lines = text_lines(ctx.store.get_file(ref, tmp / f"{GATE_FILE}.txt"), "model.gate_samples")
        gate = convert_text(lines)
        rows = rows_of(gate.samples, gate.reference)
        if not rows:
            raise UserInputError("model.gate_samples: its converted rows and outputs do not share a row count")
        samples = _append_rows(result.samples, gate.samples, pad=True)
        reference = _append_rows(result.reference, gate.reference, pad=False)
        return replace(result, samples=samples, reference=reference), rows
    rows = rows_of(load_arrays(tmp / f"{GATE_FILE}.npz", what="model.gate_samples"))
    if not rows or (rows_of(result.samples, result.reference) or 0) <= rows:
        raise UserInputError("model.gate_samples: the converter did not keep the rows of model.samples and "
                             "model.gate_samples (their count changed)")
    return result, rows


def _append_rows(first: Arrays, second: Arrays, *, pad: bool) -> Arrays:
    """Row-wise concatenation; inputs (``pad``) of different widths are padded with zeros to the wider."""
    if set(first) != set(second):
        raise UserInputError("model.gate_samples: the converter made different arrays for the gate rows "
                             f"({', '.join(sorted(second))}) than for model.samples ({', '.join(sorted(first))})")
    combined = {}
    for name in first:
        a, b = np.asarray(first[name]), np.asarray(second[name])
        if a.shape[1:] != b.shape[1:]:
            if not pad or a.ndim != b.ndim:
                raise UserInputError(f"model.gate_samples: output {name} has rows of shape {list(b.shape[1:])}, "
                                     f"model.samples' have {list(a.shape[1:])}")
            width = [max(x, y) for x, y in zip(a.shape[1:], b.shape[1:])]
            a, b = (np.pad(v, [(0, 0)] + [(0, w - s) for w, s in zip(width, v.shape[1:])]) for v in (a, b))
        combined[name] = np.concatenate([a, b.astype(a.dtype)])
    return combined
