"""The built-in hf engine in-process: batching, stop strings, n, logprobs, adapters, errors."""

from __future__ import annotations

import threading

import pytest

from modelloop.errors import EngineError
from modelloop.inference.types import GenerationRequest, SamplingParams
from modelloop.registry import ENGINES, get_registry
from modelloop.specs import EngineSession

QUESTION = [{"role": "user", "content": "What is 2+2?"}]


@pytest.fixture(scope="module")
def session(tiny_models):
    from modelloop.inference.hf import HFSession

    started = HFSession.load(tiny_models("qwen2"), options={"served_name": "tiny"})
    yield started
    started.close()


def ask(session, **params):
    return session.generate([GenerationRequest(messages=QUESTION, params=SamplingParams(**params))])[0]


def test_hook_register_engines_builtin_hf_starts_a_session(tiny_models):
    engine = get_registry(ENGINES).get("hf")
    session = engine.start(tiny_models("llama"), options={"served_name": "llama"})
    try:
        assert isinstance(session, EngineSession) and session.models == ["llama"]
    finally:
        session.close()


def test_greedy_is_deterministic_and_respects_max_tokens(session):
    first, second = ask(session, max_tokens=7, temperature=0), ask(session, max_tokens=7, temperature=0)
    assert first.choices == second.choices
    assert len(first.choices[0].token_ids) <= 7


def test_the_prompt_is_the_training_prompt(session):
    prompt = session.chat.render(QUESTION, add_generation_prompt=True)
    assert session.check(GenerationRequest(messages=QUESTION)) == len(
        session.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    )


def test_a_stop_string_ends_the_text_and_is_not_returned(session):
    whole = ask(session, max_tokens=20, temperature=0).choices[0].text
    stop = whole[3:5]
    cut = ask(session, max_tokens=20, temperature=0, stop=(stop,)).choices[0]
    assert cut.text == whole[: whole.index(stop)] and cut.finish_reason == "stop"
    streamed = "".join(
        delta.text
        for delta in session.stream(
            GenerationRequest(messages=QUESTION, params=SamplingParams(max_tokens=20, temperature=0, stop=(stop,)))
        )
    )
    assert streamed == cut.text


def test_n_choices_seeded_sampling_and_logprobs(session):
    generation = ask(session, max_tokens=6, temperature=1.0, n=3, seed=7, logprobs=True)
    assert len(generation.choices) == 3
    assert all(
        len(choice.logprobs) == len(choice.token_ids) and all(p <= 0 for p in choice.logprobs)
        for choice in generation.choices
    )
    assert ask(session, max_tokens=6, temperature=1.0, n=3, seed=7, logprobs=True) == generation


