"""The OpenAI-compatible HTTP API in front of an engine session.

``GET /health``, ``GET /metrics``, ``GET /v1/models``, ``POST /v1/chat/completions`` and
``POST /v1/completions`` (both streamed as server-sent events when ``stream`` is true),
and, with a request log (``serve --log``), ``POST /v1/feedback`` about an answer, named by
the ``id`` it carried (``modelloop.inference.request_log``).
Errors use OpenAI's body, ``{"error": {"message", "type", "param", "code"}}``, with the
status a client expects: 400 for a bad request (malformed JSON, a field of the wrong type
or out of range, named in ``param``), 401 for a wrong or missing API key, 403 for an
adapter path outside the allowed folders, 404 for an unknown model, 413 for a body over
the size limit, 429 when the queue is full and 503 when a request outlives its time (both
with ``Retry-After``). Each adapter is a model name.

Load: the engine is handed at most twice its batch size in rows (each request takes its
``n``): one batch generating, the next one ready in the engine's own queue. Up to
``max_queued`` more requests wait in the server, first come first served; a request still
waiting at its deadline never reaches the engine, and a stream that ends early (its
deadline, its client gone) stops its rows in the engine. Engine calls run in worker
threads of the app's own pool, so the event loop, and with it ``/health`` and
``/metrics``, never waits behind generation.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import json
import threading
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException

from modelloop.errors import EngineError, ModelloopError
from modelloop.inference.request_log import RequestLog
from modelloop.inference.types import Delta, GenerationRequest, SamplingParams

INT32 = 2**31 - 1  # the largest count or token id an engine's tensors hold
SEED = 2**63  # seeds are signed 64-bit integers (torch's and vLLM's)
MIN_TEMPERATURE = 1e-5  # below it the logits overflow: greedy, as vLLM does
RETRY_AFTER_S = 1
RATE_WINDOW_S = 10.0  # tokens/s in /metrics is over the answers of this many seconds
_END = object()


@dataclass(frozen=True)
class Limits:
    """How much the server takes on (``modelloop serve --help`` says why each default)."""

    batch_rows: int = 32  # the engine's batch size (--max-batch-size)
    max_queued: int = 128
    request_timeout: float = 600.0  # seconds a request may wait for and spend in the engine
    max_body_bytes: int = 8 << 20


class OpenAIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code, self.headers = (
            status,
            message,
            kind,
            param,
            code,
            headers,
        )

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class Strict(BaseModel):
    """A piece of a request body: JSON types as sent (no "5" for 5, no 1e400), unknown fields
    ignored (clients send OpenAI fields this server has no use for)."""

    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore")


Stop = Annotated[str, Field(max_length=256)]


class StreamOptions(Strict):
    include_usage: bool = False


class Sampling(Strict):
    """The sampling fields both endpoints share (``top_k`` and ``repetition_penalty`` are
    extensions), each bounded to what an engine takes; the context length is the engine's check."""

    model: str = Field(max_length=256)
    max_tokens: int | None = Field(None, gt=0, le=INT32)
    max_completion_tokens: int | None = Field(None, gt=0, le=INT32)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, le=INT32)
    repetition_penalty: float = Field(1.0, ge=0.01, le=10.0)
    n: int = Field(1, ge=1, le=16)
    stop: Stop | Annotated[list[Stop], Field(max_length=16)] | None = None
    seed: int | None = Field(None, ge=-SEED, lt=SEED)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool = False
    return_token_ids: bool = False  # vLLM's extension: each choice's generated token ids

    def params(self) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            max_tokens=self.max_completion_tokens or self.max_tokens or 256,
            temperature=self.temperature if self.temperature >= MIN_TEMPERATURE else 0.0,
            top_p=self.top_p,
            top_k=self.top_k,
            repetition_penalty=self.repetition_penalty,
            stop=tuple(stop),
            seed=self.seed,
            n=self.n,
            logprobs=self.logprobs,
        )


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ImageURL(Strict):
    url: str = Field(min_length=1)
    detail: str | None = None


class ImagePart(Strict):
    type: Literal["image_url"]
    image_url: ImageURL


class InputAudio(Strict):
    data: str = Field(min_length=1)  # base64
    format: str = Field(pattern=r"^[a-z0-9]{1,8}$")  # wav, mp3, flac ...


class AudioPart(Strict):
    """OpenAI's audio input: the clip's bytes in the request."""

    type: Literal["input_audio"]
    input_audio: InputAudio


