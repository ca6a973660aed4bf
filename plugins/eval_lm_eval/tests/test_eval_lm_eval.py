"""lm-evaluation-harness through modelloop, offline: two tasks written here in lm-eval's own
YAML format over local JSONL (one that generates, one that scores choices by their
log-probabilities), run on the tiny LoRA run; the scores must equal a count made by hand
from the same model's answers, in-process and through the hf engine's OpenAI endpoint."""

from __future__ import annotations

import json

import pytest
import torch

from modelloop.errors import ModelloopError
from modelloop.models.loading import load_model, merged_model
from modelloop.stages.benchmark import AnswersFrom, benchmark

QUESTIONS = [f"What is {i}+1?" for i in range(8)]
PROMPT = "Q: {question}\nA:"
MAX_TOKENS = 6
#: the reference is the model's own answer for these questions, and a wrong one for the rest
RIGHT = (0, 2, 3, 5, 6)

GENERATE_TASK = """
task: tiny_sums
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: {max_tokens}
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""

CHOICE_TASK = """
task: tiny_choices
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def greedy_answer(model, tokenizer, question: str) -> str:
    """What lm-eval's generate_until asks for, computed here: greedy tokens after the
    prompt, decoded without special tokens, cut at the first newline."""
    ids = tokenizer(PROMPT.format(question=question), return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=MAX_TOKENS, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).split("\n")[0]


def choice_logprob(model, tokenizer, question: str, choice: str) -> float:
    """The summed log-probability of `` choice`` after the prompt, as lm-eval scores a choice."""
    context = tokenizer(PROMPT.format(question=question)).input_ids
    whole = tokenizer(PROMPT.format(question=question) + " " + choice).input_ids
    with torch.no_grad():
        logits = model(torch.tensor([whole])).logits[0].log_softmax(-1)
    return sum(float(logits[position - 1, whole[position]]) for position in range(len(context), len(whole)))


@pytest.fixture(scope="module")
def tasks(lora_run, tmp_path_factory):
    """The two tasks, with references chosen from the LoRA run's own answers, and the
    scores a hand count expects."""
    folder = tmp_path_factory.mktemp("lm-eval-tasks")
    loaded = load_model(lora_run[0])
    model = merged_model(loaded).eval()
    sums, choices = [], []
    for index, question in enumerate(QUESTIONS):
        answer = greedy_answer(model, loaded.tokenizer, question)
        sums.append({"question": question, "answer": answer if index in RIGHT else answer + " no"})
        options = [str(index + 1), str(index + 7)]
        scores = [choice_logprob(model, loaded.tokenizer, question, option) for option in options]
        best = max(range(2), key=scores.__getitem__)
        choices.append({"question": question, "choices": options, "label": best if index in RIGHT else 1 - best})
    for name, rows, template in (("sums", sums, GENERATE_TASK), ("choices", choices, CHOICE_TASK)):
        data = folder / f"{name}.jsonl"
        data.write_text("".join(json.dumps(row) + "\n" for row in rows))
        (folder / f"{name}.yaml").write_text(template.format(data=data, max_tokens=MAX_TOKENS))
    return folder


def test_in_process_scores_match_a_hand_count_of_the_models_answers(lora_run, tasks, tmp_path):
    result = benchmark(
        str(lora_run[0]),
        ["tiny_sums", "tiny_choices"],
        task_dirs=[tasks],
        limit=6,
        options={"batch_size": 1},
        output_dir=tmp_path / "eval",
    )
    expected = sum(index in RIGHT for index in range(6)) / 6
    assert result["summary"] == {"tiny_sums.exact_match": expected, "tiny_choices.acc": expected}
    assert result["benchmarks"]["lm-eval:tiny_sums"]["examples"] == 6
    answers = [json.loads(line) for line in (tmp_path / "eval" / "benchmarks" / "tiny_sums.jsonl").open()]
    assert [row["doc_id"] for row in answers] == list(range(6))
    assert [row["exact_match"] for row in answers] == [float(index in RIGHT) for index in range(6)]


def test_through_the_hf_engines_endpoint_generation_scores_the_same(lora_run, tasks, tmp_path):
    result = benchmark(
        str(lora_run[0]),
        ["tiny_sums"],
        answers=AnswersFrom(engine="hf"),
        task_dirs=[tasks],
        options={"num_concurrent": 1},
        output_dir=tmp_path / "eval",
    )
    assert result["summary"] == {"tiny_sums.exact_match": len(RIGHT) / len(QUESTIONS)}


def test_a_task_scored_by_log_probabilities_is_refused_where_the_server_gives_none(lora_run, tasks, tmp_path):
    with pytest.raises(ModelloopError) as raised:
        benchmark(
            str(lora_run[0]), ["tiny_choices"], answers=AnswersFrom(engine="hf"), task_dirs=[tasks], output_dir=tmp_path
        )
    message = str(raised.value)
    assert "tiny_choices" in message and "log-probabilities" in message and "\n" not in message
    assert json.loads((tmp_path / "manifest.json").read_text())["status"] == "failed"


def test_a_task_that_needs_the_network_or_does_not_exist_fails_in_one_line(lora_run, tmp_path):
    nowhere = AnswersFrom(endpoint="http://127.0.0.1:9/v1", served_name="model")  # never asked: the task fails first
    with pytest.raises(ModelloopError) as raised:
        benchmark(str(lora_run[0]), ["gsm8k"], answers=nowhere, output_dir=tmp_path / "a")
    assert str(raised.value).startswith("lm-eval task 'gsm8k' needs its data from the network")
    assert "openai/gsm8k" in str(raised.value) and "\n" not in str(raised.value)
    with pytest.raises(ModelloopError, match=r"lm-eval has no task 'gsm8kk' \(close: gsm8k"):
        benchmark(str(lora_run[0]), ["gsm8kk"], answers=nowhere, output_dir=tmp_path / "b")


def test_options_are_checked_before_anything_loads():
    from modelloop_eval_lm_eval import check

    assert check({})["num_fewshot"] is None
    for bad, message in (({"num_fewshot": -1}, "num_fewshot"), ({"batch_size": 0}, "batch_size"), ({"x": 1}, "'x'")):
        with pytest.raises(ValueError, match=message):
            check(bad)
