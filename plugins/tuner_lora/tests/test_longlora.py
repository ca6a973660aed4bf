"""LongLoRA: shifted sparse attention keeps to its groups and never looks ahead; the tuner
trains adapters, embeddings and norms, and the model attends fully outside training."""

from __future__ import annotations

import json
import types

import pytest
import torch

import modelloop_tuner_lora as lora
from modelloop_tuner_lora_s2attn import shifted_sparse_attention

LENGTH = 16


def attend(q, k, v, *, training=True, ratio=0.5):
    module = types.SimpleNamespace(
        training=training,
        config=types.SimpleNamespace(longlora_group_ratio=ratio),
        num_key_value_groups=2,
        is_causal=True,
    )
    return shifted_sparse_attention(module, q, k, v, None)[0]


def qkv(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (
        torch.randn(2, 4, LENGTH, 8, generator=generator),
        torch.randn(2, 2, LENGTH, 8, generator=generator),
        torch.randn(2, 2, LENGTH, 8, generator=generator),
    )


def changed_by(position: int) -> torch.Tensor:
    """[length, heads]: whether each output moved when the key and value at ``position`` did."""
    q, k, v = qkv()
    before = attend(q, k, v)
    k, v = k.clone(), v.clone()
    k[:, :, position] += 1
    v[:, :, position] += 1
    return (attend(q, k, v) - before).abs().amax(dim=(0, 3)) > 0


def test_no_token_attends_to_a_later_one():
    for position in range(LENGTH):
        assert not changed_by(position)[:position].any(), position


def test_plain_heads_keep_to_their_groups_and_shifted_heads_to_theirs():
    # groups of 8: plain heads [0, 8) and [8, 16); shifted heads [0, 4), [4, 12), [12, 16)
    moved = changed_by(3)
    assert moved[3:8, :2].all() and not moved[8:, :2].any()
    assert moved[3, 2:].all() and not moved[4:, 2:].any()
    moved = changed_by(5)
    assert moved[5:8, :2].all() and not moved[8:, :2].any()
    assert moved[5:12, 2:].all() and not moved[12:, 2:].any()


def test_outside_training_attention_is_full():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q, k, v = qkv()
    module = types.SimpleNamespace(num_key_value_groups=2, is_causal=True)
    assert torch.allclose(attend(q, k, v, training=False), sdpa_attention_forward(module, q, k, v, None)[0])


def test_options_and_families():
    options = lora.check_longlora({"rank": 4})
    assert options["group_ratio"] == 0.25 and options["modules_to_save"] == ["embed_tokens", "norm"]
    with pytest.raises(ValueError, match="group_ratio must be between 0 and 1"):
        lora.check_longlora({"group_ratio": 1.5})
    model = types.SimpleNamespace(config=types.SimpleNamespace(model_type="gpt2"))
    with pytest.raises(ValueError, match="LongLoRA's attention is for llama, qwen2, qwen3 models, not 'gpt2'"):
        lora.prepare_longlora(model, options, None)


def test_longlora_trains_adapters_embeddings_and_norms(tiny_models, tmp_path):
    import modelloop

    rows = [{"text": " ".join(f"word{i % 50} {i}" for i in range(start, start + 200))} for start in range(0, 4000, 200)]
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    result = modelloop.pt(
        {
            "model": str(tiny_models("qwen2")),
            "data": [str(data)],
            "tuner": "longlora",
            "max_length": 128,
            "batch_size": 2,
            "max_steps": 12,
            "lr": 3e-3,
            "logging_steps": 1,
            "output_dir": str(tmp_path / "run"),
        }
    )
    losses = [
        json.loads(line)["loss"]
        for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
        if "loss" in json.loads(line)
    ]
    assert losses[-1] < losses[0]
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "run" / "model" / "adapter_model.safetensors")
    assert (
        any("lora_A" in name for name in saved)
        and any("embed_tokens" in name for name in saved)
        and any("norm" in name for name in saved)
    )
    assert result["run_dir"] == str(tmp_path / "run")


def test_the_prepared_model_uses_shifted_attention_in_training_only(tiny_models):
    from modelloop.models.loading import load_model

    loaded = load_model(tiny_models("qwen2"))
    model = lora.prepare_longlora(loaded.model, lora.check_longlora({"dropout": 0.0}), loaded.family)
    ids = torch.randint(0, 1000, (1, 64), generator=torch.Generator().manual_seed(0))
    model.train()
    sparse = model(input_ids=ids).logits
    model.eval()
    full = model(input_ids=ids).logits
    # groups of 16 (a quarter of the row); the shifted heads' first group is [0, 8)
    assert torch.allclose(sparse[:, :8], full[:, :8], atol=1e-5)  # every head of these tokens sees them all either way
    assert not torch.allclose(sparse[:, 8:], full[:, 8:], atol=1e-3)


def test_the_mask_transformers_builds_still_applies_in_each_group():
    """Two packed examples ([0, 6) and [6, 16)) with the boundary inside a group: no token
    of the second sees the first, which full attention with the same mask also ensures."""
    q, k, v = qkv()
    example = torch.arange(LENGTH) >= 6
    keep = (example[:, None] == example[None, :]) & torch.ones(LENGTH, LENGTH, dtype=torch.bool).tril()
    keep = keep.expand(2, 1, LENGTH, LENGTH)
    module = types.SimpleNamespace(
        training=True, config=types.SimpleNamespace(longlora_group_ratio=0.5), num_key_value_groups=2, is_causal=True
    )
    before = shifted_sparse_attention(module, q, k, v, keep)[0]
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 2] += 1
    v2[:, :, 2] += 1
    after = shifted_sparse_attention(module, q, k2, v2, keep)[0]
    moved = (after - before).abs().amax(dim=(0, 3)) > 0
    assert moved[2:6].any() and not moved[6:].any()
    assert torch.isfinite(before).all()
