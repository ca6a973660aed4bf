"""`modelloop serve` against what a careless or hostile client sends: every malformed request
is a 4xx in OpenAI's error body (never a 5xx, never a traceback in the server's log), adapters
load only from the allowed folders, and load beyond the queue is shed (429, 503), not piled up."""

from __future__ import annotations

import json
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from test_serve import free_port, start_server

VALID = {"model": "tiny", "messages": [{"role": "user", "content": "Say 3"}], "max_tokens": 2}


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory):
    """An allowed folder holding a link out of it, and a folder outside beside it."""
    root = tmp_path_factory.mktemp("adapter-dirs")
    (root / "allowed" / "plain").mkdir(parents=True)
    (root / "outside" / "adapter").mkdir(parents=True)
    (root / "allowed" / "escape").symlink_to(root / "outside" / "adapter")
    return root


@pytest.fixture(scope="module")
def server(tiny_models, subprocess_env, adapter_dirs, tmp_path_factory):
    """A server with a 1 MiB body limit; yields its URL and its log (stderr)."""
    port, log = free_port(), tmp_path_factory.mktemp("serve-log") / "stderr.txt"
    process = start_server(
        tiny_models("qwen2"),
        port,
        subprocess_env,
        "--served-name",
        "tiny",
        "--max-body-mb",
        "1",
        "--adapter-dir",
        str(adapter_dirs / "allowed"),
        log=log,
    )
    yield f"http://127.0.0.1:{port}", log
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def small(tiny_models, subprocess_env, tmp_path_factory):
    """A server that sheds load soon: 2 rows in the engine, 2 requests queued, 0.5 s per request."""
    port, log = free_port(), tmp_path_factory.mktemp("small-log") / "stderr.txt"
    limits = ("--max-batch-size", "1", "--max-queued", "2", "--request-timeout", "0.5")
    process = start_server(tiny_models("qwen2"), port, subprocess_env, "--served-name", "tiny", *limits, log=log)
    yield f"http://127.0.0.1:{port}", log, process.pid
    process.terminate()
    process.wait(timeout=30)


# --------------------------------------------------------------------------- the fuzz corpus


def body(**fields) -> bytes:
    return json.dumps({**VALID, **fields}).encode()


def literal(name: str, text: str) -> bytes:
    """The valid body with a field whose value JSON cannot hold (1e400, a 5,000-digit number)."""
    return body()[:-1] + f', "{name}": {text}}}'.encode()


