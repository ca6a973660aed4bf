"""GGUF exports of the tiny families, loaded back by llama.cpp: the f16 export answers as
the run does, token for token; quantised ones are smaller and still answer; the chat
template and end of turn the run trained with are in the GGUF and the Modelfile; a LoRA
run exports as a GGUF adapter on its base."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from conftest import assert_same_greedy_tokens
from modelloop.cli import build_cli
from modelloop.export import trained_chat_format
from modelloop.inference.types import GenerationRequest, SamplingParams
from modelloop.registry import ENGINES, get_registry

pytest.importorskip("llama_cpp")
import modelloop_export_gguf as gguf  # noqa: E402

GREEDY = SamplingParams(max_tokens=12, temperature=0)
QUESTIONS = [[{"role": "user", "content": f"What is {i}+1?"}] for i in (3, 8, 14, 21, 30, 42, 47, 55)]


def export(source, out, quant, *options):
    flags = [f"--export-option={option}" for option in options]
    result = CliRunner().invoke(
        build_cli(), ["export", str(source), "--merge", "--quant", quant, "--out", str(out), *flags]
    )
    assert result.exit_code == 0, result.output
    return out


def answers(model, questions=QUESTIONS, engine="llamacpp"):
    session = get_registry(ENGINES).get(engine).start(str(model), options={"served_name": "m"})
    try:
        return [
            g.choices[0] for g in session.generate([GenerationRequest(messages=q, params=GREEDY) for q in questions])
        ]
    finally:
        session.close()


def metadata(path):
    import llama_cpp

    model = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        return dict(model.metadata)
    finally:
        model.close()


@pytest.fixture(scope="module")
def run(varied_lora_run):
    return varied_lora_run


@pytest.fixture(scope="module")
def f16(run, tmp_path_factory):
    return export(run, tmp_path_factory.mktemp("gguf") / "f16", "gguf-f16")


def prompt_ids(model):
    from modelloop.models.loading import load_tokenizer

    chat = trained_chat_format(model)
    tokenizer = load_tokenizer(str(model / "model"))
    return [
        tokenizer(chat.render(q, add_generation_prompt=True), add_special_tokens=False)["input_ids"] for q in QUESTIONS
    ]


def test_the_f16_export_answers_as_the_merged_run_token_for_token(run, f16, tmp_path):
    from transformers import AutoModelForCausalLM

    merged = export(run, tmp_path / "merged", "merged")
    expected = answers(merged, engine="hf")
    got = answers(f16)
    model = AutoModelForCausalLM.from_pretrained(merged).eval()
    assert_same_greedy_tokens(model, prompt_ids(run), [c.token_ids for c in expected], [c.token_ids for c in got])
    assert len({c.token_ids for c in got}) > 1  # the answers differ: matching them is not matching one repeated token
    manifest = json.loads((f16 / "manifest.json").read_text())
    assert (
        manifest["format"] == "gguf-f16" and manifest["parent"] == json.loads((run / "manifest.json").read_text())["id"]
    )
    assert sorted(p.name for p in f16.iterdir()) == ["Modelfile", "manifest.json", "model.gguf"]


def test_the_gguf_carries_the_template_and_the_end_of_turn_it_was_trained_with(run, f16):
    import llama_cpp

    chat = trained_chat_format(run)
    found = metadata(f16 / "model.gguf")
    assert found["tokenizer.chat_template"] == chat.source
    model = llama_cpp.Llama(model_path=str(f16 / "model.gguf"), vocab_only=True, verbose=False)
    end = model.tokenize(chat.end_of_turn[0].encode(), add_bos=False, special=True)
    assert len(end) == 1 and llama_cpp.llama_vocab_is_eog(llama_cpp.llama_model_get_vocab(model.model), end[0])
    modelfile = (f16 / "Modelfile").read_text()
    assert modelfile.startswith('FROM ./model.gguf\nTEMPLATE """')
    assert f'PARAMETER stop "{chat.end_of_turn[0]}"' in modelfile


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_the_modelfile_template_renders_conversations_as_the_chat_template(tiny_models, family):
    chat = trained_chat_format(tiny_models(family))
    turns = gguf.Turns.of(chat)
    assert turns is not None
    conversations = [
        [{"role": "user", "content": "hi"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
        [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": "{{ c }}"},
        ],
    ]
    for messages in conversations:
        assert turns.render(messages) == chat.render(messages, add_generation_prompt=True)
    template = turns.go_template()
    assert template.count("{{ .Content }}") == 1 and turns.prompt in template


def test_quantised_exports_are_smaller_and_still_answer(run, f16, tmp_path):
    sizes = {"gguf-f16": (f16 / "model.gguf").stat().st_size}
    first = {"gguf-f16": [c.token_ids[0] for c in answers(f16)]}
    for quant in ("gguf-q8_0", "gguf-q4_k_m"):
        out = export(run, tmp_path / quant, quant)
        sizes[quant] = (out / "model.gguf").stat().st_size
        first[quant] = [c.token_ids[0] for c in answers(out)]
    assert sizes["gguf-f16"] > 1.5 * sizes["gguf-q8_0"] > 1.5 * 1.2 * sizes["gguf-q4_k_m"]
    # q8_0 keeps the first answer token of (nearly) every prompt; 4 bits move a random
    # tiny model's close logits too far for that, and only have to load and answer
    assert sum(a == b for a, b in zip(first["gguf-q8_0"], first["gguf-f16"])) >= len(QUESTIONS) - 1
    assert len(first["gguf-q4_k_m"]) == len(QUESTIONS)
    assert metadata(tmp_path / "gguf-q4_k_m" / "model.gguf")["general.file_type"] == "15"  # LLAMA_FTYPE_MOSTLY_Q4_K_M


def test_a_lora_run_exports_as_a_gguf_adapter_on_its_base(run, tmp_path):
    out = export(run, tmp_path / "lora", "gguf-lora")
    assert {"base.gguf", "adapter.gguf", "Modelfile"} <= {p.name for p in out.iterdir()}
    assert "FROM ./base.gguf\nADAPTER ./adapter.gguf\n" in (out / "Modelfile").read_text()
    # the base with the adapter applied answers as the merged export, both converted by llama.cpp
    assert [c.token_ids for c in answers(out)] == [c.token_ids for c in answers(run)]


def test_llama_cpp_tokenises_the_llama_family_as_transformers_does(tiny_models, tmp_path):
    from transformers import AutoTokenizer

    source = tiny_models("llama")
    out = export(source, tmp_path / "llama", "gguf-f16")
    tokenizer = AutoTokenizer.from_pretrained(source)
    chat = trained_chat_format(source)
    session = get_registry(ENGINES).get("llamacpp").start(str(out), options={})
    try:
        for text in ("What is 12+345?", "  spaced\n\nlines\tand tabs", "naïve café 😀 1234567"):
            messages = [{"role": "user", "content": text}]
            expected = tokenizer(chat.render(messages, add_generation_prompt=True), add_special_tokens=False)
            assert session.prompt_ids(GenerationRequest(messages=messages)) == expected["input_ids"]
    finally:
        session.close()


def test_a_tokenizer_llama_cpp_does_not_know_needs_its_pre_tokenizer_named(tiny_models, tmp_path):
    source = tmp_path / "odd"
    shutil.copytree(tiny_models("qwen2"), source)
    assert gguf.pre_tokenizer_of(source) == "qwen2"  # a family's rule: named for llama.cpp
    tokenizer = json.loads((source / "tokenizer.json").read_text())
    tokenizer["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\s+|\S+"
    (source / "tokenizer.json").write_text(json.dumps(tokenizer))
    assert gguf.pre_tokenizer_of(source) is None
    chat = trained_chat_format(source)
    with pytest.raises(gguf.GGUFError, match="pass --export-option pre_tokenizer=NAME"):
        gguf.convert_model(source, tmp_path / "a.gguf", chat)
    gguf.convert_model(source, tmp_path / "b.gguf", chat, pre_tokenizer="qwen2")
    assert metadata(tmp_path / "b.gguf")["tokenizer.ggml.pre"] == "qwen2"


def test_a_misspelt_export_option_is_refused_naming_the_right_one(tiny_models, tmp_path):
    result = CliRunner().invoke(
        build_cli(),
        ["export", str(tiny_models("qwen2")), "--quant", "gguf-f16", "--out", str(tmp_path / "x"),
         "--export-option", "pre_tokeniser=qwen2"],
    )  # fmt: skip
    assert result.exit_code != 0 and "no option 'pre_tokeniser'; its options: pre_tokenizer" in result.output
    assert not (tmp_path / "x").exists()


def test_gguf_lora_refuses_a_model_without_an_adapter(tiny_models, tmp_path):
    result = CliRunner().invoke(
        build_cli(), ["export", str(tiny_models("qwen2")), "--quant", "gguf-lora", "--out", str(tmp_path / "x")]
    )
    assert result.exit_code != 0 and "is not a LoRA run" in result.output


def test_an_adapter_the_converter_cannot_read_fails_in_one_line_and_leaves_the_process_as_it_was(tiny_models, tmp_path):
    import logging
    import sys

    (tmp_path / "adapter").mkdir()  # no adapter_config.json, no weights
    argv, handlers = list(sys.argv), list(logging.root.handlers)
    with pytest.raises(gguf.GGUFError, match="convert_lora_to_gguf.py failed") as failure:
        gguf.convert_adapter(tmp_path / "adapter", tiny_models("qwen2"), tmp_path / "a.gguf")
    assert "\n" not in str(failure.value) and not (tmp_path / "a.gguf").exists()
    assert sys.argv == argv and logging.root.handlers == handlers  # converted in this process, put back
