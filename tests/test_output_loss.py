"""The loss computed in the output layer: the same loss and gradients as the model's own,
without ever holding the full logits, through every wrapper a model meets."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

import modelloop
from modelloop.chat import resolve_chat_format
from modelloop.data.packing import collate_packed, collate_padded, pack
from modelloop.data.tokenize import prepare_data
from modelloop.models import output_loss
from modelloop.models.loading import load_model
from modelloop.models.output_loss import OutputLayerLoss, chunked_linear_cross_entropy, unsupported_reason
from modelloop.registry import TUNERS, get_registry
from modelloop.training import shifted_labels, slices_logits_by_mask

REPO = Path(__file__).resolve().parent.parent
SHAPES = REPO / "examples" / "data" / "shapes.jsonl"


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of a few rows, so that every test crosses chunk boundaries."""
    monkeypatch.setattr(output_loss, "CHUNK_ELEMENTS", 7 * 2000)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("weight_trains", [False, True])
def test_chunked_cross_entropy_equals_the_plain_one_with_its_gradients(small_chunks, bias, weight_trains):
    torch.manual_seed(0)
    hidden = torch.randn(45, 32, requires_grad=True)
    weight = torch.randn(2000, 32, requires_grad=weight_trains)
    offset = torch.randn(2000, requires_grad=True) if bias else None
    labels = torch.randint(0, 2000, (45,))

    plain = (
        torch.nn.functional.cross_entropy(torch.nn.functional.linear(hidden, weight, offset), labels, reduction="sum")
        / 3
    )
    wanted = torch.autograd.grad(plain, [t for t in (hidden, weight, offset) if t is not None and t.requires_grad])
    chunked = chunked_linear_cross_entropy(hidden, weight, offset, labels) / 3
    got = torch.autograd.grad(chunked, [t for t in (hidden, weight, offset) if t is not None and t.requires_grad])

    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-4)
    for mine, theirs in zip(got, wanted):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5)


