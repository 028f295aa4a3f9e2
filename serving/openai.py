"""OpenAI-compatible routes for a served text-generation model: completions and chat completions.

``POST /v1/completions`` and ``POST /v1/chat/completions`` answer as OpenAI's API does, whole or,
with ``"stream": true``, as server-sent events (one ``data:`` chunk per generated token, then
``data: [DONE]``; ``"stream_options": {"include_usage": true}`` adds a last chunk with the
token counts). ``GET /v1/models`` lists the one model. ``serving.app`` mounts this router, behind
the same bearer token as the other routes, when the version it serves at start is a
text-generation model (``serving.generation.GenerationEngine``); if the alias later moves to a
version that is not, these routes say so (400).

Refusals use OpenAI's error body, ``{"error": {"message", "type", "code"}}``, with the HTTP
status of the limit that was hit (``serving.generation``): 400 for a request past a limit, 429
when the server already runs ``MODELYARD_SERVE_MAX_GENERATIONS`` generations. One prompt and one
choice per request (``n`` 1); ``temperature`` 0 (the default here) is greedy decoding.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from serving.errors import RequestError
from serving.generation import GenerationEngine, Sampling, Token, finish_reason

router = APIRouter()
COMPLETION_DEFAULT_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions; chat: the server's limit


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str = Field(min_length=1, max_length=64)
    content: str


class Options(BaseModel):
    """What both routes take; fields OpenAI defines that do not apply here are ignored."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float = Field(default=0.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=0)
    n: int = 1
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None


class CompletionBody(Options):
    prompt: str | list[int]


class ChatBody(Options):
    messages: list[Message] = Field(min_length=1)


@router.get("/v1/models")
async def models(request: Request) -> JSONResponse:
    context = request.app.state.context
    return JSONResponse({"object": "list", "data": [
        {"id": context.server.model, "object": "model", "created": 0, "owned_by": "modelyard"}]})


@router.post("/v1/completions")
async def completions(request: Request) -> Response:
    try:
        body = await _parse(request, CompletionBody)
        engine = _engine(request, body)
        prompt = await request.app.state.context.in_pool(engine.encode, body.prompt)
        return await _answer(request, engine, body, prompt, chat=False)
    except RequestError as exc:
        return error_response(exc)


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    try:
        body = await _parse(request, ChatBody)
        engine = _engine(request, body)
        text = engine.chat_prompt([message.model_dump() for message in body.messages])
        prompt = await request.app.state.context.in_pool(engine.encode, text)
        return await _answer(request, engine, body, prompt, chat=True)
    except RequestError as exc:
        return error_response(exc)


def error_response(exc: RequestError) -> JSONResponse:
    kind = {429: "rate_limit_exceeded", 404: "not_found"}.get(exc.status, "invalid_request_error")
    response = JSONResponse({"error": {"message": str(exc), "type": kind, "code": exc.status}},
                            status_code=exc.status)
    response.headers.update(exc.headers)
    return response


async def _parse(request: Request, kind: type[Options]) -> Any:
    limit = request.app.state.context.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(f"the request body ({declared} bytes) is over the {limit}-byte limit")
    raw = b""
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > limit:
            raise RequestError(f"the request body is over the {limit}-byte limit")
    try:
        body = kind.model_validate(json.loads(raw or b"null"))
    except ValueError as exc:
        if isinstance(exc, ValidationError):
            where = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors())
            raise RequestError(f"bad request: {where}") from None
        raise RequestError(f"the request body is not JSON: {exc}") from None
    if body.n != 1:
        raise RequestError(f"n must be 1 (one choice per request), got {body.n}")
    return body


def _engine(request: Request, body: Options) -> GenerationEngine:
    server = request.app.state.context.server
    if body.model is not None and body.model != server.model:
        raise RequestError(f"unknown model {body.model!r}: this server serves {server.model!r}", 404)
    engine = server.version(None).session
    if not isinstance(engine, GenerationEngine):
        raise RequestError(f"model {server.model!r} (the version served now) is not a text-generation model")
    return engine


async def _answer(request: Request, engine: GenerationEngine, body: Options, prompt, *, chat: bool) -> Response:
    requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    default = engine.limits.max_tokens if chat else COMPLETION_DEFAULT_TOKENS
    stops = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    sampling = Sampling(max_tokens=engine.check(prompt, requested, default_tokens=default),
                        temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, stop=stops)
    slot = engine.slot()
    slot.__enter__()  # 429 now, before a stream starts; released when the generation ends
    reply = Reply(request.app.state.context.server.model, chat=chat, prompt_tokens=len(prompt))
    tokens = StopScanner(engine.generate(prompt, sampling), stops)
    in_pool = request.app.state.context.in_pool
    if not body.stream:
        try:
            pieces = await in_pool(lambda: [piece for piece in tokens])
        finally:
            slot.__exit__(None, None, None)
        return JSONResponse(reply.whole("".join(pieces), tokens.count,
                                        finish_reason(tokens.count, sampling, tokens.stopped)))
    usage = bool((body.stream_options or {}).get("include_usage"))

    async def events() -> AsyncIterator[str]:
        try:
            if chat:
                yield reply.event(reply.chunk(None, role=True))
            while (piece := await in_pool(next, tokens, None)) is not None:
                yield reply.event(reply.chunk(piece))
            yield reply.event(reply.chunk(None, finish=finish_reason(tokens.count, sampling, tokens.stopped)))
            if usage:
                yield reply.event({**reply.chunk(None), "choices": [], "usage": reply.usage(tokens.count)})
            yield "data: [DONE]\n\n"
        finally:
            slot.__exit__(None, None, None)

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


class StopScanner:
    """The generated text, token by token, cut before the first stop string (held back until it cannot start one)."""

    def __init__(self, tokens: Iterator[Token], stops: tuple[str, ...]) -> None:
        self._tokens, self._stops = tokens, [s for s in stops if s]
        self._hold = max((len(s) - 1 for s in self._stops), default=0)
        self._pending, self._finished = "", False
        self.count, self.stopped = 0, False

    def __iter__(self) -> StopScanner:
        return self

    def __next__(self) -> str:
        if self._finished:
            raise StopIteration
        token = next(self._tokens, None)
        if token is None:
            self._finished = True
            if not self._pending:
                raise StopIteration
            piece, self._pending = self._pending, ""
            return piece
        self.count += 1
        text = self._pending + token.text
        cut = min((text.find(s) for s in self._stops if s in text), default=-1)
        if cut >= 0:
            self._finished = self.stopped = True
            return text[:cut]
        keep = len(text) - self._hold if self._hold else len(text)
        self._pending = text[keep:]
        return text[:keep]


class Reply:
    """OpenAI's response shapes for one request: a whole completion, stream chunks, usage."""

    def __init__(self, model: str, *, chat: bool, prompt_tokens: int) -> None:
        self.model, self.chat, self.prompt_tokens = model, chat, prompt_tokens
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())

    def usage(self, completion_tokens: int) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens}

    def whole(self, text: str, completion_tokens: int, finish: str) -> dict:
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice.update(text=text, logprobs=None)
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": [choice],
                "usage": self.usage(completion_tokens)}

    def chunk(self, text: str | None, *, finish: str | None = None, role: bool = False) -> dict:
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish}
        if self.chat:
            choice["delta"] = {"role": "assistant", "content": ""} if role else (
                {"content": text} if text is not None else {})
        else:
            choice.update(text=text or "", logprobs=None)
        return {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": [choice]}

    @staticmethod
    def event(data: dict) -> str:
        return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"
