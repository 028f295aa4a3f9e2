"""The gpu pool's PyTorch fallback measurement, run on the CPU (loads torch and transformers)."""

from __future__ import annotations

import numpy as np
import pytest

from worker import gpu


@pytest.mark.heavy
def test_the_torch_fallback_times_the_source_model_in_float32_and_float16(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")

    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=16)
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    model.save_pretrained(tmp_path, safe_serialization=True)
    samples = {"input_ids": np.arange(16, dtype=np.int64).reshape(2, 8) % 50,
               "attention_mask": np.ones((2, 8), np.int64), "token_type_ids": np.zeros((2, 8), np.int64)}
    with torch.inference_mode():
        reference = {"last_hidden_state": model(**{k: torch.from_numpy(v) for k, v in samples.items()})
                     .last_hidden_state.numpy()}
    figures = gpu.torch_cuda_figures(tmp_path, "feature-extraction", samples, reference, runs=3, warmup=1,
                                     device="cpu")
    assert figures["float32"]["cosine_min"] > 0.9999
    assert 0.99 < figures["float16"]["cosine_min"] < 1.0001
    assert figures["float16"]["runs"] == 3 and figures["float16"]["p50_ms"] > 0
