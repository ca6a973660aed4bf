"""DPO's pairs in padding-free rows that compute each prompt once: the same
log-probabilities, gradients and training as TRL's own batches."""

from __future__ import annotations

import json

import pytest
import torch

import modelloop
from modelloop.data.labels import IGNORE
from modelloop.data.shared_prompts import CHOSEN, REJECTED, ROWS_KEY, SHARED, SharedPromptCollator, pair_rows
from modelloop.models.shared_prompts import score_shared_prompt_rows

#: Prompt, chosen and rejected lengths: a one-token prompt, pairs two to a row, and a
#: pair cut by max_length (16) in both completions.
SHAPES = [(7, 3, 5), (1, 4, 6), (3, 2, 2), (2, 1, 1), (12, 6, 9)]
MAX_LENGTH = 16


def random_pairs(vocab_size: int, seed: int = 0) -> list[dict[str, list[int]]]:
    generator = torch.Generator().manual_seed(seed)

    def ids(count: int) -> list[int]:
        return torch.randint(5, vocab_size - 5, (count,), generator=generator).tolist()

    return [{"prompt_ids": ids(p), "chosen_ids": ids(c), "rejected_ids": ids(r)} for p, c, r in SHAPES]


def trl_collator():
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    return DataCollatorForPreference(pad_token_id=0, max_length=MAX_LENGTH, pad_to_multiple_of=8)


def test_rows_score_exactly_the_completion_tokens_of_trls_batch():
    pairs = random_pairs(100)
    collator = SharedPromptCollator(trl_collator())
    batch = collator(pairs)
    rows = batch[ROWS_KEY]
    width = batch["input_ids"].shape[1]
    # every completion token TRL scores (at its predecessor's place in the shifted layout), once
    scored = batch["completion_mask"][:, 1:].reshape(-1).nonzero().squeeze(1)
    assert sorted(rows["destinations"].tolist()) == scored.tolist()
    # ... predicted from a position whose label is that very token
    # ... predicting the same token from the same token at the same position
    assert torch.equal(rows["targets"], batch["input_ids"][:, 1:].reshape(-1)[rows["destinations"]])
    trl_inputs = batch["input_ids"][:, :-1].reshape(-1)[rows["destinations"]]
    assert torch.equal(rows["input_ids"].reshape(-1)[rows["sources"]], trl_inputs)
    trl_positions = (rows["destinations"] % (width - 1)).tolist()
    assert rows["position_ids"].reshape(-1)[rows["sources"]].tolist() == trl_positions
    assert len(set(rows["sources"].tolist())) == len(rows["sources"])
    # the short pairs share rows, and each prompt is there once: fewer tokens than TRL's batch
    assert rows["input_ids"].shape[0] < len(pairs) and rows["input_ids"].shape[1] % 8 == 0
    assert (rows["segment_ids"] < len(pairs)).sum() < batch["attention_mask"].sum()
    assert width == 16


def test_a_pair_is_its_prompt_then_two_branches_from_the_prompts_last_token():
    rows = pair_rows(
        [{"prompt_ids": [11, 12, 13], "chosen_ids": [21, 22], "rejected_ids": [31]}],
        max_length=None,
        pad_token_id=0,
        pair_width=6,
    )
    assert rows["input_ids"].tolist() == [[11, 12, 13, 21, 22, 13, 31]]
    assert rows["position_ids"].tolist() == [[0, 1, 2, 3, 4, 2, 3]]
    assert rows["branches"].tolist() == [[SHARED, SHARED, CHOSEN, CHOSEN, CHOSEN, REJECTED, REJECTED]]
    assert rows["sources"].tolist() == [2, 3, 5] and rows["targets"].tolist() == [21, 22, 31]
    assert rows["destinations"].tolist() == [2, 3, 5 + 2]  # TRL: row 0 (chosen) and row 1 (rejected), 5 a row


def fused_model(path, attention: str, tuner: str):
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attention, dtype=torch.float32)
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    score_shared_prompt_rows(model)
    if tuner == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    return model


