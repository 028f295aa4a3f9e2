"""A text-generation version, served: an ONNX Runtime GenAI model and tokenizer, behind limits.

A repository version whose manifest says ``task: text-generation`` is a GenAI model folder
(``model.onnx`` + weights + ``genai_config.json`` + tokenizer). ``GenerationEngine`` opens it
with ``onnxruntime_genai`` and stands where an inference session stands for a tensor model
(``serving.versions.LoadedVersion.session``): it has ``inputs`` / ``outputs`` for the metadata
routes, and its ``run`` refuses KServe v2 inference with a pointer to the OpenAI routes
(``serving.openai``), which call ``generate``.

Every request is bounded (``GenerationLimits``, from ``MODELYARD_SERVE_*``): the prompt's tokens,
``max_tokens``, their sum against the model's context length, and the generations running at
once; past a limit the request is refused (400, or 429 for a full server) with a message naming
the limit and its setting. Generation is greedy at temperature 0, else sampled.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from serving.errors import RequestError
from shared.arrays import TensorInfo
from shared.errors import UserInputError, one_line
from shared.inference.generation import read_genai_config

PROVIDER = "onnxruntime-genai"


class GenerationLimits(BaseSettings):
    """How much one request may ask of a text-generation server, and how many may run at once."""

    model_config = SettingsConfigDict(env_prefix="MODELYARD_SERVE_", extra="ignore", frozen=True)

    max_prompt_tokens: int = Field(default=2048, ge=1, description="Most tokens a prompt may have.")
    max_tokens: int = Field(default=512, ge=1, description="Most tokens one request may ask to generate.")
    max_generations: int = Field(default=2, ge=1, description="Generations running at once; more get 429.")


@dataclass(frozen=True)
class Sampling:
    """One request's generation settings, checked (``GenerationEngine.check``)."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class Token:
    """One generated token: its id and the text it adds (empty while a multi-byte character is incomplete)."""

    id: int
    text: str


class GenerationEngine:
    """An ONNX Runtime GenAI model folder, loaded, with its tokenizer and the server's limits."""

    def __init__(self, folder: Path, *, threads: int = 2, limits: GenerationLimits | None = None) -> None:
        import onnxruntime_genai as og

        from shared.inference.generation_timing import load_model

        self.path = Path(folder)
        self.limits = limits or GenerationLimits()
        config = read_genai_config(self.path)
        self.context_length = int(config["model"].get("context_length") or 0) or None
        self.model = load_model(self.path, threads=threads)
        try:
            self.tokenizer = og.Tokenizer(self.model)
        except Exception as exc:
            raise UserInputError(f"the tokenizer of {self.path.name} cannot be loaded: {one_line(exc)}") from None
        self.eos_token_ids = {int(t) for t in self.tokenizer.eos_token_ids}
        self.provider = PROVIDER
        self.inputs, self.outputs = _model_io(self.path / config["model"]["decoder"].get("filename", "model.onnx"))
        self._slots = threading.BoundedSemaphore(self.limits.max_generations)

    def run(self, feeds: dict) -> dict:
        raise UserInputError("this model generates text: use POST /v1/completions or /v1/chat/completions "
                             "(OpenAI-compatible), not the KServe v2 infer route")

    # -- requests ----------------------------------------------------------------------------

    def encode(self, prompt: str | list[int]) -> np.ndarray:
        if isinstance(prompt, list):
            return np.asarray(prompt, dtype=np.int32)
        return np.asarray(self.tokenizer.encode(prompt), dtype=np.int32)

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        """The messages in the model's chat template (its tokenizer's), ending where the assistant speaks."""
        try:
            return self.tokenizer.apply_chat_template(json.dumps(messages), add_generation_prompt=True)
        except Exception as exc:
            raise RequestError(f"this model's tokenizer cannot format chat messages (no usable chat template): "
                               f"{one_line(exc)}; use /v1/completions") from None

    def check(self, prompt: np.ndarray, max_tokens: int | None, *, default_tokens: int) -> int:
        """The request's max_tokens (its default filled in), or RequestError naming the limit it passes."""
        limits = self.limits
        if len(prompt) == 0:
            raise RequestError("the prompt is empty")
        if len(prompt) > limits.max_prompt_tokens:
            raise RequestError(f"the prompt has {len(prompt)} tokens, over this server's limit of "
                               f"{limits.max_prompt_tokens} (MODELYARD_SERVE_MAX_PROMPT_TOKENS)")
        tokens = min(default_tokens, limits.max_tokens) if max_tokens is None else max_tokens
        if tokens < 1:
            raise RequestError(f"max_tokens must be at least 1, got {tokens}")
        if tokens > limits.max_tokens:
            raise RequestError(f"max_tokens {tokens} is over this server's limit of {limits.max_tokens} "
                               "(MODELYARD_SERVE_MAX_TOKENS)")
        if self.context_length and len(prompt) + tokens > self.context_length:
            raise RequestError(f"the prompt's {len(prompt)} tokens plus max_tokens {tokens} exceed the model's "
                               f"context length of {self.context_length} tokens")
        return tokens

    @contextmanager
    def slot(self) -> Iterator[None]:
        """One of ``max_generations`` places, taken at once or refused with 429: a full server says so."""
        if not self._slots.acquire(blocking=False):
            raise RequestError(f"the server is generating for {self.limits.max_generations} requests already "
                               "(MODELYARD_SERVE_MAX_GENERATIONS); retry later", 429, headers={"Retry-After": "1"})
        try:
            yield
        finally:
            self._slots.release()

    def generate(self, prompt: np.ndarray, sampling: Sampling) -> Iterator[Token]:
        """The generated tokens, one at a time, until end of text, ``max_tokens`` or a stop string.

        Blocking (each step runs the model): call it from a worker thread. The caller holds a ``slot``.
        """
        import onnxruntime_genai as og

        params = og.GeneratorParams(self.model)
        search: dict[str, float | int | bool] = {"max_length": int(len(prompt) + sampling.max_tokens)}
        if sampling.temperature > 0:
            search.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p)
            if sampling.top_k > 0:
                search["top_k"] = sampling.top_k
        else:
            search["do_sample"] = False
        params.set_search_options(**search)
        generator = og.Generator(self.model, params)
        generator.append_tokens(prompt)
        stream = self.tokenizer.create_stream()
        for _ in range(sampling.max_tokens):
            if generator.is_done():
                return
            generator.generate_next_token()
            token = int(generator.get_next_tokens()[0])
            if token in self.eos_token_ids:
                return
            yield Token(token, stream.decode(token))


def finish_reason(count: int, sampling: Sampling, stopped: bool) -> str:
    """OpenAI's finish_reason: "length" when max_tokens ran out, else "stop" (end of text or a stop string)."""
    return "length" if count >= sampling.max_tokens and not stopped else "stop"


def _model_io(model: Path) -> tuple[list[TensorInfo], list[TensorInfo]]:
    """The decoder's inputs and outputs, read from the graph without its weights (for the metadata routes)."""
    import onnx

    graph = onnx.load(str(model), load_external_data=False).graph

    def info(value) -> TensorInfo:
        tensor = value.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
        shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or f"dim{i}")
                 for i, d in enumerate(tensor.shape.dim)]
        return TensorInfo(value.name, dtype, shape)

    return [info(v) for v in graph.input], [info(v) for v in graph.output]