# Each field of the schema, with the JSON types it takes (bool is not a number here).
ACCEPTS = {
    "model": (str,),
    "messages": (list,),
    "max_tokens": (int, type(None)),
    "max_completion_tokens": (int, type(None)),
    "temperature": (int, float),
    "top_p": (int, float),
    "top_k": (int,),
    "repetition_penalty": (int, float),
    "n": (int,),
    "stop": (str, list, type(None)),
    "seed": (int, type(None)),
    "stream": (bool,),
    "logprobs": (bool,),
    "return_token_ids": (bool,),
}
SAMPLES = ["5", 5, 2.5, True, [], {}, None]
OUT_OF_RANGE = {
    "model": ["x" * 10_000, ""],
    "max_tokens": [0, -1, 4096, 2**31, 2**80],
    "max_completion_tokens": [0, 2**63],
    "temperature": [-0.5, 2.5, math.nan, math.inf, -math.inf],
    "top_p": [0, -1, 1.5, math.nan],
    "top_k": [-1, 2**31, 2**80],
    "repetition_penalty": [0, -1, 1e-300, 1e300, math.inf],
    "n": [0, -1, 17, 2**80],
    "seed": [2**63, -(2**63) - 1, 2**80, -(2**80)],
    "stop": [["x"] * 17, "x" * 257, [5], [None], [["x"]]],
}
PICTURE = "data:image/png;base64,iVBORw0KGgo="
PARTS = [
    5,
    "text",
    [],
    {"text": "no type"},
    {"type": "video", "video": "x"},
    {"type": "text"},
    {"type": "text", "text": 5},
    {"type": "image_url"},
    {"type": "image_url", "image_url": PICTURE},  # the string shorthand OpenAI does not take either
    {"type": "image_url", "image_url": {}},
    {"type": "image_url", "image_url": {"url": 5}},
    {"type": "image_url", "image_url": {"url": ""}},
    {"type": "image_url", "image_url": {"url": "/etc/passwd"}},
    {"type": "image_url", "image_url": {"url": "file:///etc/passwd"}},
    {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
    {"type": "image_url", "image_url": {"url": PICTURE}},  # well formed, but the model takes no pictures
]
MESSAGES = [
    [],
    "hi",
    [5],
    [[]],
    [{}],
    [{"role": "robot", "content": "x"}],
    [{"role": "user", "content": 5}],
    [{"role": "user", "content": {"text": "x"}}],
    [{"role": "user", "content": "x", "name": 5}],
    [{"role": "user", "content": "word " * 150_000}],  # under the body limit, over the context
    [{"role": "user", "content": "x"}] * 2049,
    *[[{"role": "user", "content": [part]}] for part in PARTS],
    *[
        [{"role": "assistant", "content": "x", "tool_calls": calls}, {"role": "user", "content": "y"}]
        for calls in (
            5,
            "x",
            [5],
            [{"function": 5}],
            [{"function": {"name": "f"}}],
            [{"function": {"name": "f", "arguments": {"a": 1}}}],
        )
    ],
]
nested = "x"
for _ in range(500):
    nested = [nested]


def corpus() -> list[tuple[str, str, dict]]:
    """``(name, route, httpx.post arguments)`` of every malformed request, generated from the schema."""
    chat, completions, load = "/v1/chat/completions", "/v1/completions", "/v1/load_lora_adapter"
    cases = [
        (f"{field}={value!r:.40}", chat, {"content": body(**{field: value})})
        for field, kinds in ACCEPTS.items()
        for value in SAMPLES
        if type(value) not in kinds
    ]
    cases += [
        (f"{field}={value!r:.40}", chat, {"content": body(**{field: value})})
        for field, values in OUT_OF_RANGE.items()
        for value in values
    ]
    cases += [(f"messages={value!r:.60}", chat, {"content": body(messages=value)}) for value in MESSAGES]
    cases += [
        ("content nested 500 deep", chat, {"content": body(messages=[{"role": "user", "content": nested}])}),
        ("no model", chat, {"content": json.dumps({"messages": VALID["messages"]}).encode()}),
        ("no messages", chat, {"content": json.dumps({"model": "tiny"}).encode()}),
        ("temperature=1e400", chat, {"content": literal("temperature", "1e400")}),
        ("seed=1e400", chat, {"content": literal("seed", "1e400")}),
        ("max_tokens of 5000 digits", chat, {"content": literal("max_tokens", "9" * 5000)}),
        ("a key twice, the last one bad", chat, {"content": literal("max_tokens", '"x"')}),
    ]
    for raw in (
        b"",
        b"[]",
        b'"x"',
        b"5",
        b"null",
        b"true",
        b"{",
        b'{"model": "tiny",}',
        b"\xff\xfe\x00{",
        b"[" * 100_000,
        b'{"a":' * 100_000,
    ):
        cases.append((f"body {raw[:12]!r}", chat, {"content": raw}))
    cases += [
        ("form data", chat, {"data": {"model": "tiny", "messages": "hi"}}),
        ("multipart", chat, {"files": {"file": ("a.json", body())}}),
        ("text/plain prose", chat, {"content": b"hello", "headers": {"Content-Type": "text/plain"}}),
        ("over the body limit", chat, {"content": body(messages=[{"role": "user", "content": "x" * (2 << 20)}])}),
        ("over the body limit, chunked", chat, {"content": iter([b"x" * (1 << 19)] * 4)}),
    ]
    for prompt in (5, None, {}, [-1], [2**31], [1.5], [[1, 2]], ["a"], [], ""):
        cases.append(
            (
                f"prompt={prompt!r}",
                completions,
                {"content": json.dumps({"model": "tiny", "prompt": prompt, "max_tokens": 2}).encode()},
            )
        )
    for adapter in (
        {},
        {"lora_name": 5, "lora_path": "x"},
        {"lora_name": "", "lora_path": "x"},
        {"lora_name": "a", "lora_path": "x" * 5000},
    ):
        cases.append((f"load {adapter!r:.40}", load, {"content": json.dumps(adapter).encode()}))
    cases += [
        ("unload without a name", "/v1/unload_lora_adapter", {"content": b"{}"}),
        ("unload what is not served", "/v1/unload_lora_adapter", {"content": b'{"lora_name": "nope"}'}),
        ("no such route", "/v1/nope", {"content": body()}),
        ("a GET route", "/v1/models", {"content": body()}),
    ]
    return cases


CORPUS = corpus()


def assert_openai_error(response: httpx.Response) -> dict:
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:300])
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"] and error["type"]
    return error