class AudioURLPart(Strict):
    """vLLM's audio by URL (a base64 data URL, or remote where allowed), as pictures are."""

    type: Literal["audio_url"]
    audio_url: ImageURL


class VideoURLPart(Strict):
    """vLLM's video by URL (a base64 data URL, or remote where allowed), as pictures are."""

    type: Literal["video_url"]
    video_url: ImageURL


class Function(Strict):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(Strict):
    id: str | None = None
    type: Literal["function"] = "function"
    function: Function


class Message(Strict):
    """An OpenAI chat message; only these fields reach the chat template."""

    role: Literal["system", "user", "assistant", "tool"]
    content: (
        str
        | list[Annotated[TextPart | ImagePart | AudioPart | AudioURLPart | VideoURLPart, Field(discriminator="type")]]
        | None
    ) = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1, max_length=2048)


class CompletionRequest(Sampling):
    prompt: str | list[Annotated[int, Field(ge=0, le=INT32)]]  # text, or token ids


class UnloadRequest(Strict):
    lora_name: str = Field(min_length=1, max_length=256)


class AdapterRequest(Strict):
    lora_name: str = Field(min_length=1, max_length=256)
    lora_path: str = Field(min_length=1, max_length=4096)


class FeedbackRequest(Strict):
    """What a user thought of an answer: ``id`` is the one the answer carried, ``index``
    its choice; a rating, a score from 0 (worst) to 1 (best), a corrected answer, or several."""

    id: str = Field(min_length=1, max_length=256)
    index: int = Field(0, ge=0, lt=16)
    rating: Literal["up", "down"] | None = None
    score: float | None = Field(None, ge=0.0, le=1.0)
    correction: str | None = Field(None, min_length=1, max_length=1 << 20)
    comment: str | None = Field(None, max_length=4096)


class Load:
    """What the server has taken on: the gate in front of the engine, and what ``/metrics`` shows.

    At most ``capacity`` rows are in the engine at once (a request takes its ``n``); up to
    ``max_queued`` more requests wait their turn in arrival order. A request that finds the
    queue full is refused at once (429); one still waiting at its deadline gives up (503).
    Used from the event loop only.
    """

    def __init__(self, limits: Limits) -> None:
        self.capacity = 2 * limits.batch_rows
        self.max_queued = limits.max_queued
        self.timeout = limits.request_timeout
        self.rows = self.requests = self.tokens = 0
        self.line: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()
        self.rejected = collections.Counter(dict.fromkeys(("queue_full", "timeout", "too_large", "disconnected"), 0))
        self.recent: collections.deque[tuple[float, int]] = collections.deque()  # (when, tokens) of recent answers

    async def enter(self, rows: int, deadline: float) -> int:
        """Wait for room for ``rows`` rows in the engine; the rows taken, for ``leave``."""
        rows = min(rows, self.capacity)
        if self.line or self.rows + rows > self.capacity:
            await self._wait(rows, deadline)
        else:
            self._take(rows)
        return rows

    def refuse_if_full(self) -> None:
        """429 before the body is read (and its prompt tokenized) when any request would be
        refused now: under overload a refusal must not take the CPU from the engine."""
        if len(self.line) >= self.max_queued and (self.line or self.rows >= self.capacity):
            raise self._queue_full()

    def leave(self, rows: int) -> None:
        """A request is out of the engine: let in those waiting that now fit, in order."""
        self.rows -= rows
        self.requests -= 1
        while self.line and self.rows + self.line[0][0] <= self.capacity:
            waiting, turn = self.line.popleft()
            if not turn.done():  # else it gave up
                self._take(waiting)
                turn.set_result(None)

    def shed(self, status: int, code: str, message: str) -> OpenAIError:
        """A refusal for the load, counted by reason; the client may retry (Retry-After)."""
        self.rejected[code] += 1
        kind = "rate_limit_error" if status == 429 else "server_error"
        return OpenAIError(status, message, kind, code=code, headers={"Retry-After": str(RETRY_AFTER_S)})

    def timed_out(self) -> OpenAIError:
        return self.shed(
            503, "timeout", f"the request was not answered within {self.timeout:g} s (--request-timeout); retry later"
        )

    def produced(self, tokens: int) -> None:
        now = time.monotonic()
        self.tokens += tokens
        self.recent.append((now, tokens))
        while self.recent[0][0] < now - RATE_WINDOW_S:
            self.recent.popleft()

    def metrics(self) -> dict[str, Any]:
        now = time.monotonic()
        recent = sum(tokens for when, tokens in self.recent if when >= now - RATE_WINDOW_S)
        return {
            "queued": len(self.line),
            "max_queued": self.max_queued,
            "active_requests": self.requests,
            "active_rows": self.rows,
            "capacity_rows": self.capacity,
            "tokens_generated": self.tokens,
            "tokens_per_s": round(recent / RATE_WINDOW_S, 1),
            "rejected": dict(self.rejected),
        }

    def _take(self, rows: int) -> None:
        self.rows += rows
        self.requests += 1

    def _queue_full(self) -> OpenAIError:
        return self.shed(
            429,
            "queue_full",
            f"the server is busy: {self.max_queued} requests are waiting already (--max-queued); retry later",
        )

    async def _wait(self, rows: int, deadline: float) -> None:
        if len(self.line) >= self.max_queued:
            raise self._queue_full()
        turn = (rows, asyncio.get_running_loop().create_future())
        self.line.append(turn)
        try:
            await asyncio.wait_for(turn[1], deadline - time.monotonic())
        except TimeoutError:
            raise self.timed_out() from None
        finally:
            if turn[1].cancelled():  # it gave up (its deadline, or its task was cancelled): out of the line
                with contextlib.suppress(ValueError):
                    self.line.remove(turn)


