"""Distillation batches: shuffled by epoch seed, every row once, padded text rows cut to each batch's longest."""

from __future__ import annotations

import numpy as np

from worker.compress.distill import batches, steps_per_epoch


def _padded_rows(lengths: list[int], width: int) -> dict[str, np.ndarray]:
    mask = np.zeros((len(lengths), width), dtype=np.int64)
    for row, length in enumerate(lengths):
        mask[row, :length] = 1
    ids = np.where(mask == 1, np.arange(len(lengths))[:, None] + 1000, 0)
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


def test_each_batch_is_cut_to_its_longest_row_and_no_token_is_lost():
    data = _padded_rows([3, 9, 2, 5, 4, 2], width=12)
    seen = []
    for batch in batches(data, 2, seed=None):
        width = batch["attention_mask"].shape[1]
        assert width == batch["attention_mask"].sum(axis=1).max()
        assert {a.shape for a in batch.values()} == {(2, width)}
        seen.extend(batch["input_ids"][batch["attention_mask"] == 1].tolist())
    assert sorted(seen) == sorted(data["input_ids"][data["attention_mask"] == 1].tolist())
    assert [b["attention_mask"].shape[1] for b in batches(data, 2, seed=None)] == [9, 5, 4]


def test_shuffling_follows_the_seed_and_covers_every_row_once():
    data = _padded_rows(list(range(1, 11)), width=10)
    order = [int(row.max()) for batch in batches(data, 3, seed=7) for row in batch["input_ids"]]
    again = [int(row.max()) for batch in batches(data, 3, seed=7) for row in batch["input_ids"]]
    other = [int(row.max()) for batch in batches(data, 3, seed=8) for row in batch["input_ids"]]
    assert order == again and order != other and sorted(order) == list(range(1000, 1010))
    assert steps_per_epoch(data, 3) == 4


def test_arrays_without_an_attention_mask_are_left_whole():
    data = {"x": np.ones((5, 4, 4), dtype=np.float32)}
    assert [b["x"].shape for b in batches(data, 2, seed=None)] == [(2, 4, 4), (2, 4, 4), (1, 4, 4)]
