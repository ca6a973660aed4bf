"""The generic family on architectures no plugin claims: it loads them, trains a LoRA step
on the linear layers it infers, and says in one line each what it could not infer (a chat
template, LoRA targets) and how to supply it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

import modelloop
from modelloop.builtin.generic_family import linear_layers, not_inferred
from modelloop.chat import resolve_chat_format
from modelloop.models.loading import load_model, resolve_family
from modelloop.models.new_model import generated_corpus, train_tokenizer
from modelloop.registry import TEMPLATES, get_registry
from modelloop.specs import TokenizerRecipe

#: Tiny shapes of architectures no shipped plugin claims, and a module of each that LoRA
#: must reach: their attention projections are named three different ways.
ARCHITECTURES = {
    "olmo2": ({}, "self_attn.q_proj"),
    "starcoder2": ({"use_bias": True}, "self_attn.q_proj"),
    "falcon": ({"new_decoder_architecture": True, "num_kv_heads": 2}, "self_attention.query_key_value"),
}
SHAPE = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
}
RECIPE = TokenizerRecipe(
    split_regex=r"\p{N}{1,3}| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+",
    nfc=False,
    special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
    eos_token="<|im_end|>",
    pad_token="<|endoftext|>",
)


@pytest.fixture(scope="module")
def tokenizer():
    """A small byte-level BPE with ChatML's tokens, and the ChatML template."""
    trained = train_tokenizer(RECIPE, generated_corpus(lines=400), 400)
    trained.chat_template = get_registry(TEMPLATES).get("chatml").source
    return trained


def build(folder: Path, model_type: str, tokenizer, *, chat_template: bool = True) -> Path:
    fields, _ = ARCHITECTURES[model_type]
    config = AutoConfig.for_model(
        model_type,
        **SHAPE,
        **fields,
        vocab_size=len(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    template, tokenizer.chat_template = tokenizer.chat_template, tokenizer.chat_template if chat_template else None
    try:
        tokenizer.save_pretrained(folder)
    finally:
        tokenizer.chat_template = template
    return folder


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    """Each test sees the warnings its own loads give (they are said once a process)."""
    monkeypatch.setattr("modelloop.log._said", set())


def warnings(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("modelloop: warning:")]


@pytest.mark.parametrize("model_type", list(ARCHITECTURES))
def test_an_unclaimed_architecture_loads_and_trains_a_lora_step_on_inferred_targets(
    model_type, tokenizer, tmp_path, capsys
):
    folder = build(tmp_path / model_type, model_type, tokenizer)
    loaded = load_model(folder)
    assert loaded.family.name == "generic" and loaded.model.config.model_type == model_type
    assert warnings(capsys) == [
        f"modelloop: warning: no installed plugin claims model type {model_type!r}; using the generic family"
    ]  # a chat template and linear layers: nothing else to say

    data = tmp_path / "data.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": f"What is {i}+1?"}, {"role": "assistant", "content": str(i + 1)}]}
        for i in range(8)
    ]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    run = modelloop.sft(
        {
            "model": str(folder),
            "data": [str(data)],
            "max_steps": 1,
            "batch_size": 8,
            "max_length": 32,
            "gradient_checkpointing": False,
            "output_dir": str(tmp_path / "run"),
        }
    )
    adapter = load_file(Path(run["run_dir"]) / "model" / "adapter_model.safetensors")
    _, attention = ARCHITECTURES[model_type]
    assert any(f".{attention}.lora_A" in name for name in adapter)
    mlp = [name for name in linear_layers(loaded.model) if "mlp" in name]
    assert mlp and all(any(f"{name}.lora_A" in key for key in adapter) for name in mlp)  # every linear layer
    assert not any("lm_head" in name for name in adapter)  # not the output layer


def test_a_tokenizer_without_a_chat_template_is_said_in_one_line_naming_the_flag(tokenizer, tmp_path, capsys):
    folder = build(tmp_path / "olmo2", "olmo2", tokenizer, chat_template=False)
    loaded = load_model(folder)
    load_model(folder)
    said = warnings(capsys)
    assert len(said) == 2 and "no installed plugin claims model type 'olmo2'" in said[0]
    assert said[1] == (
        f"modelloop: warning: {folder}: the tokenizer has no chat template and the generic family has none for "
        "model type 'olmo2'; to train or chat on conversations name one with --template NAME "
        "(config: template; `modelloop plugins` lists them)"
    )
    chat = resolve_chat_format(loaded.tokenizer, loaded.family, template="chatml")  # supplied as it says
    assert chat.render([{"role": "user", "content": "Hi"}], add_generation_prompt=True).endswith(
        "<|im_start|>assistant\n"
    )


def test_a_model_without_linear_layers_is_said_in_one_line_naming_the_option(tokenizer, tmp_path):
    """A model whose projections are of its own class, not ``torch.nn.Linear`` (as remote
    code may write them): the rule finds nothing for LoRA, and says what to set."""

    class Projection(torch.nn.Module):
        def __init__(self, linear: torch.nn.Linear) -> None:
            super().__init__()
            self.weight, self.bias = linear.weight, linear.bias

        def forward(self, x):
            return torch.nn.functional.linear(x, self.weight, self.bias)

    model = load_model(build(tmp_path / "olmo2", "olmo2", tokenizer)).model
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and module is not model.get_output_embeddings():
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, Projection(module))
    assert linear_layers(model) == []
    (line,) = not_inferred(model, tokenizer, "here")  # the tokenizer has a template: only this line
    assert line == (
        "here: the generic family finds no linear layers (torch.nn.Linear or Conv1D) to put LoRA on in model type "
        "'olmo2'; name the modules with --set tuner_options.targets=[NAME,...] (config: tuner_options.targets), "
        "or train every weight with --tuner full"
    )


def test_no_shipped_plugin_claims_these_architectures():
    for model_type in ARCHITECTURES:
        assert resolve_family(model_type).name == "generic", f"{model_type} is claimed now: pick another architecture"
