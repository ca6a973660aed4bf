"""Served answers and feedback back into training (issue 21): `serve --log` records every
request and answer, `POST /v1/feedback` takes what users thought of them, and `data
from-logs` turns both into sft, kto and preference data that a run trains on and that
the lineage traces back to the served run."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from click.testing import CliRunner
from test_serve import start_server

import modelloop
from modelloop.cli import build_cli
from modelloop.data.from_logs import collect, make
from modelloop.errors import ModelloopError
from modelloop.inference.request_log import RequestLog, read_log
from modelloop.lineage import find_run, find_runs, tree_lines
from modelloop.parallel.world import free_port

KEY = "sk-feedback-test"
QUESTIONS = ["What is 2+2?", "What is 3+4?", "Say hello.", "Name a colour."]


@pytest.fixture(scope="module")
def served(lora_run, subprocess_env, tmp_path_factory):
    """A LoRA run served with a request log; four chats (one streamed) and a completion,
    then feedback on the chats. Yields the server's URL, the log folder and the answers."""
    log = tmp_path_factory.mktemp("served") / "log"
    port = free_port()
    process = start_server(lora_run[0], port, subprocess_env, "--api-key", KEY, "--log", str(log))
    url = f"http://127.0.0.1:{port}"
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)
    model = client.models.list().data[0].id
    answers = []
    for number, question in enumerate(QUESTIONS):
        messages = [{"role": "user", "content": question}]
        if number == 3:  # streamed: logged once the stream ends, under the id its chunks carried
            chunks = list(client.chat.completions.create(model=model, messages=messages, max_tokens=8, stream=True))
            text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
            answers.append((chunks[0].id, messages, text))
        else:
            reply = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0)
            answers.append((reply.id, messages, reply.choices[0].message.content))
    completion = client.completions.create(model=model, prompt="Once upon", max_tokens=4)
    try:
        yield url, log, answers, completion
    finally:
        process.terminate()
        process.wait(timeout=30)


def feedback(url, key=KEY, **body):
    return httpx.post(f"{url}/v1/feedback", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=30)


@pytest.fixture(scope="module")
def judged(served):
    url, log, answers, _ = served
    (up, _, _), (down, _, _), (corrected, _, _), (scored, _, _) = answers
    for body in (
        {"id": up, "rating": "up"},
        {"id": down, "rating": "up"},
        {"id": down, "rating": "down", "comment": "wrong sum"},  # the latest judgement counts
        {"id": corrected, "correction": "Hello!"},
        {"id": scored, "score": 0.9},
    ):
        response = feedback(url, **body)
        assert response.status_code == 200, response.text
        assert response.json() == {"id": body["id"], "object": "feedback", "status": "recorded"}
    return served


def test_every_answer_is_logged_with_its_request_run_and_settings(served, lora_run):
    url, log, answers, completion = served
    # written by a thread of the server's own: read once it has caught up
    entries = _wait_for(lambda: [e for e in read_log(log) if e["type"] == "request"], len(answers) + 1)
    by_id = {entry["id"]: entry for entry in entries}
    for identity, messages, text in answers:
        entry = by_id[identity]
        assert entry["messages"] == messages and entry["answers"][0]["text"] == text
        assert entry["kind"] == "chat" and entry["run"] == lora_run[0].name
        assert entry["latency_s"] > 0 and entry["completion_tokens"] > 0
    assert by_id[answers[0][0]]["sampling"]["temperature"] == 0 and not by_id[answers[0][0]]["stream"]
    assert by_id[answers[3][0]]["stream"]
    text = by_id[completion.id]
    assert text["kind"] == "text" and text["prompt"] == "Once upon"
    assert text["answers"][0]["text"] == completion.choices[0].text


@pytest.mark.parametrize(
    ("body", "status", "expected"),
    [
        ({"id": "chatcmpl-nope", "rating": "up"}, 404, "no request 'chatcmpl-nope' in the log"),
        ({"id": "ID"}, 400, "give a rating (up or down), a score (0 to 1) or a correction"),
        ({"id": "ID", "rating": "meh"}, 400, "rating: Input should be 'up' or 'down'"),
        ({"id": "ID", "score": 7}, 400, "score: Input should be less than or equal to 1"),
    ],
)
def test_bad_feedback_is_refused_in_openai_s_body(served, body, status, expected):
    url, _, answers, _ = served
    body = {key: answers[0][0] if value == "ID" else value for key, value in body.items()}
    response = feedback(url, **body)
    assert response.status_code == status
    assert response.json()["error"]["message"] == expected


def test_feedback_takes_the_api_key_like_every_route(served):
    url, _, answers, _ = served
    assert feedback(url, key="wrong", id=answers[0][0], rating="up").status_code == 401


