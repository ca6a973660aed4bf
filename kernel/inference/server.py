"""The OpenAI-compatible HTTP API in front of an engine session.

``GET /health``, ``GET /v1/models``, ``POST /v1/chat/completions`` and
``POST /v1/completions`` (both streamed as server-sent events when ``stream`` is
true). Errors use OpenAI's body, ``{"error": {"message", "type", "param", "code"}}``,
with the status a client expects: 400 for a bad request (malformed JSON included), 401
for a wrong or missing API key, 404 for an unknown model. Each adapter is a model name.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from modelloop.errors import EngineError, ModelloopError
from modelloop.inference.types import GenerationRequest, SamplingParams


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


class Sampling(BaseModel):
    """The sampling fields both endpoints share (``top_k`` and ``repetition_penalty`` are extensions)."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, gt=0)
    max_completion_tokens: int | None = Field(None, gt=0)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    repetition_penalty: float = Field(1.0, gt=0.0)
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    logprobs: bool = False
    return_token_ids: bool = False  # vLLM's extension: each choice's generated token ids

    def params(self) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            max_tokens=self.max_completion_tokens or self.max_tokens or 256,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            repetition_penalty=self.repetition_penalty,
            stop=tuple(stop),
            seed=self.seed,
            n=self.n,
            logprobs=self.logprobs,
        )


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None  # text, or OpenAI content parts (text, image_url)


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(Sampling):
    prompt: str | list[int]  # text, or token ids


class UnloadRequest(BaseModel):
    lora_name: str = Field(min_length=1)


class AdapterRequest(BaseModel):
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


def create_app(session: Any, *, api_key: str | None = None, allow_remote_images: bool = False) -> FastAPI:
    """The API over ``session`` (an EngineSession); ``api_key`` guards every /v1 route.

    Pictures in chat requests are base64 data URLs, or http(s) URLs with
    ``allow_remote_images``, whatever the engine (vLLM would otherwise fetch any URL, and
    read server paths where allowed)."""
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        yield
        session.close()  # after uvicorn has answered the requests in flight

    app = FastAPI(title="modelloop", docs_url=None, redoc_url=None, lifespan=lifespan)

    @app.exception_handler(OpenAIError)
    async def openai_error(request: Request, error: OpenAIError) -> JSONResponse:
        return error.response()

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception) -> JSONResponse:
        return OpenAIError(500, f"internal error: {type(error).__name__}: {error}", "server_error").response()

    async def parse(request: Request, model: type[BaseModel]) -> Any:
        """The body as ``model``, whatever content type the client declared."""
        try:
            data = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise OpenAIError(400, f"malformed JSON: {error}") from None
        if not isinstance(data, dict):
            raise OpenAIError(400, "the request body must be a JSON object")
        try:
            return model.model_validate(data)
        except ValidationError as error:
            problem = error.errors()[0]
            where = ".".join(str(part) for part in problem["loc"])
            raise OpenAIError(400, f"{where}: {problem['msg']}", param=where or None) from None

    @app.middleware("http")
    async def authenticate(request: Request, call_next: Any) -> Any:
        if api_key and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(given, f"Bearer {api_key}".encode()):  # in constant time: no timing hints at the key
                return OpenAIError(401, "invalid or missing API key", "authentication_error", code="invalid_api_key").response()
        return await call_next(request)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "models": session.models, "requests": getattr(session, "requests", None), "batches": getattr(session, "batches", None)}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        created = int(time.time())
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "modelloop"} for name in session.models]}

    async def engine_request(body: Sampling, **content: Any) -> GenerationRequest:
        if body.model not in session.models:
            raise OpenAIError(404, f"the model {body.model!r} does not exist; served: {', '.join(session.models)}", param="model", code="model_not_found")
        request = GenerationRequest(model=body.model, params=body.params(), **content)
        try:
            await asyncio.to_thread(session.check, request)  # it may read pictures: off the event loop
        except ModelloopError as error:
            code = "context_length_exceeded" if "context length" in str(error) else None
            raise OpenAIError(400, str(error), param="max_tokens" if code else None, code=code) from None
        return request

    async def respond(body: Sampling, request: GenerationRequest, kind: Literal["chat", "text"]) -> Any:
        identity = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        if body.stream:
            return StreamingResponse(_events(session, request, identity, kind), media_type="text/event-stream")
        try:
            (generation,) = await asyncio.to_thread(session.generate, [request])
        except ModelloopError as error:
            raise OpenAIError(400, str(error)) from None
        choices = []
        for index, choice in enumerate(generation.choices):
            logprobs = _logprobs(choice, kind) if body.logprobs else None
            if kind == "chat":
                answer = {"index": index, "message": {"role": "assistant", "content": choice.text}, "finish_reason": choice.finish_reason, "logprobs": logprobs}
            else:
                answer = {"index": index, "text": choice.text, "finish_reason": choice.finish_reason, "logprobs": logprobs}
            if body.return_token_ids:
                answer["token_ids"] = list(choice.token_ids)
            choices.append(answer)
        usage = {
            "prompt_tokens": generation.prompt_tokens,
            "completion_tokens": generation.completion_tokens,
            "total_tokens": generation.prompt_tokens + generation.completion_tokens,
        }
        return {
            "id": identity,
            "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": int(time.time()),
            "model": body.model,
            "choices": choices,
            "usage": usage,
        }

    @app.post("/v1/chat/completions")
    async def chat(raw: Request) -> Any:
        body = await parse(raw, ChatRequest)
        messages = [message.model_dump(exclude_none=True) for message in body.messages]
        for message in messages:
            message.setdefault("content", "")
        _check_picture_urls(messages, allow_remote_images)
        return await respond(body, await engine_request(body, messages=messages), "chat")

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(raw: Request) -> Any:
        """Serve another LoRA adapter from now on (vLLM's route and body)."""
        body = await parse(raw, AdapterRequest)
        try:
            await asyncio.to_thread(session.load_adapter, body.lora_name, body.lora_path)
        except (EngineError, OSError, ValueError) as error:
            raise OpenAIError(400, f"cannot load adapter {body.lora_name!r}: {error}", param="lora_path") from None
        return {"status": "ok", "models": session.models}

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(raw: Request) -> Any:
        """Stop serving an adapter (vLLM's route and body)."""
        body = await parse(raw, UnloadRequest)
        try:
            await asyncio.to_thread(session.unload_adapter, body.lora_name)
        except EngineError as error:
            raise OpenAIError(404, str(error), param="lora_name", code="model_not_found") from None
        return {"status": "ok", "models": session.models}

    @app.post("/v1/completions")
    async def completions(raw: Request) -> Any:
        body = await parse(raw, CompletionRequest)
        return await respond(body, await engine_request(body, prompt=body.prompt), "text")

    return app


