"""Preference pairs in padding-free rows that compute each prompt once.

TRL's DPO batch holds every pair twice, prompt + chosen and prompt + rejected, each
row padded to the longest; the prompt (usually most of a pair's tokens) goes through
the model twice in the policy's pass and twice again in the reference's. Here a pair is one
segment: the prompt but its last token, then two branches, ``[last prompt token] +
chosen`` and ``[last prompt token] + rejected``, each attending to the shared prompt and
to itself, never to the other branch. Both branches start at the same position, so
every token sees exactly the context and the positions it has in TRL's row: the
log-probabilities are the same to float tolerance. The last prompt token is repeated
so that each position predicts one label (both completions' first tokens follow it).

Segments are placed by best-fit decreasing into rows as wide as the longest one, so
rows carry no more attention than one pair to a row would, and little padding. The
attention mask (block-diagonal, causal, branch-aware) is built on the device from two
small per-token tensors (``attention_mask``).

The rows travel beside TRL's own batch (``SharedPromptCollator``), whose layout the
trainer's loss and metrics read; ``modelloop.models.shared_prompts`` runs the model on
the rows and lays the per-token results out as TRL's batch would have them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from modelloop.data.packing import best_fit_decreasing, padded_width

#: The batch key the rows travel under (a mapping of tensors; the trainer moves it to
#: the device with the rest of the batch).
ROWS_KEY = "shared_prompt_rows"

#: Which part of a segment a token belongs to: the shared prompt, or one completion.
SHARED, CHOSEN, REJECTED = 0, 1, 2


def segment(prompt: Sequence[int], chosen: Sequence[int], rejected: Sequence[int]) -> tuple[list[int], list[int]]:
    """A pair's tokens and branches: the prompt but its last token, then each
    completion behind a copy of the prompt's last token (none for an empty prompt)."""
    last = list(prompt[-1:])
    tokens = [*prompt[:-1], *last, *chosen, *last, *rejected]
    shared = max(len(prompt) - 1, 0)
    branches = [SHARED] * shared + [CHOSEN] * (len(last) + len(chosen)) + [REJECTED] * (len(last) + len(rejected))
    return tokens, branches


def truncated(example: Mapping[str, Sequence[int]], max_length: int | None) -> tuple[list[int], list[int], list[int]]:
    """Prompt, chosen and rejected as TRL's collator keeps them (``keep_start``: each of
    prompt + chosen and prompt + rejected cut to ``max_length``; TRL drops the pairs whose
    prompt alone fills it)."""
    prompt, chosen, rejected = (list(example[key]) for key in ("prompt_ids", "chosen_ids", "rejected_ids"))
    if max_length is None:
        return prompt, chosen, rejected
    room = max(max_length - len(prompt), 0)
    return prompt[:max_length], chosen[:room], rejected[:room]


def pair_rows(
    examples: Sequence[Mapping[str, Sequence[int]]],
    *,
    max_length: int | None,
    pad_token_id: int,
    pair_width: int,
    multiple: int = 1,
) -> dict[str, Any]:
    """The batch's pairs as shared-prompt rows (tensors), and where each scored token goes
    in TRL's layout: ``pair_width`` is the width of TRL's batch, whose rows are the
    examples' prompt + chosen, then their prompt + rejected.

    ``input_ids``, ``position_ids``, ``segment_ids`` (each pair its own; padding one of its
    own) and ``branches`` are ``rows x width``; ``sources`` are the flat indices of the
    positions that predict a completion token, ``targets`` those tokens, ``destinations``
    the flat indices of the same predictions in TRL's ``2 x pairs x (pair_width - 1)``
    per-token layout."""
    import numpy
    import torch

    pairs = [truncated(example, max_length) for example in examples]
    segments = [segment(*pair) for pair in pairs]
    lengths = [len(tokens) for tokens, _ in segments]
    width = padded_width(max(lengths), multiple)
    placement = best_fit_decreasing(lengths, width)
    shape = (len(placement), width)
    input_ids = numpy.full(shape, pad_token_id, dtype=numpy.int64)
    positions = numpy.tile(numpy.arange(width), (len(placement), 1))
    segment_ids = numpy.full(shape, len(pairs), dtype=numpy.int64)  # padding: a segment of its own
    branches = numpy.full(shape, SHARED, dtype=numpy.int64)
    sources: list[int] = []
    targets: list[int] = []
    destinations: list[int] = []
    scored = pair_width - 1
    for row, members in enumerate(placement):
        offset = 0
        for number in members:
            (prompt, chosen, rejected), (tokens, pair_branches) = pairs[number], segments[number]
            span = slice(offset, offset + len(tokens))
            input_ids[row, span] = tokens
            segment_ids[row, span] = number
            branches[row, span] = pair_branches
            start = max(len(prompt) - 1, 0)  # where each completion branch begins, in TRL's row and here
            positions[row, offset : offset + start] = numpy.arange(start)
            branch_offset = offset + start
            for kind, completion in ((CHOSEN, chosen), (REJECTED, rejected)):
                branch = [*prompt[-1:], *completion]
                trl_row = number if kind == CHOSEN else len(pairs) + number
                positions[row, branch_offset : branch_offset + len(branch)] = start + numpy.arange(len(branch))
                for index in range(len(branch) - 1):  # each branch token predicts the next
                    sources.append(row * width + branch_offset + index)
                    targets.append(branch[index + 1])
                    destinations.append(trl_row * scored + start + index)
                branch_offset += len(branch)
            offset += len(tokens)
    return {
        "input_ids": torch.from_numpy(input_ids),
        "position_ids": torch.from_numpy(positions),
        "segment_ids": torch.from_numpy(segment_ids),
        "branches": torch.from_numpy(branches),
        "sources": torch.tensor(sources, dtype=torch.int64),
        "targets": torch.tensor(targets, dtype=torch.int64),
        "destinations": torch.tensor(destinations, dtype=torch.int64),
    }


def attention_mask(segment_ids: Any, branches: Any, implementation: str, dtype: Any) -> Any:
    """The rows' 4-D mask (rows x 1 x width x width): a token sees the earlier tokens of
    its own segment that are shared or of its own branch. Boolean (True: attend) for
    sdpa; added to the scores, 0 or the dtype's lowest, for eager attention."""
    import torch

    width = segment_ids.shape[-1]
    causal = torch.ones(width, width, dtype=torch.bool, device=segment_ids.device).tril()
    same_segment = segment_ids[:, :, None] == segment_ids[:, None, :]
    visible = (branches[:, None, :] == SHARED) | (branches[:, :, None] == branches[:, None, :])
    allowed = (same_segment & visible & causal)[:, None]
    if implementation == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


#: The attention implementations that take the rows' 4-D mask.
MASKED_ATTENTION = ("sdpa", "eager")


class SharedPromptCollator:
    """TRL's preference collator, with the same pairs as shared-prompt rows beside its
    batch (under ``ROWS_KEY``). The rows are padded to a multiple of ``multiple`` tokens,
    as TRL's batch is (``pad_to_multiple_of``)."""

    def __init__(self, collator: Callable[[list[dict[str, Any]]], dict[str, Any]]) -> None:
        self.collator = collator

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collator(examples)
        batch[ROWS_KEY] = pair_rows(
            examples,
            max_length=self.collator.max_length,
            pad_token_id=self.collator.pad_token_id,
            pair_width=batch["input_ids"].shape[1],
            multiple=self.collator.pad_to_multiple_of or 1,
        )
        return batch
