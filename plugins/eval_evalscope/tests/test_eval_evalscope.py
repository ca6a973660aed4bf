"""EvalScope through modelloop, offline: its ``general_qa`` benchmark over a local JSONL file
written here, answered by the tiny LoRA run served with the hf engine (EvalScope lives in its
own Python: ``make`` builds ``.venv-evalscope`` and points MODELLOOP_EVALSCOPE_PYTHON at it).
The ROUGE-L recall must equal a count made by hand: 1 where the reference is the model's own
answer, 0 where it shares no word with it."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

import modelloop_eval_evalscope as evalscope
from modelloop.errors import ModelloopError
from modelloop.inference.types import GenerationRequest, SamplingParams
from modelloop.registry import ENGINES, get_registry
from modelloop.stages.benchmark import AnswersFrom, benchmark

HAVE_EVALSCOPE = bool(os.environ.get(evalscope.PYTHON_VARIABLE)) or importlib.util.find_spec("evalscope") is not None
needs_evalscope = pytest.mark.skipif(
    not HAVE_EVALSCOPE, reason=f"set {evalscope.PYTHON_VARIABLE} to EvalScope's Python (make test does)"
)

QUESTIONS = [f"What is {i}+1?" for i in range(6)]
RIGHT = (0, 1, 4)
MAX_TOKENS = 6
UNRELATED = "zebra quartz"


@pytest.fixture(scope="module")
def qa_folder(lora_run, tmp_path_factory):
    """``example.jsonl`` in general_qa's format, its references the served model's own
    greedy answers for RIGHT, an unrelated phrase for the rest."""
    session = get_registry(ENGINES).get("hf").start(str(lora_run[0]), options={"served_name": "model"})
    try:
        answers = session.generate(
            [
                GenerationRequest(
                    messages=[{"role": "user", "content": question}],
                    params=SamplingParams(max_tokens=MAX_TOKENS, temperature=0),
                )
                for question in QUESTIONS
            ]
        )
    finally:
        session.close()
    texts = [answer.choices[0].text for answer in answers]
    assert all(text.strip() and UNRELATED.split()[0] not in text for text in texts)
    folder = tmp_path_factory.mktemp("evalscope-tasks")
    rows = [
        {"query": question, "response": text if index in RIGHT else UNRELATED}
        for index, (question, text) in enumerate(zip(QUESTIONS, texts))
    ]
    (folder / "example.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


@needs_evalscope
def test_general_qa_through_the_served_model_scores_a_hand_count(lora_run, qa_folder, tmp_path):
    result = benchmark(
        str(lora_run[0]),
        ["general_qa"],
        backend="evalscope",
        task_dirs=[qa_folder],
        # the question as it is, no instruction around it: the hand count asked exactly that
        options={"max_tokens": MAX_TOKENS, "dataset_args": {"general_qa": {"prompt_template": "{question}"}}},
        output_dir=tmp_path / "eval",
    )
    scores = result["summary"]
    assert scores["general_qa.rouge.statistic_recall.variant_l"] == pytest.approx(len(RIGHT) / len(QUESTIONS))
    assert result["benchmarks"]["evalscope:general_qa"]["examples"] == len(QUESTIONS)
    assert not any(name.startswith("general_qa.bleu") for name in scores)  # NLTK's data is not here: not a 0


@needs_evalscope
def test_a_task_that_needs_the_network_or_does_not_exist_fails_in_one_line(lora_run, tmp_path):
    nowhere = AnswersFrom(endpoint="http://127.0.0.1:9/v1", served_name="model")
    with pytest.raises(ModelloopError) as raised:
        benchmark(
            str(lora_run[0]), ["no_such_benchmark"], backend="evalscope", answers=nowhere, output_dir=tmp_path / "a"
        )
    assert str(raised.value).startswith("evalscope has no task 'no_such_benchmark'")
    with pytest.raises(ModelloopError) as raised:
        benchmark(str(lora_run[0]), ["gsm8k"], backend="evalscope", answers=nowhere, limit=2, output_dir=tmp_path / "b")
    message = str(raised.value)
    assert message.startswith("evalscope task 'gsm8k' needs its data from the network") and "\n" not in message


def test_a_custom_benchmark_without_its_files_and_a_missing_environment_are_said_first(lora_run, tmp_path, monkeypatch):
    if HAVE_EVALSCOPE:
        with pytest.raises(ModelloopError, match=r"'general_qa' reads your own files \(\*\.jsonl\): give their folder"):
            benchmark(str(lora_run[0]), ["general_qa"], backend="evalscope", output_dir=tmp_path / "a")
    monkeypatch.setenv(evalscope.PYTHON_VARIABLE, str(tmp_path / "no" / "python"))
    with pytest.raises(ValueError, match="EvalScope's Python .* does not exist"):
        evalscope.check({})
    if importlib.util.find_spec("evalscope") is None:  # as in modelloop's own environment
        monkeypatch.delenv(evalscope.PYTHON_VARIABLE)
        with pytest.raises(ModelloopError, match="evalscope eval backend: EvalScope runs from its own Python"):
            benchmark(str(lora_run[0]), ["general_qa"], backend="evalscope", output_dir=tmp_path / "b")
        assert not (tmp_path / "b").exists()  # refused before a run folder or a model
