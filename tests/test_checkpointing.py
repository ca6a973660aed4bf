"""Activation checkpointing: the gradients of a plain backward pass, and none for inputs nothing trains."""

from __future__ import annotations

import pytest
import torch

from modelloop.models.checkpointing import checkpoint_layers


def first_layer_inputs(model):
    """The hidden states the first decoder layer receives, kept as the forward pass sees them."""
    seen = []
    model.model.layers[0].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    return seen


def load(tiny_models, *, trained=("q_proj",)):
    """The tiny Qwen2 with only the named projections trainable (a frozen base, as under LoRA)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_models("qwen2"), dtype=torch.float32)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(any(f".{part}." in name for part in trained))
    return model.train()


def gradients(model, **inputs):
    model(**inputs).loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad and p.grad is not None}


@pytest.fixture
def batch():
    ids = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "labels": ids}


def test_checkpointed_layers_give_the_gradients_of_a_plain_backward_pass(tiny_models, batch):
    expected = gradients(load(tiny_models), **batch)
    model = load(tiny_models)
    checkpoint_layers(model)
    got = gradients(model, **batch)
    assert got.keys() == expected.keys() and any(".layers.0." in name for name in got)
    for name, gradient in expected.items():
        torch.testing.assert_close(got[name], gradient, rtol=1e-5, atol=1e-7)


def test_no_gradient_is_computed_for_the_frozen_embeddings_output(tiny_models, batch):
    reference = load(tiny_models)  # transformers' own reentrant checkpointing: the output gets one
    reference.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    seen = first_layer_inputs(reference)
    reference(**batch).loss.backward()
    assert seen[0].grad is not None

    model = load(tiny_models)
    checkpoint_layers(model)
    seen = first_layer_inputs(model)
    model(**batch).loss.backward()
    assert seen[0].requires_grad and seen[0].grad is None


def test_a_layer_fed_inputs_that_need_no_gradient_still_trains(tiny_models, batch):
    """As a vision tower's blocks are: a frozen patch embedding before them, adapters inside."""
    expected = gradients(
        load(tiny_models),
        inputs_embeds=load(tiny_models).get_input_embeddings()(batch["input_ids"]).detach(),
        labels=batch["labels"],
    )
    model = load(tiny_models)
    checkpoint_layers(model)
    embeds = model.get_input_embeddings()(batch["input_ids"]).detach()
    got = gradients(model, inputs_embeds=embeds, labels=batch["labels"])
    for name, gradient in expected.items():
        torch.testing.assert_close(got[name], gradient, rtol=1e-5, atol=1e-7)


def test_layers_with_nothing_to_train_run_once_and_stay_out_of_the_backward_pass(tiny_models, batch):
    model = load(tiny_models, trained=())
    model.model.norm.weight.requires_grad_(True)  # the only trained parameter, after every layer
    checkpoint_layers(model)
    model.get_input_embeddings()._forward_hooks.clear()  # inputs that need no gradient, as above
    runs = []
    for layer in model.model.layers:
        layer.register_forward_pre_hook(lambda module, args: runs.append(module))
    got = gradients(model, **batch)
    assert set(got) == {"model.norm.weight"} and len(runs) == len(model.model.layers)


def test_a_layer_whose_trained_parameters_take_no_part_still_runs_backward(tiny_models, batch):
    """An adapter on an expert no token was routed to: the layer trains, and this batch does not reach it."""
    model = load(tiny_models, trained=())
    model.model.norm.weight.requires_grad_(True)
    model.model.layers[0].unreached = torch.nn.Parameter(torch.zeros(1))
    checkpoint_layers(model)
    model.get_input_embeddings()._forward_hooks.clear()
    got = gradients(model, **batch)
    assert set(got) == {"model.norm.weight"}
