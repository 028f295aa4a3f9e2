"""The tiny Llama the text-generation tests share: built once per test session, no downloads.

``tiny_llm`` is the model ``examples/build_tiny_llm.py`` trains (hidden 128, 2 layers, 4 heads,
2 KV heads, its own 512-token byte-level BPE, 150 training steps: a loss near 1), saved under
the pytest session's temporary folder with its held-out sentences beside it (``held_out``). The folder is the one the
tests hand over, and every expectation is computed from it as saved (the tokenizer trap: a
tokenizer built in memory can split special tokens differently from its saved copy).

Imported into test modules by name (``from tests.llm_models import tiny_llm``); the build is
cached on disk (a ``.complete`` marker), so modules that import the fixture separately share it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.examples import load

MARKER = ".complete"


def build_tiny_llm(base: Path) -> Path:
    """The trained tiny model's folder under ``base`` (built on first use); held-out.txt lies beside it."""
    folder = base / "tiny-llm"
    if not (base / MARKER).is_file():
        built = load("build_tiny_llm").build(folder)
        (base / MARKER).write_text(json.dumps({"loss": built["loss"], "parameters": built["parameters"]}))
    return folder


def held_out(folder: Path) -> Path:
    """The held-out sentences the example wrote beside the model folder."""
    return load("build_tiny_llm").held_out_path(folder)


@pytest.fixture(scope="session")
def tiny_llm(tmp_path_factory) -> Path:
    pytest.importorskip("onnxruntime_genai", reason="the llm extra is not installed (scripts/test.sh installs it)")
    return build_tiny_llm(tmp_path_factory.getbasetemp() / "tiny-llm-build")


def random_decoder(folder: Path, architecture: str, tokenizer_from: Path) -> Path:
    """A random-initialized 2-layer decoder of another family, with the tiny model's tokenizer: a folder the
    builder must export as faithfully as the Llama (the checks are against torch, so random weights do)."""
    import shutil

    import torch
    import transformers

    configs = {
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
        "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 32}),
        "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
        # as Phi-3 mini 4k: no grouped KV heads, original_max_position_embeddings = max_position_embeddings
        "phi3": ("Phi3Config", "Phi3ForCausalLM", {"pad_token_id": 1, "original_max_position_embeddings": 512,
                                                   "num_key_value_heads": 4}),
        "phi": ("PhiConfig", "PhiForCausalLM", {}),
    }
    config_class, model_class, extra = configs[architecture]
    config = getattr(transformers, config_class)(**{
        "vocab_size": 512, "hidden_size": 128, "intermediate_size": 320, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512, "bos_token_id": 0,
        "eos_token_id": 1, "tie_word_embeddings": False, "architectures": [model_class], **extra})
    torch.manual_seed(0)
    model = getattr(transformers, model_class)(config).eval()
    model.save_pretrained(str(folder), safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tokenizer_from / name).is_file():
            shutil.copyfile(tokenizer_from / name, folder / name)
    return folder
