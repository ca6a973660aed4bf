"""Packing: rows are full, examples stay apart (same loss packed or not), samplers are seeded."""

from __future__ import annotations

import json
import random

import pytest
import torch

from modelloop.chat import resolve_chat_format
from modelloop.data.packing import best_fit_decreasing, collate_packed, pack, padding_waste
from modelloop.data.tokenize import IGNORE, prepare_data
from modelloop.models.loading import load_model
from modelloop.registry import SAMPLERS, get_registry


def test_best_fit_decreasing_places_every_example_once_within_capacity():
    rng = random.Random(0)
    lengths = [rng.randint(1, 100) for _ in range(500)]
    bins = best_fit_decreasing(lengths, 128)
    assert sorted(index for members in bins for index in members) == list(range(500))
    assert all(sum(lengths[i] for i in members) <= 128 for members in bins)
    assert len(bins) <= sum(lengths) / 128 * 1.1  # close to the lower bound


def test_an_example_longer_than_a_row_is_refused():
    with pytest.raises(ValueError, match="longer than the row length 4"):
        best_fit_decreasing([3, 5], 4)


def test_packed_rows_restart_positions_and_ignore_each_first_label():
    rows = pack([[1, 2, 3], [4, 5], [6]], [[1, 2, 3], [IGNORE, 5], [6]], max_length=4)
    assert [(row.input_ids.tolist(), row.position_ids.tolist(), row.labels.tolist()) for row in rows] == [
        ([1, 2, 3, 6], [0, 1, 2, 0], [IGNORE, 2, 3, IGNORE]),
        ([4, 5], [0, 1], [IGNORE, 5]),
    ]


def as_long(values):
    return torch.as_tensor(values, dtype=torch.long)


def per_token_losses(logits, input_ids, labels):
    """Cross-entropy of each predicted token (label != IGNORE), as a causal LM is trained."""
    targets = labels[1:]
    keep = targets != IGNORE
    return torch.nn.functional.cross_entropy(logits[:-1][keep], targets[keep], reduction="none")


def test_loss_per_example_is_the_same_packed_and_unpacked(tmp_path, tiny_models):
    loaded = load_model(tiny_models("qwen2"), dtype="fp32")
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    chat = resolve_chat_format(tokenizer, loaded.family)
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Reverse {word * n}"},
                {"role": "assistant", "content": (word * n)[::-1]},
            ]
        }
        for n, word in enumerate(["abc", "river", "tiger", "xy", "banana", "q"], start=1)
    ]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    data = prepare_data([tmp_path / "d.jsonl"], tokenizer, chat, max_length=96, use_cache=False)

    with torch.no_grad():
        alone = [
            per_token_losses(
                model(input_ids=as_long(ids)[None], use_cache=False).logits[0], as_long(ids), as_long(labels)
            )
            for ids, labels in zip(data.input_ids, data.labels)
        ]
        packed = pack(data.input_ids, data.labels, max_length=96)
        assert len(packed) < len(data.input_ids)  # several examples share a row
        batch = collate_packed(packed, tokenizer.pad_token_id)
        logits = model(**{key: value for key, value in batch.items() if key != "labels"}).logits
        mixed = model(input_ids=batch["input_ids"], use_cache=False).logits  # positions not restarted

    order = [index for members in best_fit_decreasing(data.lengths, 96) for index in members]
    row_of = [row for row, members in enumerate(best_fit_decreasing(data.lengths, 96)) for _ in members]
    starts: dict[int, int] = {}
    worst_leak = 0.0
    for index, row in zip(order, row_of):
        start = starts.get(row, 0)
        end = start + data.lengths[index]
        starts[row] = end
        ids, labels = as_long(data.input_ids[index]), as_long(data.labels[index])
        together = per_token_losses(logits[row, start:end], ids, labels)
        torch.testing.assert_close(together.mean(), alone[index].mean(), atol=1e-5, rtol=0)
        if start > 0:
            worst_leak = max(
                worst_leak,
                (per_token_losses(mixed[row, start:end], ids, labels).mean() - alone[index].mean()).abs().item(),
            )
    assert worst_leak > 1e-3  # without restarted positions the examples do see each other


def test_padding_waste():
    assert padding_waste([4, 4, 2, 2], batch_size=2) == 0.0
    assert padding_waste([4, 2, 4, 2], batch_size=2) == pytest.approx(4 / 16)