def assert_no_traceback(log: Path) -> None:
    text = log.read_text()
    assert "Traceback" not in text, text[-3000:]


def test_the_valid_body_is_answered(server):
    response = httpx.post(f"{server[0]}/v1/chat/completions", content=body(), timeout=30)
    assert response.status_code == 200 and response.json()["choices"]


@pytest.mark.parametrize(
    "route, request_", [(route, request) for _, route, request in CORPUS], ids=[name for name, _, _ in CORPUS]
)
def test_every_malformed_request_is_a_4xx_in_openai_s_body(server, route, request_):
    url, log = server
    assert_openai_error(httpx.post(f"{url}{route}", timeout=30, **request_))
    assert_no_traceback(log)


def test_a_field_error_names_the_field(server):
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Look"},
                {"type": "image_url", "image_url": "data:image/png;base64,AA"},
            ],
        }
    ]
    error = assert_openai_error(httpx.post(f"{server[0]}/v1/chat/completions", content=body(messages=messages)))
    assert error["param"] == "messages[0].content[1].image_url" and "valid dictionary" in error["message"]
    error = assert_openai_error(httpx.post(f"{server[0]}/v1/chat/completions", content=body(seed=2**80)))
    assert error["param"] == "seed"
    error = assert_openai_error(httpx.post(f"{server[0]}/v1/chat/completions", content=body(stop=["x"] * 17)))
    assert error["param"] == "stop" and "at most 16 items" in error["message"]
    too_large = httpx.post(f"{server[0]}/v1/chat/completions", content=b"x" * (2 << 20))
    assert too_large.status_code == 413 and assert_openai_error(too_large)["code"] == "request_too_large"


def test_adapters_load_only_from_the_allowed_folders_and_say_nothing_of_others(server, adapter_dirs):
    url, log = server

    def load(path):
        return httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": str(path)})

    refusals = [
        load(path)
        for path in (
            "/etc",
            "/no/such/folder",
            adapter_dirs / "allowed" / ".." / "outside" / "adapter",
            adapter_dirs / "allowed" / "escape",
            "relative/path",
        )
    ]
    assert {(answer.status_code, answer.text) for answer in refusals} == {
        (refusals[0].status_code, refusals[0].text)
    }  # existing or not: one answer
    assert assert_openai_error(refusals[0])["code"] == "adapter_path_not_allowed" and refusals[0].status_code == 403
    inside = load(adapter_dirs / "allowed" / "plain")
    assert (
        inside.status_code == 400
        and "is not an adapter folder of an installed tuner" in inside.json()["error"]["message"]
    )  # past the gate, to the engine
    assert_no_traceback(log)


# --------------------------------------------------------------------------- load


def metrics(url: str) -> dict:
    return httpx.get(f"{url}/metrics", timeout=5).json()


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


