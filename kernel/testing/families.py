"""Model families: the tiny preset builds and loads as the family; its chat format trains
each assistant turn through its end-of-turn token, tool calls included (and places
pictures and clips the model reads, for a family that sees or hears); its default LoRA targets name modules
of its model; and packed rows give each example the loss it has alone.

A family without a tiny preset (the generic fallback) has nothing the kit can build.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

from modelloop.plugin import IGNORE
from modelloop.specs import ModelFamily
from modelloop.testing.kit import Broken, Check, Skip
from modelloop.testing.samples import (
    CONVERSATIONS,
    TOOL_CONVERSATION,
    assistant_turns,
    buildable,
    encode,
    load,
    loss,
    media_conversations,
    tiny_model,
)
from modelloop.testing.templates import check_tool_calls, check_turns
from modelloop.testing.workspace import Workspace

#: How far packed and unpacked losses may differ in fp32.
LOSS_TOLERANCE = 1e-4


def checks(family: ModelFamily) -> list[Check]:
    if not buildable(family):
        return [Check("model", family, "its tiny preset builds and loads", has_no_preset)]
    found = [
        Check("model", family, "its tiny preset builds and loads as this family", builds),
        Check(
            "model", family, "its chat format labels each assistant turn through its end-of-turn token", labels_turns
        ),
        Check("model", family, "its chat format trains a tool call and not its result", trains_tool_calls),
    ]
    if family.multimodal:
        found.append(Check("model", family, "its chat format places pictures and clips the model reads", reads_media))
    found += [
        Check("model", family, "its default LoRA targets name modules of its model", lora_targets_exist),
        Check("model", family, "packed rows give the loss their examples give alone", packing_keeps_examples_apart),
    ]
    return found


def has_no_preset(family: ModelFamily, workspace: Workspace) -> None:
    raise Skip("it has no tiny preset and tokenizer recipe for new-model to build")


def builds(family: ModelFamily, workspace: Workspace) -> None:
    loaded = load(workspace.tiny_model(family.name))
    if loaded.family.name != family.name:
        model_type = loaded.model.config.model_type
        raise Broken(
            f"its tiny model loads as the {loaded.family.name} family: its model_types do not claim {model_type!r}"
        )


def chat_of(family: ModelFamily, folder: Path) -> tuple[Any, Any]:
    """The tiny model's tokenizer and the chat format training resolves for it."""
    from modelloop.chat import resolve_chat_format
    from modelloop.models.loading import load_tokenizer

    tokenizer = load_tokenizer(folder)
    return tokenizer, resolve_chat_format(tokenizer, family)


def labels_turns(family: ModelFamily, workspace: Workspace) -> None:
    """On the text, then on the tokens: each labelled span ends with an end-of-turn token."""
    tokenizer, chat = chat_of(family, tiny_model(workspace, family))
    check_turns(chat)
    ends = " or ".join(map(repr, chat.end_of_turn))
    for record, encoded in zip(CONVERSATIONS, encode(tokenizer, chat, CONVERSATIONS)):
        spans = labelled_spans(encoded.labels)
        if len(spans) != assistant_turns(record):
            raise Broken(f"{len(spans)} labelled spans of tokens for {assistant_turns(record)} assistant turns")
        for number, (start, end) in enumerate(spans, start=1):
            text = tokenizer.decode(list(encoded.input_ids[start:end]))
            if not text.endswith(chat.end_of_turn):
                raise Broken(
                    f"assistant turn {number}'s labels end at {text[-24:]!r}, not at its end-of-turn token {ends}"
                )


def labelled_spans(labels: Any) -> list[tuple[int, int]]:
    """``(start, end)`` of each run of labelled tokens."""
    spans: list[tuple[int, int]] = []
    start = None
    for position, label in enumerate([*labels, IGNORE]):
        if label != IGNORE and start is None:
            start = position
        elif label == IGNORE and start is not None:
            spans.append((start, position))
            start = None
    return spans


