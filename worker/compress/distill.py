"""Knowledge distillation: train a pruned student to reproduce its teacher on unlabelled data.

Two objectives, by what the model outputs:

* ``embedding`` (feature extraction, sentence embeddings): per vector (a token's hidden state, or
  a row's sentence embedding), ``1 - cosine`` plus the squared error scaled by the teacher's mean
  squared norm, averaged over the vectors (for token states, the positions the attention mask
  marks real); the student learns the teacher's directions and magnitudes.
* ``logits`` (classifiers): ``KL(softmax(teacher / T) || softmax(student / T)) · T²`` (Hinton et
  al.), T the job's ``distill.temperature``.

The loop is plain: AdamW, a learning rate that warms up over the first 5% of steps then decays
linearly to 10%, set from the global step so that a run resumed from a checkpoint continues on
the same schedule. Batches of epoch e are shuffled with ``seed + e``, so a resumed run sees
the same batches it would have seen. Dropout is switched off (the targets are the teacher's
deterministic outputs); BatchNorm statistics keep updating in training mode.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from shared.arrays import Arrays


@dataclass
class Checkpoint:
    """The state after ``epoch`` completed epochs (1-based)."""

    epoch: int
    student: dict  # state dict: name -> tensor
    optimizer: dict  # torch optimizer state dict
    history: list[dict] = field(default_factory=list)  # one record per completed epoch


@dataclass
class DistillConfig:
    objective: str  # "embedding" | "logits"
    epochs: int
    batch_size: int
    lr: float
    temperature: float = 2.0
    seed: int = 0
    weight_decay: float = 0.01


def batches(data: Arrays, batch_size: int, *, seed: int | None) -> Iterator[Arrays]:
    """Rows of every array in data, batch_size at a time; shuffled with seed (None: in order).

    With a 2-D ``attention_mask`` (padded text rows), each batch is cut to its longest row: the
    columns past it are padding in every row of the batch.
    """
    count = len(next(iter(data.values())))
    order = np.arange(count) if seed is None else np.random.default_rng(seed).permutation(count)
    for start in range(0, count, batch_size):
        index = order[start:start + batch_size]
        yield _trim({name: array[index] for name, array in data.items()})


def _trim(batch: Arrays) -> Arrays:
    mask = batch.get("attention_mask")
    if mask is None or mask.ndim != 2 or not mask.size:
        return batch
    used = np.flatnonzero(mask.any(axis=0))
    width = int(used[-1]) + 1 if used.size else 1
    if width == mask.shape[1]:
        return batch
    return {name: a[:, :width] if a.ndim >= 2 and a.shape[:2] == mask.shape else a for name, a in batch.items()}


def steps_per_epoch(data: Arrays, batch_size: int) -> int:
    return math.ceil(len(next(iter(data.values()))) / batch_size)


def loss_fn(objective: str, student_out, teacher_out, mask, temperature: float):
    import torch.nn.functional as F

    if objective == "logits":
        t = temperature
        return F.kl_div(F.log_softmax(student_out / t, dim=-1), F.log_softmax(teacher_out / t, dim=-1),
                        reduction="batchmean", log_target=True) * t * t
    cosine = F.cosine_similarity(student_out, teacher_out, dim=-1, eps=1e-8)
    scale = teacher_out.pow(2).sum(-1).mean().clamp_min(1e-8)
    squared = (student_out - teacher_out).pow(2).sum(-1) / scale
    per_vector = (1 - cosine) + squared
    if mask is None:
        return per_vector.mean()
    weight = mask.to(per_vector.dtype)
    return (per_vector * weight).sum() / weight.sum().clamp_min(1.0)


def learning_rate(config: DistillConfig, step: int, total: int) -> float:
    warmup = max(1, int(0.05 * total))
    if step < warmup:
        return config.lr * (step + 1) / warmup
    remaining = (total - step) / max(1, total - warmup)
    return config.lr * (0.1 + 0.9 * max(0.0, remaining))


def distill(
    student,
    teacher,
    data: Arrays,
    config: DistillConfig,
    *,
    forward: Callable[[Any, dict], Any],
    mask_of: Callable[[dict], Any] | None = None,
    device: str = "cpu",
    start: Checkpoint | None = None,
    on_progress: Callable[[dict], None] | None = None,
    on_epoch: Callable[[Checkpoint], None] | None = None,
) -> list[dict]:
    """Train student in place; returns the per-epoch history (resumed epochs included).

    ``forward(model, batch)`` returns the output tensor compared (hidden states or logits);
    ``mask_of(batch)`` the positions that count (None: all). ``start`` resumes after its epoch.
    """
    import torch

    student.to(device)
    teacher.to(device).eval()
    for module in student.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    history: list[dict] = []
    first_epoch = 1
    if start is not None:
        student.load_state_dict(start.student)
        optimizer.load_state_dict(start.optimizer)
        history = list(start.history)
        first_epoch = start.epoch + 1
    per_epoch = steps_per_epoch(data, config.batch_size)
    total = per_epoch * config.epochs
    torch.manual_seed(config.seed)
    for epoch in range(first_epoch, config.epochs + 1):
        student.train()
        started, losses = time.perf_counter(), []
        for step, batch in enumerate(batches(data, config.batch_size, seed=config.seed + epoch), start=1):
            tensors = {name: torch.from_numpy(np.ascontiguousarray(a)).to(device) for name, a in batch.items()}
            with torch.no_grad():
                target = forward(teacher, tensors)
            output = forward(student, tensors)
            mask = mask_of(tensors) if mask_of else None
            loss = loss_fn(config.objective, output, target, mask, config.temperature)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(config, (epoch - 1) * per_epoch + step - 1, total)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            losses.append(float(loss.detach()))
            if on_progress:
                on_progress({"epoch": epoch, "epochs": config.epochs, "step": step, "steps": per_epoch,
                             "loss": losses[-1], "start_epoch": first_epoch})
        history.append({"epoch": epoch, "loss": float(np.mean(losses)) if losses else None,
                        "seconds": round(time.perf_counter() - started, 2)})
        if on_epoch:
            state = {k: v.detach().to("cpu").clone() for k, v in student.state_dict().items()}
            on_epoch(Checkpoint(epoch=epoch, student=state, optimizer=optimizer.state_dict(), history=list(history)))
    student.eval()
    return history


def agreement(student, teacher, data: Arrays, *, forward, mask_of=None, batch_size: int = 16,
              device: str = "cpu") -> dict:
    """How close the student's outputs are to the teacher's on data: per-vector cosine min/mean."""
    import torch

    from shared.inference.fidelity import cosines

    student.to(device).eval()
    teacher.to(device).eval()
    values = []
    with torch.no_grad():
        for batch in batches(data, batch_size, seed=None):
            tensors = {name: torch.from_numpy(np.ascontiguousarray(a)).to(device) for name, a in batch.items()}
            ref = forward(teacher, tensors).float().cpu().numpy()
            out = forward(student, tensors).float().cpu().numpy()
            cos = cosines(ref, out)
            if mask_of is not None:
                cos = cos[mask_of(tensors).cpu().numpy().reshape(-1).astype(bool)]
            values.append(cos)
    joined = np.concatenate(values) if values else np.ones(1)
    return {"cosine_min": float(joined.min()), "cosine_mean": float(joined.mean()), "vectors": int(joined.size)}
