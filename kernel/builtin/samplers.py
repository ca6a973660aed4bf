"""Built-in samplers: ``random`` (seeded shuffle), ``length_grouped`` and ``modality_balanced``.

``length_grouped`` draws examples of similar length together so that, with packing
off, a batch pads little: it shuffles, cuts the order into mega-batches of
``batch_size * 50`` examples, sorts each by length, and shuffles the resulting batches
(so the model does not see lengths in order).

``modality_balanced`` gives every batch its share of each modality's examples (text,
pictures, sound, video: ``image_share``, ``audio_share``, ``video_share``; a modality without a share splits
what is left evenly with the others), spread evenly when a batch cannot hold the exact
share. The epoch ends when the modality that runs out last has been seen once; the
others are drawn again, in a new order each round, so skewed data never leaves a batch
without them. All are deterministic
for a seed.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence

from modelloop.hooks import hookimpl
from modelloop.specs import Sampler

MEGA_BATCHES = 50


def random_order(lengths: Sequence[int], *, batch_size: int, seed: int) -> Iterator[int]:
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    return iter(order)


def length_grouped_order(lengths: Sequence[int], *, batch_size: int, seed: int) -> Iterator[int]:
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    mega = max(1, batch_size * MEGA_BATCHES)
    batches = []
    for start in range(0, len(order), mega):
        chunk = sorted(order[start : start + mega], key=lambda index: -lengths[index])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return (index for batch in batches for index in batch)


def modality_balanced_order(
    lengths: Sequence[int],
    *,
    batch_size: int,
    seed: int,
    modalities: Sequence[str],
    image_share: float | None = None,
    audio_share: float | None = None,
    video_share: float | None = None,
) -> Iterator[int]:
    shares_given = (("image", image_share), ("audio", audio_share), ("video", video_share))
    given = {kind: share for kind, share in shares_given if share is not None}
    for kind, share in given.items():
        if not 0 < share < 1:
            raise ValueError(f"{kind}_share must be between 0 and 1, got {share}")
    rng = random.Random(seed)
    present = sorted(set(modalities), key=lambda kind: (kind == "text", kind))  # text last
    if len(present) < 2:  # one modality: nothing to balance
        return random_order(lengths, batch_size=batch_size, seed=seed)
    shares = _shares(present, given)
    pools = {kind: [index for index, modality in enumerate(modalities) if modality == kind] for kind in present}
    batches = max(math.ceil(len(pools[kind]) / (shares[kind] * batch_size)) for kind in present)
    draws = {kind: _rounds(pool, rng) for kind, pool in pools.items()}
    order = []
    for number in range(batches):
        # each modality's count in batch ``number``: the whole parts of the running
        # cumulative shares, so that any batch_size (even 1) averages exactly each share
        batch, below = [], 0.0
        for kind in present:
            above = below + shares[kind]
            count = _whole(number, above, batch_size) - _whole(number, below, batch_size)
            batch += [next(draws[kind]) for _ in range(count)]
            below = above
        rng.shuffle(batch)
        order += batch
    return iter(order)


def _shares(present: Sequence[str], given: dict[str, float]) -> dict[str, float]:
    """Each present modality's share of a batch: as given, the rest split evenly among
    the others (text takes what is left when every other share is given)."""
    unset = [kind for kind in present if kind not in given]
    fixed = {kind: share for kind, share in given.items() if kind in present}
    left = 1 - sum(fixed.values())
    if left <= 0 and unset:
        raise ValueError(f"the shares given ({', '.join(f'{k}_share' for k in fixed)}) leave nothing for {unset[0]}")
    shares = {kind: fixed.get(kind, left / len(unset) if unset else 0.0) for kind in present}
    if not unset:  # every share given: text (or the last) takes what is left
        shares[present[-1]] += left
    return shares


def _whole(number: int, share: float, batch_size: int) -> int:
    """How many of ``(number + 1) * batch_size`` draws a running ``share`` holds."""
    return math.floor((number + 1) * share * batch_size + 1e-9) - math.floor(number * share * batch_size + 1e-9)


def _rounds(pool: list[int], rng: random.Random) -> Iterator[int]:
    """The pool in a new shuffled order each round, for ever."""
    while True:
        shuffled = list(pool)
        rng.shuffle(shuffled)
        yield from shuffled


SAMPLERS = (
    Sampler(name="random", description="seeded shuffle", order=random_order),
    Sampler(name="length_grouped", description="batches of similar length (less padding)", order=length_grouped_order),
    Sampler(
        name="modality_balanced",
        description="a set share of each modality (text, pictures, sound, video) in every batch",
        order=modality_balanced_order,
    ),
)


@hookimpl
def register_samplers(register):
    for sampler in SAMPLERS:
        register(sampler)
