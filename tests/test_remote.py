"""Engines behind HTTP: process management with stand-in servers, the client against `modelloop serve`."""

from __future__ import annotations

import sys
import textwrap
import time

import pytest

from conftest import modelloop_serve
from modelloop.errors import EngineError
from modelloop.inference.launch import start_server
from modelloop.inference.remote import RemoteSession, ServerProcess
from modelloop.inference.types import GenerationRequest, SamplingParams
from modelloop.parallel.world import free_port


def stand_in(tmp_path, body: str):
    """A Python script that behaves like (or fails like) an engine's server."""
    script = tmp_path / "server.py"
    script.write_text(textwrap.dedent(body))
    return [sys.executable, str(script)]


HEALTHY_AFTER_A_WHILE = """
    import http.server, sys, time
    print("loading weights...", flush=True)
    time.sleep(0.5)
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200); self.end_headers(); self.wfile.write(b"ok")
        def log_message(self, *args):
            pass
    http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""


def test_a_server_that_comes_up_is_waited_for_and_stopped(tmp_path):
    port = free_port()
    server = ServerProcess(
        [*stand_in(tmp_path, HEALTHY_AFTER_A_WHILE), str(port)], url=f"http://127.0.0.1:{port}", name="stand-in"
    )
    server.wait_healthy(timeout=30)
    assert server.process.poll() is None
    server.stop(grace=5)
    assert server.process.poll() is not None


def test_a_crash_while_starting_is_reported_with_its_last_lines(tmp_path):
    crash = 'print("CUDA error: out of memory while loading", flush=True)\nraise SystemExit(3)\n'
    server = ServerProcess(stand_in(tmp_path, crash), url=f"http://127.0.0.1:{free_port()}", name="stand-in")
    with pytest.raises(
        EngineError, match=r"exited with status 3 while starting; its last output:\nCUDA error: out of memory"
    ):
        server.wait_healthy(timeout=30)


def test_a_server_that_never_gets_healthy_times_out_and_is_killed(tmp_path):
    hang = 'import time\nprint("compiling kernels", flush=True)\ntime.sleep(600)\n'
    server = ServerProcess(stand_in(tmp_path, hang), url=f"http://127.0.0.1:{free_port()}", name="stand-in")
    started = time.monotonic()
    with pytest.raises(EngineError, match=r"not healthy after 2 s; its last output:\ncompiling kernels"):
        server.wait_healthy(timeout=2)
    assert time.monotonic() - started < 30
    assert server.process.poll() is not None


def test_a_missing_executable_is_a_clear_error():
    with pytest.raises(EngineError, match="cannot start the stand-in server"):
        ServerProcess(["/no/such/python"], url="http://127.0.0.1:1", name="stand-in")


@pytest.fixture(scope="module")
def remote(lora_run):
    session = start_server(
        "stand-in",
        "modelloop",
        lora_run[0],
        None,
        {"startup_timeout": 120},
        modelloop_serve,
        adapter_route="/v1/load_lora_adapter",
        unload_route="/v1/unload_lora_adapter",
    )
    yield session
    session.close()


def test_a_lora_run_is_launched_as_base_plus_adapter_and_answers_by_default(remote, tiny_models):
    assert remote.models == [tiny_models("qwen2").name, "tuned"]
    params = SamplingParams(max_tokens=4, temperature=0, logprobs=True)
    unnamed, tuned, base = remote.generate(
        [
            GenerationRequest(prompt="Say", params=params),
            GenerationRequest(prompt="Say", model="tuned", params=params),
            GenerationRequest(prompt="Say", model=tiny_models("qwen2").name, params=params),
        ]
    )
    assert unnamed.choices[0].logprobs == tuned.choices[0].logprobs != base.choices[0].logprobs


def test_generate_batches_of_requests_over_http(remote):
    requests = [
        GenerationRequest(
            messages=[{"role": "user", "content": f"Say {i}"}],
            model="tuned",
            params=SamplingParams(max_tokens=4, temperature=0),
        )
        for i in range(6)
    ]
    generations = remote.generate(requests)
    assert len(generations) == 6 and all(g.choices[0].finish_reason in ("stop", "length") for g in generations)
    assert all(g.prompt_tokens > 0 for g in generations)


def test_streaming_over_http_matches_the_whole_answer(remote):
    request = GenerationRequest(prompt="Say", params=SamplingParams(max_tokens=8, temperature=0))
    (whole,) = remote.generate([request])
    deltas = list(remote.stream(request))
    assert "".join(d.text for d in deltas) == whole.choices[0].text
    assert deltas[-1].finish_reason == whole.choices[0].finish_reason


def test_an_adapter_is_loaded_while_serving(remote, lora_run):
    remote.load_adapter("again", str(lora_run[0] / "model"))
    assert "again" in remote.models
    (answer,) = remote.generate([GenerationRequest(prompt="Say", model="again", params=SamplingParams(max_tokens=2))])
    assert answer.choices
    with pytest.raises(EngineError, match="is not an adapter folder of an installed tuner"):
        remote.load_adapter("broken", str(lora_run[0]))
    remote.unload_adapter("again")
    assert "again" not in remote.models
    with pytest.raises(EngineError, match=r"\(404\).*no adapter 'again' is served"):
        remote.unload_adapter("again")


def test_server_side_refusals_become_engine_errors(remote):
    with pytest.raises(EngineError, match="unknown model 'nope'"):
        remote.check(GenerationRequest(prompt="x", model="nope"))
    with pytest.raises(EngineError, match=r"refused the request \(400\).*context length"):
        remote.generate([GenerationRequest(prompt="x", params=SamplingParams(max_tokens=100_000))])


def test_the_engine_session_protocol_is_met(remote):
    from modelloop.specs import EngineSession

    assert isinstance(remote, EngineSession) and isinstance(remote, RemoteSession)


BUSY_TWICE = """
    import http.server, json, sys
    refusals = [(429, "0.2"), (503, None)]  # a full queue (Retry-After), then a request past its time (none)
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200); self.end_headers(); self.wfile.write(b"ok")
        def do_POST(self):
            streamed = json.loads(self.rfile.read(int(self.headers["Content-Length"]))).get("stream")
            if self.path == "/bad":
                return self.answer(400, {"error": {"message": "no"}})
            if refusals:
                status, wait = refusals.pop(0)
                return self.answer(status, {"error": {"message": "busy"}}, wait)
            refusals.extend([(429, "0.2"), (503, None)])
            choice = {"index": 0, "text": "ok", "finish_reason": "stop"}
            if streamed:
                usage = {"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2}}
                return self.answer(200, f"data: {json.dumps({'choices': [choice]})}\\n\\ndata: {json.dumps(usage)}\\n\\ndata: [DONE]\\n\\n")
            self.answer(200, {"choices": [choice], "usage": {"prompt_tokens": 1}})
        def answer(self, status, body, wait=None):
            data = (body if isinstance(body, str) else json.dumps(body)).encode()
            self.send_response(status)
            if wait:
                self.send_header("Retry-After", wait)
            self.send_header("Content-Length", str(len(data))); self.end_headers(); self.wfile.write(data)
        def log_message(self, *args):
            pass
    http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""


@pytest.fixture
def busy_server(tmp_path):
    """A stand-in that refuses each request twice (429 with Retry-After, 503 without) before answering it."""
    port = free_port()
    server = ServerProcess(
        [*stand_in(tmp_path, BUSY_TWICE), str(port)], url=f"http://127.0.0.1:{port}", name="stand-in"
    )
    server.wait_healthy(timeout=30)
    yield server
    server.stop(grace=5)


def test_busy_answers_are_asked_again_after_their_retry_after(busy_server):
    session = RemoteSession(busy_server.url, default_model="m")
    started = time.monotonic()
    (answer,) = session.generate([GenerationRequest(prompt="Say", params=SamplingParams(max_tokens=2))])
    assert answer.choices[0].text == "ok"
    assert time.monotonic() - started >= 0.2 + 0.5  # Retry-After, then the first back-off step
    (delta,) = session.stream(GenerationRequest(prompt="Say", params=SamplingParams(max_tokens=2)))
    assert (delta.text, delta.finish_reason, delta.tokens, delta.prompt_tokens) == (
        "ok",
        "stop",
        2,
        1,
    )  # the usage rides on the finish
    with pytest.raises(EngineError, match=r"\(400\): no"):  # a refusal that is not "busy" stands at once
        session._call("POST", "/bad", json={})
    session.close()


def test_a_busy_server_past_the_client_s_time_is_an_error(busy_server):
    session = RemoteSession(busy_server.url, default_model="m", timeout=0.1)  # no time to wait for a retry
    with pytest.raises(EngineError, match=r"refused the request \(429\): busy"):
        session.generate([GenerationRequest(prompt="Say", params=SamplingParams(max_tokens=2))])
    session.close()