@pytest.mark.parametrize(
    "family, attention, tuner",
    [("qwen2", "sdpa", "lora"), ("qwen2", "sdpa", "full"), ("gemma2", "eager", "lora"), ("llama", "sdpa", "full")],
)
def test_rows_give_trls_log_probabilities_and_gradients(family, attention, tuner, tiny_models):
    """The policy's pass (and, for LoRA, the reference's: the adapter off) on the rows
    gives every per-token field TRL's loss and metrics read, and the same gradients."""
    model = fused_model(tiny_models(family), attention, tuner)
    batch = SharedPromptCollator(trl_collator())(random_pairs(model.config.get_text_config().vocab_size))
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, IGNORE)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": labels}

    def run(**rows):
        model.zero_grad()
        outputs = model(**inputs, fused_lm_head=True, use_cache=False, **rows)
        sequence_logps = outputs.log_probs.sum(dim=1)
        (sequence_logps * torch.linspace(-1, 1, len(sequence_logps))).sum().backward()
        gradients = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        return outputs, sequence_logps.detach(), gradients

    trl, trl_logps, trl_gradients = run()
    shared, shared_logps, shared_gradients = run(**{ROWS_KEY: batch[ROWS_KEY]})
    torch.testing.assert_close(shared_logps, trl_logps, rtol=1e-5, atol=1e-4)
    for name in ("log_probs", "entropy", "mean_logits"):
        torch.testing.assert_close(getattr(shared, name), getattr(trl, name), rtol=1e-5, atol=1e-4)
    assert torch.equal(shared.is_top1, trl.is_top1)
    assert shared_gradients.keys() == trl_gradients.keys() and trl_gradients
    for name, gradient in trl_gradients.items():
        torch.testing.assert_close(shared_gradients[name], gradient, rtol=1e-4, atol=1e-5, msg=name)
    if tuner == "lora":
        with torch.no_grad(), model.disable_adapter():
            reference = model(**inputs, fused_lm_head=True, use_cache=False).log_probs.sum(dim=1)
            shared_reference = model(**inputs, fused_lm_head=True, use_cache=False, **{ROWS_KEY: batch[ROWS_KEY]})
        torch.testing.assert_close(shared_reference.log_probs.sum(dim=1), reference, rtol=1e-5, atol=1e-4)
        assert not torch.allclose(reference, trl_logps, atol=1e-3)  # the adapter was really off


@pytest.mark.parametrize("tuner", ["lora", "full"])
def test_dpo_trains_the_same_in_shared_prompt_rows(tuner, tiny_models, tmp_path):
    """Four DPO steps with the pairs in shared-prompt rows (the default) and in TRL's
    batches log the same losses and margins; the manifest says which ran. On a GPU the
    runs compute in bf16, and the two layouts round differently."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        "".join(
            json.dumps({"prompt": f"What is {a}+{b}?", "chosen": str(a + b), "rejected": str(a + b + 1)}) + "\n"
            for a in range(5)
            for b in range(5)
        )
    )
    logged = {}
    for packing in (None, False):
        run = tmp_path / f"run-{packing}"
        modelloop.rlhf(
            {
                "model": str(tiny_models("qwen2")),
                "data": [str(pairs)],
                "method": "dpo",
                "tuner": tuner,
                "max_length": 64,
                "batch_size": 8,
                "lr": 5e-3 if tuner == "lora" else 1e-4,
                "max_steps": 4,
                "logging_steps": 1,
                "packing": packing,
                "output_dir": str(run),
            }
        )
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        logged[packing] = [(r["loss"], r["rewards/margins"], r["logps/chosen"]) for r in records if "loss" in r]
        loss = json.loads((run / "manifest.json").read_text())["compute"]["loss"]
        assert loss.endswith("pairs in shared-prompt rows") == (packing is None), loss
    assert len(logged[None]) == 4
    margins = [step[1] for step in logged[False]]
    assert max(abs(m) for m in margins[1:]) > 1e-3  # the steps moved the policy off the reference
    tolerance = 2e-2 if torch.cuda.is_available() else 1e-4
    torch.testing.assert_close(torch.tensor(logged[None]), torch.tensor(logged[False]), rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize(
    "family, options, shared",
    [
        ("qwen2", {"truncation_mode": "keep_end"}, False),  # TRL would cut each pair's prompt its own way
        ("mixtral", {}, False),  # TRL adds the router's balancing loss over its batch's tokens
        ("mixtral", {"router_aux_loss_coef": 0.0}, True),
    ],
)
def test_pairs_a_model_cannot_share_go_as_trl_batches_them(family, options, shared, tiny_models, tmp_path):
    """packing unset on a run that cannot share prompts trains on TRL's batches; asked for,
    the same run stops before loading (test_rlhf)."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "Hi?", "chosen": "Yes.", "rejected": "No."}) + "\n")
    run = tmp_path / "run"
    modelloop.rlhf(
        {
            "model": str(tiny_models(family)),
            "data": [str(pairs)],
            "method": "dpo",
            "max_steps": 1,
            "tuner_options": {"dropout": 0.0},  # LoRA on fused experts takes no dropout
            "method_options": options,
            "output_dir": str(run),
        }
    )
    loss = json.loads((run / "manifest.json").read_text())["compute"]["loss"]
    assert loss == ("TRL's dpo loss, pairs in shared-prompt rows" if shared else "TRL's dpo loss")
