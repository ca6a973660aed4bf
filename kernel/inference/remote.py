"""Engines that run as their own OpenAI-compatible server process (vLLM, SGLang, ...).

vLLM and SGLang pin their own torch and transformers, so an engine plugin may start its
server from another Python (``--engine-python``) and modelloop talks to it over HTTP:
``ServerProcess`` starts it, waits for health with a timeout, reports a crash with the
server's last log lines, and stops it; ``RemoteSession`` is the EngineSession protocol
over the OpenAI API, so every engine looks the same to serve, infer, eval and GRPO.
Torch-free: nothing here imports the ML stack.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from modelloop.errors import EngineError
from modelloop.inference.types import Completion, Delta, Generation, GenerationRequest

LOG_LINES = 40

#: Statuses that mean "busy, ask again" (a full queue, a request past its time), retried as
#: OpenAI's own clients retry them: after the server's Retry-After, or with back-off.
RETRIED = frozenset({429, 503})


class ServerProcess:
    """An engine's server in its own process group, with its recent output kept for errors."""

    def __init__(
        self, command: Sequence[str], *, url: str, env: Mapping[str, str] | None = None, name: str = "engine"
    ) -> None:
        self.command = list(command)
        self.url = url.rstrip("/")
        self.name = name
        self.lines: collections.deque[str] = collections.deque(maxlen=LOG_LINES)
        try:
            self.process = subprocess.Popen(
                self.command,
                env={**os.environ, **(env or {})},
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,  # its own process group: stop() reaches the children too
            )
        except OSError as error:
            raise EngineError(f"cannot start the {name} server ({self.command[0]}): {error}") from None
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    def last_lines(self) -> str:
        return "\n".join(self.lines) or "(no output)"

    def wait_healthy(self, timeout: float, path: str = "/health") -> None:
        """Return once ``GET url+path`` answers 200; EngineError on a crash or the timeout."""
        import httpx

        deadline = time.monotonic() + timeout
        while True:
            code = self.process.poll()
            if code is not None:
                self._reader.join(timeout=2)
                raise EngineError(
                    f"the {self.name} server exited with status {code} while starting; its last output:\n{self.last_lines()}"
                )
            try:
                if httpx.get(self.url + path, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise EngineError(
                    f"the {self.name} server was not healthy after {timeout:.0f} s; its last output:\n{self.last_lines()}"
                )
            time.sleep(0.25)

    def stop(self, grace: float = 30.0) -> None:
        """SIGTERM to the process group, then SIGKILL if it has not exited after ``grace`` s.

        The group is signalled even when its leader has exited: its children may not have.
        """
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            self.process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()


class RemoteSession:
    """The EngineSession protocol over an OpenAI-compatible server.

    :param url: the server's base URL (without ``/v1``).
    :param process: the server process, stopped by ``close``; None for a server run elsewhere.
    :param adapter_route: the route that loads a LoRA adapter at run time (vLLM and
        modelloop: ``/v1/load_lora_adapter``; SGLang: ``/load_lora_adapter``).
    :param unload_route: the route that unloads one (``/v1/unload_lora_adapter``, ...).
        None for either: the server loads adapters only when it starts (LMDeploy).
    :param token_prompts: the server takes a prompt of token ids and returns the ids it
        generated (vLLM's extension); False refuses such a prompt here, where the server
        would read the list as a batch of prompts (LMDeploy).
    :param default_model: the served name a request without ``model`` goes to (a LoRA
        run's adapter, not its base); None means the first served model.
    """

    def __init__(
        self,
        url: str,
        *,
        process: ServerProcess | None = None,
        api_key: str | None = None,
        context_length: int | None = None,
        adapter_route: str | None = "/v1/load_lora_adapter",
        unload_route: str | None = "/v1/unload_lora_adapter",
        default_model: str | None = None,
        timeout: float = 600.0,
        token_prompts: bool = True,
    ) -> None:
        import httpx

        self.url = url.rstrip("/")
        self.process = process
        self.adapter_route = adapter_route
        self.unload_route = unload_route
        self.default_model = default_model
        self.token_prompts = token_prompts
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)
        self.timeout = timeout
        self.context_length = context_length or 1 << 30
        self._models: list[str] | None = None
        self._pool = ThreadPoolExecutor(max_workers=64, thread_name_prefix="modelloop-remote")

    @property
    def models(self) -> list[str]:
        """The served names, asked once (and again after an adapter is loaded)."""
        if self._models is None:
            self._models = [model["id"] for model in self._call("GET", "/v1/models")["data"]]
        return self._models

    def check(self, request: GenerationRequest) -> int:
        if request.model is not None and request.model not in self.models:
            raise EngineError(f"unknown model {request.model!r}; served: {', '.join(self.models)}")
        if request.messages is None and request.prompt is None:
            raise EngineError("a request needs messages or a prompt")
        if request.params.max_tokens >= self.context_length:  # with any prompt at all
            raise EngineError(
                f"max_tokens ({request.params.max_tokens}) leaves no room for a prompt in the context length "
                f"({self.context_length})"
            )
        return 0  # the server counts tokens; it refuses a prompt that does not fit

    def generate(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        """Send the requests at once (the server batches them) and wait for all."""
        return list(self._pool.map(self._generate_one, requests))

    def stream(self, request: GenerationRequest) -> Iterator[Delta]:
        import httpx

        try:
            yield from self._stream(request)
        except httpx.HTTPError as error:
            raise EngineError(f"the engine at {self.url} failed while streaming: {error}") from None

    def _stream(self, request: GenerationRequest) -> Iterator[Delta]:
        route, body = self._body(request)
        deadline = time.monotonic() + self.timeout
        for attempt in itertools.count():
            with self.http.stream(
                "POST", route, json={**body, "stream": True, "stream_options": {"include_usage": True}}
            ) as response:
                if response.status_code == 200:
                    yield from self._deltas(response)
                    return
                response.read()
            if not self._wait_to_retry(response, attempt, deadline):  # the connection is back in the pool
                self._raise(response)

    @staticmethod
    def _deltas(response: Any) -> Iterator[Delta]:
        """The stream's pieces. A finish is held until the next event, so that the usage
        the server sends last (asked with ``include_usage``) rides on the last finish."""
        held: Delta | None = None
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise EngineError(chunk["error"].get("message", "the server failed while streaming"))
            if usage := chunk.get("usage"):
                counts = {"tokens": usage.get("completion_tokens", 0), "prompt_tokens": usage.get("prompt_tokens", 0)}
                held = dataclasses.replace(held, **counts) if held else Delta(index=0, **counts)
            for choice in chunk.get("choices", []):
                text = choice.get("text") or (choice.get("delta") or {}).get("content") or ""
                if held is not None:
                    yield held
                    held = None
                if choice.get("finish_reason"):
                    held = Delta(index=choice["index"], text=text, finish_reason=choice["finish_reason"])
                elif text:
                    yield Delta(index=choice["index"], text=text)
        if held is not None:
            yield held

    def load_adapter(self, name: str, path: str) -> None:
        self._call(
            "POST", self._route(self.adapter_route), json={"lora_name": name, "lora_path": str(Path(path).resolve())}
        )
        self._models = None

    def unload_adapter(self, name: str) -> None:
        self._call("POST", self._route(self.unload_route), json={"lora_name": name})
        self._models = None

    def _route(self, route: str | None) -> str:
        if route is None:
            raise EngineError(
                f"the engine at {self.url} cannot load or unload adapters while serving; "
                "name them when it starts (--adapters NAME=PATH)"
            )
        return route

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        self.http.close()
        if self.process is not None:
            self.process.stop()

    # ------------------------------------------------------------------ HTTP

    def _body(self, request: GenerationRequest) -> tuple[str, dict[str, Any]]:
        params = request.params
        body: dict[str, Any] = {
            "model": request.model or self.default_model or self.models[0],
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "n": params.n,
            "logprobs": params.logprobs,
        }
        if params.top_k:
            body["top_k"] = params.top_k
        if params.repetition_penalty != 1.0:
            body["repetition_penalty"] = params.repetition_penalty
        if params.stop:
            body["stop"] = list(params.stop)
        if params.seed is not None:
            body["seed"] = params.seed
        if request.messages is not None:
            return "/v1/chat/completions", {**body, "messages": list(request.messages)}
        if request.prompt is None:
            raise EngineError("a request needs messages or a prompt")
        if not isinstance(request.prompt, str):  # token ids in: ask for token ids out (vLLM's extension)
            if not self.token_prompts:
                raise EngineError(
                    f"the engine at {self.url} takes text prompts only and returns no token ids "
                    "(GRPO's rollouts send token ids: use an engine that takes them, such as vllm or hf)"
                )
            return "/v1/completions", {**body, "prompt": list(request.prompt or ()), "return_token_ids": True}
        return "/v1/completions", {**body, "prompt": request.prompt}

    def _generate_one(self, request: GenerationRequest) -> Generation:
        route, body = self._body(request)
        answer = self._call("POST", route, json=body)
        choices = []
        for choice in sorted(answer["choices"], key=lambda c: c["index"]):
            text = choice["message"]["content"] if "message" in choice else choice["text"]
            choices.append(
                Completion(
                    text=text or "",
                    token_ids=tuple(choice.get("token_ids") or ()),
                    finish_reason=choice.get("finish_reason") or "stop",
                    logprobs=_logprobs(choice),
                )
            )
        return Generation(choices=tuple(choices), prompt_tokens=int(answer.get("usage", {}).get("prompt_tokens", 0)))

    def _call(self, method: str, route: str, **kwargs: Any) -> Any:
        import httpx

        deadline = time.monotonic() + self.timeout
        for attempt in itertools.count():
            try:
                response = self.http.request(method, route, **kwargs)
            except httpx.HTTPError as error:
                detail = f"; its last output:\n{self.process.last_lines()}" if self.process else ""
                raise EngineError(
                    f"the engine at {self.url} did not answer {method} {route}: {error}{detail}"
                ) from None
            if response.status_code == 200:
                return response.json() if response.content else {}
            if not self._wait_to_retry(response, attempt, deadline):
                self._raise(response)

    @staticmethod
    def _wait_to_retry(response: Any, attempt: int, deadline: float) -> bool:
        """Sleep before asking again if the server said it is busy and the wait fits before
        ``deadline``; False when the refusal stands."""
        if response.status_code not in RETRIED:
            return False
        try:
            delay = float(response.headers.get("Retry-After", ""))
        except ValueError:  # absent, or an HTTP date: back off instead
            delay = 0.5 * 2**attempt
        delay = min(max(delay, 0.1), 30.0)
        if time.monotonic() + delay > deadline:
            return False
        time.sleep(delay)
        return True

    @staticmethod
    def _raise(response: Any) -> None:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text[:500]
        raise EngineError(f"the engine refused the request ({response.status_code}): {message}")


def _logprobs(choice: Mapping[str, Any]) -> tuple[float, ...] | None:
    logprobs = choice.get("logprobs")
    if not logprobs:
        return None
    if "content" in logprobs:
        return tuple(item["logprob"] for item in logprobs["content"] or [])
    return tuple(logprobs.get("token_logprobs") or ())
