"""LoRA tuners: option checks, targets per family, LoRA+ groups, the CPU dropout."""

from __future__ import annotations

import pytest
import torch

import modelloop_tuner_lora as lora
from modelloop.models.loading import load_model
from modelloop.registry import TUNERS, get_registry


@pytest.mark.parametrize(
    "options, message",
    [
        ({"rank": 0}, "rank must be a positive integer, got 0"),
        ({"rank": 2.5}, "rank must be a positive integer"),
        ({"alpha": -1}, "alpha must be a positive number"),
        ({"dropout": 1.0}, r"dropout must be in \[0.0, 1.0\)"),
        ({"targets": 3}, "targets must be"),
        ({"ranks": 8}, "unknown option 'ranks'"),
    ],
)
def test_bad_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        lora.check(options)


def test_bits_only_for_qlora():
    assert lora.check_quantized({"bits": 8})["bits"] == 8
    with pytest.raises(ValueError, match="unknown option 'bits'"):
        lora.check({"bits": 4})
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        lora.check_quantized({"bits": 3})


@pytest.mark.parametrize("family", ["qwen2", "qwen3_moe"])
def test_default_targets_come_from_the_family(family, tiny_models):
    loaded = load_model(tiny_models(family))
    options = lora.check({"dropout": 0.0})
    model = get_registry(TUNERS).get("lora").prepare(loaded.model, options, loaded.family)
    adapted = {name.split(".lora_A")[0].rsplit(".", 1)[-1] for name, _ in model.named_parameters() if ".lora_A" in name}
    assert {"q_proj", "k_proj", "v_proj", "o_proj"} <= adapted
    if family == "qwen3_moe":
        assert any("experts" in name and "lora" in name for name, _ in model.named_parameters())
    else:
        assert {"gate_proj", "up_proj", "down_proj"} <= adapted
    assert not any("lm_head" in name and "lora" in name for name, _ in model.named_parameters())


def test_loraplus_puts_b_matrices_in_a_faster_group(tiny_models):
    loaded = load_model(tiny_models("qwen2"))
    options = lora.check({"loraplus_lr_ratio": 16})
    model = lora.prepare(loaded.model, options, loaded.family)
    plain, fast = lora.parameter_groups(model, options, loaded.family)
    assert fast["lr_scale"] == 16.0
    assert len(fast["params"]) == len(plain["params"]) == 28  # 7 projections x 4 layers


def test_fast_dropout_keeps_one_minus_p_and_the_expectation():
    dropout = lora.fast_dropout_class()(0.05)
    x = torch.ones(2000, 1000)
    y = dropout(x)
    assert (y > 0).float().mean().item() == pytest.approx(0.95, abs=2e-3)
    assert y.mean().item() == pytest.approx(1.0, abs=5e-3)
    torch.manual_seed(3)
    first = dropout(x)
    torch.manual_seed(3)
    assert torch.equal(dropout(x), first)  # the same mask again under the same RNG state
    assert torch.equal(dropout.eval()(x), x)


def test_lora_replaces_peft_dropout_on_cpu(tiny_models):
    loaded = load_model(tiny_models("qwen2"))
    model = lora.prepare(loaded.model, lora.check({}), loaded.family)
    kinds = {type(module).__name__ for name, module in model.named_modules() if ".lora_dropout." in name}
    assert kinds == {"FastDropout"}


def test_what_turns_dropout_off_turns_the_fast_dropout_off_too(tiny_models):
    """TRL's DPO and KTO switch every ``torch.nn.Dropout`` off by default; the LoRA dropout
    modelloop puts in place on a CPU must be one of them, or those runs train with dropout
    where TRL's do not (and pay for drawing its masks)."""
    from trl.trainer.utils import disable_dropout_in_model

    loaded = load_model(tiny_models("qwen2"))
    model = lora.prepare(loaded.model, lora.check({"dropout": 0.5}), loaded.family).train()
    for name, parameter in model.named_parameters():
        if "lora_B" in name:  # drawn as zeros: the adapters' inputs, and their dropout, would not show
            torch.nn.init.normal_(parameter)
    ids = torch.arange(1, 17)[None]
    assert not torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)  # dropout on
    disable_dropout_in_model(model)
    assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)


def test_lora_keeps_torchs_dropout_where_it_will_train_on_a_gpu(tiny_models, monkeypatch):
    """The weights are still on the CPU when the tuner prepares them: where training goes
    decides, and on a GPU torch's fused dropout is the cheaper one."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    loaded = load_model(tiny_models("qwen2"))
    model = lora.prepare(loaded.model, lora.check({}), loaded.family)
    kinds = {type(module).__name__ for name, module in model.named_modules() if ".lora_dropout." in name}
    assert kinds == {"Dropout"}


def test_moe_experts_with_dropout_is_a_clear_error(tiny_models):
    loaded = load_model(tiny_models("qwen3_moe"))
    with pytest.raises(ValueError, match="needs dropout 0 in PEFT: set tuner_options.dropout=0"):
        lora.prepare(loaded.model, lora.check({}), loaded.family)


def test_fast_dropout_reuses_the_checkpointed_mask_in_the_recompute():
    dropout = lora.fast_dropout_class()(0.5, reuse_checkpointed_mask=True)
    x = torch.ones(64, 64)
    with torch.no_grad():
        first = dropout(x)  # the checkpointed forward
    state = torch.random.get_rng_state()
    assert torch.equal(dropout(x), first)  # the recompute: same mask, no new draws
    assert torch.equal(torch.random.get_rng_state(), state)
    assert not torch.equal(dropout(x), first)  # an ordinary forward draws afresh
    with torch.no_grad():
        dropout(torch.ones(8, 8))
    assert dropout(x).shape == x.shape  # a mask of another shape is never reused


def test_lora_reuses_masks_only_under_checkpointing(tiny_models):
    for checkpointing in (False, True):
        loaded = load_model(tiny_models("qwen2"))
        if checkpointing:
            loaded.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
        model = lora.prepare(loaded.model, lora.check({}), loaded.family)
        reuse = {module.reuse_checkpointed_mask for name, module in model.named_modules() if ".lora_dropout." in name}
        assert reuse == {checkpointing}
