"""Text-generation conversion (worker.support.genai_convert) for each supported family, against torch.

Random-initialized 2-layer decoders (Qwen2, Qwen3, Mistral, Phi, Phi-3) with the tiny Llama's tokenizer:
the ONNX Runtime GenAI export must pick torch's next token at the held-out positions (all of them
but near-ties: random weights make flat logits), and its logits must match (the check is against
the source model, so random weights do). The trained
Llama itself goes through the queue in tests/integration/test_llm_job.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.jobspec import ConvertSpec, ModelSpec
from shared.settings import Settings
from tests.llm_models import held_out, random_decoder, tiny_llm  # noqa: F401  (tiny_llm: a session fixture)
from worker.support.plugin_io import ConvertRequest

pytestmark = [pytest.mark.heavy, pytest.mark.timeout(2400)]  # the first test also trains the tiny model


def convert(folder: Path, workdir: Path, lines: list[str] | None = None):
    from worker.support.genai_convert import convert_causal_lm

    workdir.mkdir()
    spec = ModelSpec(name="m", source=f"./{folder.name}", format="hf-transformers", task="text-generation")
    return convert_causal_lm(ConvertRequest(source=folder, model=spec, convert=ConvertSpec(), workdir=workdir,
                                            settings=Settings(), sample_text=lines))


@pytest.mark.parametrize("architecture", ["qwen2", "qwen3", "mistral", "phi", "phi3"])
def test_each_family_exports_with_a_kv_cache_and_torchs_next_tokens(tiny_llm, tmp_path, architecture):
    (tmp_path / architecture).mkdir()
    source = random_decoder(tmp_path / architecture, architecture, tiny_llm)
    lines = held_out(tiny_llm).read_text().splitlines()
    result = convert(source, tmp_path / "out", lines)
    check = result.extra["source_check"]
    assert check["next_token_agreement"] >= 0.99 and check["logits_cosine_min"] > 0.999
    assert check["perplexity_ratio_source"] == pytest.approx(1.0, abs=1e-3)
    assert any(t.name.startswith("past_key_values.") for t in result.inputs)  # the KV cache
    assert (tmp_path / "out" / "genai_config.json").is_file() and (tmp_path / "out" / "hf_source").is_dir()


def test_the_trained_model_keeps_its_source_and_samples_the_held_out_text(tiny_llm, tmp_path):
    lines = held_out(tiny_llm).read_text().splitlines()
    result = convert(tiny_llm, tmp_path / "out", lines)
    assert result.extra["samples"] == "user-text" and result.extra["architecture"] == "LlamaForCausalLM"
    ids = result.samples["input_ids"]
    assert ids.shape == (8, 128) and result.reference["logits"].shape == (8, 128, 512)
    assert result.extra["source_check"]["perplexity_source"] < 4  # trained: far below the 512-token vocabulary
    kept = {p.name for p in (tmp_path / "out" / "hf_source").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= kept