def test_a_full_queue_is_429_and_a_request_past_its_time_503(small):
    url, log, _ = small
    chat = f"{url}/v1/chat/completions"
    with ThreadPoolExecutor(3) as pool:
        busy = pool.submit(
            httpx.post, chat, json={**VALID, "n": 2, "max_tokens": 600, "temperature": 0}, timeout=30
        )  # both engine rows, and greedy runs to max_tokens
        wait_for(lambda: metrics(url)["active_rows"] == 2)
        queued = [pool.submit(httpx.post, chat, json=VALID, timeout=30) for _ in range(2)]
        wait_for(lambda: metrics(url)["queued"] == 2)
        refused = httpx.post(chat, json=VALID, timeout=30)
        answers = [busy.result(), *(future.result() for future in queued)]
    assert refused.status_code == 429 and refused.headers["Retry-After"] == "1"
    assert assert_openai_error(refused)["code"] == "queue_full"
    assert [answer.status_code for answer in answers] == [503, 503, 503]  # in the engine, then waiting for it
    assert all(
        answer.headers["Retry-After"] == "1" and answer.json()["error"]["code"] == "timeout" for answer in answers
    )
    assert metrics(url)["rejected"]["queue_full"] >= 1 and metrics(url)["rejected"]["timeout"] >= 3
    wait_for(
        lambda: metrics(url)["active_requests"] == 0, timeout=30
    )  # the engine could not drop the one it was generating
    assert_no_traceback(log)


def test_a_stream_left_or_timed_out_stops_its_rows_in_the_engine(small):
    url, log, _ = small
    # Seconds of work if not stopped; greedy "Hello" streams text at every token (an engine stops
    # a stream at its next piece of text, and the tiny model's answer to "a" holds back half-made characters).
    long = {"model": "tiny", "prompt": "Hello", "max_tokens": 1800, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=long, timeout=30) as response:
        next(response.iter_lines())
    wait_for(lambda: metrics(url)["active_requests"] == 0, timeout=1.5)
    with httpx.stream("POST", f"{url}/v1/completions", json=long, timeout=30) as response:
        events = [line for line in response.iter_lines() if line]
    assert events[-1] == "data: [DONE]" and json.loads(events[-2][6:])["error"]["code"] == "timeout"
    wait_for(lambda: metrics(url)["active_requests"] == 0, timeout=1.5)
    assert_no_traceback(log)


def rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1])


def test_a_bounded_soak_answers_everyone_and_health_stays_fast(small):
    """4x more clients than the queue takes, for a few seconds: only 200, 429 and 503, each
    within a deadline, /health quick throughout, and no memory growth worth the name."""
    url, log, pid = small
    clients, stop, statuses, health = 8, threading.Event(), [], []

    def client(number: int) -> None:
        with httpx.Client(timeout=10) as http:  # a hang fails the test: every request is answered within 10 s
            while not stop.is_set():
                request = {
                    **VALID,
                    "max_tokens": 8,
                    "stream": number % 2 == 1,
                    "messages": [{"role": "user", "content": f"Say {number}"}],
                }
                with http.stream("POST", f"{url}/v1/chat/completions", json=request) as response:
                    response.read()
                    statuses.append(response.status_code)
                if response.status_code != 200:
                    time.sleep(0.1)  # sooner than Retry-After says: impatient, but not a flood

    def watch() -> None:
        while not stop.is_set():
            started = time.monotonic()
            assert httpx.get(f"{url}/health", timeout=5).status_code == 200
            health.append(time.monotonic() - started)
            time.sleep(0.05)

    with ThreadPoolExecutor(clients + 1) as pool:
        running = [pool.submit(client, number) for number in range(clients)] + [pool.submit(watch)]
        time.sleep(1.5)
        early = rss_kib(pid)
        time.sleep(3.0)
        late = rss_kib(pid)
        stop.set()
        for future in running:
            future.result()
    assert set(statuses) <= {200, 429, 503} and statuses.count(200) > 10, sorted(set(statuses))
    assert max(health) < 0.5, max(health)
    assert late - early < 30 * 1024, (early, late)
    assert_no_traceback(log)