def test_concurrent_requests_share_batches(session):
    before_batches, before_requests = session.batches, session.requests
    together = threading.Barrier(12)  # all submit at once: the first batch runs while the rest queue

    def client():
        together.wait()
        ask(session, max_tokens=16, temperature=0)

    threads = [threading.Thread(target=client) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert session.requests - before_requests == 12
    assert session.batches - before_batches < 12


def test_requests_it_cannot_serve(session):
    with pytest.raises(EngineError, match="unknown model 'other'; served: tiny"):
        session.generate([GenerationRequest(messages=QUESTION, model="other")])
    with pytest.raises(EngineError, match="exceeds the context length"):
        session.generate([GenerationRequest(messages=QUESTION, params=SamplingParams(max_tokens=5000))])
    with pytest.raises(EngineError, match="needs messages or a prompt"):
        session.generate([GenerationRequest()])


def test_a_lora_run_is_served_as_trained_even_beside_other_adapters(lora_run, tiny_models):
    from modelloop.inference.hf import HFSession

    def answer(session, model=None):
        request = GenerationRequest(
            messages=QUESTION, model=model, params=SamplingParams(max_tokens=4, temperature=0, logprobs=True)
        )
        return session.generate([request])[0].choices[0].logprobs

    alone = HFSession.load(lora_run[0], options={"served_name": "tuned"})
    beside = HFSession.load(lora_run[0], adapters={"other": lora_run[0] / "model"}, options={"served_name": "tuned"})
    base = HFSession.load(tiny_models("qwen2"))
    try:
        assert answer(beside, "tuned") == answer(alone) != answer(base)
        assert answer(beside, "other") == answer(alone)
        beside.unload_adapter("other")
        assert answer(beside, "tuned") == answer(alone)
        with pytest.raises(EngineError, match="unknown model 'other'"):
            answer(beside, "other")
    finally:
        for session in (alone, beside, base):
            session.close()


def test_unloading_the_last_adapter_leaves_the_base_serving(lora_run, tiny_models):
    from modelloop.inference.hf import HFSession

    session = HFSession.load(
        tiny_models("qwen2"), adapters={"a": lora_run[0] / "model"}, options={"served_name": "tiny"}
    )
    try:
        session.unload_adapter("a")
        assert session.models == ["tiny"]
        assert ask(session, max_tokens=3, temperature=0).choices
    finally:
        session.close()


def test_a_closed_engine_refuses_requests(tiny_models):
    from modelloop.inference.hf import HFSession

    session = HFSession.load(tiny_models("qwen2"))
    session.close()
    with pytest.raises(EngineError, match="the engine was closed"):
        ask(session, max_tokens=2)


def test_a_short_request_is_answered_before_a_long_one_in_the_same_batch(tiny_models):
    import time

    from modelloop.inference.hf import HFSession

    session = HFSession.load(tiny_models("qwen2"), options={"batch_window": 0.3})
    finished = {}
    together = threading.Barrier(2)

    def client(name, tokens):
        together.wait()
        result = ask(session, max_tokens=tokens, temperature=0)
        finished[name] = (time.monotonic(), len(result.choices[0].token_ids))

    try:
        threads = [
            threading.Thread(target=client, args=("short", 1)),
            threading.Thread(target=client, args=("long", 300)),
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert session.batches == 1
        assert finished["short"][1] == 1 and finished["long"][1] > 100
        assert finished["long"][0] - finished["short"][0] > 0.2
    finally:
        session.close()


def test_a_token_id_prompt_is_used_as_it_is_and_the_end_of_turn_token_is_kept(session):
    prompt = session.tokenizer(session.chat.render(QUESTION, add_generation_prompt=True), add_special_tokens=False)[
        "input_ids"
    ]
    by_ids = session.generate([GenerationRequest(prompt=prompt, params=SamplingParams(max_tokens=40, temperature=0))])[
        0
    ]
    by_messages = ask(session, max_tokens=40, temperature=0)
    assert by_ids.choices == by_messages.choices and by_ids.prompt_tokens == len(prompt)
    word = session.tokenizer("hello", add_special_tokens=False)["input_ids"]
    ended = session._complete([*word, session.eos_ids[0], *word], SamplingParams(max_tokens=40), None)
    assert (
        ended.token_ids == (*word, session.eos_ids[0]) and ended.finish_reason == "stop"
    )  # the end-of-turn token kept
    assert ended.text == session.tokenizer.decode(word)  # but not in the text
    with pytest.raises(EngineError, match="ids outside the vocabulary"):
        session.generate([GenerationRequest(prompt=[1, 10**9])])


def test_attached_to_a_model_in_training_it_generates_inline_and_leaves_it_training(tiny_models):
    from modelloop.chat import resolve_chat_format
    from modelloop.models.loading import load_model

    loaded = load_model(tiny_models("qwen2"))
    policy = loaded.model.train()
    session = (
        get_registry(ENGINES)
        .get("hf")
        .attach(policy, loaded.tokenizer, resolve_chat_format(loaded.tokenizer, loaded.family))
    )
    try:
        assert session.inline and session._worker is None
        generation = session.generate(
            [GenerationRequest(messages=QUESTION, params=SamplingParams(max_tokens=5, temperature=1.0, n=4, seed=1))]
        )[0]
        assert len(generation.choices) == 4 and session.batches == 1
        assert policy.training
        assert [
            delta for delta in session.stream(GenerationRequest(messages=QUESTION, params=SamplingParams(max_tokens=3)))
        ][-1].finish_reason
    finally:
        session.close()


def test_a_stream_closed_early_stops_generating(tiny_models):
    from modelloop.inference.hf import HFSession

    session = HFSession.load(tiny_models("qwen2"))
    try:
        stream = session.stream(
            GenerationRequest(messages=QUESTION, params=SamplingParams(max_tokens=1500, temperature=1.0, seed=0))
        )
        next(stream)
        stream.close()  # the reader goes away after the first piece of text
        session.generate(
            [GenerationRequest(messages=QUESTION, params=SamplingParams(max_tokens=1))]
        )  # waits for the worker
        assert session.steps < 100  # not the 1500 tokens asked for
    finally:
        session.close()


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_logprobs_are_the_sampling_distributions(session, temperature):
    """What importance weights divide by: each sampled token's log-probability under the
    distribution it was drawn from (the logits over the temperature), as the policy's
    forward pass gives it."""
    import torch

    choice = ask(session, max_tokens=6, temperature=temperature, seed=3, logprobs=True).choices[0]
    prompt = session.tokenizer(session.chat.render(QUESTION, add_generation_prompt=True), add_special_tokens=False)
    ids = torch.tensor([prompt["input_ids"] + list(choice.token_ids)])
    with torch.no_grad():
        logits = session.model(ids).logits[0, len(prompt["input_ids"]) - 1 : -1].float()
    expected = torch.log_softmax(logits / temperature, dim=-1).gather(1, ids[0, -len(choice.token_ids) :, None])[:, 0]
    assert choice.logprobs == pytest.approx(expected.tolist(), abs=1e-4)
