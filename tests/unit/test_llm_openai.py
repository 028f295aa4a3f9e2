"""The OpenAI-compatible routes (serving.openai) over a scripted engine: shapes, streaming, limits, refusals."""

from __future__ import annotations

import asyncio
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from serving import openai
from serving.generation import GenerationEngine, GenerationLimits, Sampling, Token

WORDS = ["The", " quiet", " engineer", " repaired", " a", " bridge", "."]


class ScriptedEngine(GenerationEngine):
    """Generates WORDS (one token each) whatever the prompt; the prompt is one token per character."""

    def __init__(self, limits: GenerationLimits, context_length: int | None = 64) -> None:
        self.limits, self.context_length = limits, context_length
        self.eos_token_ids = {0}
        self._slots = threading.BoundedSemaphore(limits.max_generations)
        self.release = threading.Event()
        self.release.set()

    def encode(self, prompt):
        return np.asarray(prompt if isinstance(prompt, list) else [ord(c) for c in prompt], dtype=np.int32)

    def chat_prompt(self, messages):
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"

    def generate(self, prompt, sampling: Sampling):
        for index, word in enumerate(WORDS[: sampling.max_tokens]):
            self.release.wait(timeout=10)
            yield Token(100 + index, word)


def client_for(engine: GenerationEngine, model: str = "tiny") -> TestClient:
    app = FastAPI()
    pool = ThreadPoolExecutor(max_workers=4)

    async def in_pool(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    version = SimpleNamespace(session=engine)
    server = SimpleNamespace(model=model, version=lambda _: version)
    app.state.context = SimpleNamespace(server=server, in_pool=in_pool, max_body_bytes=4096)
    app.include_router(openai.router)
    return TestClient(app)


def events(response) -> list:
    lines = [line for line in response.text.splitlines() if line.startswith("data: ")]
    return [line[6:] if line == "data: [DONE]" else json.loads(line[6:]) for line in lines]


def test_a_completion_returns_the_generated_text_and_usage():
    client = client_for(ScriptedEngine(GenerationLimits()))
    body = client.post("/v1/completions", json={"model": "tiny", "prompt": "abc", "max_tokens": 3}).json()
    assert body["object"] == "text_completion" and body["model"] == "tiny"
    assert body["choices"][0]["text"] == "The quiet engineer"
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}


def test_a_streamed_completion_sends_one_event_per_token_then_done():
    client = client_for(ScriptedEngine(GenerationLimits()))
    response = client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 10, "stream": True,
                                                     "stream_options": {"include_usage": True}})
    assert response.headers["content-type"].startswith("text/event-stream")
    chunks = events(response)
    assert chunks[-1] == "[DONE]"
    texts = [c["choices"][0]["text"] for c in chunks[:len(WORDS)]]
    assert texts == WORDS
    assert chunks[len(WORDS)]["choices"][0]["finish_reason"] == "stop"  # the words ran out before max_tokens
    assert chunks[-2]["usage"]["completion_tokens"] == len(WORDS)


def test_a_streamed_chat_completion_opens_with_the_assistant_role():
    client = client_for(ScriptedEngine(GenerationLimits()))
    response = client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": True})
    chunks = events(response)
    assert chunks[0]["object"] == "chat.completion.chunk"
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [c["choices"][0]["delta"].get("content") for c in chunks[1:3]] == ["The", " quiet"]
    assert chunks[3]["choices"][0]["finish_reason"] == "length" and chunks[-1] == "[DONE]"


def test_a_chat_completion_answers_with_an_assistant_message():
    client = client_for(ScriptedEngine(GenerationLimits()))
    body = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                     "max_tokens": 2}).json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "The quiet"}


def test_a_stop_string_cuts_the_text_before_it():
    client = client_for(ScriptedEngine(GenerationLimits()))
    body = client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 10, "stop": " repaired"}).json()
    assert body["choices"][0]["text"] == "The quiet engineer"
    assert body["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("request_body, limits, words", [
    ({"prompt": "x" * 9}, GenerationLimits(max_prompt_tokens=8), ["9 tokens", "limit of 8",
                                                                   "MODELYARD_SERVE_MAX_PROMPT_TOKENS"]),
    ({"prompt": "x", "max_tokens": 33}, GenerationLimits(max_tokens=32),
     ["max_tokens 33", "MODELYARD_SERVE_MAX_TOKENS"]),
    ({"prompt": "x" * 60, "max_tokens": 10}, GenerationLimits(), ["exceed the model's context length of 64"]),
    ({"prompt": "x", "n": 2}, GenerationLimits(), ["n must be 1"]),
    ({"prompt": ""}, GenerationLimits(), ["the prompt is empty"]),
    ({"max_tokens": 2}, GenerationLimits(), ["prompt: Field required"]),
    ({"prompt": "x", "model": "other"}, GenerationLimits(), ["unknown model 'other'"]),
])
def test_a_request_past_a_limit_is_refused_with_an_openai_error(request_body, limits, words):
    response = client_for(ScriptedEngine(limits)).post("/v1/completions", json=request_body)
    assert response.status_code in (400, 404)
    error = response.json()["error"]
    assert set(error) == {"message", "type", "code"}
    for word in words:
        assert word in error["message"]


def test_generations_past_the_concurrency_limit_get_429_until_one_ends():
    engine = ScriptedEngine(GenerationLimits(max_generations=1))
    client = client_for(engine)
    engine.release.clear()  # the first generation blocks on its first token
    first = ThreadPoolExecutor(max_workers=1).submit(client.post, "/v1/completions",
                                                     json={"prompt": "a", "max_tokens": 2})
    for _ in range(200):  # until the first request holds the only slot
        if engine._slots._value == 0:
            break
        threading.Event().wait(0.01)
    refused = client.post("/v1/completions", json={"prompt": "b", "max_tokens": 2})
    assert refused.status_code == 429
    assert "MODELYARD_SERVE_MAX_GENERATIONS" in refused.json()["error"]["message"]
    assert refused.headers["retry-after"] == "1"
    engine.release.set()
    assert first.result(timeout=10).status_code == 200
    assert client.post("/v1/completions", json={"prompt": "b", "max_tokens": 2}).status_code == 200


def test_the_routes_refuse_a_model_that_does_not_generate():
    app_client = client_for(SimpleNamespace())  # the served version is a tensor model's session
    response = app_client.post("/v1/completions", json={"prompt": "x"})
    assert response.status_code == 400
    assert "is not a text-generation model" in response.json()["error"]["message"]