def _check_picture_urls(messages: list[dict[str, Any]], allow_remote: bool) -> None:
    for number, message in enumerate(messages):
        for part in message["content"] if isinstance(message["content"], list) else []:
            url = (part.get("image_url") or {}).get("url", "") if isinstance(part, dict) and part.get("type") == "image_url" else ""
            if not url or url.startswith("data:") or (allow_remote and url.startswith(("http://", "https://"))):
                continue
            reason = "remote URLs are not fetched (serve with --allow-remote-images)" if url.startswith(("http://", "https://")) else "send pictures as base64 data URLs"
            raise OpenAIError(400, f"messages[{number}]: image {url[:80]}: {reason}", param=f"messages[{number}].content")


def _logprobs(choice: Any, kind: str) -> Any:
    """OpenAI's logprobs: each token's text with its log-probability."""
    if choice.logprobs is None:
        return None
    tokens = list(choice.tokens) if choice.tokens is not None else [str(token) for token in choice.token_ids]
    if kind == "chat":
        return {"content": [{"token": token, "logprob": logprob} for token, logprob in zip(tokens, choice.logprobs)]}
    return {"token_logprobs": list(choice.logprobs), "tokens": tokens}


def _events(session: Any, request: GenerationRequest, identity: str, kind: str) -> Iterator[str]:
    """Server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``."""
    created = int(time.time())
    base = {"id": identity, "object": "chat.completion.chunk" if kind == "chat" else "text_completion", "created": created, "model": request.model}

    def event(index: int, text: str | None, finish: str | None, role: bool = False) -> str:
        if kind == "chat":
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text:
                delta["content"] = text
            choice = {"index": index, "delta": delta, "finish_reason": finish}
        else:
            choice = {"index": index, "text": text or "", "finish_reason": finish}
        return f"data: {json.dumps({**base, 'choices': [choice]})}\n\n"

    if kind == "chat":
        for index in range(request.params.n):
            yield event(index, None, None, role=True)
    try:
        for delta in session.stream(request):
            yield event(delta.index, delta.text, delta.finish_reason)
    except Exception as error:  # the status line is sent: report in the stream, then end it
        kind = "invalid_request_error" if isinstance(error, ModelloopError) else "server_error"
        yield f"data: {json.dumps({'error': {'message': str(error), 'type': kind}})}\n\n"
    yield "data: [DONE]\n\n"