class _KeyGuard:
    """Asks for the API key on every /v1 route, compared in constant time (no timing hints at
    the key). Plain ASGI: Starlette's BaseHTTPMiddleware would hide a client's disconnect
    from the routes."""

    def __init__(self, app: Any, key: str) -> None:
        self.app, self.expected = app, f"Bearer {key}".encode()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            given = Headers(scope=scope).get("authorization", "").encode()
            if not hmac.compare_digest(given, self.expected):
                error = OpenAIError(401, "invalid or missing API key", "authentication_error", code="invalid_api_key")
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(
    session: Any,
    *,
    api_key: str | None = None,
    allow_remote_images: bool = False,
    adapter_dirs: Sequence[str | Path] = (),
    limits: Limits = Limits(),
    request_log: RequestLog | None = None,
    origin: Mapping[str, Any] | None = None,
) -> FastAPI:
    """The API over ``session`` (an EngineSession); ``api_key`` guards every /v1 route.

    With ``request_log`` every answered request is logged, with ``origin`` (what is served:
    its ``source`` and ``run``), and ``/v1/feedback`` takes what users thought of the answers.

    Pictures, clips and videos in chat requests are base64 data URLs (or OpenAI's ``input_audio``),
    or http(s) URLs with ``allow_remote_images``, whatever the engine (vLLM would otherwise fetch any URL, and
    read server paths where allowed). Adapters are loaded at run time from under
    ``adapter_dirs`` only (none: never), so that the route reads no other server path."""
    load = Load(limits)
    # a thread per request in the engine
    pool = ThreadPoolExecutor(max_workers=load.capacity, thread_name_prefix="modelloop-serve")
    allowed = [Path(folder).resolve() for folder in adapter_dirs]

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        yield
        session.close()  # after uvicorn has answered the requests in flight
        pool.shutdown(wait=False, cancel_futures=True)
        if request_log is not None:
            request_log.close()

    app = FastAPI(title="modelloop", docs_url=None, redoc_url=None, lifespan=lifespan)
    if api_key:
        app.add_middleware(_KeyGuard, key=api_key)

    @app.exception_handler(OpenAIError)
    async def openai_error(request: Request, error: OpenAIError) -> JSONResponse:
        return error.response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        """FastAPI's own refusals (an unknown route, a wrong method) in OpenAI's body."""
        return OpenAIError(error.status_code, str(error.detail), headers=error.headers).response()

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception) -> JSONResponse:
        return OpenAIError(500, f"internal error: {type(error).__name__}: {error}", "server_error").response()

    async def read(request: Request) -> bytes:
        """The body, refused (413) as soon as it outgrows the limit."""
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limits.max_body_bytes:
                load.rejected["too_large"] += 1
                raise OpenAIError(
                    413,
                    f"the request body is over {limits.max_body_bytes} bytes (--max-body-mb)",
                    code="request_too_large",
                )
        return bytes(body)

    async def parse(request: Request, model: type[BaseModel]) -> Any:
        """The body as ``model``, whatever content type the client declared (curl -d says form data)."""
        try:
            data = json.loads(await read(request))
        except (
            ValueError,
            RecursionError,
        ) as error:  # bad JSON or UTF-8, a 5,000-digit number, nesting past Python's stack
            raise OpenAIError(400, f"malformed JSON: {error}") from None
        if not isinstance(data, dict):
            raise OpenAIError(400, "the request body must be a JSON object")
        try:
            return model.model_validate(data)
        except ValidationError as error:
            problem = max(error.errors(), key=_relevance)
            where = _param(problem["loc"], data, missing=problem["type"] == "missing")
            raise OpenAIError(400, f"{where}: {problem['msg']}", param=where or None) from None

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "models": session.models,
            "requests": getattr(session, "requests", None),
            "batches": getattr(session, "batches", None),
        }

    @app.get("/metrics")
    async def metrics() -> dict[str, Any]:
        return load.metrics()

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        created = int(time.time())
        return {
            "object": "list",
            "data": [
                {"id": name, "object": "model", "created": created, "owned_by": "modelloop"} for name in session.models
            ],
        }

    async def engine_request(body: Sampling, **content: Any) -> GenerationRequest:
        if body.model not in session.models:
            raise OpenAIError(
                404,
                f"the model {body.model!r} does not exist; served: {', '.join(session.models)}",
                param="model",
                code="model_not_found",
            )
        request = GenerationRequest(model=body.model, params=body.params(), **content)
        try:
            await asyncio.to_thread(session.check, request)  # it may read pictures: off the event loop
        except ModelloopError as error:
            code = "context_length_exceeded" if "context length" in str(error) else None
            raise OpenAIError(400, str(error), param="max_tokens" if code else None, code=code) from None
        return request

    def in_engine(rows: int, call: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        """``call(*args)`` in a worker thread; its rows stay taken until it returns, even when
        nobody waits for it any more (the engine is still busy with it)."""
        work = asyncio.get_running_loop().run_in_executor(pool, call, *args)
        work.add_done_callback(lambda _: load.leave(rows))
        return work

    def engine_stream(rows: int, request: GenerationRequest, deadline: float) -> AsyncGenerator[Delta, None]:
        """The request's deltas, read from the engine in a worker thread (``_pump``)."""
        loop = asyncio.get_running_loop()
        deltas: asyncio.Queue[Any] = asyncio.Queue()
        stop = threading.Event()
        in_engine(
            rows, _pump, session.stream(request), lambda item: loop.call_soon_threadsafe(deltas.put_nowait, item), stop
        )
        return _until_end(deltas, stop, deadline)

    def log(identity: str, request: GenerationRequest, kind: str, started: float, stream: bool) -> Callable[..., None]:
        """What logs the request once it is answered: ``(answers, prompt tokens, completion tokens)``."""

        def answered(answers: list[dict[str, Any]], prompt_tokens: int, completion_tokens: int) -> None:
            if request_log is None:
                return
            content = {"messages": request.messages} if kind == "chat" else {"prompt": request.prompt}
            request_log.request(
                {
                    "id": identity,
                    "model": request.model,
                    **(origin or {}),
                    "kind": kind,
                    **content,
                    "answers": answers,
                    "sampling": asdict(request.params),
                    "latency_s": round(time.monotonic() - started, 4),
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "stream": stream,
                }
            )

        return answered

    async def respond(raw: Request, body: Sampling, request: GenerationRequest, kind: Literal["chat", "text"]) -> Any:
        started = time.monotonic()
        deadline = started + limits.request_timeout
        rows = await load.enter(body.n, deadline)
        if await raw.is_disconnected():  # its client left while it waited: the engine never sees it
            load.leave(rows)
            load.rejected["disconnected"] += 1
            return Response(status_code=499)  # nginx's "client closed request": nobody reads it
        identity = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            answered = log(identity, request, kind, started, stream=True)
            events = _events(
                engine_stream(rows, request, deadline), request, identity, kind, load, usage=usage, answered=answered
            )
            return StreamingResponse(events, media_type="text/event-stream")
        try:
            (generation,) = await asyncio.wait_for(
                asyncio.shield(in_engine(rows, session.generate, [request])), deadline - time.monotonic()
            )
        except TimeoutError:
            raise load.timed_out() from None
        except ModelloopError as error:
            raise OpenAIError(400, str(error)) from None
        load.produced(generation.completion_tokens)
        log(identity, request, kind, started, stream=False)(
            [{"text": choice.text, "finish_reason": choice.finish_reason} for choice in generation.choices],
            generation.prompt_tokens,
            generation.completion_tokens,
        )
        choices = []
        for index, choice in enumerate(generation.choices):
            logprobs = _logprobs(choice, kind) if body.logprobs else None
            if kind == "chat":
                answer = {
                    "index": index,
                    "message": {"role": "assistant", "content": choice.text},
                    "finish_reason": choice.finish_reason,
                    "logprobs": logprobs,
                }
            else:
                answer = {
                    "index": index,
                    "text": choice.text,
                    "finish_reason": choice.finish_reason,
                    "logprobs": logprobs,
                }
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
        load.refuse_if_full()
        body = await parse(raw, ChatRequest)
        _check_media_urls(body.messages, allow_remote_images)
        messages = [message.model_dump(exclude_none=True) for message in body.messages]
        for message in messages:
            message.setdefault("content", "")
        return await respond(raw, body, await engine_request(body, messages=messages), "chat")

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(raw: Request) -> Any:
        """Serve another LoRA adapter from now on (vLLM's route and body)."""
        body = await parse(raw, AdapterRequest)
        if not _inside(
            body.lora_path, allowed
        ):  # decided before the path is looked at: the answer tells nothing about it
            raise OpenAIError(
                403,
                "lora_path is not in a folder adapters may be loaded from (serve --adapter-dir)",
                "permission_error",
                param="lora_path",
                code="adapter_path_not_allowed",
            )
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
        load.refuse_if_full()
        body = await parse(raw, CompletionRequest)
        return await respond(raw, body, await engine_request(body, prompt=body.prompt), "text")

    @app.post("/v1/feedback")
    async def feedback(raw: Request) -> Any:
        """What a user thought of a logged answer, logged beside it (``serve --log``)."""
        if request_log is None:
            raise OpenAIError(
                404,
                "this server keeps no request log, so it takes no feedback: serve it with --log DIR",
                code="feedback_not_enabled",
            )
        body = await parse(raw, FeedbackRequest)
        if body.rating is None and body.score is None and body.correction is None:
            raise OpenAIError(400, "give a rating (up or down), a score (0 to 1) or a correction", param="rating")
        if not request_log.knows(body.id):
            raise OpenAIError(404, f"no request {body.id!r} in the log", param="id", code="request_not_found")
        request_log.feedback(body.model_dump(exclude_none=True))
        return {"id": body.id, "object": "feedback", "status": "recorded"}

    return app


def _relevance(problem: Mapping[str, Any]) -> tuple[int, bool]:
    """How surely a validation error is about the member of a union the client meant: the
    deepest, and between equals, not a wrong type (``stop`` as a list of 20 is too long,
    not "not a string")."""
    return len(problem["loc"]), not problem["type"].endswith("_type")


def _param(loc: Sequence[str | int], data: Any, *, missing: bool) -> str:
    """Where in the body a validation error is, as ``messages[0].content[1].image_url``:
    pydantic's location without its names for union members (``str``, ``list[...]``),
    which are not in the body. A missing field is named though it is not there."""
    where, node = "", data
    for depth, part in enumerate(loc):
        if isinstance(node, list) and isinstance(part, int):
            where, node = f"{where}[{part}]", node[part] if part < len(node) else None
        elif isinstance(node, dict) and (part in node or (missing and depth == len(loc) - 1)):
            where, node = f"{where}.{part}" if where else str(part), node.get(part)
    return where


def _inside(path: str, folders: Sequence[Path]) -> bool:
    """Whether ``path``, links and ``..`` resolved, lies in one of ``folders``."""
    try:
        resolved = Path(path).resolve()
    except (OSError, RuntimeError, ValueError):  # a link loop, a NUL byte
        return False
    return any(resolved.is_relative_to(folder) for folder in folders)


def _check_media_urls(messages: Sequence[Message], allow_remote: bool) -> None:
    """Pictures, clips and videos by URL are base64 data URLs, or remote ones where
    allowed: never a path on the server."""
    for number, message in enumerate(messages):
        for index, part in enumerate(message.content if isinstance(message.content, list) else []):
            if isinstance(part, ImagePart):
                url, field, noun = part.image_url.url, "image_url", ("image", "pictures")
            elif isinstance(part, AudioURLPart):
                url, field, noun = part.audio_url.url, "audio_url", ("audio", "clips")
            elif isinstance(part, VideoURLPart):
                url, field, noun = part.video_url.url, "video_url", ("video", "videos")
            else:
                continue
            if url.startswith("data:") or (allow_remote and url.startswith(("http://", "https://"))):
                continue
            reason = (
                "remote URLs are not fetched (serve with --allow-remote-images)"
                if url.startswith(("http://", "https://"))
                else f"send {noun[1]} as base64 data URLs"
            )
            raise OpenAIError(
                400,
                f"messages[{number}]: {noun[0]} {url[:80]}: {reason}",
                param=f"messages[{number}].content[{index}].{field}.url",
            )


def _logprobs(choice: Any, kind: str) -> Any:
    """OpenAI's logprobs: each token's text with its log-probability."""
    if choice.logprobs is None:
        return None
    tokens = list(choice.tokens) if choice.tokens is not None else [str(token) for token in choice.token_ids]
    if kind == "chat":
        return {"content": [{"token": token, "logprob": logprob} for token, logprob in zip(tokens, choice.logprobs)]}
    return {"token_logprobs": list(choice.logprobs), "tokens": tokens}


def _pump(deltas: Iterable[Delta], send: Callable[[Any], None], stop: threading.Event) -> None:
    """Read an engine stream in a worker thread, handing each delta (or the failure) to the
    event loop. Told to stop, it closes the stream: the hf engine then ends the request's
    rows at their next token, an HTTP engine's connection is closed."""
    stream = iter(deltas)
    try:
        for delta in stream:
            if stop.is_set():
                break
            send(delta)
    except Exception as error:
        send(error)
    finally:
        if hasattr(stream, "close"):
            stream.close()
        send(_END)


async def _until_end(deltas: asyncio.Queue[Any], stop: threading.Event, deadline: float) -> AsyncGenerator[Delta, None]:
    """The deltas ``_pump`` hands over, until the end, its failure (raised) or the deadline
    (TimeoutError); leaving early, for whatever reason, tells it to stop."""
    try:
        while (item := await asyncio.wait_for(deltas.get(), deadline - time.monotonic())) is not _END:
            if isinstance(item, Exception):
                raise item
            yield item
    finally:
        stop.set()


async def _events(
    deltas: AsyncGenerator[Delta, None],
    request: GenerationRequest,
    identity: str,
    kind: str,
    load: Load,
    *,
    usage: bool,
    answered: Callable[[list[dict[str, Any]], int, int], None],
) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``; with
    ``usage`` (``stream_options.include_usage``), every chunk carries ``"usage": null`` and a
    last one with no choices carries the stream's usage. A stream that ends whole is handed
    to ``answered`` (its answers, prompt and completion tokens)."""
    created = int(time.time())
    base = {
        "id": identity,
        "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
        "created": created,
        "model": request.model,
    }
    if usage:
        base["usage"] = None

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
    tokens = prompt_tokens = 0
    texts: dict[int, list[str]] = collections.defaultdict(list)
    finishes: dict[int, str] = {}
    async with contextlib.aclosing(deltas):  # closed whenever this stream ends: the engine stops too
        try:
            async for delta in deltas:
                tokens, prompt_tokens = tokens + delta.tokens, prompt_tokens + delta.prompt_tokens
                texts[delta.index].append(delta.text)
                if delta.finish_reason:
                    finishes[delta.index] = delta.finish_reason
                if delta.text or delta.finish_reason:
                    yield event(delta.index, delta.text, delta.finish_reason)
        except Exception as error:  # the status line is sent: report in the stream, then end it
            yield f"data: {json.dumps(_stream_failure(error, load).body())}\n\n"
        else:
            answers = [
                {"text": "".join(texts[index]), "finish_reason": finishes.get(index)}
                for index in range(request.params.n)
            ]
            answered(answers, prompt_tokens, tokens)
    load.produced(tokens)
    if usage:
        counts = {"prompt_tokens": prompt_tokens, "completion_tokens": tokens, "total_tokens": prompt_tokens + tokens}
        yield f"data: {json.dumps({**base, 'choices': [], 'usage': counts})}\n\n"
    yield "data: [DONE]\n\n"


def _stream_failure(error: Exception, load: Load) -> OpenAIError:
    """What a stream that failed after its status line reports: what the status would have said."""
    if isinstance(error, TimeoutError):
        return load.timed_out()
    if isinstance(error, ModelloopError):
        return OpenAIError(400, str(error))
    return OpenAIError(500, str(error), "server_error")
