"""Text-generation figures and gate (shared.inference.generation), folder checks and job checks: no model runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from shared.errors import UserInputError
from shared.inference.generation import (
    apply_generation_gate,
    gate_reasons,
    generation_fidelity,
    next_token_scores,
    teacher_forced_feeds,
)
from shared.jobspec import Gate, parse_job

CONFIG = {"model": {"decoder": {"num_key_value_heads": 2, "head_size": 32, "num_hidden_layers": 2,
                                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                                           "past_key_names": "past_key_values.%d.key",
                                           "past_value_names": "past_key_values.%d.value"}}}}


def one_hot_logits(ids: np.ndarray, vocab: int, confidence: float = 8.0) -> np.ndarray:
    """Logits that predict each next token of ``ids`` (the last position predicts token 0)."""
    logits = np.zeros((*ids.shape, vocab), dtype=np.float32)
    following = np.concatenate([ids[:, 1:], np.zeros((ids.shape[0], 1), dtype=ids.dtype)], axis=1)
    np.put_along_axis(logits, following[..., None], confidence, axis=-1)
    return logits


def test_teacher_forced_feeds_hold_an_empty_cache_per_layer():
    feeds = teacher_forced_feeds(np.array([[5, 6, 7]]), CONFIG)
    assert feeds["attention_mask"].tolist() == [[1, 1, 1]]
    assert sorted(k for k in feeds if k.startswith("past")) == [
        "past_key_values.0.key", "past_key_values.0.value", "past_key_values.1.key", "past_key_values.1.value"]
    assert feeds["past_key_values.1.value"].shape == (1, 2, 0, 32)


def test_perfect_predictions_have_perplexity_near_one_and_full_agreement():
    ids = np.array([[1, 4, 2, 3, 0]], dtype=np.int64)
    logits = one_hot_logits(ids, vocab=6, confidence=30.0)
    figures = generation_fidelity(logits, logits, ids)
    assert figures["perplexity"] == pytest.approx(1.0, abs=1e-6)
    assert figures["next_token_agreement"] == 1.0
    assert figures["positions"] == 4


def test_uniform_logits_have_perplexity_equal_to_the_vocabulary():
    ids = np.array([[1, 4, 2, 3]], dtype=np.int64)
    nll, _ = next_token_scores(np.zeros((1, 4, 7), dtype=np.float32), ids)
    assert np.exp(nll.mean()) == pytest.approx(7.0)


def test_disagreeing_positions_lower_agreement_and_raise_perplexity():
    ids = np.array([[1, 4, 2, 3, 5]], dtype=np.int64)
    reference = one_hot_logits(ids, vocab=6)
    actual = reference.copy()
    actual[0, 1] = np.roll(actual[0, 1], 1)  # position 1 now prefers another token
    figures = generation_fidelity(reference, actual, ids)
    assert figures["next_token_agreement"] == pytest.approx(0.75)
    assert figures["perplexity_ratio_source"] > 1.1


def test_the_gate_names_each_figure_it_refuses():
    gate = Gate(perplexity_ratio_max=1.05, next_token_agreement_min=0.95)
    figures = {"perplexity": 2.2, "perplexity_source": 2.0, "perplexity_ratio_source": 1.1,
               "next_token_agreement": 0.9}
    against_fp32 = gate_reasons(gate, figures, baseline={"perplexity": 2.1})  # 2.2 / 2.1 = 1.048: within 1.05
    assert against_fp32 == ["next_token_agreement 0.9000 < gate next_token_agreement_min 0.95"]
    against_source = gate_reasons(gate, figures, None)  # no fp32 figures: 1.1x the source model's
    assert against_source[0] == "perplexity 2.2 is 1.100x the source model's > gate perplexity_ratio_max 1.05"


def test_the_selection_fails_a_variant_whose_perplexity_is_over_the_ratio_to_fp32():
    gate = Gate(perplexity_ratio_max=1.10)
    rows = [{"variant": "fp32", "passed": True, "reason": "", "generation": {"perplexity": 2.0}},
            {"variant": "int4", "passed": True, "reason": "passed the gate", "generation": {"perplexity": 2.3,
             "perplexity_ratio_source": 1.0, "next_token_agreement": 0.99}},
            {"variant": "int8-weights", "passed": True, "reason": "passed the gate",
             "generation": {"perplexity": 2.02, "perplexity_ratio_source": 1.0, "next_token_agreement": 1.0}}]
    apply_generation_gate(gate, rows)
    assert rows[1]["passed"] is False and "1.150x fp32's > gate perplexity_ratio_max 1.1" in rows[1]["reason"]
    assert rows[2]["passed"] is True and rows[2]["perplexity_ratio"] == pytest.approx(1.01)


def folder_with(tmp_path: Path, config: dict, *, tokenizer: bool = True, tokenizer_config: dict | None = None) -> Path:
    folder = tmp_path / "llm"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes(b"\0" * 8)
    if tokenizer:
        (folder / "tokenizer.json").write_text("{}")
    if tokenizer_config is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return folder


def test_a_llama_folder_with_its_tokenizer_is_accepted(tmp_path):
    from worker.support.genai_builder import check_causal_lm_folder

    assert check_causal_lm_folder(folder_with(tmp_path, {"architectures": ["LlamaForCausalLM"]}), "./llm") \
        == "LlamaForCausalLM"


@pytest.mark.parametrize("case, words", [
    ("no tokenizer", ["no tokenizer", "tokenizer.json or tokenizer.model"]),
    ("unsupported architecture", ["'GPT2LMHeadModel'", "LlamaForCausalLM"]),
    ("custom model code", ["config.json has 'auto_map'", "trust_remote_code"]),
    ("custom tokenizer code", ["tokenizer_config.json has 'auto_map'"]),
])
def test_a_malformed_folder_is_refused_naming_the_problem(tmp_path, case, words):
    from worker.support.genai_builder import check_causal_lm_folder

    config = {"architectures": ["GPT2LMHeadModel" if case == "unsupported architecture" else "LlamaForCausalLM"]}
    if case == "custom model code":
        config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    folder = folder_with(tmp_path, config, tokenizer=case != "no tokenizer",
                         tokenizer_config={"auto_map": {"AutoTokenizer": ["x.Y", None]}}
                         if case == "custom tokenizer code" else None)
    with pytest.raises(UserInputError) as refused:
        check_causal_lm_folder(folder, "./llm")
    for word in words:
        assert word in str(refused.value)


JOB = """
model: {name: tiny, source: ./m, format: hf-transformers, task: text-generation}
optimize: {variants: [VARIANT]}
"""


@pytest.mark.parametrize("variant, task, message", [
    ("int8-dynamic", "text-generation", "'int8-dynamic' does not apply to text-generation models"),
    ("int4", "feature-extraction", "'int4' does not apply to task feature-extraction models"),
])
def test_variants_are_checked_against_the_kind_of_model(variant, task, message):
    from worker.plugins.catalog import check_job

    spec = parse_job(JOB.replace("VARIANT", variant).replace("text-generation", task))
    with pytest.raises(UserInputError) as refused:
        check_job(spec)
    assert message in str(refused.value)
    assert "int4" in str(refused.value) if task == "text-generation" else True


def test_the_generation_variants_are_accepted_for_a_text_generation_job():
    from worker.plugins.catalog import check_job

    spec = parse_job(JOB.replace("[VARIANT]", "[int4, int8-weights, {id: int4-k, of: int4, params: "
                                              "{method: k_quant, block_size: 64}}]"))
    assert check_job(spec) is spec


def test_compress_is_refused_for_a_text_generation_model():
    with pytest.raises(UserInputError) as refused:
        parse_job("model: {name: t, source: ./m, format: hf-transformers, task: text-generation}\n"
                  "compress: {prune: {method: layers, keep: 1}}\n")
    assert "compress (prune, distill) applies to encoder and CNN models" in str(refused.value)


def test_a_vocabulary_as_wide_as_a_layer_is_refused_before_the_builder_miswires_the_head(tmp_path):
    from worker.support.genai_builder import check_causal_lm_folder

    config = {"architectures": ["LlamaForCausalLM"], "vocab_size": 512, "hidden_size": 1536,
              "num_attention_heads": 12, "num_key_value_heads": 4, "intermediate_size": 4096}  # k/v: 4 x 128
    with pytest.raises(UserInputError) as refused:
        check_causal_lm_folder(folder_with(tmp_path, config), "./llm")
    assert "vocab_size 512 equals the output width of the layers' key/value projections" in str(refused.value)


class CharTokenizer:
    """One token per character, BOS 0 first, EOS 1: how the packing frames each line."""

    eos_token_id = 1

    def __call__(self, text: str) -> dict:
        return {"input_ids": [0] + [ord(c) for c in text]}


def test_held_out_lines_are_packed_end_to_end_each_ended_by_eos():
    from worker.support.genai_convert import token_rows

    rows = token_rows(CharTokenizer(), ["abc", "de", "fghij"], rows=2, sequence=5, origin="model.samples t.txt")
    assert rows.tolist() == [[0, 97, 98, 99, 1], [0, 100, 101, 1, 0]]


def test_text_shorter_than_a_row_gives_one_shorter_row_and_too_little_text_is_refused():
    from worker.support.genai_convert import token_rows

    assert token_rows(CharTokenizer(), ["abcdefghij"], rows=8, sequence=128, origin="t").shape == (1, 12)
    with pytest.raises(UserInputError) as refused:
        token_rows(CharTokenizer(), ["ab"], rows=8, sequence=128, origin="model.samples t.txt")
    assert "model.samples t.txt: 4 tokens in all; the gate needs at least 8" in str(refused.value)
