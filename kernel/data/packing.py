"""Padding-free packing: many examples per row of ``max_length``, kept apart.

Examples are placed by best-fit decreasing (the fullest row that still has room), so
rows come out nearly full. Within a row, position ids restart at 0 for each example;
with no attention mask and no KV cache, transformers builds a block-diagonal causal
mask from them, so no token attends across examples. The first label of each packed
example is ignored, so no example learns to predict from the one before it.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from modelloop.data.labels import IGNORE
from modelloop.data.media import Media


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into bins of total length at most ``capacity``.

    Bins are found by their free space, kept as a sorted list of distinct free sizes
    (at most ``capacity + 1`` of them), so placing each item costs a bisect.
    """
    if any(length > capacity for length in lengths):
        raise ValueError(f"an example is longer than the row length {capacity}")
    bins: list[list[int]] = []
    by_free: dict[int, list[int]] = {}
    free_sizes: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        length = lengths[index]
        position = bisect.bisect_left(free_sizes, length)
        if position < len(free_sizes):
            free = free_sizes[position]
            bin_id = by_free[free].pop()
            if not by_free[free]:
                del by_free[free]
                free_sizes.pop(position)
        else:
            bin_id, free = len(bins), capacity
            bins.append([])
        bins[bin_id].append(index)
        left = free - length
        if left > 0:
            if left not in by_free:
                by_free[left] = []
                bisect.insort(free_sizes, left)
            by_free[left].append(bin_id)
    return bins


@dataclass(frozen=True)
class PackedRow:
    """Examples side by side: their tokens, labels and restarting positions, each
    example's length, and each example's media items (empty for text)."""

    input_ids: Any
    labels: Any
    position_ids: Any
    lengths: tuple[int, ...] = ()
    media: tuple[tuple[Media, ...], ...] = ()


def pack(
    input_ids: Sequence[Sequence[int]],
    labels: Sequence[Sequence[int]],
    max_length: int,
    media: Sequence[tuple[Media, ...]] | None = None,
) -> list[PackedRow]:
    """Pack tokenised examples into rows of at most ``max_length`` tokens (numpy int32 arrays)."""
    import numpy

    rows = []
    for members in best_fit_decreasing([len(ids) for ids in input_ids], max_length):
        row_labels = [numpy.array(labels[index], dtype=numpy.int32) for index in members]  # copies
        for example_labels in row_labels:
            example_labels[:1] = IGNORE  # the first token is never predicted from the previous example
        rows.append(
            PackedRow(
                numpy.concatenate([numpy.asarray(input_ids[index], dtype=numpy.int32) for index in members]),
                numpy.concatenate(row_labels),
                numpy.concatenate([numpy.arange(len(input_ids[index]), dtype=numpy.int32) for index in members]),
                tuple(len(input_ids[index]) for index in members),
                tuple(media[index] for index in members) if media is not None else tuple(() for _ in members),
            )
        )
    return rows


def padding_waste(lengths: Sequence[int], batch_size: int) -> float:
    """The share of a padded batch's tokens that are padding, batching in the given order."""
    padded = real = 0
    for start in range(0, len(lengths), batch_size):
        batch = lengths[start : start + batch_size]
        padded += max(batch) * len(batch)
        real += sum(batch)
    return 1 - real / padded if padded else 0.0


def padded_width(longest: int, multiple: int) -> int:
    """``longest`` rounded up to a multiple of ``multiple`` (the ranks a row is split over)."""
    return -(-longest // multiple) * multiple


def collate_packed(rows: Sequence[PackedRow], pad_token_id: int, multiple: int = 1) -> dict[str, Any]:
    """A batch of packed rows as tensors, padded to the longest row (to a multiple of
    ``multiple`` tokens, when sequence parallelism splits each row).

    No attention mask is returned: the position ids carry the example boundaries, which
    transformers honours only without a KV cache (hence ``use_cache=False``). The padding
    continues as one more block of positions, never attended by real tokens.
    """
    import numpy
    import torch

    width = padded_width(max(len(row.input_ids) for row in rows), multiple)
    input_ids = numpy.full((len(rows), width), pad_token_id, dtype=numpy.int64)
    labels = numpy.full((len(rows), width), IGNORE, dtype=numpy.int64)
    positions = numpy.tile(numpy.arange(width), (len(rows), 1))
    for number, row in enumerate(rows):
        size = len(row.input_ids)
        input_ids[number, :size] = row.input_ids
        labels[number, :size] = row.labels
        positions[number, :size] = row.position_ids
        positions[number, size:] = numpy.arange(width - size)
    return {
        "input_ids": torch.from_numpy(input_ids),
        "labels": torch.from_numpy(labels),
        "position_ids": torch.from_numpy(positions),
        "use_cache": False,  # with a cache, transformers ignores the boundaries in position_ids
    }


def collate_padded(
    input_ids: Sequence[Sequence[int]], labels: Sequence[Sequence[int]], pad_token_id: int, multiple: int = 1
) -> dict[str, Any]:
    """A batch of unpacked examples, right-padded (to a multiple of ``multiple`` tokens),
    with an attention mask and the position ids (which sequence parallelism needs once
    a row is split).

    Every tensor owns its memory: a GPU trainer pins batches, and ``pin_memory`` refuses
    a tensor whose elements share storage (an ``expand``-ed row of positions)."""
    import numpy
    import torch

    width = padded_width(max(len(ids) for ids in input_ids), multiple)
    batch_ids = numpy.full((len(input_ids), width), pad_token_id, dtype=numpy.int64)
    batch_labels = numpy.full((len(input_ids), width), IGNORE, dtype=numpy.int64)
    mask = numpy.zeros((len(input_ids), width), dtype=numpy.int64)
    for number, (ids, example_labels) in enumerate(zip(input_ids, labels)):
        batch_ids[number, : len(ids)] = ids
        batch_labels[number, : len(ids)] = example_labels
        mask[number, : len(ids)] = 1
    return {
        "input_ids": torch.from_numpy(batch_ids),
        "labels": torch.from_numpy(batch_labels),
        "attention_mask": torch.from_numpy(mask),
        "position_ids": torch.from_numpy(numpy.tile(numpy.arange(width), (len(input_ids), 1))),
    }
