"""The built-in sample sentences: the gate's rows are text no plugin calibrated on, and no held-out text leaks in."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from tests.data_gen import sentences
from worker.stages.holdout import split
from worker.support.transformers_samples import SENTENCES, sentence_ids

ROOT = Path(__file__).resolve().parents[2]


def phrases(text: str, n: int = 4) -> set[tuple[str, ...]]:
    words = "".join(c if c.isalnum() or c in " '" else " " for c in text.lower()).split()
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def test_no_held_out_sentence_of_the_benchmarks_shares_a_phrase_with_the_built_in_samples():
    sys.path.insert(0, str(ROOT / "scripts" / "bench"))
    try:
        from int8_recipe import HELD_OUT
    finally:
        sys.path.remove(str(ROOT / "scripts" / "bench"))
    held = set().union(*(phrases(line) for line in [*HELD_OUT, *sentences(200, seed=11)]))
    leaking = [line for line in SENTENCES if phrases(line) & held]
    assert leaking == []
    assert len(set(SENTENCES)) == len(SENTENCES)


def test_the_gate_rows_share_no_sentence_with_the_calibration_rows(minilm_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir), local_files_only=True)
    ids = sentence_ids(tokenizer, batch=8, sequence=128)
    assert ids.shape == (8, 128)
    part = split({"input_ids": ids}, {"y": np.zeros((8, 1), np.float32)}, gate_rows=None, fixed=False)
    encoded = {line: tokenizer.encode(line, add_special_tokens=False) for line in SENTENCES}

    def used(rows) -> set[str]:  # sentences whose first five tokens appear in the rows
        text = [" ".join(map(str, row)) for row in rows]
        return {line for line, tokens in encoded.items()
                if any(" ".join(map(str, tokens[:5])) in row for row in text)}

    gate, calibration = used(part.gate["input_ids"]), used(part.calibration["input_ids"])
    assert len(gate) >= 10 and len(calibration) >= 40
    assert gate.isdisjoint(calibration)