def trains_tool_calls(family: ModelFamily, workspace: Workspace) -> None:
    tokenizer, chat = chat_of(family, tiny_model(workspace, family))
    check_tool_calls(chat)
    encode(tokenizer, chat, [TOOL_CONVERSATION])


def reads_media(family: ModelFamily, workspace: Workspace) -> None:
    """A conversation with a picture (a clip, for a family that hears) tokenises with the
    item's tokens, and the model takes the batch (its features must match those tokens)
    to a finite loss."""
    from modelloop.training import Collator

    folder = tiny_model(workspace, family)
    loaded = load(folder)
    media = media_tokens(family, folder, loaded)
    records = media_conversations(family, workspace)
    for encoded in encode(loaded.tokenizer, chat_of(family, folder)[1], records, media):
        (item,) = encoded.media
        token = media.kinds[item.kind].token
        if media.kinds[item.kind].token_id not in encoded.input_ids:
            raise Broken(f"the rendered conversation holds no {item.kind} token {token!r}")
        inputs = Collator(loaded.tokenizer.pad_token_id, packing=False, media=media)(
            [(encoded.input_ids, encoded.labels, encoded.media)]
        )
        loss(loaded.model, inputs)


def media_tokens(family: ModelFamily, folder: Path, loaded: Any) -> Any:
    from modelloop.models.loading import load_media_tokens

    return load_media_tokens(family, folder, loaded.model.config, loaded.tokenizer)


def lora_targets_exist(family: ModelFamily, workspace: Workspace) -> None:
    """PEFT's own rule: the target list may name modules some models of the family lack
    (a MoE family's dense MLP, absent where every layer is sparse), and must name one; each
    target parameter (fused experts) must exist."""
    model = load(tiny_model(workspace, family)).model
    modules = [name for name, _ in model.named_modules()]
    parameters = [name for name, _ in model.named_parameters()]
    named = [
        target
        for target in family.lora_targets
        if any(name == target or name.endswith("." + target) for name in modules)
    ]
    if family.lora_targets and not named:
        raise Broken(f"none of its LoRA targets ({', '.join(family.lora_targets)}) names a module of its tiny model")
    for target in family.lora_target_parameters:
        if not any(name == target or name.endswith("." + target) for name in parameters):
            raise Broken(f"LoRA target parameter {target!r} names no parameter of its tiny model")


def packing_keeps_examples_apart(family: ModelFamily, workspace: Workspace) -> None:
    """The sample conversations (and one with each kind of media the family takes) packed
    into one row, through the collator training uses, against each alone: the same summed
    loss."""
    import torch

    from modelloop.data.packing import pack
    from modelloop.training import Collator

    folder = tiny_model(workspace, family)
    loaded = load(folder)
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    media = media_tokens(family, folder, loaded)
    records = [*CONVERSATIONS, *media_conversations(family, workspace)]
    encoded = encode(tokenizer, chat_of(family, folder)[1], records, media)
    items = [(e.input_ids, e.labels, e.media) if media is not None else (e.input_ids, e.labels) for e in encoded]
    rows = pack(
        [e.input_ids for e in encoded],
        [e.labels for e in encoded],
        sum(map(len, encoded)),
        [e.media for e in encoded] if media else None,
    )
    rope_index = partial(media.rope_index, model) if media is not None and media.rope_index is not None else None
    packed = Collator(tokenizer.pad_token_id, packing=True, media=media, rope_index=rope_index)(rows)
    alone = Collator(tokenizer.pad_token_id, packing=False, media=media)
    with torch.no_grad():
        together = summed_loss(model, packed)
        apart = sum(summed_loss(model, alone([item])) for item in items)
    if abs(together - apart) > LOSS_TOLERANCE * max(1.0, abs(apart)):
        raise Broken(
            f"packed rows give a summed loss of {together:.5f}, the examples alone {apart:.5f}: "
            "packed examples see each other"
        )


def summed_loss(model: Any, inputs: dict[str, Any]) -> float:
    """The batch's loss times the number of tokens it is the mean of."""
    labelled = int((inputs["labels"][:, 1:] != IGNORE).sum())
    return float(model(**inputs).loss) * labelled