def test_from_logs_makes_data_that_checks_and_that_a_run_traces_back(judged, lora_run, tiny_models, tmp_path):
    url, log, answers, _ = judged
    _wait_for(lambda: [e for e in read_log(log) if e["type"] == "feedback"], 5)
    made = {}
    for kind in ("sft", "kto", "preference"):
        out = tmp_path / f"{kind}.jsonl"
        done = _modelloop("data", "from-logs", str(log), "--as", kind, "--out", str(out))
        assert done.exit_code == 0, done.output
        checked = _modelloop("data", "check", str(out))
        assert checked.exit_code == 0, checked.output
        made[kind] = [json.loads(line) for line in out.read_text().splitlines()]
        origin = json.loads((tmp_path / f"{kind}.jsonl.origin.json").read_text())
        assert origin["runs"] == [lora_run[0].name] and origin["records"] == len(made[kind])
    (up, question, text), (_, second, wrong), (_, third, original), (_, fourth, liked) = answers
    assert made["sft"] == [
        {"messages": [*question, {"role": "assistant", "content": text}]},
        {"messages": [*third, {"role": "assistant", "content": "Hello!"}]},
        {"messages": [*fourth, {"role": "assistant", "content": liked}]},
    ]
    labels = [(record["prompt"], record["completion"][0]["content"], record["label"]) for record in made["kto"]]
    assert labels == [
        (question, text, True),
        (second, wrong, False),
        (third, "Hello!", True),
        (third, original, False),
        (fourth, liked, True),
    ]
    assert made["preference"] == [
        {
            "prompt": third,
            "chosen": [{"role": "assistant", "content": "Hello!"}],
            "rejected": [{"role": "assistant", "content": original}],
        }
    ]

    home = tmp_path / "home"
    trained = modelloop.sft(
        {
            "model": str(tiny_models("qwen2")),
            "data": [str(tmp_path / "sft.jsonl")],
            "max_steps": 1,
            "max_length": 64,
            "output_dir": str(home / "runs" / "from-feedback"),
        }
    )
    run = find_run(trained["run_dir"], find_runs(home / "runs"))
    assert run.data_from == [lora_run[0].name]
    assert any(
        "from-feedback" in line and f"(data: answers of {lora_run[0].name})" in line for line in tree_lines([run])
    )


# ---------------------------------------------------------------------------- from a log written here


def chat(log, identity, question, answer, run="runs/a"):
    log.request(
        {
            "id": identity,
            "model": "m",
            "source": "m",
            "run": run,
            "kind": "chat",
            "messages": [{"role": "user", "content": question}],
            "answers": [{"text": answer, "finish_reason": "stop"}],
        }
    )


def test_scores_judge_by_the_threshold_and_repeats_are_written_once(tmp_path):
    log = RequestLog(tmp_path / "log")
    chat(log, "a", "Q1", "good")
    chat(log, "b", "Q1", "good")  # the same conversation and answer: one record
    chat(log, "c", "Q1", "bad")
    chat(log, "d", "Q2", "unjudged")
    log.request({"id": "e", "kind": "text", "prompt": "raw", "answers": [{"text": "x"}]})
    for identity, score in (("a", 0.8), ("b", 0.7), ("c", 0.2)):
        log.feedback({"id": identity, "index": 0, "score": score})
    log.feedback({"id": "zzz", "index": 0, "rating": "up"})
    log.close()
    answers, left_out = collect(tmp_path / "log", threshold=0.5)
    assert left_out == {"raw completions (no conversation)": 1, "feedback on no logged chat answer": 1}
    sft = make(answers, "sft")
    assert sft.records == [{"messages": [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "good"}]}]
    assert sft.left_out == {
        "repeated records": 1,
        "disliked answers (sft keeps the good ones)": 1,
        "answers nobody judged": 1,
    }
    preference = make(answers, "preference")
    assert [(r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in preference.records] == [("good", "bad")]
    assert preference.runs == {"runs/a"}
    strict, _ = collect(tmp_path / "log", threshold=0.75)
    assert [r["messages"][-1]["content"] for r in make(strict, "sft").records] == ["good"]  # a's 0.8 only


def test_an_empty_answer_is_left_out_and_only_its_correction_trains(tmp_path):
    """A model that ended its turn at once gave no assistant turn: nothing to train on or against."""
    log = RequestLog(tmp_path / "log")
    chat(log, "a", "Q1", "")
    chat(log, "b", "Q2", " ")
    log.feedback({"id": "a", "index": 0, "rating": "up"})
    log.feedback({"id": "b", "index": 0, "rating": "down", "correction": "4"})
    log.close()
    answers, _ = collect(tmp_path / "log")
    kto = make(answers, "kto")
    assert [(r["completion"][0]["content"], r["label"]) for r in kto.records] == [("4", True)]
    assert kto.left_out == {"empty answers": 2}
    assert [r["messages"][-1]["content"] for r in make(answers, "sft").records] == ["4"]
    assert make(answers, "preference").records == []


def test_a_log_rotates_by_size_and_a_torn_last_line_is_left_out(tmp_path):
    log = RequestLog(tmp_path / "log", max_bytes=300)
    for number in range(6):
        chat(log, f"r{number}", f"question {number}", "answer")
    log.close()
    files = sorted((tmp_path / "log").glob("requests-*.jsonl"))
    assert len(files) > 1
    with files[-1].open("a") as out:
        out.write('{"type": "feedback", "id": "r0", "rat')  # a server killed mid-write
    assert [entry["id"] for entry in read_log(tmp_path / "log")] == [f"r{number}" for number in range(6)]
    restarted = RequestLog(tmp_path / "log")  # a restarted server knows the ids logged before
    assert restarted.knows("r5") and not restarted.knows("r6")
    restarted.close()


def test_an_empty_or_missing_log_is_named(tmp_path):
    with pytest.raises(ModelloopError, match="no such request log"):
        collect(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelloopError, match="holds no request log files"):
        collect(tmp_path / "empty")


def _modelloop(*arguments):
    return CliRunner().invoke(build_cli(), list(arguments))


def _wait_for(read, count, timeout=10.0):
    import time

    deadline = time.monotonic() + timeout
    while len(found := read()) < count:
        assert time.monotonic() < deadline, f"{len(found)} of {count} log lines written"
        time.sleep(0.05)
    return found
