"""`modelloop serve` as a user runs it: the official openai client against a real server process."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from modelloop.parallel.world import free_port

KEY = "sk-modelloop-test"


def start_server(model, port, env, *extra, log=None):
    """A ``modelloop serve`` process once it answers /health; its stderr goes to the file
    ``log`` where given (for a test to read while it runs), else to a pipe."""
    with open(log, "w") if log else contextlib.nullcontext(subprocess.PIPE) as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "modelloop", "serve", str(model), "--port", str(port), *extra],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            text=True,
        )
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            output = Path(log).read_text() if log else process.stderr.read()
            raise AssertionError(f"the server did not start: {output[-2000:]}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def server(tiny_models, lora_run, subprocess_env):
    port = free_port()
    process = start_server(
        tiny_models("qwen2"),
        port,
        subprocess_env,
        "--api-key",
        KEY,
        "--served-name",
        "tiny",
        "--adapters",
        f"sft={lora_run[0] / 'model'}",
    )
    yield f"http://127.0.0.1:{port}"
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)


QUESTION = [{"role": "user", "content": "Say 3"}]


def test_a_server_without_a_request_log_says_how_to_take_feedback(server):
    response = httpx.post(
        f"{server}/v1/feedback", json={"id": "chatcmpl-x", "rating": "up"}, headers={"Authorization": f"Bearer {KEY}"}
    )
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "feedback_not_enabled"
    assert "--log DIR" in response.json()["error"]["message"]


def test_lists_the_base_and_each_adapter(client):
    assert [model.id for model in client.models.list()] == ["tiny", "sft"]


def test_chat_completion(client):
    response = client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=5, temperature=0)
    choice = response.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert response.usage.prompt_tokens > 0 and response.usage.completion_tokens <= 5


def test_streamed_text_equals_the_whole_answer(client):
    whole = client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=12, temperature=0)
    pieces = list(
        client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=12, temperature=0, stream=True)
    )
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in pieces)
    assert streamed == whole.choices[0].message.content
    assert pieces[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_a_stream_asked_for_its_usage_ends_with_it(client):
    whole = client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=12, temperature=0, n=2)
    pieces = list(
        client.chat.completions.create(
            model="tiny",
            messages=QUESTION,
            max_tokens=12,
            temperature=0,
            n=2,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    *text, last = pieces
    assert last.choices == [] and last.usage.model_dump() == {
        **whole.usage.model_dump(),
        "total_tokens": whole.usage.total_tokens,
    }
    assert all(chunk.usage is None for chunk in text)
    plain = list(
        client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=4, temperature=0, stream=True)
    )
    assert all(chunk.choices for chunk in plain)  # no usage chunk unless asked


def test_an_adapter_is_used_by_name(client):
    base = client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=6, temperature=0, logprobs=True)
    tuned = client.chat.completions.create(model="sft", messages=QUESTION, max_tokens=6, temperature=0, logprobs=True)
    assert base.choices[0].logprobs.content != tuned.choices[0].logprobs.content
    tokens = [item.token for item in base.choices[0].logprobs.content]
    assert "".join(tokens).startswith(base.choices[0].message.content)  # token texts, not ids


def test_text_completion(client):
    response = client.completions.create(model="tiny", prompt="What is", max_tokens=4, temperature=0)
    assert response.choices[0].text and response.usage.completion_tokens == 4


def test_a_token_id_prompt_gets_token_ids_back(server):
    body = {"model": "tiny", "prompt": [5, 6, 7, 8], "max_tokens": 4, "temperature": 0, "return_token_ids": True}
    answer = httpx.post(f"{server}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}).json()
    (choice,) = answer["choices"]
    assert answer["usage"]["prompt_tokens"] == 4
    assert 1 <= len(choice["token_ids"]) <= 4 and answer["usage"]["completion_tokens"] == len(choice["token_ids"])


def test_32_concurrent_requests_succeed_and_are_batched(client, server):
    before = httpx.get(f"{server}/health").json()

    def ask(number):
        return client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": f"Say {number}"}], max_tokens=16, temperature=0
        )

    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(ask, range(32)))
    after = httpx.get(f"{server}/health").json()
    assert all(answer.choices[0].message is not None for answer in answers)
    assert after["requests"] - before["requests"] == 32
    assert after["batches"] - before["batches"] < 32 / 2  # requests arriving together share a forward batch


@pytest.mark.parametrize(
    "body, status, message",
    [
        (b'{"model": "tiny", "messages": [', 400, "malformed JSON"),
        (json.dumps({"model": "tiny"}).encode(), 400, "messages: Field required"),
        (json.dumps({"model": "nope", "messages": QUESTION}).encode(), 404, "the model 'nope' does not exist"),
        (
            json.dumps({"model": "tiny", "messages": QUESTION, "max_tokens": 4096}).encode(),
            400,
            "exceeds the context length (2048)",
        ),
        (json.dumps({"model": "tiny", "messages": QUESTION, "temperature": -1}).encode(), 400, "temperature"),
    ],
)
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, client, body, status, message):
    response = httpx.post(
        f"{server}/v1/chat/completions",
        content=body,
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
    )
    assert response.status_code == status
    error = response.json()["error"]
    assert message in error["message"] and error["type"] == "invalid_request_error"
    assert client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=2).choices


def test_an_empty_prompt_is_a_400(server):
    response = httpx.post(
        f"{server}/v1/completions", json={"model": "tiny", "prompt": ""}, headers={"Authorization": f"Bearer {KEY}"}
    )
    assert response.status_code == 400 and response.json()["error"]["message"] == "the prompt is empty"


def test_a_wrong_api_key_is_401(server):
    with pytest.raises(openai.AuthenticationError) as raised:
        openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0).models.list()
    assert raised.value.status_code == 401
    assert httpx.get(f"{server}/v1/models").status_code == 401


def test_adapters_load_at_run_time_from_the_folders_of_those_given_at_start(server, lora_run):
    headers = {"Authorization": f"Bearer {KEY}"}
    outside = httpx.post(
        f"{server}/v1/load_lora_adapter", json={"lora_name": "etc", "lora_path": "/etc"}, headers=headers
    )
    assert outside.status_code == 403 and outside.json()["error"]["code"] == "adapter_path_not_allowed"
    beside = httpx.post(
        f"{server}/v1/load_lora_adapter",
        json={"lora_name": "again", "lora_path": str(lora_run[0] / "model")},
        headers=headers,
    )
    assert beside.status_code == 200 and "again" in beside.json()["models"]
    assert httpx.post(f"{server}/v1/unload_lora_adapter", json={"lora_name": "again"}, headers=headers).json()[
        "models"
    ] == ["tiny", "sft"]


def test_sigterm_finishes_the_request_in_flight(tiny_models, subprocess_env):
    port = free_port()
    process = start_server(tiny_models("qwen2"), port, subprocess_env, "--served-name", "tiny")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
    answers = []
    asking = threading.Thread(
        target=lambda: answers.append(
            client.completions.create(model="tiny", prompt="a", max_tokens=1500, temperature=0)
        )
    )
    asking.start()
    time.sleep(0.3)
    os.kill(process.pid, signal.SIGTERM)
    asking.join(timeout=60)
    assert answers and answers[0].usage.completion_tokens > 0
    # uvicorn shuts down gracefully, then re-raises SIGTERM so the exit status says why it stopped
    assert process.wait(timeout=60) in (0, -signal.SIGTERM)