def test_chunked_cross_entropy_multiplies_in_the_autocast_type_and_keeps_the_inputs_types(small_chunks):
    torch.manual_seed(0)
    hidden = torch.randn(20, 32, requires_grad=True)
    weight = torch.randn(2000, 32, requires_grad=True)
    labels = torch.randint(0, 2000, (20,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = chunked_linear_cross_entropy(hidden, weight, None, labels)
    loss.backward()
    plain = torch.nn.functional.cross_entropy(
        hidden.bfloat16().float() @ weight.bfloat16().float().t(), labels, reduction="sum"
    )
    assert loss.dtype == torch.float32 and hidden.grad.dtype == weight.grad.dtype == torch.float32
    torch.testing.assert_close(loss, plain, rtol=1e-2, atol=1e-2)


def test_without_gradients_the_loss_is_the_same_and_no_gradient_is_computed(small_chunks, monkeypatch):
    """Evaluation runs under no_grad: the same loss, and the softmax is never turned into a gradient."""
    hidden, weight, labels = (
        torch.randn(10, 32, requires_grad=True),
        torch.randn(2000, 32, requires_grad=True),
        torch.randint(0, 2000, (10,)),
    )
    with_gradients = chunked_linear_cross_entropy(hidden, weight, None, labels)
    exponentials = []
    monkeypatch.setattr(torch.Tensor, "exp_", lambda self: exponentials.append(self) or torch.exp(self, out=self))
    with torch.no_grad():
        loss = chunked_linear_cross_entropy(hidden, weight, None, labels)
    assert loss.grad_fn is None and not exponentials
    torch.testing.assert_close(loss, with_gradients.detach())


def chats(tmp_path: Path) -> Path:
    rows = [
        {"messages": [{"role": "user", "content": f"Spell {word}"}, {"role": "assistant", "content": " ".join(word)}]}
        for word in ["abc", "river", "tiger", "xy", "banana", "q", "violet", "zebra"]
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def prepared(model, tuner_name: str, family, **options):
    """The model as the tuner prepares it (LoRA without dropout: two passes must match)."""
    tuner = get_registry(TUNERS).get(tuner_name)
    options = {"dropout": 0.0, **options} if tuner_name == "lora" else options
    torch.manual_seed(0)
    return tuner.prepare(model, tuner.check(options) if tuner.check else options, family).train()


def model_and_batch(folder: Path, data: Path, *, packed: bool, tuner: str, untied: bool = False):
    loaded = load_model(folder, dtype="fp32")
    model = loaded.model
    if untied:
        model.config.tie_word_embeddings = False
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone() + 0.01)
    model = prepared(model, tuner, loaded.family)
    tokenizer = loaded.tokenizer
    tokens = prepare_data(
        [data], tokenizer, resolve_chat_format(tokenizer, loaded.family), max_length=96, use_cache=False
    )
    if packed:
        batch = collate_packed(pack(tokens.input_ids, tokens.labels, max_length=96), tokenizer.pad_token_id)
    else:
        batch = collate_padded(tokens.input_ids, tokens.labels, tokenizer.pad_token_id)
    return model, batch


def losses_and_gradients(model, batch):
    """(the model's own loss, its gradients), (the output layer's loss, its gradients)."""
    trained = [(name, p) for name, p in model.named_parameters() if p.requires_grad]

    def gradients():
        found = {name: p.grad.clone() for name, p in trained if p.grad is not None}
        model.zero_grad()
        return found

    model.zero_grad()
    own = model(**batch).loss
    own.backward()
    own_gradients = gradients()
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    with OutputLayerLoss(model).computing(shifted_labels(batch["labels"])):
        mine = model(**inputs).logits
    mine.backward()
    return (own.detach(), own_gradients), (mine.detach(), gradients())


def assert_same(model, batch):
    (own, own_gradients), (mine, my_gradients) = losses_and_gradients(model, batch)
    torch.testing.assert_close(mine, own, rtol=1e-5, atol=1e-5)
    assert set(my_gradients) == set(own_gradients) and own_gradients
    for name, gradient in own_gradients.items():
        torch.testing.assert_close(my_gradients[name], gradient, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("tuner", ["full", "lora"])
def test_the_output_layer_gives_the_models_own_loss_and_gradients(small_chunks, tiny_models, tmp_path, packed, tuner):
    model, batch = model_and_batch(tiny_models("qwen2"), chats(tmp_path), packed=packed, tuner=tuner)
    assert model.config.tie_word_embeddings  # the output layer shares the embeddings' weight
    assert unsupported_reason(model) is None
    assert_same(model, batch)


def test_an_untied_output_layer_trains_its_own_weight(small_chunks, tiny_models, tmp_path):
    model, batch = model_and_batch(tiny_models("llama"), chats(tmp_path), packed=True, tuner="full", untied=True)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert_same(model, batch)


def test_a_vision_language_model_on_pictures(small_chunks, tiny_models):
    from modelloop.models.loading import load_media_tokens, read_config, resolve_family
    from modelloop.training import Collator

    folder = tiny_models("qwen2_vl")
    loaded = load_model(folder, dtype="fp32")
    family = resolve_family("qwen2_vl")
    images = load_media_tokens(family, folder, read_config(folder), loaded.tokenizer)
    tokens = prepare_data(
        [SHAPES], loaded.tokenizer, resolve_chat_format(loaded.tokenizer, family), max_length=256, media=images
    )
    items = list(zip(tokens.input_ids, tokens.labels, tokens.media))[:4]
    assert any(pictures for *_, pictures in items)
    batch = Collator(loaded.tokenizer.pad_token_id, packing=False, media=images)(items)
    assert "pixel_values" in batch
    model = prepared(loaded.model, "lora", family)
    assert_same(model, batch)


def liger_like_forward(self, input_ids=None, labels=None, logits_to_keep=0, **kwargs):
    """What Liger puts on a model instance: it slices the hidden states with
    ``logits_to_keep`` as an int or index tensor, so a boolean mask raises IndexError."""
    hidden = self.model(input_ids=input_ids, **kwargs).last_hidden_state
    kept = hidden[:, slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep, :]
    logits = self.lm_head(kept)
    loss = (
        self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size)
        if labels is not None
        else None
    )
    return CausalLMOutputWithPast(loss=loss, logits=logits)


def test_a_forward_an_accelerator_put_on_the_instance_gets_no_mask_and_the_same_loss(
    small_chunks, tiny_models, tmp_path
):
    from types import MethodType

    model, batch = model_and_batch(tiny_models("qwen2"), chats(tmp_path), packed=True, tuner="lora")
    model.get_base_model().forward = MethodType(liger_like_forward, model.get_base_model())
    assert not slices_logits_by_mask(model)  # a mask would crash it, as it crashed Liger's on the GPU
    assert_same(model, batch)


def test_output_layers_that_are_not_plain_keep_the_models_loss(tiny_models):
    loaded = load_model(tiny_models("qwen2"), dtype="fp32")
    model = prepared(loaded.model, "lora", loaded.family, modules_to_save=["lm_head"])
    assert "not a plain linear layer" in unsupported_reason(model)
    plain = load_model(tiny_models("qwen2"), dtype="fp32").model
    plain.config.final_logit_softcapping = 30.0
    assert "final_logit_softcapping" in unsupported_reason(plain)


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    found = {}
    for file in (run / "model").glob("*.safetensors"):
        found.update(load_file(file))
    return found


def test_sft_trains_the_same_with_the_loss_in_the_output_layer(tiny_models, tmp_path, monkeypatch):
    data = chats(tmp_path)
    settings = {
        "model": str(tiny_models("qwen2")),
        "data": [str(data)],
        "tuner": "full",
        "max_steps": 4,
        "batch_size": 4,
        "lr": 1e-3,
        "max_length": 64,
    }
    modelloop.sft({**settings, "output_dir": str(tmp_path / "chunked")})
    manifest = json.loads((tmp_path / "chunked" / "manifest.json").read_text())
    assert manifest["compute"]["loss"] == "in the output layer, chunked linear cross-entropy"
    assert manifest["compute"]["attention"] == "sdpa" and manifest["compute"]["precision"]["compute"] == "auto"

    monkeypatch.setattr(
        "modelloop.stages.train.output_layer_loss", lambda model, checked: (None, "from the model's logits")
    )
    modelloop.sft({**settings, "output_dir": str(tmp_path / "logits")})
    chunked, logits = final_weights(tmp_path / "chunked"), final_weights(tmp_path / "logits")
    assert chunked.keys() == logits.keys()
    start = load_model(tiny_models("qwen2"), dtype="fp32").model.state_dict()
    for name, weight in logits.items():
        assert not torch.equal(start[name], weight), name
        # Adam moves a weight by about lr a step whatever its gradient's size, so rounding
        # in a near-zero gradient shows up as a fraction of a step
        torch.testing.assert_close(chunked[name], weight, rtol=1e-3, atol=1e-4, msg=name)


FUSED_ACCELERATOR = (
    """
from types import MethodType

from transformers.modeling_outputs import CausalLMOutputWithPast

import modelloop
from modelloop.models.output_loss import chunked_linear_cross_entropy
from modelloop.specs import Accelerator

CALLS = []


def fused(hidden, weight, bias, labels):
    CALLS.append(hidden.shape[0])
    return chunked_linear_cross_entropy(hidden, weight, bias, labels)


def apply(model, family):
    model.forward = MethodType(liger_like_forward, model)
    return model


"""
    + inspect.getsource(liger_like_forward)
    + """

@modelloop.hookimpl
def register_accelerators(register):
    register(Accelerator(name="fused", apply=apply, model_types=("qwen2",), linear_cross_entropy=fused))
"""
)


def test_an_accelerators_fused_loss_is_used_and_its_forward_gets_no_mask(
    tiny_models, tmp_path, install_plugin, monkeypatch
):
    import importlib
    import os

    dist = install_plugin("modelloop-plugin-fused", FUSED_ACCELERATOR)
    monkeypatch.setenv("MODELLOOP_LOAD_PLUGINS", os.environ["MODELLOOP_LOAD_PLUGINS"] + "," + dist)
    result = modelloop.sft(
        {
            "model": str(tiny_models("qwen2")),
            "data": [str(chats(tmp_path))],
            "accelerators": ["fused"],
            "max_steps": 2,
            "batch_size": 4,
            "max_length": 64,
            "output_dir": str(tmp_path / "run"),
        }
    )
    plugin = importlib.import_module(
        next(name for name in __import__("sys").modules if name.startswith("modelloop_plugin_fused"))
    )
    assert len(plugin.CALLS) == 2 and all(rows > 0 for rows in plugin.CALLS)
    assert (
        json.loads((tmp_path / "run" / "manifest.json").read_text())["compute"]["loss"]
        == "in the output layer, fused's fused linear cross-entropy"
    )
    assert result["metrics"]["train_loss"] > 0