def test_hook_register_samplers_random_is_a_seeded_permutation():
    sampler = get_registry(SAMPLERS).get("random")
    lengths = list(range(100))
    first = list(sampler.order(lengths, batch_size=8, seed=3))
    assert sorted(first) == lengths
    assert first == list(sampler.order(lengths, batch_size=8, seed=3))
    assert first != list(sampler.order(lengths, batch_size=8, seed=4))


def test_length_grouped_sampler_cuts_padding():
    samplers = get_registry(SAMPLERS)
    rng = random.Random(0)
    lengths = [rng.randint(10, 500) for _ in range(2000)]
    grouped = list(samplers.get("length_grouped").order(lengths, batch_size=8, seed=0))
    shuffled = list(samplers.get("random").order(lengths, batch_size=8, seed=0))
    assert sorted(grouped) == list(range(2000))
    waste_grouped = padding_waste([lengths[i] for i in grouped], 8)
    waste_random = padding_waste([lengths[i] for i in shuffled], 8)
    assert waste_grouped < waste_random / 5


@pytest.mark.parametrize("packed", [False, True])
def test_logits_only_at_labels_give_the_same_loss_and_gradients(packed, tmp_path, tiny_models):
    from modelloop.data.packing import collate_padded
    from modelloop.training import logits_at_labels, slices_logits_by_mask

    loaded = load_model(tiny_models("qwen2"), dtype="fp32")
    model, tokenizer = loaded.model.train(), loaded.tokenizer
    assert slices_logits_by_mask(model)
    rows = [
        {"messages": [{"role": "user", "content": f"Spell {word}"}, {"role": "assistant", "content": " ".join(word)}]}
        for word in ["abc", "river", "tiger", "xy", "banana", "q"]
    ]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    data = prepare_data(
        [tmp_path / "d.jsonl"], tokenizer, resolve_chat_format(tokenizer, loaded.family), max_length=96, use_cache=False
    )
    if packed:
        batch = collate_packed(pack(data.input_ids, data.labels, max_length=96), tokenizer.pad_token_id)
    else:
        batch = collate_padded(data.input_ids, data.labels, tokenizer.pad_token_id)

    def loss_and_grad(inputs):
        model.zero_grad()
        loss = model(**inputs).loss
        loss.backward()
        return loss.detach(), model.model.embed_tokens.weight.grad.clone()

    trimmed = logits_at_labels(batch)
    assert trimmed["shift_labels"].numel() < batch["labels"].numel() / 2
    full_loss, full_grad = loss_and_grad(batch)
    loss, grad = loss_and_grad(trimmed)
    torch.testing.assert_close(loss, full_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, full_grad, rtol=1e-5, atol=1e-7)


def owns_its_memory(tensor: torch.Tensor) -> bool:
    """No two elements share storage: what ``pin_memory`` (and any in-place write) needs."""
    return tensor.is_contiguous() and all(stride > 0 for size, stride in zip(tensor.shape, tensor.stride()) if size > 1)


@pytest.mark.parametrize(("packing", "padding_free"), [(False, False), (False, True), (True, False)])
def test_collated_batches_own_their_memory_and_survive_pinning(packing, padding_free):
    """A GPU trainer pins every batch; an expanded row of positions (one storage for all
    rows) made the first unpacked batch fail there."""
    from modelloop.training import Collator

    examples = [
        ([5, 6, 7, 8, 9], [IGNORE, IGNORE, 7, 8, 9]),
        ([5, 6, 7], [IGNORE, 6, 7]),
        ([4] * 11, [IGNORE] * 5 + [4] * 6),
    ]
    items = (
        pack([ids for ids, _ in examples], [labels for _, labels in examples], max_length=16) if packing else examples
    )
    batch = Collator(pad_token_id=0, packing=packing, multiple=8, padding_free=padding_free)(items)
    tensors = {key: value for key, value in batch.items() if isinstance(value, torch.Tensor)}
    assert {"input_ids", "labels", "position_ids"} <= set(tensors)
    for key, tensor in tensors.items():
        assert owns_its_memory(tensor), f"{key} shares memory between its elements (strides {tensor.stride()})"
    if torch.cuda.is_available():
        for tensor in tensors.values():
            assert torch.equal(tensor.pin_memory(), tensor)


def chat_tokens(tmp_path, tokenizer, family):
    rows = [
        {"messages": [{"role": "user", "content": f"Spell {word}"}, {"role": "assistant", "content": " ".join(word)}]}
        for word in ["abc", "river", "tiger", "xy", "banana", "q", "violet"]
    ]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return prepare_data(
        [tmp_path / "d.jsonl"], tokenizer, resolve_chat_format(tokenizer, family), max_length=96, use_cache=False
    )


