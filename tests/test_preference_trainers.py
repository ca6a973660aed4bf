"""SimPO's (CPO's), ORPO's and online DPO's log-probabilities from TRL's fused LM head: the
same losses and gradients as TRL's trainers compute from the full logits."""

from __future__ import annotations

import json

import pytest
import torch

import modelloop
from modelloop.stages.preference_trainers import fused_completion_log_probs, fused_log_probs


def pairs():
    return [
        {"prompt": f"What is {a}+{b}?", "chosen": f"{a + b}, of course.", "rejected": str(a + b + 1)}
        for a in range(4)
        for b in range(2)
    ]


def trainer_for(method, options, tuner, path, tmp_path):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if method == "orpo":
        from trl.experimental.orpo import ORPOConfig as Config
        from trl.experimental.orpo import ORPOTrainer as Trainer
    else:
        from trl.experimental.cpo import CPOConfig as Config
        from trl.experimental.cpo import CPOTrainer as Trainer
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if tuner == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    tokenizer = AutoTokenizer.from_pretrained(path)
    arguments = Config(
        output_dir=str(tmp_path / "out"),
        max_length=64,
        per_device_train_batch_size=8,
        report_to="none",
        bf16=False,
        **options,
    )
    trainer_class = fused_log_probs(Trainer, orpo=method == "orpo")
    trainer = trainer_class(
        model=model, args=arguments, train_dataset=Dataset.from_list(pairs()), processing_class=tokenizer
    )
    return trainer_class, trainer, trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


@pytest.mark.parametrize(
    "method, options, tuner",
    [
        ("simpo", {"loss_type": "simpo", "cpo_alpha": 0.0}, "lora"),
        ("simpo", {"loss_type": "simpo", "cpo_alpha": 0.5}, "full"),
        ("simpo", {"loss_type": "sigmoid", "cpo_alpha": 1.0}, "lora"),  # CPO itself: summed log-probabilities
        ("orpo", {}, "lora"),
        ("orpo", {}, "full"),
    ],
)
def test_the_fused_head_gives_trls_log_probabilities_losses_and_gradients(
    method, options, tuner, tiny_models, tmp_path
):
    trainer_class, trainer, batch = trainer_for(method, options, tuner, tiny_models("qwen2"), tmp_path)
    model = trainer.model

    def run(forward):
        model.zero_grad()
        chosen, rejected, _, _, nll = forward(model, batch)
        (chosen.sum() - 2 * rejected.sum() + nll).backward()
        gradients = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        return torch.stack([*chosen.detach(), *rejected.detach(), nll.detach()]), gradients

    fused, fused_gradients = run(trainer.concatenated_forward)
    full, full_gradients = run(super(trainer_class, trainer).concatenated_forward)  # TRL's, from the logits
    torch.testing.assert_close(fused, full, rtol=1e-5, atol=1e-5)
    assert fused_gradients.keys() == full_gradients.keys() and full_gradients
    for name, gradient in full_gradients.items():
        torch.testing.assert_close(fused_gradients[name], gradient, rtol=1e-4, atol=1e-5)
    if options.get("cpo_alpha") == 0.0:
        assert fused[-1] == 0  # no likelihood term


@pytest.mark.parametrize("tuner", ["lora", "full"])
def test_online_dpo_takes_trls_completion_log_probabilities_from_the_fused_head(tuner, tiny_models, tmp_path):
    """Per-token log-probabilities of the completions, padding included, with the prompt cut
    from its start to ``max_length`` as TRL cuts it, and their gradients."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    path = tiny_models("qwen2")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if tuner == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    trainer_class = fused_completion_log_probs(OnlineDPOTrainer)
    trainer = trainer_class(
        model=model,
        reward_funcs=[lambda prompts, completions, **columns: [float(len(c)) for c in completions]],
        args=OnlineDPOConfig(output_dir=str(tmp_path / "out"), report_to="none", bf16=False, max_length=40),
        train_dataset=Dataset.from_list([{"prompt": "Hi"}] * 4),
        processing_class=AutoTokenizer.from_pretrained(path),
    )
    generator = torch.Generator().manual_seed(0)
    vocabulary = model.config.get_text_config().vocab_size
    prompt_ids = torch.randint(5, vocabulary - 5, (4, 30), generator=generator)
    completion_ids = torch.randint(5, vocabulary - 5, (4, 15), generator=generator)  # 45 tokens: 5 cut
    prompt_mask, completion_mask = torch.ones_like(prompt_ids), torch.ones_like(completion_ids)
    prompt_mask[0, :5] = 0  # left padding
    completion_mask[1, 10:] = 0  # after the end of turn
    device = trainer.accelerator.device  # where the trainer put the model
    prompt_ids, prompt_mask, completion_ids, completion_mask = (
        tensor.to(device) for tensor in (prompt_ids, prompt_mask, completion_ids, completion_mask)
    )

    def run(forward):
        model.zero_grad()
        log_probs = forward(trainer.model, prompt_ids, prompt_mask, completion_ids, completion_mask)
        (log_probs * completion_mask).sum().backward()
        return log_probs.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    fused, fused_gradients = run(trainer._forward)
    full, full_gradients = run(super(trainer_class, trainer)._forward)  # TRL's, from the logits
    assert fused.shape == full.shape == completion_ids.shape
    torch.testing.assert_close(fused, full, rtol=1e-5, atol=1e-5)
    assert fused_gradients.keys() == full_gradients.keys() and full_gradients
    for name, gradient in full_gradients.items():
        torch.testing.assert_close(fused_gradients[name], gradient, rtol=1e-4, atol=1e-5)


def test_simpo_and_orpo_runs_say_their_log_probabilities_come_from_the_fused_head(tiny_models, tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(pair) + "\n" for pair in pairs()))
    for method in ("simpo", "orpo"):
        run = tmp_path / method
        modelloop.rlhf(
            {
                "model": str(tiny_models("qwen2")),
                "data": [str(data)],
                "method": method,
                "max_steps": 1,
                "output_dir": str(run),
            }
        )
        loss = json.loads((run / "manifest.json").read_text())["compute"]["loss"]
        assert loss == f"TRL's {method} loss, log-probabilities from TRL's fused LM head"
