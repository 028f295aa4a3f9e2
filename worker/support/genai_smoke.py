"""The deploy smoke gate of a text-generation model: the gate's figures again, and a generation as served.

Before a text-generation model gets a version, it must (1) score the gate's held-out rows within
the job's gate (``shared.inference.generation``: perplexity against the source model's,
next-token agreement), run teacher-forced in ONNX Runtime as the optimize stage measured it, and
(2) load in ONNX Runtime GenAI, the runtime ``modelyard serve`` uses, and generate greedily from
the start of a held-out row. A folder that fails either never becomes a version.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from shared.errors import UserInputError
from shared.inference.generation import gate_reasons, input_ids_name, read_genai_config, score_folder
from shared.jobspec import Gate

SMOKE_PROMPT_TOKENS = 16
SMOKE_NEW_TOKENS = 8


def generation_smoke(model_file: Path, samples: dict, reference: dict, gate: Gate, *, threads: int,
                     alias: str) -> dict:
    """The gate figures and the smoke generation's tokens; UserInputError (alias not moved) when either fails."""
    from shared.inference.runtime import load_session

    folder = Path(model_file).parent
    config = read_genai_config(folder)
    figures = score_folder(load_session(model_file, threads=threads), samples, reference, config)
    reasons = gate_reasons(gate, figures, None)
    if reasons:
        raise UserInputError(f"deploy smoke gate failed, alias {alias!r} not moved: {'; '.join(reasons)}")
    prompt = np.asarray(samples[input_ids_name(config)][0, :SMOKE_PROMPT_TOKENS], dtype=np.int32)
    try:
        tokens = greedy_tokens(folder, prompt, SMOKE_NEW_TOKENS, threads=threads)
    except Exception as exc:
        raise UserInputError(f"deploy smoke gate failed, alias {alias!r} not moved: the model does not generate "
                             f"in ONNX Runtime GenAI: {exc}") from None
    return {**figures, "smoke_generation": {"prompt_tokens": len(prompt), "generated": tokens}}


def greedy_tokens(folder: Path, prompt: np.ndarray, count: int, *, threads: int) -> list[int]:
    """Up to ``count`` greedy tokens after ``prompt``, in ONNX Runtime GenAI (fewer when the text ends)."""
    import onnxruntime_genai as og

    from shared.inference.generation_timing import load_model

    model = load_model(folder, threads=threads)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=int(len(prompt) + count), do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    tokens = []
    while not generator.is_done() and len(tokens) < count:
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    return tokens