def test_flex_attention_keeps_packed_examples_apart_without_a_mask(tmp_path, tiny_models):
    """Packed rows under flex attention (a block mask from the position ids, no quadratic
    mask): the loss of the examples side by side equals their loss one by one. Forward
    only: torch's flex attention has no backward pass on a CPU (the GPU test trains)."""
    from modelloop.data.packing import collate_padded

    sdpa = load_model(tiny_models("qwen2"), dtype="fp32").model.eval()
    flex = load_model(tiny_models("qwen2"), dtype="fp32", attn_implementation="flex_attention").model.eval()
    tokenizer = load_model(tiny_models("qwen2")).tokenizer
    data = chat_tokens(tmp_path, tokenizer, load_model(tiny_models("qwen2")).family)
    packed = collate_packed(pack(data.input_ids, data.labels, max_length=96), tokenizer.pad_token_id)
    assert packed["input_ids"].shape[0] < len(data.input_ids)
    with torch.no_grad():
        alone = sdpa(**collate_padded(data.input_ids, data.labels, tokenizer.pad_token_id)).loss
        together = flex(**packed).loss
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch's flex attention trains on CUDA GPUs only")
def test_flex_attention_trains_packed_rows_as_sdpa_trains_them_alone(tmp_path, tiny_models):
    """Under bf16 autocast, as training runs on a GPU (flex attention compiled no fp32
    kernel on the H200): the same loss and nearly the same gradient, packed or alone."""
    from modelloop.data.packing import collate_padded

    def loss_and_grad(implementation, batch):
        model = load_model(
            tiny_models("qwen2"), dtype="fp32", attn_implementation=implementation, device_map="cuda"
        ).model.train()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(
                **{key: value.cuda() if isinstance(value, torch.Tensor) else value for key, value in batch.items()}
            ).loss
        loss.backward()
        return loss.detach().float(), model.model.embed_tokens.weight.grad.flatten()

    tokenizer = load_model(tiny_models("qwen2")).tokenizer
    data = chat_tokens(tmp_path, tokenizer, load_model(tiny_models("qwen2")).family)
    alone = loss_and_grad("sdpa", collate_padded(data.input_ids, data.labels, tokenizer.pad_token_id))
    together = loss_and_grad(
        "flex_attention", collate_packed(pack(data.input_ids, data.labels, max_length=96), tokenizer.pad_token_id)
    )
    torch.testing.assert_close(together[0], alone[0], rtol=2e-2, atol=2e-2)
    assert torch.nn.functional.cosine_similarity(together[1], alone[1], dim=0) > 0.99


def test_a_padding_free_batch_trains_as_the_padded_one(tmp_path, tiny_models):
    """With packing off, a step's examples (those, no others) side by side in rows no wider
    than the longest: fewer tokens computed than padded, and the same loss and gradients."""
    from modelloop.training import Collator

    loaded = load_model(tiny_models("qwen2"), dtype="fp32")
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    data = chat_tokens(tmp_path, tokenizer, loaded.family)
    items = list(zip(data.input_ids, data.labels))
    items.append((sum(map(list, data.input_ids[:3]), []), sum(map(list, data.labels[:3]), [])))  # a long one
    padded_collator = Collator(tokenizer.pad_token_id, packing=False)
    free_collator = Collator(tokenizer.pad_token_id, packing=False, padding_free=True)
    padded, free = padded_collator(items), free_collator(items)
    assert free["input_ids"].shape[1] == padded["input_ids"].shape[1] == max(len(ids) for ids, _ in items)
    assert free["input_ids"].shape[0] < len(items)
    assert free_collator.tokens == padded_collator.tokens == sum(len(ids) for ids, _ in items)
    results = []
    for batch in (padded, free):
        model.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        results.append((loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}))
    (padded_loss, padded_grads), (free_loss, free_grads) = results
    torch.testing.assert_close(free_loss, padded_loss, rtol=1e-5, atol=1e-6)
    for name, grad in padded_grads.items():
        torch.testing.assert_close(free_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_padding_free_is_for_unpacked_training_batches():
    from modelloop.config import RLHFConfig, TrainConfig

    assert TrainConfig(model="m", data=["d"]).padding_free  # the default
    with pytest.raises(ValueError, match="padding_free is for sft and pt"):
        RLHFConfig(model="m", data=["d"], padding_free=False)
