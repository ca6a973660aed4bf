"""SimPO's (CPO's) and ORPO's log-probabilities from TRL's fused LM head: the same losses
and gradients as TRL's trainers compute from the full logits."""

from __future__ import annotations

import json

import pytest
import torch

import modelloop
from modelloop.stages.preference_trainers import fused_log_probs


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
