"""The llamacpp engine on the tiny Qwen2: what the built-in server and GRPO's rollouts rely
on, against the ``hf`` engine on the same run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

import modelloop
from conftest import assert_same_greedy_tokens
from modelloop.errors import EngineError
from modelloop.inference.types import GenerationRequest, SamplingParams
from modelloop.registry import ENGINES, get_registry

pytest.importorskip("llama_cpp")

GREEDY = SamplingParams(max_tokens=10, temperature=0)
QUESTIONS = [[{"role": "user", "content": f"What is {i}+1?"}] for i in range(6)]
SUM_PROMPTS = Path(__file__).parents[3] / "examples" / "data" / "sum_prompts.jsonl"


def start(engine, model, **options):
    return get_registry(ENGINES).get(engine).start(str(model), options={"served_name": "m", **options})


@pytest.fixture(scope="module")
def transformers_model(varied_lora_run):
    from modelloop.models.loading import load_model, merged_model

    return merged_model(load_model(str(varied_lora_run))).eval()


@pytest.fixture(scope="module")
def sessions(varied_lora_run):
    """The varied LoRA run in both engines (llamacpp converts it to a cached GGUF first)."""
    hf, llama = start("hf", varied_lora_run), start("llamacpp", varied_lora_run)
    yield hf, llama
    hf.close()
    llama.close()


def test_greedy_answers_streams_and_logprobs_match_the_hf_engine(sessions, transformers_model):
    hf, llama = sessions
    params = SamplingParams(max_tokens=10, temperature=0, logprobs=True)
    expected = hf.generate([GenerationRequest(messages=q, params=params) for q in QUESTIONS])
    got = llama.generate([GenerationRequest(messages=q, params=params) for q in QUESTIONS])
    prompts = [llama.prompt_ids(GenerationRequest(messages=q)) for q in QUESTIONS]
    assert prompts == [hf.prompt_ids(GenerationRequest(messages=q)) for q in QUESTIONS]
    assert_same_greedy_tokens(
        transformers_model, prompts, [g.choices[0].token_ids for g in expected], [g.choices[0].token_ids for g in got]
    )
    for a, b in zip(got, expected):
        first = a.choices[0].logprobs[0], b.choices[0].logprobs[0]  # the same prompt, the same first token
        assert a.choices[0].token_ids[0] == b.choices[0].token_ids[0] and math.isclose(*first, abs_tol=0.01)
        assert a.choices[0].tokens == tuple(
            llama.llm.detokenize([t], special=True).decode(errors="replace") for t in a.choices[0].token_ids
        )
    deltas = list(llama.stream(GenerationRequest(messages=QUESTIONS[0], params=GREEDY)))
    assert "".join(d.text for d in deltas) == got[0].choices[0].text
    assert deltas[-1].finish_reason == got[0].choices[0].finish_reason and deltas[-1].tokens == 10


def test_requests_arriving_together_are_decoded_together_and_answer_as_alone(sessions, transformers_model):
    _, llama = sessions
    requests = [GenerationRequest(messages=q, params=GREEDY) for q in QUESTIONS]
    alone = [llama.generate([request])[0].choices[0].token_ids for request in requests]
    steps = llama.steps
    together = [g.choices[0].token_ids for g in llama.generate(requests)]
    # one llama_decode per token of the longest answer, not one per token of every answer
    assert llama.steps - steps == max(len(answer) for answer in together)
    prompts = [llama.prompt_ids(request) for request in requests]
    assert_same_greedy_tokens(transformers_model, prompts, alone, together)


def test_a_prompt_is_decoded_once_for_its_choices_and_again_only_where_it_changed(varied_lora_run, transformers_model):
    llama = start("llamacpp", varied_lora_run)  # a fresh one: no slot keeps anything yet
    try:
        _decoded_once_and_again(llama, transformers_model)
    finally:
        llama.close()


def _decoded_once_and_again(llama, transformers_model):
    prompt = llama.prompt_ids(GenerationRequest(messages=[{"role": "user", "content": "Name three rivers, please."}]))
    sampled = GenerationRequest(prompt=prompt, params=SamplingParams(max_tokens=8, temperature=1.0, seed=3, n=4))

    def decoded(request):
        before = llama.decoded_tokens
        (generation,) = llama.generate([request])
        return llama.decoded_tokens - before, generation

    # the prompt once; each other choice takes its KV and decodes only its last token again
    # (for the logits it samples its first token from); each answer token but the last is fed
    tokens, first = decoded(sampled)
    assert tokens == len(prompt) + 3 + sum(len(c.token_ids) - 1 for c in first.choices)
    tokens, again = decoded(sampled)  # the same prompt again: kept by the slots it freed
    assert tokens == 4 + sum(len(c.token_ids) - 1 for c in again.choices) and again.choices == first.choices
    longer = GenerationRequest(prompt=prompt + list(first.choices[0].token_ids[:-1]), params=GREEDY)
    tokens, answer = decoded(longer)  # a next turn: only the new tokens past what a slot kept
    assert tokens == 1 + len(answer.choices[0].token_ids) - 1
    assert_same_greedy_tokens(
        transformers_model,
        [longer.prompt],
        [llama.generate([longer])[0].choices[0].token_ids],
        [answer.choices[0].token_ids],
    )


def test_a_small_kv_pool_makes_requests_wait_their_turn(varied_lora_run, sessions, transformers_model):
    _, llama = sessions
    requests = [GenerationRequest(messages=q, params=GREEDY) for q in QUESTIONS]
    expected = [g.choices[0].token_ids for g in llama.generate(requests)]
    prompts = [llama.prompt_ids(request) for request in requests]
    prompt = len(prompts[0])
    # room for two answers at a time (each holds its prompt and max_tokens): three rounds
    small = start("llamacpp", varied_lora_run, n_ctx=64, kv_tokens=2 * (prompt + GREEDY.max_tokens) + 1)
    try:
        assert small.kv_tokens < 3 * (prompt + GREEDY.max_tokens)
        got = [g.choices[0].token_ids for g in small.generate(requests)]
        assert small.steps >= 3 * max(len(answer) for answer in got)
    finally:
        small.close()
    assert_same_greedy_tokens(transformers_model, prompts, expected, got)  # batched two, not six, at a time


def test_token_id_prompts_stop_strings_and_seeds(sessions):
    _, llama = sessions
    ids = llama.prompt_ids(GenerationRequest(messages=QUESTIONS[1]))
    (by_ids,) = llama.generate([GenerationRequest(prompt=ids, params=GREEDY)])
    (by_messages,) = llama.generate([GenerationRequest(messages=QUESTIONS[1], params=GREEDY)])
    assert by_ids.choices == by_messages.choices
    text = by_ids.choices[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    (cut,) = llama.generate(
        [GenerationRequest(prompt=ids, params=SamplingParams(max_tokens=10, temperature=0, stop=(stop,)))]
    )
    assert cut.choices[0].text == text[: text.find(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = list(
        llama.stream(GenerationRequest(prompt=ids, params=SamplingParams(max_tokens=10, temperature=0, stop=(stop,))))
    )
    assert stop not in "".join(d.text for d in streamed)
    sampled = SamplingParams(max_tokens=8, temperature=1.0, seed=7, n=3)
    first, again = (llama.generate([GenerationRequest(prompt=ids, params=sampled)])[0] for _ in range(2))
    assert first.choices == again.choices and len({c.token_ids for c in first.choices}) > 1
    unseeded = SamplingParams(max_tokens=8, temperature=1.0, n=3)  # after a seeded request: still fresh draws
    drawn = [
        c.token_ids
        for _ in range(2)
        for c in llama.generate([GenerationRequest(prompt=ids, params=unseeded)])[0].choices
    ]
    assert len(set(drawn)) > 3


def test_requests_it_cannot_serve_fail_in_one_line(sessions):
    _, llama = sessions
    with pytest.raises(EngineError, match="unknown model 'other'"):
        llama.check(GenerationRequest(messages=QUESTIONS[0], model="other"))
    with pytest.raises(EngineError, match="exceeds the context length"):
        llama.check(GenerationRequest(prompt=[1] * 10, params=SamplingParams(max_tokens=llama.context_length)))
    with pytest.raises(EngineError, match="outside the vocabulary"):
        llama.check(GenerationRequest(prompt=[10**7]))
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}]
    with pytest.raises(EngineError, match="text messages only"):
        llama.check(GenerationRequest(messages=image))


def test_adapters_load_and_unload_while_serving(tiny_models, varied_lora_run, sessions, session_cache):
    _, llama = sessions
    as_run = [
        g.choices[0].token_ids
        for g in llama.generate([GenerationRequest(messages=q, params=GREEDY) for q in QUESTIONS])
    ]
    base = start("llamacpp", tiny_models("qwen2"))
    try:
        plain = [
            g.choices[0].token_ids
            for g in base.generate([GenerationRequest(messages=q, params=GREEDY) for q in QUESTIONS])
        ]
        base.load_adapter("tuned", str(varied_lora_run / "model"))  # a PEFT folder, converted for this base
        assert base.models == ["m", "tuned"]
        tuned = base.generate([GenerationRequest(messages=q, params=GREEDY, model="tuned") for q in QUESTIONS])
        # the adapter applied at run time answers as the run's own, converted with it
        assert [g.choices[0].token_ids for g in tuned] == as_run != plain
        again = base.generate([GenerationRequest(messages=q, params=GREEDY) for q in QUESTIONS])
        assert [g.choices[0].token_ids for g in again] == plain  # the base, without the adapter
        # arriving together, the requests for the adapter run first, then those for the base
        mixed = base.generate(
            [GenerationRequest(messages=q, params=GREEDY, model=model) for model in ("tuned", "m") for q in QUESTIONS]
        )
        assert [g.choices[0].token_ids for g in mixed] == as_run + plain
        base.unload_adapter("tuned")
        with pytest.raises(EngineError, match="unknown model 'tuned'"):
            base.check(GenerationRequest(messages=QUESTIONS[0], model="tuned"))
    finally:
        base.close()
    converted = set((session_cache / "gguf").glob("*/*.gguf"))
    llamacpp = get_registry(ENGINES).get("llamacpp")
    llamacpp.start(str(tiny_models("qwen2")), adapters={"tuned": varied_lora_run / "model"}).close()
    assert set((session_cache / "gguf").glob("*/*.gguf")) == converted  # the base and the adapter: from the cache


def test_engine_auto_takes_llamacpp_on_a_machine_without_a_gpu():
    import torch

    from modelloop.inference.choice import find_engine

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: which engine ranks first depends on the llama.cpp build")
    assert find_engine("auto").name == "llamacpp"


def test_the_openai_api_serves_it(sessions):
    from openai import OpenAI

    from modelloop.inference.serving import openai_url

    _, llama = sessions
    (expected,) = llama.generate([GenerationRequest(messages=QUESTIONS[2], params=GREEDY)])
    with openai_url(llama) as url:
        client = OpenAI(base_url=url, api_key="none")
        answer = client.chat.completions.create(model="m", messages=QUESTIONS[2], max_tokens=10, temperature=0)
        chunks = client.chat.completions.create(
            model="m", messages=QUESTIONS[2], max_tokens=10, temperature=0, stream=True
        )
        streamed = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert answer.choices[0].message.content == streamed == expected.choices[0].text


def test_eval_through_llamacpp_scores_as_through_hf(varied_lora_run, tmp_path):
    from modelloop.stages.evaluate import evaluate

    scores = {}
    for engine in ("hf", "llamacpp"):
        result = evaluate(
            str(varied_lora_run),
            SUM_PROMPTS,
            metrics=["accuracy"],
            engine=engine,
            output_dir=tmp_path / engine,
            max_tokens=8,
        )
        answers = [json.loads(line)["response"] for line in (Path(result["run_dir"]) / "results.jsonl").open()]
        scores[engine] = result["summary"]["accuracy"], answers
    assert abs(scores["hf"][0] - scores["llamacpp"][0]) <= 0.02
    # the same answer to most prompts: the rest part at a close call of the random tiny model
    same = sum(a == b for a, b in zip(scores["hf"][1], scores["llamacpp"][1]))
    assert same >= 0.85 * len(scores["hf"][1])


def test_grpo_trains_with_llamacpp_rollouts(tiny_models, tmp_path):
    """Episodes of the arithmetic quiz, their second turns sent to llama.cpp as token ids."""
    prompts = tmp_path / "prompts.jsonl"
    rows = [
        {"prompt": [{"role": "user", "content": f"What is {a}+{b}?"}], "solution": str(a + b)}
        for a in range(4)
        for b in range(4)
    ]
    prompts.write_text("".join(json.dumps(row) + "\n" for row in rows))
    modelloop.rlhf(
        {
            "model": str(tiny_models("qwen2")),
            "method": "grpo",
            "data": [str(prompts)],
            # the tiny model is never right: the length reward varies between completions
            # (each episode's two answers and the question between them)
            "rewards": ["accuracy", "length"],
            "reward_options": {"length": {"min_chars": 200}},
            "tuner": "lora",
            "rollout_engine": "llamacpp",
            "environment": "arithmetic",
            "environment_options": {"rounds": 2},
            "sync_steps": 1,
            "num_generations": 4,
            "batch_size": 8,
            "max_completion_length": 8,
            "max_steps": 2,
            "logging_steps": 1,
            "lr": 1e-2,
            "output_dir": str(tmp_path / "grpo"),
        }
    )
    records = [json.loads(line) for line in (tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in records if "rewards/length/mean" in r]) == 2
    assert len([r for r in records if "rewards/environment/mean" in r]) == 2
    from safetensors.torch import load_file

    adapter = load_file(tmp_path / "grpo" / "model" / "adapter_model.safetensors")
    assert any(float(t.abs().max()) > 0 for name, t in adapter.items() if "lora_B" in name)  # B starts at zero
